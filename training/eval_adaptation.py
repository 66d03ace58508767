"""Held-out figures of the per-person motion adaptation (`avatar/motion/adapt.py`) on the preprocessing cache.

    python -m training.eval_adaptation --cache cache

For each validation clip of at least 150 frames: the adaptation is fitted (as enrollment fits it) on
the speaking frames of the first 60%, and the general and the adapted motion are measured against the
tracked mouths on the last 40%, for the offline and the live model: the mouth-opening r, the lips
and jaw distance (mean L1 per coordinate, % of the inter-ocular distance; the rest pose beside) and
the amplitude (the inner-lip gap's spread over the real one's). A `dub` fits the adaptation on the
video it dubs, so this is what it sees. No rendering: these are the model's own mouths
(`benchmarks.enroll` measures the rendered result).
The cache keeps 2D landmarks, so here the tracked mouths have only the anchor's shift taken out;
enrollment takes the whole head pose out (3D, `PosedRest.offsets_of`; its effect rendered:
`benchmarks.enroll`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import typing

import numpy as np

from avatar.face import landmarks as lm
from avatar.metrics import mouth_landmark_distance, pearson
from avatar.motion.adapt import fit_adaptation
from avatar.motion.runner import MotionPredictor
from training.motion_data import clip_features, load_motion_clips
from training.motion_eval import JAW, LIPS

MIN_FRAMES, SPLIT = 150, 0.6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval_adaptation", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--split", default="val", choices=("val", "train"),
                        help="train: the people the general model learned from (how often the adaptation is kept there, and what it does)")
    args = parser.parse_args(argv)
    clips = [c for c in load_motion_clips(args.cache, args.split) if c.n_frames >= MIN_FRAMES] if (args.cache / "clips").is_dir() else []
    if not clips:
        print(f"error: no {args.split} clips of at least {MIN_FRAMES} frames with speech in {args.cache}; run training.preprocess "
              "and training.speech_features first", file=sys.stderr)
        return 2
    offline, live = MotionPredictor(live=False), MotionPredictor(live=True)
    rows, frames = [], []
    for clip in clips:
        cut = int(SPLIT * clip.n_frames)
        real = clip.mouth - clip.anchor_shift[:, None]  # the head's shift taken out, as the model's output
        features, live_features = clip_features(clip, False), clip_features(clip, True)
        general, general_live = offline.predict(features, clip.rest), live.predict(live_features, clip.rest)
        fit = clip.keep & (clip.vad > 0.5) & (np.arange(clip.n_frames) < cut)
        adaptation, why = fit_adaptation(features, general, np.nan_to_num(real), clip.rest, fit, offline.models)
        test = clip.keep & (np.arange(clip.n_frames) >= cut)
        adapted = adaptation.apply(features, general, clip.rest) if adaptation else general
        adapted_live = (adaptation.apply(live.encoder.own_rows(live_features), general_live, clip.rest, smooth=False)
                        if adaptation else general_live)  # the live model's adaptation reads each frame's own row
        rest = np.broadcast_to(clip.rest, general.shape)
        row = {"rest": measure(rest, real, clip.iod, test)}
        for name, mouths in (("offline", general), ("offline adapted", adapted), ("live", general_live), ("live adapted", adapted_live)):
            row[name] = measure(mouths, real, clip.iod, test)
        rows.append(row)
        frames.append(int(test.sum()))
        chosen = (f"λ {adaptation.lam:g}" if np.isfinite(adaptation.lam) else f"amplitude × {adaptation.gain:.2f}") if adaptation \
            else f"none ({why})"
        print(f"{clip.person} ({int(fit.sum())} speaking frames fitted, {chosen}; {frames[-1]} frames scored):")
        print(format_rows(row), flush=True)
    weights = np.array(frames, np.float64) / sum(frames)
    mean = {name: tuple(float(sum(w * row[name][k] for w, row in zip(weights, rows))) for k in range(4)) for name in rows[0]}
    print(f"all {len(rows)}, frame-weighted ({sum(frames)} frames):")
    print(format_rows(mean))
    return 0


def measure(mouths: np.ndarray, real: np.ndarray, iod: float, test: np.ndarray) -> typing.Tuple[float, float, float, float]:
    """(opening r, lips L1, jaw L1 (%IOD), amplitude) of `mouths (T, K, 2)` against `real` on the `test` frames."""
    gap, real_gap = lm.inner_gap(mouths)[test], lm.inner_gap(real)[test]
    return (pearson(gap, real_gap) if gap.std() > 0 else float("nan"), mouth_landmark_distance(mouths[:, LIPS], real[:, LIPS], iod, test),
            mouth_landmark_distance(mouths[:, JAW], real[:, JAW], iod, test), float(gap.std() / max(real_gap.std(), 1e-9)))


def format_rows(row: typing.Mapping[str, typing.Tuple[float, float, float, float]]) -> str:
    return "\n".join(f"  {name:16s} r {r:6.3f}  lips {lips:.3f}  jaw {jaw:.3f}  amplitude {amplitude:.2f}"
                     for name, (r, lips, jaw, amplitude) in row.items())


if __name__ == "__main__":
    sys.exit(main())
