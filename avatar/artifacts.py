"""The per-frame artifact check: a cheap look at every output frame's repainted region, beside the
sampled identity check (`avatar/identity.py`).

    check = ArtifactCheck(ArtifactConfig())
    verdict = check(output, source, alpha, landmarks, target_landmarks)   # .ok, the measures, .failures

The renderers only move and redraw the lower face, so in a good frame the repainted skin (the
repaint region less the lips as they were and as they are drawn) keeps the input's colours and its
fine detail, and nothing is repainted outside the face. The tests, each against the frame the output
was made from (`source`), with what they measured on clean warp and diffusion outputs (6 real dubs
and 10 portraits from ../shared/data, 16-50 frames each) and on corrupted ones:
- colour: ΔE (CIE76) between the mean CIELAB colour of the repainted skin in the output and in the
  source, on the skin's box scaled to about 48 px (clean: at most 4.1; a patch of the frame's
  background over half the mouth region: flagged);
- new colours: the share of the repainted skin whose colour the source has nowhere near it (within
  `colour_reach` of the skin's size, closer than `new_colour_delta`): a renderer moves the person's
  pixels a little, it does not bring colours that were not there (clean: at most 0.6%; a
  flat grey patch over a GRID speaker's chin: 9%);
- detail: mean absolute Laplacian of the repainted skin, output / source (clean 0.70-1.0; the same
  frames blurred at 2-4 px 0.24-0.40; squared energy separates less: a few strong edges dominate it),
  and the same in the flattest cell of a CELLS × CELLS grid on the skin (clean at least 0.34: where
  the chin moves over smooth background the texture legitimately thins);
- outside: share of the repaint (weight over 0.5, not its feathered edge) outside the face's outline
  (as it is ∪ as it will be with the target mouth, grown by `face_margin` × the face's height); the
  repaint mask is kept inside the face (`FaceAligner.repaint_mask`), so this catches a renderer that
  paints beyond its mask.
All images are `(h, w, 3) uint8` RGB of one region (a frame's face region, or an aligned crop),
`alpha (h, w) float32` in [0, 1] the repaint weight, landmarks `(478, 2+)` in that region's pixels.
"""

from __future__ import annotations

import dataclasses
import typing

import cv2
import numpy as np

from avatar.config import ArtifactConfig
from avatar.face import landmarks as lm
from avatar.face.align import polygon_mask

CELLS = 4  # the repainted skin is judged in a CELLS × CELLS grid of cells
CHANNEL_SUM = np.ones((1, 3), np.float32)  # cv2.transform's matrix: the sum of three channels
LAB_SCALE = np.array([100 / 255, 1.0, 1.0], np.float32)  # OpenCV's 8-bit CIELAB: L is 0-255, a and b offset by 128


@dataclasses.dataclass
class Verdict:
    """What the check measured on one frame, and the failures (empty: the frame is fine)."""

    colour_delta: float
    new_colour: float
    detail_ratio: float
    cell_detail: float
    outside_share: float
    failures: typing.List[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        return "; ".join(self.failures) or "ok"


def cell_sums(image: np.ndarray, rows: slice, columns: slice) -> float:
    """The sum of `image`'s pixels in `rows` × `columns`, from its integral image `(h + 1, w + 1)`
    (`cv2.integral`)."""
    return float(image[rows.stop, columns.stop] - image[rows.start, columns.stop]
                 - image[rows.stop, columns.start] + image[rows.start, columns.start])


def cell_grid(skin: np.ndarray, counts: typing.Optional[np.ndarray] = None) -> typing.List[typing.Tuple[int, int, slice, slice]]:
    """`(row, column, rows, columns)` of the cells of a CELLS × CELLS grid on the skin's bounding box
    that hold at least 1/(2 CELLS²) of the skin; `counts`: the skin's integral image, if made already."""
    x, y, w, h = cv2.boundingRect(skin.astype(np.uint8))
    rows = np.linspace(y, y + h, CELLS + 1).astype(int)
    cols = np.linspace(x, x + w, CELLS + 1).astype(int)
    counts = cv2.integral(skin.astype(np.uint8)) if counts is None else counts
    least = max(16, int(counts[-1, -1]) // (2 * CELLS * CELLS))
    cells = [(i, j, slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1])) for i in range(CELLS) for j in range(CELLS)]
    return [cell for cell in cells if cell_sums(counts, cell[2], cell[3]) >= least]


def colour_measures(output: np.ndarray, source: np.ndarray, skin: np.ndarray, reach: float,
                    threshold: float) -> typing.Tuple[float, float]:
    """On the skin's bounding box scaled to about 48 px (`output`, `source`: RGB of that box): the ΔE
    between the skin's mean CIELAB colours, and the share of the skin whose colour the source does not
    have nearby (no source pixel within `reach` × the box's size closer than `threshold` ΔE: a renderer
    moves the person's pixels a little, it does not bring new colours)."""
    scale = min(1.0, 48.0 / max(skin.shape))
    size = (max(1, round(skin.shape[1] * scale)), max(1, round(skin.shape[0] * scale)))
    lab = lambda image: cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB).astype(np.float32) * LAB_SCALE
    small_out, small_src = lab(output), lab(source)
    small_skin = cv2.resize(skin.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    if not small_skin.any():
        return 0.0, 0.0
    colour_delta = float(np.linalg.norm(small_out[small_skin].mean(axis=0) - small_src[small_skin].mean(axis=0)))
    radius = max(1, int(round(reach * max(size))))
    step = max(1, radius // 3)
    padded = cv2.copyMakeBorder(small_src, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
    nearest = np.full(small_skin.shape, np.inf, np.float32)
    for dy in range(-radius, radius + 1, step):  # OpenCV's operations: numpy's cost 3.6× as much on these small arrays
        for dx in range(-radius, radius + 1, step):
            difference = cv2.subtract(small_out, padded[radius + dy:radius + dy + size[1], radius + dx:radius + dx + size[0]])
            nearest = cv2.min(nearest, cv2.transform(cv2.multiply(difference, difference), CHANNEL_SUM))
    return colour_delta, float((nearest[small_skin] > threshold ** 2).mean())


def flattest_cell(detail_out: np.ndarray, detail_src: np.ndarray, skin: np.ndarray) -> float:
    """The smallest detail ratio (`detail_*`: absolute Laplacians) over the cells of `cell_grid`."""
    weight = skin.astype(np.float32)
    counts = cv2.integral(skin.astype(np.uint8))
    out_sums = cv2.integral(cv2.multiply(detail_out, weight), sdepth=cv2.CV_64F)
    src_sums = cv2.integral(cv2.multiply(detail_src, weight), sdepth=cv2.CV_64F)
    return min((cell_sums(out_sums, r, c) / max(cell_sums(src_sums, r, c), 1e-3 * cell_sums(counts, r, c))
                for _, _, r, c in cell_grid(skin, counts)), default=1.0)


class ArtifactCheck:
    """See the module docstring; `config.enabled` False: every frame passes unmeasured."""

    def __init__(self, config: ArtifactConfig = ArtifactConfig()):
        self.config = config

    def __call__(self, output: np.ndarray, source: np.ndarray, alpha: np.ndarray, landmarks: np.ndarray,
                 target_landmarks: np.ndarray) -> Verdict:
        config = self.config
        core = alpha > 0.5  # the repaint itself, not its feathered edge
        if not config.enabled or not core.any():
            return Verdict(0.0, 0.0, 1.0, 1.0, 0.0, [])
        failures = []
        # outside the face: the repaint's distance from the face outlines, in pixels
        landmarks, target_landmarks = np.asarray(landmarks)[:, :2], np.asarray(target_landmarks)[:, :2]
        face = polygon_mask(landmarks[lm.FACE_OVAL], alpha.shape) | polygon_mask(target_landmarks[lm.FACE_OVAL], alpha.shape)
        distance = cv2.distanceTransform((~face).astype(np.uint8), cv2.DIST_L2, 3)
        grow = config.face_margin * float(np.ptp(landmarks[lm.FACE_OVAL, 1]))
        outside_share = float((core & (distance > grow)).sum()) / int(core.sum())
        if outside_share > config.max_outside_share:
            failures.append(f"{100 * outside_share:.0f}% of the repaint lies outside the face (> {100 * config.max_outside_share:g}%)")
        # the skin: the repaint less the lips, within its bounding box
        x, y, w, h = cv2.boundingRect(core.view(np.uint8))
        box = slice(y, y + h), slice(x, x + w)
        offset = np.array([x, y], np.float64)
        shape = core[box].shape
        lips = polygon_mask(landmarks[lm.LIPS_OUTER] - offset, shape) | polygon_mask(target_landmarks[lm.LIPS_OUTER] - offset, shape)
        skin = core[box] & ~cv2.dilate(lips.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        colour_delta, new_colour, detail_ratio, cell_detail = 0.0, 0.0, 1.0, 1.0
        if skin.sum() >= 64:
            output, source = output[box], source[box]
            colour_delta, new_colour = colour_measures(output, source, skin, config.colour_reach, config.new_colour_delta)
            detail_out = np.abs(cv2.Laplacian(cv2.cvtColor(output, cv2.COLOR_RGB2GRAY), cv2.CV_32F))
            detail_src = np.abs(cv2.Laplacian(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY), cv2.CV_32F))
            detail_ratio = float(detail_out[skin].mean() / max(detail_src[skin].mean(), 1e-3))
            cell_detail = flattest_cell(detail_out, detail_src, skin)
            if colour_delta > config.colour_threshold:
                failures.append(f"colour of the repainted skin changed by ΔE {colour_delta:.1f} (> {config.colour_threshold:g})")
            if new_colour > config.max_new_colour_share:
                failures.append(f"{100 * new_colour:.0f}% of the repainted skin has colours the input has nowhere near "
                                f"(> {100 * config.max_new_colour_share:g}%)")
            if detail_ratio < config.min_detail_ratio:
                failures.append(f"repainted skin smeared: detail {detail_ratio:.2f} of the input's (< {config.min_detail_ratio:g})")
            if cell_detail < config.min_cell_detail_ratio:
                failures.append(f"a flat patch in the repainted skin: detail {cell_detail:.2f} of the input's there "
                                f"(< {config.min_cell_detail_ratio:g})")
        return Verdict(colour_delta, new_colour, detail_ratio, cell_detail, outside_share, failures)

