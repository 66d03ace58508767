"""Build `assets/mouth_bank.npz`: real open mouths (teeth, tongue) for portraits that show none.

    python -m training.make_mouth_bank --cache cache [--count 8] [--out assets/mouth_bank.npz]

The warp renderer takes the inside of an opening mouth from the person's own open mouth; a portrait
with closed lips has none. For those, it borrows the inside of a real open mouth from this bank,
picked by lip colour and matched in brightness. One mouth per training person (never a validation
person): the clip's frame with the widest inner-lip gap among the sharp, frontal, usable frames,
the mouth region cut from its 128² aligned crop with the 59 mouth/jaw points relative to that cut.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import cv2
import numpy as np

from avatar import media
from avatar.face import landmarks as lm
from avatar.render.warp import inner_gap_ratio
from training.cache import open_cache

CROP = 128
MIN_GAP, MAX_GAP = 0.22, 0.6  # inner-lip gap over mouth width: open enough to show teeth, not a yawn


def mouth_box(mouth: np.ndarray, margin: float = 0.35) -> tuple:
    """Integer `(x0, y0, x1, y1)` round the lips (the first 40 points) with `margin` × the mouth width."""
    lips = mouth[:40]
    width = np.ptp(lips[:, 0])
    x0, y0 = np.floor(lips.min(axis=0) - margin * width).astype(int)
    x1, y1 = np.ceil(lips.max(axis=0) + margin * width).astype(int)
    return max(0, x0), max(0, y0), min(CROP, x1), min(CROP, y1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.make_mouth_bank", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/mouth_bank.npz"))
    args = parser.parse_args(argv)
    best = {}  # person → (score, clip, frame)
    for clip in open_cache(args.cache, split="train", kind="video"):
        landmarks = clip.landmarks(CROP)
        keep = clip.keep & np.isfinite(landmarks).all(axis=(1, 2))
        if not keep.any():
            continue
        gaps = np.array([inner_gap_ratio(p[lm.MOUTH_AND_JAW, :2]) if k else 0.0 for p, k in zip(landmarks, keep)])
        good = np.flatnonzero(keep & (gaps >= MIN_GAP) & (gaps <= MAX_GAP))
        if good.size == 0:
            continue
        index = int(good[np.argmax(gaps[good])])
        score = float(gaps[index])
        person = clip.meta["person"]
        if person not in best or score > best[person][0]:
            best[person] = (score, clip, index)
    chosen = sorted(best.items(), key=lambda kv: -kv[1][0])[: args.count]
    if not chosen:
        print(f"error: no open mouths found in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    patches, mouths, people = [], [], []
    size = 0
    for person, (score, clip, index) in chosen:
        crop = clip.crops(CROP)[index]
        mouth = clip.landmarks(CROP)[index][lm.MOUTH_AND_JAW, :2].astype(np.float32)
        x0, y0, x1, y1 = mouth_box(mouth)
        patches.append(crop[y0:y1, x0:x1])
        mouths.append(mouth - np.array([x0, y0], np.float32))
        people.append(f"{person} ({clip.clip_id} frame {index}, gap {score:.2f})")
        size = max(size, y1 - y0, x1 - x0)
    # One array: each patch in the top-left corner of a square of the largest side, padded by edge repetition.
    canvas = np.stack([cv2.copyMakeBorder(p, 0, size - p.shape[0], 0, size - p.shape[1], cv2.BORDER_REPLICATE) for p in patches])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with media.atomic_output(args.out) as tmp, open(tmp, "wb") as f:  # a complete bank or the old one
        np.savez_compressed(f, patches=canvas, mouths=np.stack(mouths), crop_size=np.int32(CROP), people=np.array(people))
    print("\n".join(people))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB, {len(people)} mouths)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
