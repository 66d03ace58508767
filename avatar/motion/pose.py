"""The mouth placed at each frame's head pose: the rest mouth kept in 3D, in the head's own
coordinates, and turned with the head (yaw, pitch, roll) into each frame of a video.

The motion model gives the mouth as offsets from the person's rest mouth. In a video whose head turns
and tilts, a rest mouth taken from some frames and moved to the others by the mouth anchor alone
keeps the jaw of those frames' pose: a head tilted down in the closed frames and up in the others
gets a jaw drawn well inside the face, and the warp then drags the neck and collar up over the chin.
Here the closed frames' mouth and jaw (the face mesh's 3D points) are taken into the head's own
coordinates (a 3D similarity fitted on points that speech does not move: eyes, nose, forehead,
cheeks), and each frame gets them back at its own pose, the model's offsets added in the head's
frontal plane.

    posed = PosedRest.from_frames(crop_landmarks, rest)        # (N, 478, 3) crop px; rest (59, 2) from rest_pose
    mouth = posed.place(frame_landmarks_3d, offsets)           # (59, 2) crop px of that frame
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from avatar.face import landmarks as lm

# Points that speech does not move: eye corners, nose bridge and tip, forehead, cheeks at eye and nose height.
HEAD_POINTS = np.array([33, 133, 263, 362, 168, 6, 197, 195, 1, 4, 10, 109, 338, 151, 93, 323, 234, 454, 127, 356])


def similarity_3d(src: np.ndarray, dst: np.ndarray) -> typing.Tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity `(scale, rotation (3, 3), translation (3,))` taking `src (N, 3)` onto
    `dst (N, 3)` (Umeyama; no reflection): `dst ≈ scale · rotation @ src + translation`."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[2] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((sigma * d).sum() / max((a ** 2).sum() / len(src), 1e-12))
    return scale, rotation, mu_d - scale * rotation @ mu_s


def common_head(faces: typing.Sequence[np.ndarray]) -> np.ndarray:
    """HEAD_POINTS `(P, 3)` of several faces `(478, 3)` brought onto one another (the first as the
    start) and their median: one head shape, in the first face's pose."""
    head = np.asarray(faces[0], np.float64)[HEAD_POINTS]
    for _ in range(2):
        into = [similarity_3d(np.asarray(f, np.float64)[HEAD_POINTS], head) for f in faces]
        head = np.median([s * np.asarray(f, np.float64)[HEAD_POINTS] @ r.T + t for f, (s, r, t) in zip(faces, into)], axis=0)
    return head


def in_head(face: np.ndarray, head: np.ndarray, points: np.ndarray = lm.MOUTH_AND_JAW) -> np.ndarray:
    """`points` of `face (478, 3)` in the coordinates of `head (P, 3)` (`common_head`): the face's
    head pose taken out, `(K, 3)`."""
    face = np.asarray(face, np.float64)
    scale, rotation, shift = similarity_3d(face[HEAD_POINTS], head)
    return scale * face[points] @ rotation.T + shift


@dataclasses.dataclass
class PosedRest:
    """head `(P, 3)`: HEAD_POINTS in the head's coordinates; mouth `(59, 3)`: the closed mouth and jaw
    there, and anchor `(3,)` its mouth anchor; rest `(59, 2)`: the 2D rest mouth the motion model's
    offsets are measured from."""

    head: np.ndarray
    mouth: np.ndarray
    rest: np.ndarray
    anchor: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))

    @classmethod
    def from_frames(cls, crop_landmarks: np.ndarray, rest: np.ndarray, closed: np.ndarray) -> "PosedRest":
        """From `crop_landmarks (N, 478, 3)` of a video's frames with a face and which of them are the
        closed ones (`closed (N,) bool`, as `rest_pose` chose them); `rest (59, 2)` from `rest_pose`."""
        frames = np.asarray(crop_landmarks, np.float64)[np.asarray(closed, bool)]
        if frames.shape[-1] < 3 or not len(frames):
            raise ValueError("the head pose needs 3D landmarks (N, 478, 3) of at least one closed frame")
        head = common_head(frames)
        points = np.median([in_head(f, head, np.r_[lm.MOUTH_AND_JAW, lm.MOUTH_ANCHOR]) for f in frames], axis=0)
        return cls(head, points[:len(lm.MOUTH_AND_JAW)], np.asarray(rest, np.float64), points[len(lm.MOUTH_AND_JAW):].mean(0))

    def place(self, frame_landmarks: np.ndarray, mouth: np.ndarray) -> np.ndarray:
        """The motion model's `mouth (59, 2)` (relative to `rest`) in a frame whose face is
        `frame_landmarks (478, 3)` (crop px): the closed mouth at the frame's head pose plus the
        model's offsets, turned with the head. Returns `(59, 2)` crop px."""
        face = np.asarray(frame_landmarks, np.float64)
        scale, rotation, _ = similarity_3d(self.head, face[HEAD_POINTS])
        offsets = np.asarray(mouth, np.float64) - self.rest
        posed = self.mouth + np.c_[offsets, np.zeros(len(offsets))]
        # turned with the head about the mouth anchor, which is put where the frame's is (the fit's
        # own translation carries the tracker's depth noise over the whole head)
        return (scale * (posed - self.anchor) @ rotation.T)[:, :2] + lm.mouth_anchor(face)

    def offsets_of(self, frame_landmarks: np.ndarray) -> np.ndarray:
        """The inverse of `place`: a frame's own mouth and jaw (its face `frame_landmarks (478, 3)`,
        crop px) as the change from the closed mouth in the head's coordinates, about the mouth anchor:
        `(59, 2)`, in the units of `rest`'s offsets. A head that turns moves the jaw's contour on
        the picture, not here."""
        points = in_head(frame_landmarks, self.head, np.r_[lm.MOUTH_AND_JAW, lm.MOUTH_ANCHOR])
        mouth, anchor = points[:len(lm.MOUTH_AND_JAW)], points[len(lm.MOUTH_AND_JAW):].mean(0)
        return ((mouth - anchor) - (self.mouth - self.anchor))[:, :2]
