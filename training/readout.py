"""Linear read-out of speech features: how much of the mouth a ridge regression finds in them.

    python -m training.readout --cache cache [--model assets/speech.onnx] [--live] [--folds K] [--src ../shared/data]

The honest baseline for any motion model on the same features, and the way to compare speech
encoders without training one: a ridge regression from 5 stacked frames of features (the frame
and the 2 before and after; live: the frame and the 4 before, so it stays causal) to the mouth/jaw
offsets, fitted on the training people's kept frames, scored on the held-out people with the motion
model's mouth-opening correlation (frame-weighted over clips, and for the French speaker). With
`--model`, features come from that encoder ONNX, computed here from the clips' audio; without it,
from the cache (`training.speech_features`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
import typing

import numpy as np

from avatar import media
from avatar.face import landmarks as lm
from avatar.metrics import pearson
from training.cache import open_cache
from training.motion_data import MotionClip, clip_features, load_motion_clips

LAGS = 5  # the frames the read-out sees for each one (`stacked`)
LAMBDAS = (3e3, 3e4, 1e5)


def stacked(features: np.ndarray, live: bool) -> np.ndarray:
    """`(T, D)` → `(T, LAGS·D)`: each frame with its neighbours, oldest first (clamped at the ends):
    centred offline, the frame and the LAGS − 1 before it live (causal)."""
    lags = range(1 - LAGS, 1) if live else range(-(LAGS // 2), LAGS - LAGS // 2)
    index = np.arange(len(features))
    return np.concatenate([features[np.clip(index + lag, 0, len(features) - 1)] for lag in lags], axis=1)


def ridge_readout(train: typing.Sequence[MotionClip], val: typing.Sequence[MotionClip],
                  features: typing.Mapping[str, np.ndarray], live: bool,
                  lambdas: typing.Sequence[float] = LAMBDAS) -> typing.Dict[float, typing.Dict[str, float]]:
    """Per λ: held-out opening r (frame-weighted) and per person. `features`: clip id → `(T, D)` at its frames."""
    inputs = {c.clip_id: stacked(features[c.clip_id], live) for c in list(train) + list(val)}
    x = np.concatenate([inputs[c.clip_id][c.keep] for c in train]).astype(np.float64)
    y = np.concatenate([c.offsets[c.keep].reshape(int(c.keep.sum()), -1) for c in train]).astype(np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    gram, cross = (x - x_mean).T @ (x - x_mean), (x - x_mean).T @ (y - y_mean)
    results = {}
    for lam in lambdas:
        weights = np.linalg.solve(gram + lam * np.eye(len(gram)), cross)
        row, rs, frames = {}, [], []
        for clip in val:
            offsets = ((inputs[clip.clip_id] - x_mean) @ weights + y_mean).reshape(len(clip.keep), -1, 2)
            predicted = clip.rest[None] + offsets * clip.width
            r = pearson(lm.inner_gap(predicted)[clip.keep], lm.inner_gap(clip.mouth)[clip.keep])
            rs.append(r)
            frames.append(int(clip.keep.sum()))
            row[clip.person] = r
        row["all"] = float(np.average(rs, weights=frames))
        results[lam] = row
    return results


def person_folds(clips: typing.Sequence[MotionClip], folds: int) -> typing.Iterator[typing.Tuple[typing.List[MotionClip], typing.List[MotionClip]]]:
    """The clips split `folds` ways by person (people dealt round-robin in name order): for each fold,
    (the other people's clips, its own)."""
    people = sorted({c.person for c in clips})
    if len(people) < folds:
        raise ValueError(f"{len(people)} people cannot make {folds} folds")
    for k in range(folds):
        held = set(people[k::folds])
        yield [c for c in clips if c.person not in held], [c for c in clips if c.person in held]


def folds_readout(clips: typing.Sequence[MotionClip], features: typing.Mapping[str, np.ndarray], live: bool,
                  folds: int) -> typing.Dict[float, typing.Dict[str, float]]:
    """Per λ: opening r over `clips` by `person_folds`, frame-weighted over the folds (each fold's people
    are never in its fit)."""
    scores: typing.Dict[float, typing.List[typing.Tuple[float, int]]] = {}
    for fit, held in person_folds(clips, folds):
        frames = sum(int(c.keep.sum()) for c in held)
        for lam, row in ridge_readout(fit, held, features, live).items():
            scores.setdefault(lam, []).append((row["all"], frames))
    return {lam: {"all": float(np.average([r for r, _ in rows], weights=[n for _, n in rows]))}
            for lam, rows in scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.readout", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--model", type=pathlib.Path, help="a speech encoder ONNX (default: the cached features)")
    parser.add_argument("--live", action="store_true", help="live features (default: offline)")
    parser.add_argument("--folds", type=int, help="score the training people in K folds by person (not the held-out ones)")
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("../shared/data"))
    parser.add_argument("--live-right", type=int, help="with --model: encoder frames of audio each live frame waits for "
                        "(SpeechConfig.live_right)")
    parser.add_argument("--live-phase", type=int, help="with --model: where live windows end (SpeechConfig.live_phase)")
    parser.add_argument("--live-window", type=int, help="with --model: encoder frames each live window hears "
                        "(SpeechConfig.live_window)")
    args = parser.parse_args(argv)
    if args.model is None and any(v is not None for v in (args.live_right, args.live_phase, args.live_window)):
        print("error: --live-right, --live-phase and --live-window change how features are computed: give --model too "
              "(the cached features are fixed)", file=sys.stderr)
        return 2
    train, val = load_motion_clips(args.cache, "train"), load_motion_clips(args.cache, "val")
    if not train or not val:
        print(f"error: no clips with speech features in {args.cache}; run training.preprocess and training.speech_features",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    needed = train if args.folds else train + val  # choosing by folds never computes the held-out people's features
    if args.model is None:
        features = {c.clip_id: clip_features(c, args.live) for c in needed}
        source = "cached features"
    else:
        from avatar.config import SpeechConfig
        from avatar.speech.encoder import SpeechEncoder, interpolate_frames

        changes = {name: value for name, value in (("live_right", args.live_right), ("live_phase", args.live_phase),
                                                   ("live_window", args.live_window)) if value is not None}
        # the float graph, as `training.speech_features` computes the features the models are trained on
        encoder = SpeechEncoder(args.model, config=dataclasses.replace(SpeechConfig(), live_int8=False, **changes))
        print(f"look-ahead at most {encoder.lookahead_ms:.1f} ms")
        files = {c.clip_id: c.meta["file"] for c in open_cache(args.cache, kind="video")}
        features = {c.clip_id: interpolate_frames(encoder.features(media.read_audio(args.src / files[c.clip_id], 16000), live=args.live),
                                                  c.frame_pos - 50.0 * c.pad_s[0])  # the cache's positions include its head pad
                    for c in needed}
        source = str(args.model)
    if args.folds:
        results = folds_readout(train, features, args.live, args.folds)
        scored = f"{len(train)} training clips in {args.folds} folds by person"
    else:
        results = ridge_readout(train, val, features, args.live)
        scored = f"{len(train)} training clips, {len(val)} held-out"
    print(f"ridge read-out of {'live' if args.live else 'offline'} features ({source}; {scored}; "
          f"{time.perf_counter() - started:.0f} s)")
    for lam, row in results.items():
        french = f", French {row['french']:.2f}" if "french" in row else ""
        print(f"  λ {lam:>8.0f}: opening r {row['all']:.3f}{french}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
