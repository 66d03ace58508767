"""Build `assets/mouth_bank.npz`: real open mouths (teeth, tongue) for portraits that show none.

    python -m training.make_mouth_bank --cache cache [--count 8] [--out assets/mouth_bank.npz]

The warp renderer takes the inside of an opening mouth from the person's own open mouth; a portrait
with closed lips has none. For those, it borrows the inside of a real open mouth from this bank,
picked by lip colour and matched to the photo's lighting. At most one mouth per training person (never
a validation person): among up to CANDIDATES frames spread over each clip of a face at least
MIN_FACE_PX high whose inner-lip gap is open (MIN_GAP-MAX_GAP of the mouth width) and steady over 5
frames (a one-frame jump is a tracking slip), whose crop comes from inside the frame, whose inside
has a dark band, whose lips lean to red (a mouth, not a moustache the tracker took for one) and whose
upper teeth show (brighter than the lips by MIN_TEETH), the one with the brightest teeth × the
square root of its sharpness; the people's best mouths, best first. The mouth region is cut from a
256² aligned crop of the source frame, with the 59 mouth/jaw points relative to that cut.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import cv2
import numpy as np

from avatar import media
from avatar.config import AlignConfig
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, apply_transform, invert_transform, rescale_transform
from avatar.render.warp import inner_gap_ratio, inside_bands, lip_colour
from training.cache import open_cache

CROP = 256  # the bank's mouths are cut from crops of this side (the warp renderer's INNER_SIZE), from the source frames
MIN_GAP, MAX_GAP = 0.22, 0.5  # inner-lip gap over mouth width: open enough to show teeth, not a yawn
MIN_FACE_PX = 150  # the face's height in the source frame: smaller faces give blurred teeth at CROP
STEADY = 0.25  # the gap may differ from its 5-frame median by this fraction (a one-frame jump is a tracking slip)
MAX_DARKEST = 0.55  # an open mouth's darkest band is darker than this fraction of its lips' luma
CANDIDATES = 40  # open frames looked at per clip (spread over it)
MIN_TEETH = 1.25  # the upper teeth are at least this much brighter than the lips (`upper_teeth`)
MIN_LIP_HUE = 1.2  # lips lean to red (CIELAB a* at least this × b*); hair and skin the tracker took for lips lean to yellow


def mouth_box(mouth: np.ndarray, margin: float = 0.35) -> tuple:
    """Integer `(x0, y0, x1, y1)` round the lips (the first 40 points) with `margin` × the mouth width."""
    lips = mouth[:40]
    width = np.ptp(lips[:, 0])
    x0, y0 = np.floor(lips.min(axis=0) - margin * width).astype(int)
    x1, y1 = np.ceil(lips.max(axis=0) + margin * width).astype(int)
    return max(0, x0), max(0, y0), min(CROP, x1), min(CROP, y1)


def steady_gaps(gaps: np.ndarray) -> np.ndarray:
    """`(T,) bool`: frames whose gap is within STEADY of the median of the 5 frames around them."""
    padded = np.pad(gaps, 2, mode="edge")
    median = np.median(np.lib.stride_tricks.sliding_window_view(padded, 5), axis=1)
    return np.abs(gaps - median) <= STEADY * np.maximum(median, 1e-6)


def inside_frame(transform: np.ndarray, box: tuple, width: int, height: int) -> bool:
    """Whether the crop pixels of `box` come from inside the source frame (no repeated border)."""
    x0, y0, x1, y1 = box
    corners = apply_transform(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float64), invert_transform(transform))
    return bool((corners >= 0).all() and (corners[:, 0] <= width - 1).all() and (corners[:, 1] <= height - 1).all())


def darkest_band(patch: np.ndarray, mouth: np.ndarray) -> float:
    """The darkest of the `inside_bands` (less the two at the lips' edges) over the lips' luma."""
    bands = inside_bands(patch, mouth)
    if bands is None:
        return 1.0
    lips = cv2.cvtColor(np.uint8([[np.clip(lip_colour(patch, mouth), 0, 255)]]), cv2.COLOR_RGB2GRAY)[0, 0]
    return float(bands[1:-1].min() / max(float(lips), 1.0))


def lips_lean_red(patch: np.ndarray, mouth: np.ndarray) -> bool:
    """Whether the lips' colour leans to red rather than yellow (MIN_LIP_HUE)."""
    _, a, b = cv2.cvtColor(np.uint8([[np.clip(lip_colour(patch, mouth), 0, 255)]]), cv2.COLOR_RGB2LAB)[0, 0].astype(np.float64) - [0, 128, 128]
    return bool(a >= MIN_LIP_HUE * b)


def upper_teeth(patch: np.ndarray, mouth: np.ndarray) -> float:
    """How bright the upper teeth show: the brightest of the first `inside_bands` under the upper lip
    (its own edge band left out) over the lips' luma (teeth are brighter than lips; a dark hole or a
    tongue is not)."""
    bands = inside_bands(patch, mouth)
    if bands is None:
        return 0.0
    lips = cv2.cvtColor(np.uint8([[np.clip(lip_colour(patch, mouth), 0, 255)]]), cv2.COLOR_RGB2GRAY)[0, 0]
    return float(bands[1:6].max() / max(float(lips), 1.0))


def sharpness(patch: np.ndarray) -> float:
    """Variance of the Laplacian of the patch's luma."""
    return float(cv2.Laplacian(cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.make_mouth_bank", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--min-face-px", type=float, default=MIN_FACE_PX, help="smallest face height in the source frame")
    parser.add_argument("--min-teeth", type=float, default=MIN_TEETH, help="how much brighter than the lips the upper teeth must show")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/mouth_bank.npz"))
    args = parser.parse_args(argv)
    aligner = FaceAligner(AlignConfig(crop_size=CROP))
    best = {}  # person → (score, patch, mouth, description): their best-scoring open mouth
    for clip in open_cache(args.cache, split="train", kind="video"):
        landmarks = clip.landmarks(CROP)
        keep = clip.keep & np.isfinite(landmarks).all(axis=(1, 2)) & (clip.arrays["face_px"].astype(np.float32) >= args.min_face_px)
        gaps = np.array([inner_gap_ratio(p[lm.MOUTH_AND_JAW, :2]) if k else 0.0 for p, k in zip(landmarks, keep)])
        good = np.flatnonzero(keep & (gaps >= MIN_GAP) & (gaps <= MAX_GAP) & steady_gaps(gaps))
        good = good[np.linspace(0, good.size - 1, min(CANDIDATES, good.size)).round().astype(int)] if good.size else good
        wanted = set(int(i) for i in good)
        if not wanted:
            continue
        for index, (_, frame) in enumerate(media.iter_video_frames(args.data / clip.meta["file"])):
            if index > max(wanted):
                break
            if index not in wanted:
                continue
            mouth = landmarks[index][lm.MOUTH_AND_JAW, :2].astype(np.float32)
            box = mouth_box(mouth)
            transform = rescale_transform(clip.arrays["transforms"][index].astype(np.float64), 128, CROP)
            if not inside_frame(transform, box, int(clip.meta["width"]), int(clip.meta["height"])):
                continue
            x0, y0, x1, y1 = box
            patch = aligner.crop(frame, transform)[y0:y1, x0:x1]
            local = mouth - np.array([x0, y0], np.float32)
            if darkest_band(patch, local) > MAX_DARKEST or not lips_lean_red(patch, local):
                continue
            teeth = upper_teeth(patch, local)
            if teeth < args.min_teeth:
                continue
            score = teeth * np.sqrt(sharpness(patch))
            person = clip.meta["person"]
            if person not in best or score > best[person][0]:
                best[person] = (score, patch, local, f"{person} ({clip.clip_id} frame {index}, gap {gaps[index]:.2f}, "
                                                    f"teeth {teeth:.2f}, score {score:.1f})")
    chosen = sorted(best.values(), key=lambda item: -item[0])[: args.count]
    patches, mouths, people = [c[1] for c in chosen], [c[2] for c in chosen], [c[3] for c in chosen]
    if not patches:
        print(f"error: no open mouths found in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    size = max(max(p.shape[:2]) for p in patches)
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
