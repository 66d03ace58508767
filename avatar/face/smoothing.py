"""One-euro filtering (Casiez et al. 2012): strong smoothing at rest, little lag in fast motion."""

from __future__ import annotations

import math
import typing

import numpy as np


def _alpha(cutoff_hz: float, dt: float) -> float:
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filter a stream of arrays of a fixed shape, sampled at (possibly irregular) times.

    `min_cutoff_hz`: cutoff at rest (lower = smoother). `beta`: how fast the cutoff rises with speed
    (higher = less lag in motion); speeds are in the array's units per second. A constant input is
    returned unchanged: the filter adds no jitter of its own.
    """

    def __init__(self, min_cutoff_hz: float, beta: float, d_cutoff_hz: float = 1.0):
        self.min_cutoff_hz, self.beta, self.d_cutoff_hz = min_cutoff_hz, beta, d_cutoff_hz
        self.reset()

    def reset(self) -> None:
        self._x: typing.Optional[np.ndarray] = None
        self._dx: typing.Optional[np.ndarray] = None
        self._t: typing.Optional[float] = None

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        """Filter sample `x` at time `t` s; `scale` divides speeds (e.g. the face size, for scale invariance)."""
        x = np.asarray(x, np.float64)
        if self._x is None or self._t is None or t <= self._t:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        dx = (x - self._x) / dt
        a_d = _alpha(self.d_cutoff_hz, dt)
        self._dx = a_d * dx + (1.0 - a_d) * self._dx
        speed = np.abs(self._dx) / max(scale, 1e-9)
        cutoff = self.min_cutoff_hz + self.beta * speed
        tau = 1.0 / (2.0 * math.pi * cutoff)
        a = 1.0 / (1.0 + tau / dt)
        self._x = a * x + (1.0 - a) * self._x
        self._t = t
        return self._x.copy()
