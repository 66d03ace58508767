"""Idle life for a still portrait: blinks and a little head motion (see `IdleConfig`).

    closure = blink_curve(n_frames, fps, config)                 # (T,) in [0, 1], 1: eyes shut
    moves = head_motion(n_frames, fps, config, centre, face_height)   # (T, 2, 3) frame → moved frame
    frame = close_eyes(image, landmarks, closure[i])              # lids warped together
    frame = move_frame(frame, moves[i])

Everything is seeded by `config.seed`, so the same inputs give the same video.
"""

from __future__ import annotations

import math
import typing

import cv2
import numpy as np

from avatar.config import IdleConfig
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, apply_transform
from avatar.render.base import FrameJob, Identity

# Mediapipe lids: (outer corner, inner corner, upper-lid centre, lower-lid centre) for each eye.
EYES = ((33, 133, 159, 145), (263, 362, 386, 374))


class BlinkSchedule:
    """Blink times drawn as needed (a live stream can ask for any time): the first blink comes early
    but not at once, then gaps of `min_blink_gap_s` plus an exponential wait (`blinks_per_minute` on
    average). Each blink closes in 40% of `blink_seconds` and opens in the rest."""

    def __init__(self, config: IdleConfig = IdleConfig()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.mean_gap = 60.0 / config.blinks_per_minute if config.blinks_per_minute > 0 else math.inf
        self.starts: typing.List[float] = []
        self.next_start = self.rng.uniform(0.5, max(0.6, self.mean_gap)) if math.isfinite(self.mean_gap) else math.inf

    def closure(self, times: np.ndarray) -> np.ndarray:
        """Eye closure at `times (T,)` seconds → `(T,) float32` in [0, 1] (1: shut)."""
        times = np.asarray(times, np.float64)
        out = np.zeros(times.shape, np.float32)
        if not self.config.enabled or times.size == 0:
            return out
        while self.next_start <= times.max():
            self.starts.append(self.next_start)
            self.next_start += self.config.min_blink_gap_s + self.rng.exponential(max(self.mean_gap - self.config.min_blink_gap_s, 0.1))
        starts = np.asarray(self.starts)
        first, last = np.searchsorted(starts, [times.min() - self.config.blink_seconds, times.max()], side="right")
        for start in starts[max(0, first - 1):last]:  # only blinks that can touch these times (a live stream grows)
            u = (times - start) / self.config.blink_seconds
            inside = (u >= 0) & (u <= 1)
            if not inside.any():
                continue
            shape = np.where(u < 0.4, np.sin(np.clip(u / 0.4, 0, 1) * math.pi / 2), np.sin(np.clip((1 - u) / 0.6, 0, 1) * math.pi / 2))
            out = np.maximum(out, (shape * inside).astype(np.float32))
        return out


def blink_curve(n_frames: int, fps: float, config: IdleConfig = IdleConfig()) -> np.ndarray:
    """Eye closure per frame, `(T,) float32` in [0, 1] (see `BlinkSchedule`)."""
    return BlinkSchedule(config).closure(np.arange(n_frames) / fps)


def head_motion(n_frames: int, fps: float, config: IdleConfig, centre: np.ndarray, face_height: float, start: int = 0) -> np.ndarray:
    """Similarity transforms frame → moved frame for frames `start .. start + n_frames - 1`,
    `(T, 2, 3) float64`: smooth roll, shift and zoom about `centre (2,)` (the face centre in pixels);
    identity transforms when idle motion is off. The same frame gets the same motion in any call."""
    moves = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n_frames, 1, 1))
    if not config.enabled or n_frames == 0:
        return moves
    rng = np.random.default_rng(config.seed + 1)
    t = (start + np.arange(n_frames)) / fps

    def sway() -> np.ndarray:  # in [-1, 1], three incommensurate slow sines with random phases
        periods = config.head_period_s * np.array([1.0, 0.61, 0.37])
        weights = np.array([0.6, 0.3, 0.1])
        phases = rng.uniform(0, 2 * math.pi, 3)
        return (weights[:, None] * np.sin(2 * math.pi * t[None] / periods[:, None] + phases[:, None])).sum(axis=0)

    angle = np.radians(config.head_rotation_deg) * sway()
    scale = 1.0 + config.head_scale * sway()
    shift = config.head_shift * face_height * np.stack([sway(), sway()], axis=1)
    cx, cy = np.asarray(centre, np.float64)
    for i in range(n_frames):
        c, s = scale[i] * math.cos(angle[i]), scale[i] * math.sin(angle[i])
        rotation = np.array([[c, -s], [s, c]])
        moves[i, :, :2] = rotation
        moves[i, :, 2] = np.array([cx, cy]) + shift[i] - rotation @ np.array([cx, cy])
    return moves


def move_frame(image: np.ndarray, move: np.ndarray) -> np.ndarray:
    """Warp `(H, W, 3) uint8` by a `(2, 3)` frame → moved-frame transform; the edges are mirrored."""
    if np.allclose(move, [[1, 0, 0], [0, 1, 0]]):
        return image
    h, w = image.shape[:2]
    return cv2.warpAffine(image, np.asarray(move, np.float64), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def close_eyes(image: np.ndarray, landmarks: np.ndarray, closure: float) -> np.ndarray:
    """Close both eyes by `closure` in [0, 1]: the skin above and below each eye is stretched so the
    lids meet at a line a quarter of the opening above the lower lid (the upper lid travels most, as in
    a real blink). `image: (H, W, 3) uint8`, `landmarks: (478, 2+)` its pixels. Returns a new image."""
    if closure <= 1e-3:
        return image
    points = np.asarray(landmarks, np.float64)[:, :2]
    out = image.copy()
    h, w = image.shape[:2]
    for outer, inner, upper, lower in EYES:
        corner_a, corner_b = points[outer], points[inner]
        width = float(np.linalg.norm(corner_b - corner_a))
        if width < 2:
            continue
        y_upper, y_lower = points[upper, 1], points[lower, 1]
        opening = max(y_lower - y_upper, 1.0)
        centre_x = (corner_a[0] + corner_b[0]) / 2
        y_meet = y_upper + 0.75 * opening
        reach = max(opening * 1.6, width * 0.35)  # how far above and below the lids the skin stretches
        x0, x1 = int(max(0, centre_x - 0.85 * width)), int(min(w, centre_x + 0.85 * width + 1))
        y0, y1 = int(max(0, y_upper - reach)), int(min(h, y_lower + reach + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        # Horizontal weight: full across the eye, fading to none beyond the corners.
        across = np.clip(1.0 - np.abs(xs - centre_x) / (0.85 * width), 0, 1)
        weight = closure * np.clip(across * 1.6, 0, 1) ** 1.5
        top, bottom = y_upper - reach, y_lower + reach
        # Above the meeting line: output [top, y_meet] samples source [top, y_meet - c (y_meet - y_upper)].
        upper_src = top + (ys - top) * (y_meet - weight * (y_meet - y_upper) - top) / (y_meet - top)
        lower_src = bottom - (bottom - ys) * (bottom - (y_meet + weight * (y_lower - y_meet))) / (bottom - y_meet)
        src_y = np.where(ys <= y_meet, upper_src, lower_src)
        src_y = np.where((ys < top) | (ys > bottom), ys, src_y).astype(np.float32)
        out[y0:y1, x0:x1] = cv2.remap(image, xs, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


def face_centre_and_height(landmarks: np.ndarray) -> typing.Tuple[np.ndarray, float]:
    """Centre `(2,)` and height (px) of the landmarks' box: what idle head motion turns about."""
    box = np.asarray(landmarks)[:, :2]
    return box.mean(axis=0), float(np.ptp(box[:, 1]))


def still_job(aligner: FaceAligner, identity: Identity, portrait: np.ndarray, landmarks: np.ndarray, mouth: np.ndarray,
              closure: float = 0.0, move: typing.Optional[np.ndarray] = None) -> FrameJob:
    """One frame of a still `portrait (H, W, 3) uint8` with `landmarks (478, 3)`: eyes closed by
    `closure`, the picture moved by `move` (`(2, 3)`, frame → moved frame; None: still), the motion
    model's `mouth (59, 2)` (relative to the rest anchor, crop pixels of `aligner`) placed on the
    moved face."""
    frame = close_eyes(portrait, landmarks, closure)
    frame_landmarks = np.asarray(landmarks, np.float32)
    if move is not None:
        frame = move_frame(frame, move)
        frame_landmarks = apply_transform(landmarks, move).astype(np.float32)
    transform = aligner.transform_for(frame_landmarks)
    crop_landmarks = apply_transform(frame_landmarks, transform).astype(np.float32)
    return FrameJob(frame, transform, crop_landmarks, frame_landmarks, mouth + (lm.mouth_anchor(crop_landmarks) - identity.rest_anchor))
