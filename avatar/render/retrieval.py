"""Retrieval: a person's own mouths (their enrolled bank, `avatar/enroll.py`) chosen for each target
mouth, as Synthesizing Obama re-used the person's frames.

    bank = MouthBank(crops, mouths)                     # (N, 256, 256, 3) uint8, (N, 59, 2) crop-256 px
    path = bank.path(target_mouths, rest)               # (T,) one bank entry per frame (Viterbi)
    renderer = RetrievalRenderer(config)                # the warp renderer, inside of the mouth from the bank

The choice per frame is a Viterbi path over the bank's entries: the cost of an entry is how far its
lips' shape (both contours, centred on their centroid) lies from the target's, and changing entries
costs `SWITCH_COST` scaled by how open the mouth is then (a switch while the lips are closed is not
seen; one while the teeth show is). Live streams cannot look ahead: they keep their entry until
another fits better by that same margin (`MouthBank.follow`). Where the entry does change while the
mouth is open, the renderer shows the old and the new entry half and half for that frame
(`RetrievalRenderer.choose_and_fades`): a one-frame dissolve instead of a pop.

An entry is a picture of a mouth at its frame's head pose; warped onto a face turned another way
(its lips' landmarks moved onto the target's) its lips cross the face's own and the drawn region
shows a cut-out ring (a clip whose head tilts and rolls fast drew broken mouths over about 9 of 59
frames). So only entries whose head is turned less than `MAX_TURN_DEG` from the frame's are
candidates (`MouthBank.turns`: the rotation between the two faces' 3D head points); a frame with
none renders with the warp alone (path entry -1).

The renderer (`avatar/render/renderers.py`) is the warp renderer with the chosen entry as the open
mouth it composes the inside of the mouth from, and then the entry itself, warped from its mouth to
the target's (`MouthBank.draw`), blended over the lips and a margin round them: the person's own
lips, teeth and tongue at an opening like the target's, instead of one frame's lips stretched or
squashed to every opening (an open frame's lips closed meet at a band of its dark mouth edge; lips
opened a little show a dark slot where the person shows teeth). A person without a bank renders
exactly as with the warp.
"""

from __future__ import annotations

import functools
import typing

import cv2
import numpy as np

from avatar.face import landmarks as lm
from avatar.face.align import feathered_polygon, nonzero_box, polygon_mask, rescale_points
from avatar.motion.pose import HEAD_POINTS, similarity_3d
from avatar.render.warp import INNER, MIN_OPEN, N_LIPS, N_OUTER, InnerMouth, lip_band, mouth_width, open_inner, render_warp

SWITCH_COST = 3.0  # crop-128 px² of mean squared lip distance that a change of entry must win, at full opening (a random entry is ~5 away, the nearest ~0.2-0.5)
FULL_OPENING = 0.25  # inner-gap ratio at which a switch costs all of SWITCH_COST (0 at MIN_OPEN and below)
# A switch between entries whose insides look different (a dark mouth and one showing its teeth) is
# seen as a pop: it costs 1 + INSIDE_COST × the difference of their insides' brightness (`MouthBank.insides`).
INSIDE_COST = 2.0
# The region an entry is drawn over: the target's outer lips grown by LIPS_GROW and feathered by
# LIPS_FEATHER (a Gaussian's sigma), both × the mouth's width.
LIPS_GROW, LIPS_FEATHER = 0.12, 0.05
MAX_TURN_DEG = 12.0  # an entry is drawn only on faces whose head is turned less than this from the entry's
NONE = -1  # a path's entry where no bank entry is drawn (none within MAX_TURN_DEG): the warp alone


def head_rotations(heads: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`heads (T, P, 3)` (HEAD_POINTS of faces, crop px with depth) → `(T, 3, 3)`: each head's
    rotation from `reference (P, 3)` (`similarity_3d`). Two heads' relative turn is then
    `rotations[a] @ rotations[b].T`, whatever the reference."""
    return np.stack([similarity_3d(reference, h)[1] for h in np.asarray(heads, np.float64)]) if len(heads) else np.zeros((0, 3, 3))


def lip_shape(mouths: np.ndarray) -> np.ndarray:
    """`(..., 59, 2)` crop-128 px → `(..., 40, 2)`: both lip contours about their centroid."""
    lips = np.asarray(mouths, np.float64)[..., :N_LIPS, :]
    return lips - lips.mean(axis=-2, keepdims=True)


def lips_region(mouth: np.ndarray, size: int) -> np.ndarray:
    """Where a bank entry is drawn for the target `mouth (59, 2)` (crop px): `(S, S) float32` in [0, 1],
    its outer lips grown by LIPS_GROW and feathered by LIPS_FEATHER of its width."""
    width = max(mouth_width(mouth), 1.0)
    return feathered_polygon(np.asarray(mouth)[:N_OUTER], size, max(0.5, LIPS_FEATHER * width), max(1, int(round(LIPS_GROW * width))))


def shape_neighbours(shapes: np.ndarray, first: int, count: int) -> np.ndarray:
    """`count` indices into `shapes (N, 40, 2)` (`lip_shape`): `first`, then the others in order of
    their lips' mean squared distance to its own (repeating from the start when N < count). The
    diffusion renderer's retrieved references: the frame's entry and its nearest in shape, so that
    they change only when the entry does."""
    distance = ((shapes - shapes[first]) ** 2).sum(-1).mean(-1)
    distance[first] = -1.0
    order = np.argsort(distance, kind="stable")
    return order[np.arange(count) % len(order)]


class MouthBank:
    """A person's mouths, closed and open: `crops (N, S, S, 3) uint8` aligned face crops of side S,
    `mouths (N, 59, 2)` their mouth and jaw in those crops' pixels. `crop_size`: the side the targets
    are given at (the pipeline's canonical crop, 128). `heads (N, P, 3)`: each entry's HEAD_POINTS
    (crop px with depth), its head pose; None (avatar files written before them): every entry is a
    candidate for every face."""

    def __init__(self, crops: np.ndarray, mouths: np.ndarray, crop_size: int = 128, heads: typing.Optional[np.ndarray] = None):
        crops, mouths = np.asarray(crops), np.asarray(mouths, np.float64)
        if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or len(crops) != len(mouths) or len(crops) == 0:
            raise ValueError(f"a mouth bank needs N square crops and N mouths, got {crops.shape} and {mouths.shape}")
        if heads is not None and np.shape(heads) != (len(crops), len(HEAD_POINTS), 3):
            raise ValueError(f"a mouth bank's heads are (N, {len(HEAD_POINTS)}, 3), got {np.shape(heads)}")
        self.crops, self.mouths, self.size, self.crop_size = crops, mouths, int(crops.shape[1]), crop_size
        self.heads = None if heads is None else np.asarray(heads, np.float64)
        self._rotations = None if heads is None else head_rotations(self.heads, self.heads[0])  # (N, 3, 3)
        self.shapes = lip_shape(rescale_points(mouths, self.size, crop_size))  # (N, 40, 2) at the targets' scale
        self.gaps = np.array([lm.inner_gap_ratio(m) for m in self.mouths])  # (N,) inner gap / mouth width
        self._inner: typing.Dict[int, InnerMouth] = {}
        self._scaled: typing.Dict[typing.Tuple[int, int], typing.Tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.crops)

    def inner(self, index: int) -> InnerMouth:
        """Entry `index` as the warp renderer's open mouth (made once); a closed entry lends the
        bank's most open one (its teeth, should the target open beyond the closed lips). An entry
        showing only its upper row takes its lower row (lower teeth, tongue) from the person's own
        `both_rows` entry, not from the bundled mouths of other people."""
        if self.gaps[index] <= MIN_OPEN:
            index = int(np.argmax(self.gaps))
        if index not in self._inner:
            inner = open_inner(self.crops[index], self.mouths[index], self.size)
            own = self.both_rows
            if inner.lower_row is not None and inner.lower_row.borrowed and own is not None:
                inner.lower_row = own
            self._inner[index] = inner
        return self._inner[index]

    @functools.cached_property
    def insides(self) -> np.ndarray:
        """`(N,) float64`: how bright the inside of each entry's mouth is, its mean grey level between the
        inner lips over its lips' (`lip_band`); NaN for closed entries (their inside is not seen)."""
        out = np.full(len(self), np.nan)
        for k in np.flatnonzero(self.gaps > MIN_OPEN):
            grey = cv2.cvtColor(self.crops[k], cv2.COLOR_RGB2GRAY).astype(np.float64)
            inside = polygon_mask(self.mouths[k][INNER], grey.shape)
            lips = lip_band(self.mouths[k], grey.shape)
            if inside.any() and lips.any():
                out[k] = grey[inside].mean() / max(grey[lips].mean(), 1.0)
        return out

    @functools.cached_property
    def switch_weights(self) -> np.ndarray:
        """`(N + 1, N + 1) float64`: what a change from entry i to entry j costs, in units of the switch
        cost (`switch_costs`): 0 to stay, 1 + INSIDE_COST × the difference of their `insides` (1 to or
        from a closed entry); the last row and column: no entry (NONE), 1 to and from any."""
        weights = np.ones((len(self) + 1, len(self) + 1))
        weights[:-1, :-1] += INSIDE_COST * np.nan_to_num(np.abs(self.insides[:, None] - self.insides[None]), nan=0.0)
        np.fill_diagonal(weights, 0.0)
        return weights

    @functools.cached_property
    def both_rows(self) -> typing.Optional[InnerMouth]:
        """The most open entry that shows both rows of the inside (a dark band between its upper and
        lower teeth, `teeth_split` < 1), or None."""
        for k in np.argsort(-self.gaps, kind="stable"):
            mouth = InnerMouth(self.crops[k], self.mouths[k], self.size)
            if not mouth.usable:
                return None
            if mouth.split < 1.0:
                return mouth
        return None

    def references(self, index: int, count: int, size: int) -> typing.List[np.ndarray]:
        """Entry `index` and its `count` - 1 nearest in lip shape (`shape_neighbours`), as crops
        `(size, size, 3) uint8`: the diffusion renderer's retrieved references for a frame."""
        return [self.scaled(int(k), size)[0] for k in shape_neighbours(self.shapes, index, count)]

    def scaled(self, index: int, size: int) -> typing.Tuple[np.ndarray, np.ndarray]:
        """Entry `index` at crop side `size`: `(crop (size, size, 3) uint8, mouth (59, 2))` (made once)."""
        key = (index, size)
        if key not in self._scaled:
            if len(self._scaled) >= 4 * len(self):  # a video whose face size keeps changing: keep the latest
                self._scaled.clear()
            crop = self.crops[index]
            if size != self.size:
                crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if size < self.size else cv2.INTER_CUBIC)
            self._scaled[key] = crop, rescale_points(self.mouths[index], self.size, size)
        return self._scaled[key]

    def draw(self, index: int, face: np.ndarray, crop_landmarks: np.ndarray, target_mouth: np.ndarray) -> np.ndarray:
        """Entry `index` warped from its mouth to `target_mouth (59, 2)` (the warp renderer's two
        splines, with the fixed anchors of the face's `crop_landmarks (478, 2+)`: both crops are
        aligned alike) and blended over `face (S, S, 3) uint8` in `lips_region`, its brightness per
        channel matched to the face's in the region's feathered rim. Returns `(S, S, 3) uint8`."""
        size = face.shape[0]
        crop, mouth = self.scaled(index, size)
        region = lips_region(target_mouth, size)
        bounds = nonzero_box(region)
        if bounds is None:
            return face
        box = slice(bounds[1], bounds[3]), slice(bounds[0], bounds[2])  # outside it the face stays as it is
        drawn = render_warp(crop, lm.with_mouth(np.asarray(crop_landmarks, np.float64)[:, :2], mouth), target_mouth, region,
                            self.inner(index).at(size))[box].astype(np.float32)
        alpha, under = region[box], face[box].astype(np.float32)
        rim = (alpha > 0.05) & (alpha < 0.6)
        if rim.any():
            drawn *= (under[rim].mean(axis=0) + 1.0) / (drawn[rim].mean(axis=0) + 1.0)
        out = face.copy()
        out[box] = np.clip(under + (drawn - under) * alpha[..., None] + 0.5, 0, 255).astype(np.uint8)
        return out

    def costs(self, targets: np.ndarray) -> np.ndarray:
        """`targets (T, 59, 2)` crop px → `(T, N)` mean squared lip distance to each entry."""
        shapes = lip_shape(targets)
        return ((shapes[:, None] - self.shapes[None]) ** 2).sum(-1).mean(-1)

    def turns(self, heads: np.ndarray) -> np.ndarray:
        """`heads (T, P, 3)`: faces' HEAD_POINTS (crop px with depth) → `(T, N)` degrees each face's
        head is turned from each entry's (the angle of their relative rotation); zeros for a bank
        without heads."""
        heads = np.asarray(heads, np.float64)
        if self._rotations is None:
            return np.zeros((len(heads), len(self)))
        relative = np.einsum("tij,nkj->tnik", head_rotations(heads, self.heads[0]), self._rotations)
        cosine = (np.trace(relative, axis1=-2, axis2=-1) - 1.0) / 2.0
        return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))

    def candidates(self, heads: typing.Optional[np.ndarray], count: int) -> np.ndarray:
        """`(T, N) bool`: the entries that may be drawn on each of `count` faces, given their
        HEAD_POINTS `heads (T, P, 3)` (within MAX_TURN_DEG; all, without heads or for a bank without
        them). A row of NaN (no face) allows all."""
        if heads is None or self._rotations is None:
            return np.ones((count, len(self)), bool)
        heads = np.asarray(heads, np.float64)
        known = np.isfinite(heads).all(axis=(1, 2))
        allowed = np.ones((count, len(self)), bool)
        if known.any():
            allowed[known] = self.turns(heads[known]) <= MAX_TURN_DEG
        return allowed

    @staticmethod
    def switch_costs(targets: np.ndarray) -> np.ndarray:
        """`(T,)`: what changing entries at each frame costs (`SWITCH_COST` × how open the mouth is)."""
        gaps = np.array([lm.inner_gap_ratio(t) for t in np.asarray(targets, np.float64)])
        return SWITCH_COST * np.clip((gaps - MIN_OPEN) / (FULL_OPENING - MIN_OPEN), 0.0, 1.0)

    def path(self, targets: np.ndarray, heads: typing.Optional[np.ndarray] = None) -> np.ndarray:
        """The entries `(T,) int64` for a whole sequence of target mouths `(T, 59, 2)` (Viterbi), on
        faces whose head pose (`heads (T, P, 3)`, their HEAD_POINTS; NaN rows: no face) limits the
        candidates (`candidates`); NONE where no entry may be drawn. The target mouths are the ones
        drawn: at each frame's head pose."""
        targets = np.asarray(targets, np.float64)
        if len(targets) == 0:
            return np.zeros(0, np.int64)
        allowed = self.candidates(heads, len(targets))
        none = np.where(allowed.any(axis=1), np.inf, 0.0)  # the warp alone: only where no entry may be drawn
        costs, switch = np.c_[np.where(allowed, self.costs(targets), np.inf), none], self.switch_costs(targets)
        weights = self.switch_weights
        total = costs[0].copy()
        back = np.zeros(costs.shape, np.int64)
        for t in range(1, len(targets)):
            arrive = total[:, None] + switch[t] * weights  # (from, to); staying costs nothing
            back[t] = np.argmin(arrive, axis=0)
            total = arrive[back[t], np.arange(len(total))] + costs[t]
        path = np.zeros(len(targets), np.int64)
        path[-1] = int(np.argmin(total))
        for t in range(len(targets) - 1, 0, -1):
            path[t - 1] = back[t, path[t]]
        return np.where(path == len(self), NONE, path)

    def follow(self, target: np.ndarray, previous: typing.Optional[int], face: typing.Optional[np.ndarray] = None) -> typing.Optional[int]:
        """The entry for one target mouth `(59, 2)` of a stream, on `face (478, 3)` (its head pose
        limits the candidates): the previous one unless another fits better by more than the switch
        cost; None where no entry may be drawn."""
        face = None if face is None or np.shape(face)[-1] < 3 else np.asarray(face, np.float64)[None, HEAD_POINTS]  # no depth: no pose
        allowed = self.candidates(face, 1)[0]
        if not allowed.any():
            return None
        costs = np.where(allowed, self.costs(np.asarray(target, np.float64)[None])[0], np.inf)
        if previous is None or not allowed[previous]:
            return int(np.argmin(costs))
        return int(np.argmin(costs + self.switch_costs(np.asarray(target)[None])[0] * self.switch_weights[previous, :-1]))
