"""The closed-mouth prior: a person's closed, relaxed mouth and jaw inferred from one open mouth, for
portraits that only show the mouth open (a yell, a laugh, a smile showing teeth). Ridge regression
from the open shape to the change that closes it, fitted on the training people's open frames and
rest mouths by `training/fit_closed_mouth.py` (`assets/closed_mouth.npz`, `assets/MODELS.md`).

    prior = ClosedMouthPrior()                               # loads the asset
    rest = prior.close(rest, anchor, iod)                    # (59, 2) crop pixels, closed
"""

from __future__ import annotations

import os
import typing

import numpy as np

PRIOR_FILE = "closed_mouth.npz"
MIN_OPEN_GAP = 0.08  # inner-lip gap over mouth width from which a portrait's mouth counts as open


class ClosedMouthPrior:
    """See the module docstring. `path`: the prior's file (default: the bundled asset)."""

    def __init__(self, path: typing.Optional[typing.Union[str, os.PathLike]] = None):
        from avatar.runtime import asset_path

        with np.load(path or asset_path(PRIOR_FILE)) as data:
            self.mean_open = data["mean_open"].astype(np.float64)
            self.mean_change = data["mean_change"].astype(np.float64)
            self.weights = data["weights"].astype(np.float64)

    def close(self, mouth: np.ndarray, anchor: np.ndarray, iod: float) -> np.ndarray:
        """An open mouth `(59, 2)` (crop pixels; `anchor (2,)` the mouth anchor there, `iod` the
        inter-ocular distance in those pixels) → the same person's closed mouth `(59, 2) float32`."""
        x = ((np.asarray(mouth, np.float64) - anchor) / iod).reshape(-1)
        change = (x - self.mean_open) @ self.weights + self.mean_change
        return ((x + change).reshape(-1, 2) * iod + anchor).astype(np.float32)
