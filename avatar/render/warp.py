"""The warp renderer: the lower face moved to the target mouth with the person's own pixels.

A learned renderer needs far more training than a CPU affords; this one needs none and keeps every
pixel's sharpness and the person's identity, because it only moves what is there:

1. two thin-plate-spline warps (backward maps, from the target to where things are in the source
   crop) move lips, chin and jaw; fixed anchors (nose, eyes, the crop's border, a ring outside the
   repaint region) hold everything else in place. Both follow the outer lips and the jaw; one also
   the inner edge of the upper lip, the other that of the lower lip, and the output takes the first
   above the target's mouth line and the second below it. One smooth warp cannot close an open
   mouth (the lips' inner edges would have to land on the same line from two places); two can;
2. the inside of the mouth is composed of rows, never stretched (`teeth_rows`): the upper row (upper
   teeth) hangs from the target's upper inner lip, the lower row (lower teeth, tongue) rides on its
   lower inner lip, each keeping its height, with the dark of the mouth (the lips' colour darkened)
   between them; this happens where the target's lips part wider than the source's could supply,
   and where they part less than an open source's (the lips close over the teeth instead of
   squashing them; where they meet, `lips_meet`, the lips' own colour fills the hole). The rows
   come from the person's open-mouth reference; a smile showing only upper teeth borrows its lower
   row, and a person with no open mouth anywhere (most portraits) both rows, from
   `assets/mouth_bank.npz` (real open mouths of training people, `training/make_mouth_bank.py`),
   picked by lip colour and brought to the photo's lightness and chroma (`match_lighting`); with no
   bank either, the dark of the mouth alone;
3. the caller blends the result into the frame under the repaint mask (`mask` here only places
   the ring of fixed anchors).

Shapes: crops `(S, S, 3) uint8`; landmarks `(478, 2+)` and mouths `(59, 2)` (MOUTH_AND_JAW order),
all in that crop's pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import cv2
import numpy as np

from avatar.face import landmarks as lm
from avatar.face.align import dilate_disc, feathered_polygon, nonzero_box, polygon_mask
from avatar.face.landmarks import inner_gap_ratio, mouth_width

N_OUTER, N_INNER = len(lm.LIPS_OUTER), len(lm.LIPS_INNER)
INNER = slice(N_OUTER, N_OUTER + N_INNER)
N_LIPS = N_OUTER + N_INNER
# Both warps follow the outer lips and the jaw (so they agree everywhere but between the lips); the
# upper one also the inner edge of the upper lip, the lower one that of the lower lip.
SHARED = np.r_[np.arange(N_OUTER), np.arange(N_LIPS, N_LIPS + len(lm.JAW))]
UPPER = np.r_[SHARED, N_OUTER + np.arange(0, 11)]
LOWER = np.r_[SHARED, N_OUTER + np.arange(10, 20), N_OUTER]
FIXED_POINTS = np.array([1, 2, 4, 5, 6, 168, 33, 133, 263, 362, 98, 327, 64, 294, 129, 358, 50, 280, 117, 346])  # nose, eyes, cheeks
GRID_STEP = 4  # the spline is evaluated every GRID_STEP px and interpolated in between
SMOOTHING = 1e-3  # the splines' smoothing (added to their kernel's diagonal)
MIN_OPEN = 0.04  # inner-lip gap (× mouth width) below which a mouth counts as closed
MEETING_SHADE = 0.8  # the lips' colour × this fills the hole where the target's lips meet (`lips_meet`)


@dataclasses.dataclass
class InnerMouth:
    """An open mouth to take the inside of the mouth from: an image `(h, w, 3) uint8` (a whole crop
    or a patch of one) and its 59 mouth points in that image's pixels, at the scale of a crop of side
    `crop_size`; None → a shaded dark fill. `borrowed`: it is another person's (from the bank).
    `lower_row`: where the lower row (lower teeth, tongue) comes from when this mouth shows only its
    upper teeth (`teeth_split` 1, as in a smile): a bank mouth, or None (the cavity shows)."""

    crop: typing.Optional[np.ndarray]
    mouth: typing.Optional[np.ndarray]
    crop_size: int = 0
    borrowed: bool = False
    lower_row: typing.Optional["InnerMouth"] = None
    _sizes: typing.Dict[int, "InnerMouth"] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def usable(self) -> bool:
        """Whether there is an open mouth to take rows from."""
        return self.crop is not None and self.mouth is not None and inner_gap_ratio(self.mouth) > MIN_OPEN

    @functools.cached_property
    def split(self) -> float:
        """`teeth_split` of this mouth (measured once)."""
        return teeth_split(self)

    @functools.cached_property
    def lips_rgb(self) -> np.ndarray:
        """`lip_colour` of this mouth (measured once)."""
        return lip_colour(self.crop, self.mouth)

    def at(self, size: int) -> "InnerMouth":
        """The same open mouth at the scale of a crop of side `size` (made once per size; pixel-centre
        coordinates scale about -0.5)."""
        if self.crop is None or self.crop_size == size:
            return self
        if size not in self._sizes:
            from avatar.face.align import rescale_points

            k = size / self.crop_size
            h, w = self.crop.shape[:2]
            crop = cv2.resize(self.crop, (max(1, round(w * k)), max(1, round(h * k))),
                              interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
            lower_row = self.lower_row.at(size) if self.lower_row is not None else None
            self._sizes[size] = InnerMouth(crop, rescale_points(self.mouth, self.crop_size, size), size, self.borrowed, lower_row)
        return self._sizes[size]


BANK_FILE = "mouth_bank.npz"
RANK_COST = 2.0  # ΔE of lip colour that one place down the bank's quality order costs


@functools.lru_cache(maxsize=None)
def mouth_bank() -> typing.Tuple[InnerMouth, ...]:
    """The bundled open mouths (empty when the file is absent)."""
    from avatar.runtime import ASSETS

    path = ASSETS / BANK_FILE
    if not path.exists():
        return ()
    data = np.load(path)
    size = int(data["crop_size"])
    return tuple(InnerMouth(patch, mouth.astype(np.float64), size, True) for patch, mouth in zip(data["patches"], data["mouths"]))


def lip_band(mouth: np.ndarray, shape: typing.Tuple[int, int], origin: typing.Tuple[int, int] = (0, 0)) -> np.ndarray:
    """`(h, w) bool`: the lips of `mouth (59, 2)`, between its outer and inner contours, on an image
    whose pixel (0, 0) is pixel `origin` (x, y) of the mouth's."""
    mouth = np.asarray(mouth)
    return polygon_mask(mouth[:N_OUTER], shape, origin) & ~polygon_mask(mouth[INNER], shape, origin)


def lip_colour(image: np.ndarray, mouth: np.ndarray, origin: typing.Tuple[int, int] = (0, 0)) -> np.ndarray:
    """Mean RGB `(3,)` of the lips (`lip_band`; the whole image when they cover no pixel), on an image
    whose pixel (0, 0) is pixel `origin` (x, y) of the mouth's."""
    band = lip_band(mouth, image.shape[:2], origin)
    return image[band].reshape(-1, 3).astype(np.float64).mean(axis=0) if band.any() else image.reshape(-1, 3).mean(axis=0)


def lips_box(mouth: np.ndarray, size: int) -> typing.Tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)`: a box of the crop of side `size` holding every pixel of `lip_band(mouth)`."""
    outer = np.asarray(mouth, np.float64)[:N_OUTER]
    x0, y0 = np.clip(np.floor(outer.min(axis=0)).astype(int) - 1, 0, size)
    x1, y1 = np.clip(np.ceil(outer.max(axis=0)).astype(int) + 2, 0, size)
    return int(x0), int(y0), int(x1), int(y1)


def borrowed_mouth(image: np.ndarray, mouth: np.ndarray) -> InnerMouth:
    """The bank's mouth that suits these lips best, or an empty one: the closest lip colour (CIELAB
    ΔE) plus RANK_COST per place down the bank's order (best teeth first, `training/make_mouth_bank.py`),
    so a slightly closer colour does not win over clearly better teeth (`match_lighting` brings the
    chosen one to the photo's lightness and chroma anyway)."""
    bank = mouth_bank()
    if not bank:
        return InnerMouth(None, None)
    to_lab = lambda rgb: cv2.cvtColor(np.uint8([[np.clip(rgb, 0, 255)]]), cv2.COLOR_RGB2LAB)[0, 0].astype(np.float64)
    own = to_lab(lip_colour(image, mouth))
    costs = [float(np.linalg.norm(to_lab(entry.lips_rgb) - own)) + RANK_COST * rank for rank, entry in enumerate(bank)]
    return bank[int(np.argmin(costs))]


def open_inner(crop: np.ndarray, mouth: np.ndarray, crop_size: int) -> InnerMouth:
    """A frame's open mouth (`crop (S, S, 3) uint8`, `mouth (59, 2)` its pixels, S = `crop_size`) as
    the renderer's `InnerMouth`, with a bundled mouth's lower row when it shows only upper teeth; if
    the mouth is not open, the bundled open mouth that suits these lips best (`borrowed_mouth`)."""
    if inner_gap_ratio(mouth) <= MIN_OPEN:
        return borrowed_mouth(crop, mouth)
    own = InnerMouth(crop, np.asarray(mouth, np.float64), crop_size)
    if own.split >= 1.0:  # only the upper teeth show (a smile): the lower row is borrowed
        own.lower_row = borrowed_mouth(crop, mouth)
    return own


def _anchor_ring(size: int, mask: np.ndarray) -> np.ndarray:
    """Fixed points: the crop border and a ring just outside the repaint region."""
    border = np.linspace(0, size - 1, 9)
    points = [np.stack([border, np.zeros(9)], 1), np.stack([border, np.full(9, size - 1.0)], 1),
              np.stack([np.zeros(7), border[1:-1]], 1), np.stack([np.full(7, size - 1.0), border[1:-1]], 1)]
    region = (mask > 0.02).view(np.uint8)
    grow = max(2, size // 24)
    # dilated and traced in the region's box grown by the dilation and a pixel (the same contour as on the whole crop)
    x, y, w, h = cv2.boundingRect(region)
    x0, y0 = max(0, x - grow - 1), max(0, y - grow - 1)
    x1, y1 = min(size, x + w + grow + 1), min(size, y + h + grow + 1)
    ring = dilate_disc(region[y0:y1, x0:x1], grow)
    contours, _ = cv2.findContours(ring, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE) if w else ((), None)
    if contours:
        contour = max(contours, key=len)[:, 0, :].astype(np.float64) + (x0, y0)
        points.append(contour[np.linspace(0, len(contour) - 1, 24, endpoint=False).astype(int)])
    return np.concatenate(points)


def spline_kernel(d2: np.ndarray) -> np.ndarray:
    """The thin-plate spline's kernel r² log r from squared distances `d2` (any shape, float64), in place."""
    np.maximum(d2, 1e-300, out=d2)
    d2 *= np.log(d2)
    d2 *= 0.5
    return d2


def spline_points(target: np.ndarray, source: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
    """The thin-plate spline through `target (N, 2)` → `source (N, 2)`: its points `(n, 2) float64`
    (duplicates dropped) and their values, the shift source − target `(n, 2)`."""
    _, keep = np.unique(np.round(target, 2), axis=0, return_index=True)
    points = np.asarray(target, np.float64)[np.sort(keep)]
    return points, np.asarray(source, np.float64)[np.sort(keep)] - points


def spline_system(points: np.ndarray) -> np.ndarray:
    """The linear system of the thin-plate spline through `points (n, 2)`, `(n + 3, n + 3) float64`: the
    kernel (SMOOTHING on its diagonal) and the affine part (1, x, y); its solution for the values
    `(n, 2)` over 3 zero rows is the kernel weights, then the affine coefficients. scipy's
    RBFInterpolator solves the same system with a scaled polynomial basis."""
    n = len(points)
    polynomial = np.concatenate([np.ones((n, 1)), points], 1)
    dx, dy = points[:, None, 0] - points[None, :, 0], points[:, None, 1] - points[None, :, 1]
    kernel = spline_kernel(dx * dx + dy * dy) + SMOOTHING * np.eye(n)  # (the squared distances summed by hand: a third faster)
    return np.block([[kernel, polynomial], [polynomial.T, np.zeros((3, 3))]])


SPLINE_ROWS = 512  # grid points per block of a spline's evaluation (its kernel block stays in the cache)


def spline_at(points: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The thin-plate spline through `points (n, 2)` with `values (n, 2)` (`spline_points`), evaluated
    at `at (G, 2)`: `(G, 2) float64`, scipy's RBFInterpolator's values to about 1e-8 px and twice as
    fast (blocks of the kernel in float64, whose precision the weights of nearly meeting points need:
    float32 is 0.15 px off there)."""
    centre = points.mean(0)  # the kernel depends on differences only; centring keeps the products exact
    points, at = points - centre, at - centre
    n = len(points)
    weights = np.linalg.solve(spline_system(points), np.concatenate([values, np.zeros((3, 2))]))
    out = at @ weights[n + 1:] + weights[n]
    squared, across = (points * points).sum(1), -2.0 * points.T
    block = np.empty((min(SPLINE_ROWS, len(at)), n))
    for first in range(0, len(at), SPLINE_ROWS):
        rows = at[first:first + SPLINE_ROWS]
        d2 = np.matmul(rows, across, out=block[:len(rows)])
        d2 += squared
        d2 += (rows * rows).sum(1)[:, None]
        out[first:first + len(rows)] += spline_kernel(d2) @ weights[:n]
    return out


def backward_map(target: np.ndarray, source: np.ndarray, size: int,
                 box: typing.Optional[typing.Tuple[int, int, int, int]] = None) -> np.ndarray:
    """Thin-plate spline through `target (N, 2)` → `source (N, 2)`: for every output pixel, where to
    sample the source. Returns `(S, S, 2) float32` (x, y), the map of cv2.remap, or only the pixels of
    `box` `(x0, y0, x1, y1)` (the same values there: the coarse grid stays on multiples of GRID_STEP,
    with a step to spare round the box, and always reaches past the box's last pixel)."""
    x0, y0, x1, y1 = box or (0, 0, size, size)
    gx0, gy0 = max(0, (x0 // GRID_STEP - 2) * GRID_STEP), max(0, (y0 // GRID_STEP - 2) * GRID_STEP)
    gx1, gy1 = min(size, (x1 // GRID_STEP + 2) * GRID_STEP), min(size, (y1 // GRID_STEP + 2) * GRID_STEP)
    coarse_x = np.arange(gx0, gx1 + GRID_STEP, GRID_STEP, dtype=np.float64)
    coarse_y = np.arange(gy0, gy1 + GRID_STEP, GRID_STEP, dtype=np.float64)
    gx, gy = np.meshgrid(coarse_x, coarse_y)
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    sampled = (grid + spline_at(*spline_points(target, source), grid)).reshape(len(coarse_y), len(coarse_x), 2)
    # pixel x reads the coarse grid at (x - gx0) / STEP, linearly: one affine sampling, exact on the grid's
    # points (a resize then a half-step shift read it at x / STEP - 0.75 and smoothed it until 2026-12-01);
    # the grid holds where to sample, so the pixel's own position is interpolated with the shift
    affine = np.float32([[GRID_STEP, 0, gx0 - x0], [0, GRID_STEP, gy0 - y0]])
    return cv2.warpAffine(sampled.astype(np.float32), affine, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _polygon_mask(points: np.ndarray, size: int, feather: float) -> np.ndarray:
    """`(S, S) float32` in [0, 1]: the polygon `points (N, 2)` (crop px), anti-aliased, blurred by `feather` px."""
    return feathered_polygon(points, size, feather)


def upper_side(target_mouth: np.ndarray, size: int) -> np.ndarray:
    """`(S, S) float32` in [0, 1]: 1 above the target's mouth line (the midline between its inner
    lips, continued sideways from the corners), softened over about a pixel."""
    inner = target_mouth[INNER]
    upper, lower = inner[0:11], inner[[0, *range(19, 9, -1)]]  # both run corner 78 → corner 308
    middle = (upper + lower) / 2
    left, right = middle[np.argmin(middle[:, 0])], middle[np.argmax(middle[:, 0])]
    outline = np.concatenate([[[-1.0, left[1]]], middle[np.argsort(middle[:, 0])], [[size, right[1]], [size, -1.0], [-1.0, -1.0]]])
    return _polygon_mask(outline, size, feather=0.8)


def inner_lip_curves(mouth: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
    """The inner edges of the upper and of the lower lip of `mouth (59, 2)`, `(11, 2)` each, both
    from corner 78 to corner 308."""
    inner = np.asarray(mouth, np.float64)[INNER]
    return inner[0:11], inner[[0, *range(19, 9, -1)]]


def _along(curve: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The curve's height at columns `xs` (held flat beyond its ends)."""
    order = np.argsort(curve[:, 0], kind="stable")
    return np.interp(xs, curve[order, 0], curve[order, 1])


def cavity(lips_rgb: np.ndarray, target_mouth: np.ndarray, rows: slice, columns: int) -> np.ndarray:
    """The dark inside of an open mouth behind the teeth, `(h, columns, 3) float32` for crop `rows`:
    the lips' own colour darkened, darkest at the top (under the upper teeth) and lighter towards the
    lower lip, where the tongue lies (in the photo's own colour space: grey lips, grey mouth)."""
    inner = np.asarray(target_mouth, np.float64)[INNER]
    ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None, None]
    top, bottom = inner[:, 1].min(), inner[:, 1].max()
    shade = np.clip((ys - top) / max(bottom - top, 1.0), 0, 1)
    return np.broadcast_to(np.asarray(lips_rgb, np.float32) * (0.12 + 0.33 * shade ** 2), (len(ys), columns, 3)).copy()


def match_lighting(pixels: np.ndarray, own_lips: np.ndarray, their_lips: np.ndarray) -> np.ndarray:
    """Another person's mouth pixels `(..., 3)` brought to this photo, judged on the lips (RGB means
    `(3,)`): lightness scaled by the lips' ratio (0.7-1.3) and chroma by theirs (0-1.2), in CIELAB, so
    a grey photo gets a grey mouth and a warm one no cold cast."""
    to_lab = lambda rgb: cv2.cvtColor(np.clip(np.asarray(rgb, np.float32).reshape(1, -1, 3) / 255.0, 0, 1), cv2.COLOR_RGB2LAB)[0]
    own, their = to_lab(own_lips)[0], to_lab(their_lips)[0]
    gain = float(np.clip(own[0] / max(their[0], 1.0), 0.7, 1.3))
    chroma = float(np.clip(np.hypot(*own[1:]) / max(np.hypot(*their[1:]), 1.0), 0.0, 1.2))
    lab = to_lab(pixels.reshape(-1, 3))
    lab[:, 0] *= gain
    lab[:, 1:] *= chroma
    rgb = cv2.cvtColor(lab[None], cv2.COLOR_LAB2RGB)[0] * 255.0
    return rgb.reshape(pixels.shape).astype(np.float32)


SPLIT_BINS, SPLIT_DARK = 16, 0.6  # the rows' split: the darkest of 16 bands, if under 60% of the brightest


def inside_bands(image: np.ndarray, mouth: np.ndarray) -> typing.Optional[np.ndarray]:
    """Mean luma of SPLIT_BINS bands `(SPLIT_BINS,) float32` between the inner lips of `mouth (59, 2)`
    (from the upper lip down), across the middle half of the mouth in `image (h, w, 3) uint8`; None
    when the inside is under 2 px high."""
    upper, lower = inner_lip_curves(mouth)
    left, right = upper[0, 0], upper[-1, 0]
    xs = np.linspace(left + 0.25 * (right - left), right - 0.25 * (right - left), 16)
    top, bottom = _along(upper, xs), _along(lower, xs)
    if np.median(bottom - top) < 2.0:
        return None
    ys = top[None, :] + ((np.arange(SPLIT_BINS) + 0.5) / SPLIT_BINS)[:, None] * (bottom - top)[None, :]
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.remap(luma, np.broadcast_to(xs[None, :], ys.shape).astype(np.float32), ys.astype(np.float32),
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).mean(axis=1)


def teeth_split(inner: InnerMouth) -> float:
    """Where the reference's inside divides into the upper row (with the head) and the lower row
    (with the jaw), as a fraction of the way from its upper to its lower inner lip: the darkest of
    its `inside_bands` (the gap between the teeth, or the dark of an open mouth) when it is clearly
    darker than the brightest; else 1 (teeth together, as in a smile: all of what shows is upper
    teeth in front)."""
    bands = inside_bands(inner.crop, np.asarray(inner.mouth, np.float64))
    if bands is None:  # no inside to look at
        return 1.0
    darkest = int(np.argmin(bands[1:-1])) + 1  # the bands at the lips' edges are lip
    return float((darkest + 0.5) / SPLIT_BINS) if bands[darkest] < SPLIT_DARK * bands.max() else 1.0


def row_box(target_mouth: np.ndarray, origin: typing.Tuple[int, int], shape: typing.Tuple[int, int]) -> typing.Tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` crop pixels where `teeth_rows` composes: round the target's inner lips, inside
    the box of side `shape (h, w)` at `origin (x, y)`; empty when x1 <= x0 or y1 <= y0."""
    t_inner = np.asarray(target_mouth, np.float64)[INNER]
    bx, by = origin
    x0, y0 = np.maximum(np.floor(t_inner.min(0)).astype(int) - 1, [bx, by])
    x1, y1 = np.minimum(np.ceil(t_inner.max(0)).astype(int) + 2, [bx + shape[1], by + shape[0]])
    return int(x0), int(y0), int(x1), int(y1)


def row_columns(inner: InnerMouth, target_mouth: np.ndarray, xs: np.ndarray) -> typing.Tuple[np.ndarray, ...]:
    """For crop columns `xs`: the open mouth's column `u`, the offsets that take a crop row y to the
    mouth's row for its upper row (y + upper) and for its lower row (y + lower), and the mouth's
    mid-line there (between the rows, `teeth_split`); each shaped like `xs`."""
    t_upper, t_lower = inner_lip_curves(target_mouth)
    r_upper, r_lower = inner_lip_curves(np.asarray(inner.mouth, np.float64))
    t_left, t_right = t_upper[0, 0], t_upper[-1, 0]
    r_left, r_right = r_upper[0, 0], r_upper[-1, 0]
    u = r_left + (xs - t_left) * (r_right - r_left) / (t_right - t_left if abs(t_right - t_left) > 1e-6 else 1e-6)
    r_top, r_bottom = _along(r_upper, u), _along(r_lower, u)
    return u, r_top - _along(t_upper, xs), r_bottom - _along(t_lower, xs), r_top + inner.split * (r_bottom - r_top)


def teeth_rows(inner: InnerMouth, target_mouth: np.ndarray, behind: np.ndarray, origin: typing.Tuple[int, int],
               lips_rgb: np.ndarray, upper: bool = True) -> np.ndarray:
    """The inside of the target's mouth from an open mouth, without stretching it: the upper row of
    the reference's inside (upper teeth, above `teeth_split`) hangs from the target's upper inner lip,
    the lower row (lower teeth, tongue) rides on its lower inner lip, each moved only up or down
    column by column (widths scale with the mouth's width); where the target opens wider than the
    reference, `behind` (the cavity: `(h, w, 3) float32`, a box of the crop whose top-left corner is
    at `origin` (x, y)) shows between the rows; where it opens less, the upper row is in front. A
    borrowed mouth is brought to this photo's lips (`lips_rgb`, `match_lighting`). `upper=False`:
    the lower row alone (under another mouth's upper teeth). Returns the box, `behind` outside the
    target's inner lips."""
    bx, by = origin
    x0, y0, x1, y1 = row_box(target_mouth, origin, behind.shape[:2])
    if x1 <= x0 or y1 <= y0:
        return behind
    xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
    u, upper_offset, lower_offset, middle = row_columns(inner, target_mouth, xs)
    y_upper = ys + upper_offset  # the reference's row for the upper teeth
    y_lower = ys + lower_offset
    sample = lambda y: cv2.remap(inner.crop, u.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    upper_px, lower_px = sample(y_upper), sample(y_lower)
    if inner.borrowed:
        upper_px, lower_px = match_lighting(upper_px, lips_rgb, inner.lips_rgb), match_lighting(lower_px, lips_rgb, inner.lips_rgb)
    upper_w = np.clip(middle - y_upper + 0.5, 0, 1)[..., None]  # 1 above the reference's mid-line, over a pixel
    lower_w = np.clip(y_lower - middle + 0.5, 0, 1)[..., None]
    rows, cols = slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx)
    region = behind[rows, cols]
    region = region * (1 - lower_w) + lower_px * lower_w
    if upper:
        region = region * (1 - upper_w) + upper_px * upper_w
    out = behind.copy()
    out[rows, cols] = region
    return out


def warp_points(crop_landmarks: np.ndarray, target_mouth: np.ndarray, mask: np.ndarray) -> typing.List[typing.Tuple[np.ndarray, np.ndarray]]:
    """The two splines' control points (step 1 of the module docstring): `(target (N, 2), source (N, 2))`
    for the upper and for the lower warp, crop pixels; the fixed anchors hold the rest of the crop."""
    points = np.asarray(crop_landmarks, np.float64)[:, :2]
    source_mouth = points[lm.MOUTH_AND_JAW]
    target_mouth = np.asarray(target_mouth, np.float64)
    fixed = np.concatenate([points[FIXED_POINTS], _anchor_ring(mask.shape[0], mask)])
    return [(np.concatenate([target_mouth[part], fixed]), np.concatenate([source_mouth[part], fixed])) for part in (UPPER, LOWER)]


def mouth_hole(source_mouth: np.ndarray, target_mouth: np.ndarray, inner: InnerMouth, size: int) -> typing.Optional[np.ndarray]:
    """Where the inside of the mouth is composed of rows, `(S, S) float32` in [0, 1], or None: wherever
    the target's lips part wider than the source's could supply, and wherever they part less than an
    open source's (the warps would squash its teeth; real lips close over them)."""
    width = max(mouth_width(target_mouth), 1.0)
    source_gap = inner_gap_ratio(source_mouth)
    opening = inner_gap_ratio(target_mouth) - max(source_gap, MIN_OPEN)
    if source_gap > MIN_OPEN and inner.usable:
        opening = abs(inner_gap_ratio(target_mouth) - source_gap)
    if opening <= 0:
        return None
    hole = _polygon_mask(np.asarray(target_mouth, np.float64)[INNER], size, feather=max(0.6, width * 0.02)) * min(1.0, opening / 0.06)
    return hole if (hole > 0).any() else None


def lips_meet(target_mouth: np.ndarray) -> float:
    """How far the target's lips meet, in [0, 1]: 1 at an inner-lip gap of `MIN_OPEN` / 2 of the mouth's
    width and less, 0 from `MIN_OPEN` on (linear between). Where they meet over an open source's mouth,
    its hole is filled with the lips' colour (`MEETING_SHADE`) instead of rows: the teeth squashed
    into a lip-thin band read as a mouth left ajar."""
    return float(np.clip((MIN_OPEN - inner_gap_ratio(target_mouth)) / (MIN_OPEN / 2), 0.0, 1.0))


def render_warp(crop: np.ndarray, crop_landmarks: np.ndarray, target_mouth: np.ndarray, mask: np.ndarray,
                inner: InnerMouth) -> np.ndarray:
    """The crop with its lower face moved to `target_mouth` (see the module docstring); the caller
    blends it in under `mask`, the repaint region `(S, S)` in [0, 1]. Returns `(S, S, 3) uint8`."""
    size = crop.shape[0]
    target_mouth = np.asarray(target_mouth, np.float64)
    # only the repaint region's box is warped: outside it the caller keeps the frame's own pixels
    x0, y0, x1, y1 = nonzero_box(mask) or (0, 0, 1, 1)
    # the upper warp shows above the mouth line, the lower one below: each is evaluated only on the
    # box's rows where its weight is not 0 (elsewhere it adds exactly 0)
    above = upper_side(target_mouth, size)[y0:y1, x0:x1]
    region = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    for (target, source), weight in zip(warp_points(crop_landmarks, target_mouth, mask), (above, 1 - above)):
        rows = np.flatnonzero(weight.max(1) > 0)
        if rows.size == 0:
            continue
        top, bottom = int(rows[0]), int(rows[-1]) + 1
        sample_at = backward_map(target, source, size, (x0, y0 + top, x1, y0 + bottom))
        piece = cv2.remap(crop, sample_at, None, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        region[top:bottom] += piece * weight[top:bottom, :, None]

    # The inside of the mouth, composed of rows (`teeth_rows`, `mouth_hole`).
    hole = mouth_hole(np.asarray(crop_landmarks, np.float64)[lm.MOUTH_AND_JAW, :2], target_mouth, inner, size)
    # the pixels that can change (the warped box, the hole's) and the target's lips, whose colour the hole
    # takes, lie in box U; in float there only (outside it the crop's own pixels come back as they were)
    boxes = [(x0, y0, x1, y1)] + ([nonzero_box(hole), lips_box(target_mouth, size)] if hole is not None else [])
    ux0, uy0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    ux1, uy1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    moved = crop[uy0:uy1, ux0:ux1].astype(np.float32)
    moved[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0] = region
    if hole is not None:  # composed and blended only in the hole's box
        hx0, hy0, hx1, hy1 = nonzero_box(hole)
        inside = slice(hy0 - uy0, hy1 - uy0), slice(hx0 - ux0, hx1 - ux0)
        lips_rgb = lip_colour(moved, target_mouth, (ux0, uy0))  # (lips covering no pixel: box U's mean colour)
        fill = cavity(lips_rgb, target_mouth, slice(hy0, hy1), hx1 - hx0)
        meet = lips_meet(target_mouth)
        if inner.usable and meet < 1:
            if inner.lower_row is not None and inner.lower_row.usable:
                fill = teeth_rows(inner.lower_row, target_mouth, fill, (hx0, hy0), lips_rgb, upper=False)
            fill = teeth_rows(inner, target_mouth, fill, (hx0, hy0), lips_rgb)
        if meet > 0:  # lips that meet over an open source's mouth: no squashed teeth between them
            fill = fill * (1 - meet) + np.asarray(lips_rgb, np.float32) * (MEETING_SHADE * meet)
        alpha = hole[hy0:hy1, hx0:hx1][..., None]
        moved[inside] = moved[inside] * (1 - alpha) + fill * alpha
    out = crop.copy()
    out[uy0:uy1, ux0:ux1] = np.clip(moved + 0.5, 0, 255).astype(np.uint8)
    return out
