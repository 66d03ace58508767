"""What viewers see on real portraits (issue 13's cases): a contact sheet of each mouth asked to open
step by step, and the figures a viewer would check.

    python -m benchmarks.artifacts [--sheet out/artifacts.png] [--portrait NAME=PATH ...]

Each portrait from ../shared/data (and the project's demo portrait) is rendered with its lower lip
and jaw dropped by 0, 0.1, 0.2, 0.3 and 0.45 mouth widths (warp renderer, no watermark). Printed per
portrait and opening: the re-detected inner-lip gap (%IOD), the height of the teeth rows (bright, not red) in
the middle third of the mouth against the photo's (1.0: teeth keep their height; more: stretched),
and the largest channel spread inside the mouth for grey photos (0: no hue the photo lacks).
"""

from __future__ import annotations

import argparse
import pathlib

import cv2
import numpy as np

from avatar import media
from avatar.config import PipelineConfig
from avatar.face import landmarks as lm
from avatar.pipeline import AvatarPipeline
from avatar.render.warp import inner_lip_curves

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "faces"
PORTRAITS = {
    "demo (smile, teeth)": REPO / "assets/samples/portrait.jpg",
    "obama (smile, teeth)": DATA / "ageitgey__face_recognition/obama.jpg",
    "art_1 (closed mouth)": DATA / "OpenTalker__SadTalker/art_1.png",
    "obama, grey": DATA / "ageitgey__face_recognition/obama.jpg",
    "art_1, grey": DATA / "OpenTalker__SadTalker/art_1.png",
}
OPENINGS = (0.0, 0.1, 0.2, 0.3, 0.45)
LOWER = np.r_[np.arange(11, 20), np.arange(31, 40), np.arange(40, 59)]  # lower lips and the jaw, in MOUTH_AND_JAW
TILE = (200, 180)


def teeth_threshold(image: np.ndarray, mouth: np.ndarray) -> float:
    """The brightness that tells a photo's teeth from the dark of its mouth: halfway between the 10th
    and 90th percentile of the luma in the box of its inner lips (`mouth (59, 2)`, image pixels)."""
    upper, lower = inner_lip_curves(mouth)
    box = image[int(upper[:, 1].min()):int(lower[:, 1].max()) + 1, int(upper[0, 0]):int(upper[-1, 0]) + 1]
    interior = cv2.cvtColor(box, cv2.COLOR_RGB2GRAY)
    return float(0.5 * (np.percentile(interior, 90) + np.percentile(interior, 10)))


def bright_rows(image: np.ndarray, upper: np.ndarray, lower: np.ndarray, threshold: float, not_red: bool = True) -> float:
    """Mean count per column of teeth pixels (brighter than `threshold` and, with `not_red`, not red:
    CIELAB a* < 12, where tongue and lips are redder) between the inner-lip curves, over the middle
    third of the mouth. `not_red=False`: by brightness alone (a warm video's teeth are reddish too)."""
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if not_red:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
        luma = np.where(lab[..., 1] - 128 < 12, luma, 0)
    left, right = upper[0, 0], upper[-1, 0]
    counts = []
    for x in np.arange(left + (right - left) / 3, right - (right - left) / 3):
        top = np.interp(x, *upper[np.argsort(upper[:, 0])].T)
        bottom = np.interp(x, *lower[np.argsort(lower[:, 0])].T)
        counts.append(float((luma[int(np.floor(top)):int(np.ceil(bottom)) + 1, int(round(x))] > threshold).sum()))
    return float(np.mean(counts))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sheet", type=pathlib.Path, default=pathlib.Path("out/artifacts.png"))
    args = parser.parse_args(argv)
    from avatar.face.tracker import FaceTracker

    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(watermark=False, workers=1))
    rows = []
    print(f"{'portrait':<22} {'opening':>7} {'gap %IOD':>8} {'teeth rows / photo':>18} {'grey spread':>11}")
    with FaceTracker() as tracker:
        for name, path in PORTRAITS.items():
            portrait = media.read_image(path)
            grey = name.endswith("grey")
            if grey:
                portrait = np.repeat(cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
            landmarks = tracker.select(portrait).landmarks
            identity = pipeline.prepare_image(portrait, landmarks)
            upper0, lower0 = inner_lip_curves(landmarks[lm.MOUTH_AND_JAW, :2])
            threshold = teeth_threshold(portrait, landmarks[lm.MOUTH_AND_JAW, :2])
            photo_teeth = bright_rows(portrait, upper0, lower0, threshold)
            centre = landmarks[lm.MOUTH_AND_JAW, :2][:40].mean(0)
            width = float(np.ptp(landmarks[lm.LIPS_OUTER, 0])) * 1.6
            tiles = []
            for amount in OPENINGS:
                mouth = identity.rest.copy()
                mouth[LOWER, 1] += amount * np.ptp(identity.rest[:20, 0])
                job = pipeline.still_job(identity, portrait, landmarks, mouth)
                out = pipeline.render_batch([job], [identity], [0])[0]
                target = cv2.transform(job.mouth[None].astype(np.float64), cv2.invertAffineTransform(job.transform))[0]
                upper, lower = inner_lip_curves(target)
                teeth = bright_rows(out, upper, lower, threshold) / photo_teeth if photo_teeth > 4 else float("nan")
                detected = tracker.select(out).landmarks
                gap = 100 * lm.mouth_opening(detected) / lm.interocular(detected)
                spread = np.ptp(out.astype(np.int16), axis=2).max() if grey else float("nan")
                print(f"{name:<22} {amount:>7.2f} {gap:>8.1f} {teeth:>18.2f} {spread:>11}")
                x0, y0 = int(centre[0] - width / 2), int(centre[1] - width / 2.6)
                tile = cv2.resize(out[max(0, y0):y0 + int(width / 1.1), max(0, x0):x0 + int(width)], TILE, interpolation=cv2.INTER_AREA)
                tiles.append(tile)
            rows.append(np.concatenate(tiles, axis=1))
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.sheet), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    print(f"contact sheet: {args.sheet} (rows: {', '.join(PORTRAITS)}; columns: openings {', '.join(map(str, OPENINGS))} mouth widths)")


if __name__ == "__main__":
    main()
