"""Lip-sync and landmark metrics shared by training, evaluation and (later) `avatar eval`."""

from __future__ import annotations

import typing

import numpy as np


def mouth_landmark_distance(predicted: np.ndarray, real: np.ndarray, iod: typing.Union[float, np.ndarray],
                            mask: typing.Optional[np.ndarray] = None) -> float:
    """Mean absolute difference per coordinate, in % of the inter-ocular distance.

    predicted, real: `(T, K, 2)` landmarks in the same pixels; iod: scalar or `(T,)`; mask: `(T,) bool`.
    """
    diff = np.abs(np.asarray(predicted, np.float64) - np.asarray(real, np.float64))  # (T, K, 2)
    per_frame = diff.mean(axis=(1, 2)) / np.broadcast_to(np.asarray(iod, np.float64), diff.shape[:1])
    if mask is not None:
        per_frame = per_frame[np.asarray(mask, bool)]
    return float(100.0 * per_frame.mean()) if per_frame.size else float("nan")


def sharpness(image: np.ndarray, region: np.ndarray) -> float:
    """Laplacian variance of `(H, W, 3) uint8` RGB inside `region (H, W) bool`: the detail there. The
    sharpness ratios of the reports are this measure, output / real (≥ 0.8 counts as sharp)."""
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F)[region].var())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: typing.Optional[np.ndarray] = None) -> float:
    """PSNR (dB, peak 255) of two images on the 0-255 scale, over the pixels where `mask` (bool, the
    images' shape or their first dimensions) is set, or over all of them."""
    diff = np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    mse = diff[mask].mean() if mask is not None else diff.mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))
