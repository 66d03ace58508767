"""A person's motion adaptation: a ridge correction of the general motion model, fitted on that
person's own speech and lips (enrollment, `avatar/enroll.py`), shrunk towards the general model by
cross-validation on the same footage; or, where no correction pays, the person's own amplitude.

    adaptation = fit_adaptation(features, general, real, rest, keep, predictor.models)  # or None: not worth it
    mouths = adaptation.apply(features, mouths, rest)                   # after the motion model

The correction maps one video frame's speech features `(D,)` and the general model's mouth (its
offsets from rest, in rest mouth widths) to the change of that mouth, linearly. It sees the current
frame only, so live streams use it as files do. Its strength (the ridge λ) is chosen by time-blocked
cross-validation of the mouth-opening correlation on the enrollment footage, with "no correction"
among the choices. Where no correction raises that correlation, the person's amplitude may still
differ from the general model's (a speaker who barely opens the mouth, or one who opens it wide): the
general mouth's offsets from rest are then scaled by the ratio of the footage's inner-lip gap spread
to the general model's on the same speaking frames (a spread, not a fit in time), kept only when it
brings the mouth closer in the same cross-validation (`MIN_DISTANCE_GAIN`), and only where the general
model follows the footage's lips (`GAIN_MIN_R`). With little speech, lips the general model does not
follow, or lips it already follows at their own amplitude, the general model is kept as it is.
Measured on held-out people (the first 60% of a clip fitted, the last 40% scored;
`training/eval_adaptation.py`, `benchmarks/enroll.py`): see `assets/MODELS.md`.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from avatar.face import landmarks as lm
from avatar.metrics import pearson

LAMBDAS = (100.0, 300.0, 1000.0, 3000.0, 10000.0, np.inf)  # ridge strengths tried; inf: no correction
OFFSET_SCALE = 10.0  # the general mouth's offsets (≈ 0.1 mouth widths) scaled to the features' order
FOLDS = 4
FOLD_GAP = 12  # frames left out on each side of a validation fold (the features see ±0.5 s)
MIN_FRAMES = 100  # fewer speaking frames than this (4 s at 25 fps): no adaptation
SMOOTHING = (0.25, 0.5, 0.25)  # weights of the previous, current and next frame's change (files)
MIN_GAIN = 0.02  # cross-validated opening r must rise at least this much over the general model
MIN_DISTANCE_GAIN = 0.03  # an amplitude gain: the cross-validated mouth distance must fall at least this share
GAIN_RANGE = (0.5, 2.0)  # an amplitude gain is clipped to this range
GAIN_MIN_R = 0.3  # an amplitude gain only where the general model follows the footage's lips this well (cross-validated
#                   opening r): where it does not, any shrinking brings the mouth closer, and the gain would say nothing
FIT = "head"  # what the tracked mouths were fitted in: the head's own coordinates (`PosedRest.offsets_of`)


@dataclasses.dataclass
class MotionAdaptation:
    """`x_mean (D + 2K,)`, `y_mean (2K,)`, `weights (D + 2K, 2K)` float32 (empty without a correction);
    `lam`: the ridge strength chosen (inf: no correction, the amplitude gain alone); `frames`: the frames it was fitted on; `cv_r` / `cv_r_general`:
    cross-validated opening r with and without it; `speech_model` / `motion_model`: sha256 of the
    speech encoder and the offline motion model it was fitted with (it reads their features and
    mouths, so it holds for those alone: `MotionPredictor.check_adaptation`); `gain`: the corrected
    offsets from rest are scaled by it (1 with a correction; the amplitude gain without)."""

    x_mean: np.ndarray
    y_mean: np.ndarray
    weights: np.ndarray
    lam: float
    frames: int
    cv_r: float
    cv_r_general: float
    speech_model: str
    motion_model: str
    gain: float = 1.0

    def apply(self, features: np.ndarray, mouths: np.ndarray, rest: np.ndarray, smooth: bool = True) -> np.ndarray:
        """`features (T, D)` at video frames, the general model's `mouths (T, K, 2)` crop pixels (relative
        to `rest (K, 2)`'s anchor) → the adapted mouths `(T, K, 2) float32`. `smooth`: the change is
        averaged over each frame and its neighbours (SMOOTHING; a file's whole sequence), as one
        frame's features alone make it jitter; a stream (no look-ahead) passes False."""
        if len(mouths) == 0:
            return mouths
        width = float(lm.mouth_width(np.asarray(rest, np.float64)))
        offsets = (np.asarray(mouths, np.float64) - rest) / width
        if np.isfinite(self.lam):  # the correction
            change = (inputs(features, offsets) - self.x_mean) @ self.weights.astype(np.float64) + self.y_mean
            if smooth and len(change) > 2:
                padded = np.concatenate([change[:1], change, change[-1:]])
                change = SMOOTHING[0] * padded[:-2] + SMOOTHING[1] * padded[1:-1] + SMOOTHING[2] * padded[2:]
            offsets = offsets + change.reshape(offsets.shape)
        return (rest + self.gain * offsets * width).astype(np.float32)

    def arrays(self) -> typing.Dict[str, np.ndarray]:
        return {"x_mean": self.x_mean, "y_mean": self.y_mean, "weights": self.weights}

    def meta(self) -> typing.Dict[str, typing.Any]:
        return {"lam": self.lam, "frames": self.frames, "cv_r": self.cv_r, "cv_r_general": self.cv_r_general,
                "speech_model": self.speech_model, "motion_model": self.motion_model, "fit": FIT, "gain": self.gain}

    @classmethod
    def from_parts(cls, arrays: typing.Mapping[str, np.ndarray], meta: typing.Mapping[str, typing.Any]) -> "MotionAdaptation":
        return cls(arrays["x_mean"], arrays["y_mean"], arrays["weights"], float(meta["lam"]), int(meta["frames"]),
                   float(meta["cv_r"]), float(meta["cv_r_general"]), str(meta["speech_model"]), str(meta["motion_model"]),
                   float(meta.get("gain", 1.0)))  # files written before 2026-12-03 hold corrections alone


def inputs(features: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The correction's input `(T, D + 2K) float64`: the features and the general offsets, scaled."""
    return np.concatenate([np.asarray(features, np.float64), OFFSET_SCALE * np.asarray(offsets, np.float64).reshape(len(offsets), -1)], 1)


def _solve(x: np.ndarray, y: np.ndarray, lam: float) -> typing.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    x_mean = x.mean(0)
    if not np.isfinite(lam):
        return x_mean, np.zeros(y.shape[1]), np.zeros((x.shape[1], y.shape[1]))
    centred = x - x_mean
    y_mean = y.mean(0)
    return x_mean, y_mean, np.linalg.solve(centred.T @ centred + lam * np.eye(x.shape[1]), centred.T @ (y - y_mean))


def _opening_r(offsets: np.ndarray, real_offsets: np.ndarray, rest: np.ndarray, width: float) -> float:
    return pearson(lm.inner_gap(rest + offsets * width), lm.inner_gap(rest + real_offsets * width))


def _amplitude_gain(offsets: np.ndarray, real_offsets: np.ndarray, rest: np.ndarray, width: float) -> float:
    """The real inner-lip gap's spread over the general model's on the same frames, within GAIN_RANGE."""
    spread = float(lm.inner_gap(rest + offsets * width).std())
    return float(np.clip(lm.inner_gap(rest + real_offsets * width).std() / spread, *GAIN_RANGE)) if spread > 0 else 1.0


def fit_adaptation(features: np.ndarray, general: np.ndarray, real: np.ndarray, rest: np.ndarray, keep: np.ndarray,
                   models: typing.Tuple[str, str],
                   lambdas: typing.Sequence[float] = LAMBDAS) -> typing.Tuple[typing.Optional[MotionAdaptation], str]:
    """Fit on one person's frames: `features (T, D)` (the speech encoder's, at video frames), `general
    (T, K, 2)` (the general model's mouths), `real (T, K, 2)` (the tracked mouths with the head's
    pose taken out, as the offsets are drawn: `rest + PosedRest.offsets_of(face)`; fitted on mouths
    with only the anchor's shift taken out, it learned from speech how the jaw's contour slides as the
    head turns, and drew it), `rest (K, 2)`, all crop pixels; `keep (T,) bool`: frames with speech and
    a tracked face; `models`: the sha256 of the speech encoder and the motion model that made
    `features` and `general` (`MotionPredictor.models`). Returns the adaptation, or None and why it
    was skipped."""
    keep = np.asarray(keep, bool)
    index = np.flatnonzero(keep)
    if index.size < MIN_FRAMES:
        return None, f"{index.size} speaking frames with a face (fewer than {MIN_FRAMES})"
    width = float(lm.mouth_width(np.asarray(rest, np.float64)))
    offsets = (np.asarray(general, np.float64) - rest) / width
    real_offsets = (np.asarray(real, np.float64) - rest) / width
    x = inputs(features, offsets)
    y = (real_offsets - offsets).reshape(len(offsets), -1)
    folds = [(fold, index[(index < fold.min() - FOLD_GAP) | (index > fold.max() + FOLD_GAP)])
             for fold in np.array_split(index, FOLDS)]  # (validation frames, the training frames away from them)
    scores = {}
    for lam in lambdas:
        rs = []
        for fold, train in folds:
            x_mean, y_mean, weights = _solve(x[train], y[train], lam)
            adapted = offsets[fold] + ((x[fold] - x_mean) @ weights + y_mean).reshape(len(fold), *offsets.shape[1:])
            rs.append(_opening_r(adapted, real_offsets[fold], rest, width))
        scores[lam] = float(np.nanmean(rs))
    best = max(scores, key=lambda lam: (scores[lam], lam))  # ties: the stronger shrinkage
    general_r = scores.get(np.inf, float("nan"))
    if np.isfinite(best) and scores[best] >= general_r + MIN_GAIN:
        x_mean, y_mean, weights = _solve(x[index], y[index], best)
        return MotionAdaptation(x_mean.astype(np.float32), y_mean.astype(np.float32), weights.astype(np.float32), float(best),
                                int(index.size), scores[best], general_r, *models), ""
    # No correction pays: the person's own amplitude, if it brings the mouth closer (a gain leaves r as it is).
    if not general_r >= GAIN_MIN_R:
        return None, f"the general model follows these lips too little to learn their amplitude (cross-validated r {general_r:.2f})"
    distance = lambda a, b: float(np.abs(a - b).mean())  # mean L1 per coordinate, rest mouth widths
    general_distance = np.mean([distance(offsets[fold], real_offsets[fold]) for fold, _ in folds])
    gained_distance = np.mean([distance(_amplitude_gain(offsets[train], real_offsets[train], rest, width) * offsets[fold],
                                        real_offsets[fold]) for fold, train in folds])
    if not gained_distance <= (1 - MIN_DISTANCE_GAIN) * general_distance:
        return None, (f"the general model already follows these lips as well (cross-validated r {general_r:.2f}), "
                      "and at the footage's amplitude it would be no closer")
    none = np.zeros(0, np.float32)  # no correction
    return MotionAdaptation(none, none, none.reshape(0, 0), float(np.inf), int(index.size), general_r, general_r, *models,
                            gain=_amplitude_gain(offsets[index], real_offsets[index], rest, width)), ""
