"""Retrieval: a person's own mouths (their enrolled bank, `avatar/enroll.py`) chosen for each target
mouth, as Synthesizing Obama re-used the person's frames.

    bank = MouthBank(crops, mouths)                     # (N, 256, 256, 3) uint8, (N, 59, 2) crop-256 px
    path = bank.path(target_mouths, rest)               # (T,) one bank entry per frame (Viterbi)
    renderer = RetrievalRenderer(config)                # the warp renderer, inside of the mouth from the bank

The choice per frame is a Viterbi path over the bank's entries: the cost of an entry is how far its
lips' shape (both contours, centred on their centroid) lies from the target's, and changing entries
costs `SWITCH_COST` scaled by how open the mouth is then (a switch while the lips are closed is not
seen; one while the teeth show is). Live streams cannot look ahead: they keep their entry until
another fits better by that same margin (`MouthBank.follow`).

The renderer is the warp renderer (`avatar/render/renderers.py`) with the chosen entry as the open
mouth it composes the inside of the mouth from: the person's own teeth and tongue at an opening like
the target's, instead of one open frame stretched or squashed to every opening (or a stranger's
teeth from the bundled bank, for a photo). A person without a bank renders exactly as with the warp.
"""

from __future__ import annotations

import typing

import numpy as np

from avatar.face import landmarks as lm
from avatar.face.align import rescale_points
from avatar.render.warp import MIN_OPEN, N_LIPS, InnerMouth, open_inner

SWITCH_COST = 3.0  # crop-128 px² of mean squared lip distance that a change of entry must win, at full opening (a random entry is ~5 away, the nearest ~0.2-0.5)
FULL_OPENING = 0.25  # inner-gap ratio at which a switch costs all of SWITCH_COST (0 at MIN_OPEN and below)


def lip_shape(mouths: np.ndarray) -> np.ndarray:
    """`(..., 59, 2)` crop-128 px → `(..., 40, 2)`: both lip contours about their centroid."""
    lips = np.asarray(mouths, np.float64)[..., :N_LIPS, :]
    return lips - lips.mean(axis=-2, keepdims=True)


class MouthBank:
    """A person's open mouths: `crops (N, S, S, 3) uint8` aligned face crops of side S, `mouths
    (N, 59, 2)` their mouth and jaw in those crops' pixels. `crop_size`: the side the targets are
    given at (the pipeline's canonical crop, 128)."""

    def __init__(self, crops: np.ndarray, mouths: np.ndarray, crop_size: int = 128):
        crops, mouths = np.asarray(crops), np.asarray(mouths, np.float64)
        if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or len(crops) != len(mouths) or len(crops) == 0:
            raise ValueError(f"a mouth bank needs N square crops and N mouths, got {crops.shape} and {mouths.shape}")
        self.crops, self.mouths, self.size, self.crop_size = crops, mouths, int(crops.shape[1]), crop_size
        self.shapes = lip_shape(rescale_points(mouths, self.size, crop_size))  # (N, 40, 2) at the targets' scale
        self._inner: typing.Dict[int, InnerMouth] = {}

    def __len__(self) -> int:
        return len(self.crops)

    def inner(self, index: int) -> InnerMouth:
        """Entry `index` as the warp renderer's open mouth (made once)."""
        if index not in self._inner:
            self._inner[index] = open_inner(self.crops[index], self.mouths[index], self.size)
        return self._inner[index]

    def costs(self, targets: np.ndarray) -> np.ndarray:
        """`targets (T, 59, 2)` crop px → `(T, N)` mean squared lip distance to each entry."""
        shapes = lip_shape(targets)
        return ((shapes[:, None] - self.shapes[None]) ** 2).sum(-1).mean(-1)

    @staticmethod
    def switch_costs(targets: np.ndarray) -> np.ndarray:
        """`(T,)`: what changing entries at each frame costs (`SWITCH_COST` × how open the mouth is)."""
        gaps = np.array([lm.inner_gap_ratio(t) for t in np.asarray(targets, np.float64)])
        return SWITCH_COST * np.clip((gaps - MIN_OPEN) / (FULL_OPENING - MIN_OPEN), 0.0, 1.0)

    def path(self, targets: np.ndarray) -> np.ndarray:
        """The entries `(T,) int64` for a whole sequence of target mouths `(T, 59, 2)` (Viterbi)."""
        targets = np.asarray(targets, np.float64)
        if len(targets) == 0:
            return np.zeros(0, np.int64)
        costs, switch = self.costs(targets), self.switch_costs(targets)
        total = costs[0].copy()
        back = np.zeros(costs.shape, np.int64)
        for t in range(1, len(targets)):
            best = int(np.argmin(total))
            change = total[best] + switch[t]
            back[t] = np.where(total <= change, np.arange(len(self)), best)
            total = np.minimum(total, change) + costs[t]
        path = np.zeros(len(targets), np.int64)
        path[-1] = int(np.argmin(total))
        for t in range(len(targets) - 1, 0, -1):
            path[t - 1] = back[t, path[t]]
        return path

    def follow(self, target: np.ndarray, previous: typing.Optional[int]) -> int:
        """The entry for one target mouth `(59, 2)` of a stream: the previous one unless another fits
        better by more than the switch cost."""
        costs = self.costs(np.asarray(target, np.float64)[None])[0]
        best = int(np.argmin(costs))
        if previous is None or costs[previous] - costs[best] > self.switch_costs(np.asarray(target)[None])[0]:
            return best
        return previous
