"""Read (and encode parts of) the preprocessing cache written by `training.preprocess`.

    clips = open_cache("cache", split="train")
    clip = clips[0]
    clip.landmarks()        # (T, 478, 2) float32, 128-crop pixels, NaN where no face
    clip.crops(128)         # (T, 128, 128, 3) uint8 RGB
    clip.mel_windows()      # (T, 16, 80) float32 in [-4, 4]
"""

from __future__ import annotations

import functools
import json
import lzma
import pathlib
import typing

import numpy as np

from avatar import media
from avatar.audio import cut_windows
from avatar.config import MelConfig
from avatar.face.align import rescale_points

BASE_CROP = 128
LANDMARK_STEPS_PER_PIXEL = 64  # landmark quantisation: 1/64 px of the 128 crop


def encode_landmarks(landmarks: np.ndarray, valid: np.ndarray) -> bytes:
    """`(T, 478, 2)` crop-128 pixels → lzma-compressed int16 time differences (1/64 px steps).

    Frames without a face hold the previous value (the reader restores NaN from `valid`); int16
    differences wrap around and the int16 running sum undoes them exactly.
    """
    points = np.array(landmarks, np.float64)
    held = points.copy()
    last = np.zeros(points.shape[1:])
    for t in range(points.shape[0]):
        if valid[t] and np.isfinite(points[t]).all():
            last = points[t]
        held[t] = last
    q = np.round(held * LANDMARK_STEPS_PER_PIXEL)
    if np.abs(q).max(initial=0) >= 32767:
        raise ValueError("landmarks out of the cache's range (|x| < 512 px)")
    q = q.astype(np.int16)
    deltas = np.diff(q, axis=0, prepend=np.zeros((1,) + q.shape[1:], np.int16))
    header = np.array(q.shape, np.int32).tobytes()
    return header + lzma.compress(deltas.tobytes(), preset=6)


def decode_landmarks(blob: bytes, valid: np.ndarray) -> np.ndarray:
    shape = tuple(np.frombuffer(blob[:12], np.int32))
    deltas = np.frombuffer(lzma.decompress(blob[12:]), np.int16).reshape(shape)
    q = np.cumsum(deltas, axis=0, dtype=np.int16)
    points = q.astype(np.float32) / LANDMARK_STEPS_PER_PIXEL
    points[~np.asarray(valid, bool)] = np.nan
    return points


class ClipCache:
    """One preprocessed clip. Arrays load on first use."""

    def __init__(self, folder: typing.Union[str, pathlib.Path]):
        self.folder = pathlib.Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.folder}: not a complete cached clip (no meta.json)")
        self.meta: typing.Dict[str, typing.Any] = json.loads(meta_path.read_text())

    def __repr__(self) -> str:
        return f"ClipCache({self.meta['clip_id']!r}, {self.n_frames} frames, {self.meta['split']})"

    @property
    def clip_id(self) -> str:
        return self.meta["clip_id"]

    @property
    def n_frames(self) -> int:
        return int(self.meta["n_frames"])

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def has_audio(self) -> bool:
        return bool(self.meta.get("has_audio"))

    @functools.cached_property
    def arrays(self) -> typing.Dict[str, np.ndarray]:
        with np.load(self.folder / "data.npz") as data:
            return {k: data[k] for k in data.files}

    @property
    def valid(self) -> np.ndarray:
        return self.arrays["valid"]

    @property
    def keep(self) -> np.ndarray:
        """`(T,) bool`: frames kept for training (reason 0)."""
        return self.arrays["reason"] == 0

    @functools.cached_property
    def _landmarks(self) -> np.ndarray:
        return decode_landmarks((self.folder / "landmarks.bin").read_bytes(), self.valid)

    def landmarks(self, crop_size: int = BASE_CROP) -> np.ndarray:
        """`(T, 478, 2) float32` landmarks in pixels of a `crop_size` crop; NaN where no face (a new array)."""
        return rescale_points(self._landmarks, BASE_CROP, crop_size)

    def crops(self, crop_size: int = BASE_CROP) -> np.ndarray:
        """`(T, S, S, 3) uint8` RGB aligned crops."""
        path = self.folder / f"crops_{crop_size}.mp4"
        if not path.exists():
            raise FileNotFoundError(f"{path}: this cache has no {crop_size} crops (run preprocess with --crop-sizes {crop_size})")
        frames = [frame for _, frame in media.iter_video_frames(path)]
        return np.stack(frames)

    def mel_windows(self, config: MelConfig = MelConfig()) -> np.ndarray:
        """`(T, 16, 80) float32` per-frame mel windows (silence-padded at the clip's ends)."""
        if not self.has_audio:
            raise ValueError(f"{self.clip_id} has no audio")
        a = self.arrays
        # mel_start is stored without offset: the mel frame at each video frame's timestamp.
        return cut_windows(a["mel"].astype(np.float32), a["mel_start"].astype(np.int64) + config.window_offset, config)


def open_cache(root: typing.Union[str, pathlib.Path], split: typing.Optional[str] = None,
               kind: typing.Optional[str] = None) -> typing.List[ClipCache]:
    """Every complete clip in a cache, optionally only one split (`train`/`val`) or kind."""
    folders = sorted(p for p in (pathlib.Path(root) / "clips").iterdir() if (p / "meta.json").exists())
    clips = [ClipCache(p) for p in folders]
    return [c for c in clips if (split is None or c.meta["split"] == split) and (kind is None or c.meta["kind"] == kind)]
