"""Faces through a video: track → smooth the alignment → crop, one frame at a time (streaming)."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from avatar.config import AlignConfig, FaceConfig
from avatar.face.align import AlignedFace, FaceAligner, TransformSmoother
from avatar.face.tracker import FaceTracker


@dataclasses.dataclass
class AlignedFrame:
    """One video frame's face.

    valid: a face was found in this frame. When not, `aligned` holds the crop at the last known
    transform (or None before the first face). `frame_landmarks`: `(478, 3) float32` frame pixels
    (smoothed), or None. `image`: the source frame, `(H, W, 3) uint8` RGB.
    """

    index: int
    timestamp: float
    valid: bool
    aligned: typing.Optional[AlignedFace]
    frame_landmarks: typing.Optional[np.ndarray]
    image: np.ndarray


def align_video(
    frames: typing.Iterable[typing.Tuple[float, np.ndarray]],
    face_config: FaceConfig = FaceConfig(),
    align_config: AlignConfig = AlignConfig(),
    tracker: typing.Optional[FaceTracker] = None,
    what: str = "the video",
) -> typing.Iterator[AlignedFrame]:
    """Yield an `AlignedFrame` per `(timestamp_s, frame (H, W, 3) uint8 RGB)`.

    The alignment transform is one-euro smoothed (when `face_config.smooth`), so the crop does not
    shake; the crop-space landmarks are the smoothed frame landmarks mapped by that transform.
    """
    own_tracker = tracker is None
    tracker = tracker or FaceTracker(face_config)
    aligner = FaceAligner(align_config)
    smoother = TransformSmoother(face_config, align_config.crop_size)
    last_transform: typing.Optional[np.ndarray] = None
    try:
        frame_iter = iter(frames)
        images: typing.Dict[int, np.ndarray] = {}

        def remember():
            for i, (t, image) in enumerate(frame_iter):
                images[i] = image
                yield t, image

        for tracked in tracker.track(remember(), what=what):
            image = images.pop(tracked.index)
            if tracked.face is None:
                aligned = None
                if last_transform is not None:  # hold the last place; no landmarks in this frame
                    aligned = AlignedFace(image, aligner.size, np.zeros((0, 3), np.float32), last_transform)
                smoother.reset()
                yield AlignedFrame(tracked.index, tracked.timestamp, False, aligned, None, image)
                continue
            transform = aligner.transform_for(tracked.face.landmarks)
            if face_config.smooth:
                transform = smoother(transform, tracked.timestamp)
            last_transform = transform
            aligned = aligner.align(image, tracked.face.landmarks, transform=transform)
            yield AlignedFrame(tracked.index, tracked.timestamp, True, aligned, tracked.face.landmarks, image)
    finally:
        if own_tracker:
            tracker.close()

