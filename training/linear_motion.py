"""Linear read-outs of speech features (`training.readout`) as motion models: fitted on the training
people and exported with the same ONNX contract as `MotionModel`, alone or with a trained network
(`--blend`: `MotionBlend`, both outputs; the runner weighs the read-out by voice activity). The live
one (default) and, with `--offline`, the offline one.

    python -m training.linear_motion --cache cache --out runs/linear/motion_live.onnx
    python -m training.linear_motion --cache cache --blend assets/motion_live.pt --out assets/motion_live.onnx \
        --torch-copy assets/motion_live.pt
    python -m training.linear_motion --cache cache --offline --blend assets/motion_offline.pt --out assets/motion_offline.onnx \
        --torch-copy assets/motion_offline.pt

Each frame's mouth and jaw offsets (in rest mouth widths) are a linear function of 5 frames of
features: live, that frame and the 4 before (no look-ahead beyond the encoder's); offline, the 2 on
either side too. λ is chosen by leave-people-out cross-validation on the training people only (5
folds; the held-out people are not looked at), then the model is refitted on all of them. Frames of
room tone and digital silence (`speech_noise.npz`) join the fit with the rest pose as their target.
Held-out figures: `python -m training.eval_motion --cache cache [--live] --model OUT`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import typing

import numpy as np
import torch

from avatar.config import MotionConfig
from avatar.face import landmarks as lm
from avatar.metrics import pearson
from avatar.motion.model import LinearMotionModel, MotionBlend, MotionModel
from training.motion_data import MotionClip, clip_features, load_motion_clips, load_noise_features
from training.readout import person_folds, stacked

LAMBDAS = (3e3, 1e4, 3e4, 1e5, 3e5)
FOLDS = 5
NOISE_SHARE = 0.1  # noise frames in the fit, as a share of the speech frames


def video_rate(noise: typing.Sequence[np.ndarray]) -> typing.List[np.ndarray]:
    """Noise features at 50 encoder frames/s → at 25 video frames/s (as the engine reads them)."""
    return [np.asarray(n, np.float32)[::2] for n in noise]


def design(clips: typing.Sequence[MotionClip], noise: typing.Sequence[np.ndarray],
           noise_share: float = NOISE_SHARE, live: bool = True) -> typing.Tuple[np.ndarray, np.ndarray]:
    """Stacked live features `(N, 5 D) float64` and offsets `(N, K·2)` of the clips' kept frames, then noise
    frames with zero offsets (the rest pose), `noise_share` of them."""
    x = [stacked(clip_features(c, live=live), live=live)[c.keep] for c in clips]
    y = [c.offsets[c.keep].reshape(int(c.keep.sum()), -1) for c in clips]
    n_speech = sum(len(part) for part in x)
    if noise:
        rows = np.concatenate([stacked(n, live=live) for n in video_rate(noise)])
        pick = np.random.default_rng(0).choice(len(rows), min(len(rows), int(noise_share * n_speech)), replace=False)
        x.append(rows[pick])
        y.append(np.zeros((len(pick), y[0].shape[1])))
    return np.concatenate(x).astype(np.float64), np.concatenate(y).astype(np.float64)


def fit(x: np.ndarray, y: np.ndarray, lam: float) -> typing.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge on centred data → (weights `(5 D, K·2)`, x mean, y mean)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    centred = x - x_mean
    weights = np.linalg.solve(centred.T @ centred + lam * np.eye(x.shape[1]), centred.T @ (y - y_mean))
    return weights, x_mean, y_mean


def opening_r(clips: typing.Sequence[MotionClip], weights, x_mean, y_mean, live: bool = True) -> float:
    """Frame-weighted opening r of the clips (as `training.readout`)."""
    rs, frames = [], []
    for clip in clips:
        offsets = ((stacked(clip_features(clip, live=live), live=live) - x_mean) @ weights + y_mean).reshape(len(clip.keep), -1, 2)
        predicted = clip.rest[None] + offsets * clip.width
        rs.append(pearson(lm.inner_gap(predicted)[clip.keep], lm.inner_gap(clip.mouth)[clip.keep]))
        frames.append(int(clip.keep.sum()))
    return float(np.average(rs, weights=frames))


def choose_lambda(clips: typing.Sequence[MotionClip], noise: typing.Sequence[np.ndarray],
                  noise_share: float = NOISE_SHARE, live: bool = True) -> typing.Tuple[float, typing.Dict[float, float]]:
    """λ by leave-people-out cross-validation: mean opening r over FOLDS folds of the people."""
    scores = {lam: [] for lam in LAMBDAS}
    for train, held in person_folds(clips, FOLDS):
        x, y = design(train, noise, noise_share, live)
        for lam in LAMBDAS:
            scores[lam].append(opening_r(held, *fit(x, y, lam), live=live))
    means = {lam: float(np.mean(values)) for lam, values in scores.items()}
    return max(means, key=means.get), means


def twitch_px(noise: typing.Sequence[np.ndarray], weights: np.ndarray, width: float, live: bool = True) -> float:
    """The largest frame-to-frame change of any point (px, at mouth `width`) over the noise sequences."""
    return max(float(np.abs(np.diff(stacked(n, live=live) @ weights, axis=0)).max()) for n in video_rate(noise)) * width


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.linear_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--offline", action="store_true", help="the offline model's (centred frames, whole-utterance features); "
                        "default: the live one's")
    parser.add_argument("--noise-share", type=float, default=NOISE_SHARE, help="noise frames (target: rest) per speech frame")
    parser.add_argument("--blend", type=pathlib.Path, help="a live network's torch copy (training.export_motion --torch-copy): "
                        "export the mean of it and the read-out")
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save the torch copy here: the read-out's weights, and with "
                        "--blend the network's fp16 state dict and config as export_motion's (training.export_motion.load_model reads it)")
    args = parser.parse_args(argv)
    network = None
    if args.blend is not None:
        state = torch.load(args.blend, map_location="cpu", weights_only=False)
        network = MotionModel(MotionConfig(**state["model_config"]))
        network.load_state_dict({k: v.float() for k, v in state["model"].items()})
        if network.config.causal == args.offline:
            print(f"error: {args.blend} is {'a live' if network.config.causal else 'an offline'} network; "
                  f"{'drop' if network.config.causal else 'add'} --offline", file=sys.stderr)
            return 2
    clips = load_motion_clips(args.cache, "train")
    if not clips:
        print(f"error: no training clips with speech features in {args.cache}; run training.preprocess and training.speech_features",
              file=sys.stderr)
        return 2
    live = not args.offline
    noise = load_noise_features(args.cache, "live" if live else "offline")
    lam, means = choose_lambda(clips, noise, args.noise_share, live)
    weights, x_mean, y_mean = fit(*design(clips, noise, args.noise_share, live), lam)
    twitch = twitch_px(noise, weights, float(np.median([c.width for c in clips])), live) if noise else 0.0
    print("leave-people-out opening r on the training people: " + ", ".join(f"λ {k:g}: {v:.3f}" for k, v in means.items())
          + f"; the read-out's largest frame-to-frame change on the training noise: {twitch:.2f} px (128-px crop)")
    linear = LinearMotionModel.from_ridge(weights, x_mean, y_mean, causal=live).eval()
    model = (MotionBlend(network, linear) if network is not None else linear).eval()
    from training.export_motion import export_checked

    worst = export_checked(model, args.out, 1e-3)
    if worst is None:
        return 1
    if args.torch_copy:
        copy = {"linear": linear.state_dict(), "lambda": lam}  # fp32: the shipped ONNX's own weights
        if network is not None:
            copy.update(model={k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()},
                        model_config=dataclasses.asdict(network.config))
        torch.save(copy, args.torch_copy)
    print(f"λ {lam:g} (cross-validated); wrote {args.out} (ONNX parity {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
