"""A person, prepared once for rendering (`avatar.render.base.Identity`): from a portrait or from the
frames of a video.

    people = IdentityBuilder(face_config, crop_size=128, references=renderer.references)
    identity = people.from_image(portrait)                        # its face found, or given landmarks
    identity = people.from_frames(crops, crop_landmarks, drift_frames, inner=people.open_mouth(...))

What a person holds: the closed rest mouth the motion is relative to (for a portrait whose mouth is
open, inferred by the closed-mouth prior, `avatar/motion/closed.py`); the renderer's reference crops
(a closed and an open mouth); the open mouth the warp renderer takes teeth and tongue from (the
person's own when a frame shows one, else the bundled bank's closest); the drift monitor's
references (the source itself and any extra photos of the same person).
"""

from __future__ import annotations

import os
import typing

import numpy as np

from avatar import media
from avatar.config import AlignConfig, FaceConfig
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, rescale_points, rescale_transform
from avatar.motion.closed import MIN_OPEN_GAP, ClosedMouthPrior
from avatar.render.base import Identity
from avatar.render.warp import InnerMouth, open_inner

PathLike = typing.Union[str, os.PathLike]
INNER_SIZE = 256  # crop side at which an identity's open mouth is kept for the warp renderer


def reference_frames(crop_landmarks: np.ndarray, count: int) -> typing.List[int]:
    """Which of N frames (`crop_landmarks (N, 478, 3)`) give a renderer's `count` references: the
    median of the most-closed tenth of the mouths, then of the most-open tenth, alternating, so the
    renderer sees the lips at rest and the teeth."""
    order = np.argsort(lm.mouth_opening(crop_landmarks))
    tenth = max(1, len(order) // 10)
    closed, opened = order[:tenth], order[-tenth:]
    return [int(closed[len(closed) // 2]) if k % 2 == 0 else int(opened[len(opened) // 2]) for k in range(count)]


class IdentityBuilder:
    """Makes `Identity`s for a renderer that keeps `references` reference crops (0 for the warp),
    aligned at `crop_size`; faces are found with `face_config`."""

    def __init__(self, face_config: FaceConfig = FaceConfig(), crop_size: int = AlignConfig.crop_size, references: int = 0):
        self.face_config, self.references = face_config, references
        self.crop_size = crop_size
        self.aligner = FaceAligner(AlignConfig(crop_size=crop_size))
        self.inner_aligner = FaceAligner(AlignConfig(crop_size=INNER_SIZE))
        self.closed_prior = ClosedMouthPrior()

    def face_tracker(self):
        """A FaceTracker with these face settings (use as a context manager)."""
        from avatar.face.tracker import FaceTracker

        return FaceTracker(self.face_config)

    def reference_photos(self, paths: typing.Sequence[PathLike]) -> typing.List[typing.Tuple[np.ndarray, np.ndarray]]:
        """`(image, landmarks (478, 3))` of extra photos of the person, for the drift monitor."""
        if not paths:
            return []
        out = []
        with self.face_tracker() as tracker:
            for path in paths:
                image = media.read_image(path)
                out.append((image, tracker.select(image, what=str(path)).landmarks))
        return out

    def from_image(self, image: np.ndarray, landmarks: typing.Optional[np.ndarray] = None, what: str = "the image",
                   extra_references: typing.Sequence[PathLike] = ()) -> Identity:
        """A person from one portrait `(H, W, 3) uint8` (its face found unless `landmarks (478, 3)` given)."""
        from avatar.motion.runner import rest_pose

        if landmarks is None:
            with self.face_tracker() as tracker:
                landmarks = tracker.select(image, what=what).landmarks
        aligned = self.aligner.align(image, landmarks)
        rest, anchor = rest_pose(aligned.landmarks)
        inferred = lm.inner_gap_ratio(rest) >= MIN_OPEN_GAP
        if inferred:  # the photo's mouth is open: its closed mouth, from the prior, is where speech starts and ends
            rest = self.closed_prior.close(rest, anchor, float(lm.interocular(aligned.landmarks)))
        return Identity([aligned.crop] * self.references, rest, anchor, [(image, landmarks)] + self.reference_photos(extra_references),
                        self.open_mouth(image, aligned.transform, aligned.landmarks), rest_inferred=inferred)

    def from_frames(self, crops: typing.Sequence[np.ndarray], crop_landmarks: np.ndarray,
                    drift_frames: typing.Sequence[typing.Tuple[np.ndarray, np.ndarray]],
                    extra_references: typing.Sequence[PathLike] = (), inner: typing.Optional[InnerMouth] = None) -> Identity:
        """A person from frames of a video: `crop_landmarks (N, 478, 3)` crop pixels of every usable
        frame, and `crops`, the K crops `(S, S, 3) uint8` of `reference_frames(crop_landmarks, K)`.
        `drift_frames`: `(frame, landmarks)` pairs for the drift monitor; `inner`: the open mouth
        (`open_mouth` of the most open frame)."""
        from avatar.motion.runner import rest_pose

        rest, anchor = rest_pose(crop_landmarks)
        return Identity(list(crops), rest, anchor, list(drift_frames) + self.reference_photos(extra_references),
                        inner or InnerMouth(None, None))

    def reference_frames(self, crop_landmarks: np.ndarray) -> typing.List[int]:
        """`reference_frames` for this renderer's count."""
        return reference_frames(crop_landmarks, self.references)

    def open_mouth(self, frame: np.ndarray, transform: np.ndarray, crop_landmarks: np.ndarray) -> InnerMouth:
        """A frame's mouth at INNER_SIZE for the warp renderer if it is open (with a bundled mouth's
        lower row when it shows only upper teeth); if it is not, the bundled open mouth that suits
        these lips best (`avatar.render.warp.borrowed_mouth`).
        `transform`: frame → crop at `crop_size`; `crop_landmarks` in that crop."""
        return open_inner(*self.inner_source(frame, transform, crop_landmarks), INNER_SIZE)

    def inner_source(self, frame: np.ndarray, transform: np.ndarray, crop_landmarks: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """What `open_mouth` is made from: the frame's aligned crop at INNER_SIZE `(S, S, 3) uint8` and its
        mouth `(59, 2)` there (an avatar file keeps these, and rebuilds the open mouth from them)."""
        mouth = rescale_points(np.asarray(crop_landmarks)[lm.MOUTH_AND_JAW, :2], self.crop_size, INNER_SIZE)
        return self.inner_aligner.crop(frame, rescale_transform(transform, self.crop_size, INNER_SIZE)), mouth
