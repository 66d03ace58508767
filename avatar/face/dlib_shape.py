"""A second, independent face tracker for evaluation: dlib's HOG face detector and its 68-point shape
predictor (`shape_predictor_68_face_landmarks.dat` from the pinned `face-recognition-models`; trained
on iBUG 300-W, nothing in common with the engine's mediapipe mesh). Lip sync measured by the engine's
own tracker could reward mouths that only that tracker reads; the same measure through this one
cannot (`avatar eval --second-tracker`, `benchmarks.sync`).

    tracker = DlibMouthTracker()
    openings = tracker.openings(frames)   # (T,) float64, inner-lip gap / inter-ocular distance, NaN: no face

Points (0-based, dlib's 68): 36-41 and 42-47 the eyes, 62 and 66 the centre of the upper and lower
inner lip (as `avatar.face.landmarks.mouth_opening` on the mesh).
"""

from __future__ import annotations

import typing

import numpy as np

SHAPE_MODEL_68 = "face_recognition_models/models/shape_predictor_68_face_landmarks.dat"
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)
UPPER_LIP_INNER, LOWER_LIP_INNER = 62, 66


class DlibMouthTracker:
    """dlib's 68 points per frame, in the largest face its detector finds (upsampled once when it finds
    none at the frame's size: faces under ~80 px)."""

    def __init__(self):
        import dlib

        from avatar.identity import face_model_file

        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(face_model_file(SHAPE_MODEL_68)))

    def landmarks(self, image: np.ndarray) -> typing.Optional[np.ndarray]:
        """`image (H, W, 3) uint8` RGB → `(68, 2) float64` pixels, or None without a face."""
        image = np.ascontiguousarray(image, np.uint8)  # dlib takes only C-contiguous uint8 arrays
        boxes = self.detector(image, 0) or self.detector(image, 1)
        if not boxes:
            return None
        shape = self.predictor(image, max(boxes, key=lambda box: box.area()))
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)

    def openings(self, frames: typing.Iterable[np.ndarray]) -> np.ndarray:
        """Frames `(H, W, 3) uint8` RGB → `(T,) float64`: the inner-lip gap at the lips' centre over the
        distance between the eye centres; NaN where no face was found."""
        out = []
        for image in frames:
            points = self.landmarks(image)
            out.append(np.nan if points is None else mouth_opening(points))
        return np.array(out, np.float64)


def mouth_opening(points: np.ndarray) -> float:
    """dlib's 68 points `(68, 2)` → inner-lip gap / inter-ocular distance."""
    eyes = np.linalg.norm(points[RIGHT_EYE].mean(axis=0) - points[LEFT_EYE].mean(axis=0))
    return float(np.linalg.norm(points[LOWER_LIP_INNER] - points[UPPER_LIP_INNER]) / max(eyes, 1e-9))
