"""Held-out figures of the per-person motion adaptation (`avatar/motion/adapt.py`) on the preprocessing cache.

    python -m training.eval_adaptation --cache cache

For each validation clip of at least 150 frames: the adaptation is fitted (as enrollment fits it) on
the speaking frames of the first 60%, and the mouth-opening r of the general and the adapted motion
against the tracked mouths is measured on the last 40%, for the offline and the live model. No
rendering: these are the model's own mouths (`benchmarks.enroll` measures the rendered result).
The cache keeps 2D landmarks, so here the tracked mouths have only the anchor's shift taken out;
enrollment takes the whole head pose out (3D, `PosedRest.offsets_of`; its effect rendered:
`benchmarks.enroll`).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from avatar.face import landmarks as lm
from avatar.metrics import pearson
from avatar.motion.adapt import fit_adaptation
from avatar.motion.runner import MotionPredictor
from training.motion_data import clip_features, load_motion_clips

MIN_FRAMES, SPLIT = 150, 0.6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.eval_adaptation", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    offline, live = MotionPredictor(live=False), MotionPredictor(live=True)
    rows = []
    for clip in [c for c in load_motion_clips(args.cache, "val") if c.n_frames >= MIN_FRAMES]:
        cut = int(SPLIT * clip.n_frames)
        real = clip.mouth - clip.anchor_shift[:, None]  # the head's shift taken out, as the model's output
        features, live_features = clip_features(clip, False), clip_features(clip, True)
        general, general_live = offline.predict(features, clip.rest), live.predict(live_features, clip.rest)
        fit = clip.keep & (clip.vad > 0.5) & (np.arange(clip.n_frames) < cut)
        adaptation, why = fit_adaptation(features, general, np.nan_to_num(real), clip.rest, fit, offline.models)
        test = clip.keep & (np.arange(clip.n_frames) >= cut)
        r = lambda mouths: pearson(lm.inner_gap(mouths)[test], lm.inner_gap(real)[test])
        adapted = adaptation.apply(features, general, clip.rest) if adaptation else general
        adapted_live = adaptation.apply(live_features, general_live, clip.rest, smooth=False) if adaptation else general_live
        row = (r(general), r(adapted), r(general_live), r(adapted_live))
        rows.append(row)
        chosen = f"λ {adaptation.lam:g}" if adaptation else f"none ({why})"
        print(f"{clip.person} ({int(fit.sum())} speaking frames fitted, {chosen}): offline {row[0]:.2f} → {row[1]:.2f}, "
              f"live {row[2]:.2f} → {row[3]:.2f}", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"mean of {len(rows)}: offline {mean[0]:.3f} → {mean[1]:.3f}, live {mean[2]:.3f} → {mean[3]:.3f}")


if __name__ == "__main__":
    main()
