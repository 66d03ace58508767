"""Diffusion schedule and samplers, as plain functions (k-diffusion style): the model is any callable
`model(x_t, t, condition) → v`, torch or onnxruntime alike (numpy in, numpy out).

Continuous cosine schedule: alpha(t) = cos(πt/2), sigma(t) = sin(πt/2), x_t = alpha·x0 + sigma·noise;
the model predicts v = alpha·noise − sigma·x0, from which x0 = alpha·x_t − sigma·v.
"""

from __future__ import annotations

import typing

import numpy as np

Model = typing.Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Callback = typing.Callable[[int, int, np.ndarray], None]


def alpha_sigma(t):
    """(alpha, sigma) of the cosine schedule at time(s) t in [0, 1]."""
    return np.cos(0.5 * np.pi * t), np.sin(0.5 * np.pi * t)


def noised(clean, noise, alpha, sigma):
    """x_t = alpha·x0 + sigma·noise (numpy arrays or torch tensors alike)."""
    return alpha * clean + sigma * noise


def v_target(clean, noise, alpha, sigma):
    """What the model learns to predict: v = alpha·noise − sigma·x0."""
    return alpha * noise - sigma * clean


def clean_from_v(x_t, v, alpha, sigma):
    """x0 = alpha·x_t − sigma·v."""
    return alpha * x_t - sigma * v


def noise_from_v(x_t, v, alpha, sigma):
    """noise = sigma·x_t + alpha·v."""
    return sigma * x_t + alpha * v


def timesteps(steps: int, start: float = 1.0) -> np.ndarray:
    """`steps + 1` times from `start` down to 0, uniform in t."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    return np.linspace(start, 0.0, steps + 1)


def steps_from(start: float, full_steps: int) -> int:
    """Sampling steps from time `start` at the step size of a `full_steps`-step sampler from 1
    (at least one): 1 step from 0.25 for a 4-step model."""
    return max(1, round(start * full_steps))


def sample_ddim(model: Model, noise: np.ndarray, condition: np.ndarray, steps: int = 4,
                callback: typing.Optional[Callback] = None, init: typing.Optional[np.ndarray] = None,
                start: float = 1.0) -> np.ndarray:
    """Deterministic DDIM to a clean crop, from pure noise or (SDEdit-style) from a draft.

    noise: `(B, 3, S, S) float32` standard normal (share it across frames for temporal stability);
    condition: `(B, C, S, S) float32`. With `init` (`(B, 3, S, S)` in [-1, 1], a draft of the crop)
    and `start` < 1, sampling begins at time `start` from the draft noised to that level, so the
    result keeps the draft's coarse content and redraws its detail; `steps` then span [start, 0].
    Returns x0 `(B, 3, S, S) float32` in about [-1, 1]. `callback(step, steps, x0_estimate)` is
    called after every step.
    """
    if not 0.0 < start <= 1.0:
        raise ValueError(f"the start time must be in (0, 1], got {start}")
    if start < 1.0 and init is None:
        raise ValueError("a start time below 1 needs a draft (init) to noise")
    times = timesteps(steps, start)
    alpha, sigma = alpha_sigma(start)
    x = (noise if start >= 1.0 else noised(init, noise, alpha, sigma)).astype(np.float32)
    x0 = x
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        alpha, sigma = alpha_sigma(t)
        v = model(x, np.full((x.shape[0],), t, np.float32), condition)
        x0 = np.clip(clean_from_v(x, v, alpha, sigma), -1.0, 1.0)
        eps = noise_from_v(x, v, alpha, sigma)
        alpha_next, sigma_next = alpha_sigma(t_next)
        x = noised(x0, eps, alpha_next, sigma_next).astype(np.float32)
        if callback is not None:
            callback(i + 1, steps, x0)
    return x0.astype(np.float32)
