"""The offline motion model with its closure gate: where a linear read-out of the speech features says
the real lips close, the predicted mouth is pulled to rest (`avatar.motion.model.ClosureGated`).

    python -m training.closure_gate --cache cache --network assets/motion_offline.pt --out assets/motion_offline.onnx \
        --torch-copy assets/motion_offline.pt

The read-out: ridge regression, on the training people's kept frames, from 5 centred frames of
whole-utterance features (5 × 384) to "the real inner-lip gap is under 3 % of the inter-ocular
distance" (1, else 0; `training.closures.CLOSED_PCT_IOD`); λ by leave-people-out ranking (AUC) on the
training people. The gate's threshold (0.25) was chosen on the training people too: 4 offline networks
each trained without a quarter of them (`training.train_motion --fold k/4`, the shipped recipe), each
gated by a read-out fitted without the same quarter, scored on it (`assets/MODELS.md`). The network
is unchanged (its weights from the torch copy); the torch copy then holds the gate too (the live
model, trained before the gate, had the network alone as its teacher).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import typing

import numpy as np

from avatar.face import landmarks as lm
from avatar.motion.model import ClosureGated, MotionModel
from training.closures import CLOSED_PCT_IOD
from training.linear_motion import fit
from training.motion_data import MotionClip, clip_features, load_motion_clips
from training.readout import person_folds

LAGS = 5
LAMBDAS = (1e3, 1e4, 3e4, 1e5)
THRESHOLD = 0.25


def design(clips: typing.Sequence[MotionClip]) -> typing.Tuple[np.ndarray, np.ndarray]:
    """Stacked centred offline features `(N, LAGS·D)` (the ends repeated) and the closed label `(N,)`
    over the clips' kept frames."""
    xs, ys = [], []
    half = (LAGS - 1) // 2
    for clip in clips:
        features = clip_features(clip, live=False)
        index = np.clip(np.arange(len(features))[:, None] + np.arange(-half, LAGS - half)[None], 0, len(features) - 1)
        gap = lm.inner_gap(clip.mouth) / clip.iod * 100
        keep = clip.keep & np.isfinite(gap)
        xs.append(features[index].reshape(len(features), -1)[keep])
        ys.append((gap[keep] < CLOSED_PCT_IOD).astype(np.float64))
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The chance that a closed frame scores above an open one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positive = labels > 0.5
    n_closed, n_open = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_closed * (n_closed + 1) / 2) / (n_closed * n_open))


def choose_lambda(clips: typing.Sequence[MotionClip], folds: int = 4) -> typing.Tuple[float, typing.Dict[float, float]]:
    """The λ with the best frame-weighted AUC over leave-people-out folds of the training people (as
    many folds as people, when fewer)."""
    scores: typing.Dict[float, typing.List[typing.Tuple[float, int]]] = {}
    for fitted, held in person_folds(clips, min(folds, len({c.person for c in clips}))):
        x, y = design(fitted)
        x_held, y_held = design(held)
        for lam in LAMBDAS:
            weights, x_mean, y_mean = fit(x, y, lam)
            scores.setdefault(lam, []).append((auc((x_held - x_mean) @ weights + y_mean, y_held), len(y_held)))
    means = {lam: float(np.average([a for a, _ in rows], weights=[n for _, n in rows])) for lam, rows in scores.items()}
    return max(means, key=means.get), means


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.closure_gate", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--network", type=pathlib.Path, required=True, help="the offline network's torch copy (training.export_motion --torch-copy)")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="read-out value from which the mouth starts closing")
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save the gated model's torch copy here (the network's fp16 "
                        "state dict and config, the gate's weights; training.export_motion.load_model reads it)")
    args = parser.parse_args(argv)
    import dataclasses

    import torch

    from training.export_motion import export_checked, load_model

    network = load_model(args.network)
    if isinstance(network, ClosureGated):  # a copy gated before: its network, gated afresh
        network = network.network
    if not isinstance(network, MotionModel) or network.config.causal:
        print(f"error: {args.network} is not an offline network (MotionModel, not causal)", file=sys.stderr)
        return 2
    clips = load_motion_clips(args.cache, "train")
    if len({c.person for c in clips}) < 2:
        print(f"error: fewer than two training people with speech features in {args.cache}; run training.preprocess and "
              "training.speech_features", file=sys.stderr)
        return 2
    lam, means = choose_lambda(clips)
    print("leave-people-out AUC of the closure read-out on the training people: "
          + ", ".join(f"λ {k:g}: {v:.3f}" for k, v in means.items()))
    weights, x_mean, y_mean = fit(*design(clips), lam)
    model = ClosureGated.from_ridge(network, weights, x_mean, y_mean, args.threshold, LAGS).eval()
    worst = export_checked(model, args.out, 1e-3)
    if worst is None:
        return 1
    if args.torch_copy:
        torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()},
                    "model_config": dataclasses.asdict(network.config),
                    "closure": {f"conv.{k}": v for k, v in model.conv.state_dict().items()},
                    "closure_threshold": args.threshold, "closure_lambda": lam}, args.torch_copy)
    print(f"λ {lam:g} (cross-validated), threshold {args.threshold:g}; wrote {args.out} (ONNX parity {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
