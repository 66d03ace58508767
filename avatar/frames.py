"""Where output frames come from: a video's decoded frames kept on disk (`FrameStore`), which source
frame each output frame shows when the speech is longer than the video (`pingpong_schedule`), and a
still scaled to a working size (`fit_image`)."""

from __future__ import annotations

import os
import tempfile
import typing

import numpy as np

from avatar.errors import MediaError


class FrameStore:
    """A video's decoded frames in a temporary file, read back memory-mapped (random access for
    ping-pong without holding a long video in memory)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="avatar-frames-")
        self._path = os.path.join(self._dir.name, "frames.raw")
        self._file = open(self._path, "wb")
        self.shape: typing.Optional[typing.Tuple[int, int, int]] = None
        self.count = 0
        self._frames: typing.Optional[np.ndarray] = None

    def append(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
        if frame.shape != self.shape:
            raise MediaError(f"the video changes size mid-stream ({frame.shape[:2]} after {self.shape[:2]}); re-encode it first")
        self._file.write(np.ascontiguousarray(frame, np.uint8).tobytes())
        self.count += 1

    def __getitem__(self, index: int) -> np.ndarray:
        if self._frames is None:
            self._file.close()
            self._frames = np.memmap(self._path, dtype=np.uint8, mode="r", shape=(self.count, *self.shape))
        return np.array(self._frames[index])

    def close(self) -> None:
        self._file.close()
        self._frames = None
        self._dir.cleanup()



def fit_image(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale `(H, W, 3) uint8` (area averaging) so its longer side is at most `max_side`."""
    import cv2

    scale = max_side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(2, round(image.shape[1] * scale)), max(2, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def pingpong_schedule(n_source: int, n_out: int, motion: np.ndarray, fps: float, mode: str) -> np.ndarray:
    """Which source frame each output frame shows, `(n_out,) int`.

    mode "pingpong": forward, then backward, turning at the stillest frame (least landmark motion,
    `motion: (n_source,)`) within the last (first) second, so the reversal falls on a moment of rest;
    "loop": start again from the first frame. When n_out ≤ n_source it is the first n_out frames.
    """
    if n_out <= n_source:
        return np.arange(n_out)
    if mode == "loop":
        return np.arange(n_out) % n_source
    if mode != "pingpong":
        raise ValueError(f"unknown loop mode {mode!r}")
    if n_source < 3:
        return np.arange(n_out) % n_source
    window = max(2, min(int(round(fps)), n_source // 3))
    late = n_source - window + int(np.argmin(motion[n_source - window:]))
    early = int(np.argmin(motion[:window]))
    if late - early < 2:
        early, late = 0, n_source - 1
    schedule = list(range(0, late + 1))
    forward = False
    while len(schedule) < n_out:
        leg = range(late - 1, early - 1, -1) if not forward else range(early + 1, late + 1)
        schedule.extend(leg)
        forward = not forward
    return np.array(schedule[:n_out])
