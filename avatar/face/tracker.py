"""Face detection, choice and tracking with mediapipe (full-range detector + 478-point face mesh).

Detection: the full-range face detector finds every face (small ones too: it is trained for faces up
to 5 m away); for each, a square region around it is resized to `mesh_input_size` and the face mesh
(with iris refinement) gives 478 landmarks, mapped back to image pixels.

Tracking (video): the region for frame t comes from the landmarks of frame t-1 and only moves when
the face has moved noticeably (hysteresis), so a still input gives identical landmarks every frame;
landmarks are then one-euro filtered. When the mesh loses the face, full detection runs again and
the face nearest the last known place is kept.

Because the region seldom moves, frame t+1 is meshed in frame t's region on a second mesh (a thread
of its own: mediapipe works without the GIL) while frame t is meshed; where frame t then leaves the
region where it was, frame t+1 is meshed again in the new one. The landmarks are exactly those of
one frame after the other (`FaceConfig.mesh_workers` 1), about 1.5 times as fast on two cores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import typing

import cv2
import numpy as np

from avatar.config import FaceConfig
from avatar.errors import FaceTooSmallError, NoFaceError, SeveralFacesError
from avatar.face import landmarks as lm
from avatar.face.align import apply_transform, invert_transform, warp_image
from avatar.face.mediapipe_loader import import_face_mesh, quiet_stderr
from avatar.face.smoothing import OneEuroFilter

ROI_SCALE = 1.9  # mesh region side / face box side
ROI_MOVE_TOLERANCE = 0.04  # keep the region while its centre moves less than this fraction of its side
ROI_SIZE_TOLERANCE = 0.06  # ... and its side changes less than this fraction


@dataclasses.dataclass
class Face:
    """One face in one image.

    landmarks: `(478, 3) float32`, x and y in image pixels, z in the same units (relative depth).
    box: `(x0, y0, x1, y1)` float pixels, the landmarks' bounding box.
    score: detection confidence in [0, 1].
    """

    landmarks: np.ndarray
    box: typing.Tuple[float, float, float, float]
    score: float
    region: typing.Optional[np.ndarray] = None  # the mesh region `(cx, cy, side)` these came from

    @property
    def size(self) -> float:
        """Face box height in pixels (forehead to chin)."""
        return float(self.box[3] - self.box[1])

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])


@dataclasses.dataclass
class TrackedFrame:
    """Tracking result for one video frame: `face` is None when no face was found in it."""

    index: int
    timestamp: float
    face: typing.Optional[Face]
    raw_landmarks: typing.Optional[np.ndarray]  # before smoothing, `(478, 3) float32`


def _landmark_box(points: np.ndarray) -> typing.Tuple[float, float, float, float]:
    x0, y0 = points[:, :2].min(axis=0)
    x1, y1 = points[:, :2].max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


class FaceTracker:
    """Find, choose and track one face. Construct once; models load here.

    `detect(image)` → every face, left to right. `select(image)` → the chosen face (largest, or
    `face_index`), with clear errors for none, too small, or several without a choice.
    `track(frames)` → a `TrackedFrame` per frame, following the chosen face.
    """

    def __init__(self, config: FaceConfig = FaceConfig()):
        self.config = config
        self._mesh_ahead = None  # the second mesh of `track` (made by its first video)
        face_mesh, face_detection = import_face_mesh()
        with quiet_stderr():
            self._detector = face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=config.min_detection_confidence)
            self._detector_near = face_detection.FaceDetection(
                model_selection=0, min_detection_confidence=config.min_detection_confidence)
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                min_detection_confidence=config.min_detection_confidence)
            self._warm_up()

    def _warm_up(self) -> None:
        """Run each graph once on a real face (scikit-image's public-domain astronaut photo), so that
        mediapipe's start-up log lines are swallowed here rather than printed on first use."""
        from skimage import data

        image = np.ascontiguousarray(data.astronaut())
        self._detector.process(image)
        self._detector_near.process(image)
        self._mesh.process(cv2.resize(image[0:256, 96:352], (256, 256)))

    def close(self) -> None:
        self._detector.close()
        self._detector_near.close()
        self._mesh.close()
        if self._mesh_ahead is not None:
            self._mesh_ahead.close()

    def _second_mesh(self):
        """The mesh that runs a frame ahead in `track`, made once (as the first is, warmed up)."""
        if self._mesh_ahead is None:
            face_mesh, _ = import_face_mesh()
            with quiet_stderr():
                self._mesh_ahead = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                                      min_detection_confidence=self.config.min_detection_confidence)
        return self._mesh_ahead

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------ single images
    def _detect_boxes(self, image: np.ndarray) -> typing.List[typing.Tuple[np.ndarray, float]]:
        """Square face regions `(cx, cy, side)` in pixels with scores, from both detectors (deduplicated)."""
        h, w = image.shape[:2]
        found: typing.List[typing.Tuple[np.ndarray, float]] = []
        for detector in (self._detector, self._detector_near):
            result = detector.process(image)
            for det in result.detections or []:
                bb = det.location_data.relative_bounding_box
                cx, cy = (bb.xmin + bb.width / 2) * w, (bb.ymin + bb.height / 2) * h
                side = max(bb.width * w, bb.height * h)
                region = np.array([cx, cy, side])
                duplicate = any(np.hypot(*(r[:2] - region[:2])) < 0.5 * max(r[2], side) for r, _ in found)
                if not duplicate:
                    found.append((region, float(det.score[0])))
        return found

    def _mesh_in_region(self, image: np.ndarray, cx: float, cy: float, side: float, mesh=None) -> typing.Optional[np.ndarray]:
        """Run the face mesh (`mesh`, or the tracker's own) on a square region; landmarks `(478, 3)
        float32` in image pixels, or None."""
        size = self.config.mesh_input_size
        scale = size / side
        # Axis-aligned map image → region, (cx, cy) landing at the region's centre.
        matrix = np.array([[scale, 0, (size - 1) / 2 - scale * cx], [0, scale, (size - 1) / 2 - scale * cy]], np.float64)
        region = warp_image(image, matrix, size)
        result = (mesh or self._mesh).process(region)
        if not result.multi_face_landmarks:
            return None
        # mediapipe's normalised x * size has pixel edges at integers; ours has pixel centres there.
        points = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float64) * size
        points[:, :2] -= 0.5
        return apply_transform(points, invert_transform(matrix)).astype(np.float32)

    def detect(self, image: np.ndarray) -> typing.List[Face]:
        """Every face in `image: (H, W, 3) uint8 RGB`, ordered left to right (by box centre)."""
        _check_image(image)
        faces: typing.List[Face] = []
        for region, score in self._detect_boxes(image):
            points = self._mesh_in_region(image, region[0], region[1], region[2] * ROI_SCALE)
            if points is None:
                continue
            # Refine once in the region the landmarks themselves define: the same region tracking
            # uses next, so a still image gives the same landmarks in `detect` and in every frame.
            mesh_region = _next_region(None, Face(points, _landmark_box(points), score))
            refined = self._mesh_in_region(image, *mesh_region)
            if refined is None:
                mesh_region = None
            else:
                points = refined
            face = Face(points, _landmark_box(points), score, mesh_region)
            if any(_iou(face.box, other.box) > 0.5 for other in faces):
                continue
            faces.append(face)
            if len(faces) >= self.config.max_faces:
                break
        faces.sort(key=lambda f: f.centre[0])
        return faces

    def select(self, image: np.ndarray, what: str = "the image") -> Face:
        """The face to animate: `face_index` (left to right) if set, else the largest one."""
        faces = self.detect(image)
        return self._choose(faces, what)

    def _choose(self, faces: typing.List[Face], what: str) -> Face:
        c = self.config
        if not faces:
            raise NoFaceError(f"no face found in {what}; use a photo or video where one face is clearly visible")
        if c.face_index is not None:
            if not 0 <= c.face_index < len(faces):
                raise SeveralFacesError(
                    f"face index {c.face_index} is out of range: {what} has {len(faces)} face(s), numbered 0..{len(faces) - 1} left to right")
            face = faces[c.face_index]
        else:
            by_size = sorted(faces, key=lambda f: f.size, reverse=True)
            face = by_size[0]
            if len(by_size) > 1 and by_size[1].size >= c.ambiguity_ratio * face.size:
                raise SeveralFacesError(
                    f"{len(faces)} faces of similar size in {what}; choose one with --face-index (0..{len(faces) - 1}, left to right)")
        if face.size < c.min_face_size:
            raise FaceTooSmallError(
                f"the face in {what} is {face.size:.0f} px tall; the minimum is {c.min_face_size} px: use a larger or closer view")
        return face

    # ---------------------------------------------------------------------------------- video
    def track(
        self, frames: typing.Iterable[typing.Tuple[float, np.ndarray]], what: str = "the video",
    ) -> typing.Iterator[TrackedFrame]:
        """Track the chosen face through `(timestamp_s, frame (H, W, 3) uint8 RGB)` pairs.

        The face is chosen on the first frame that has one (as `select` does); frames before it and
        frames where it is lost give `face=None`. Raises NoFaceError only if no frame has a face
        (after the whole video has been read), SeveralFacesError/FaceTooSmallError at the first face.
        With `mesh_workers` 2, each frame's successor is read before it is yielded and meshed ahead in
        its region (module docstring).
        """
        c = self.config
        landmark_filter = OneEuroFilter(c.landmark_min_cutoff_hz, c.landmark_beta)
        region: typing.Optional[np.ndarray] = None
        previous: typing.Optional[Face] = None
        any_face = False
        ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mesh-ahead") if c.mesh_workers > 1 else None
        guess = None  # (frame index, region, future landmarks): the next frame meshed in this frame's region
        try:
            pairs = _with_next(enumerate(frames)) if ahead is not None else ((item, None) for item in enumerate(frames))
            for (index, (timestamp, image)), following in pairs:
                _check_image(image)
                points = None
                if region is not None:
                    if guess is not None and guess[0] == index and np.array_equal(guess[1], region):
                        points = guess[2].result()
                    else:
                        if guess is not None:
                            guess[2].result()  # meshed in a region the face has left: not used
                        guess = None
                        if following is not None and _is_image(following[1][1]):
                            guess = (following[0], region,
                                     ahead.submit(self._mesh_in_region, following[1][1], *region, self._second_mesh()))
                        points = self._mesh_in_region(image, *region)
                if guess is not None and guess[0] <= index:
                    guess = None  # used, or not meshed for this frame's region (lost; found again elsewhere)
                if points is None:
                    faces = self.detect(image)
                    found = None
                    if faces and previous is None:
                        found = self._choose(faces, what)
                    elif faces and previous is not None:
                        nearest = min(faces, key=lambda f: float(np.hypot(*(f.centre - previous.centre))))
                        if np.hypot(*(nearest.centre - previous.centre)) < 1.5 * previous.size:
                            found = nearest
                    if found is not None:
                        points, region = found.landmarks, found.region
                    if points is None:
                        region = None
                        landmark_filter.reset()
                        yield TrackedFrame(index, timestamp, None, None)
                        continue
                any_face = True
                raw = points
                if c.smooth:
                    scale = float(lm.interocular(points))
                    points = landmark_filter(points, timestamp, scale=scale).astype(np.float32)
                region = _next_region(region, Face(raw, _landmark_box(raw), 1.0))
                face = Face(points, _landmark_box(points), 1.0, region)
                previous = face
                yield TrackedFrame(index, timestamp, face, raw)
        finally:
            if ahead is not None:
                ahead.shutdown(wait=True, cancel_futures=True)
        if not any_face:
            raise NoFaceError(f"no face found in any frame of {what}; use a video where a face is clearly visible")


def _with_next(items: typing.Iterable) -> typing.Iterator[typing.Tuple[typing.Any, typing.Any]]:
    """(item, the item after it or None) for each item; an error of the source is raised where it
    occurred: after the item before it has been given."""
    source = iter(items)
    try:
        current = next(source)
    except StopIteration:
        return
    while True:
        try:
            following = next(source)
        except StopIteration:
            yield current, None
            return
        except Exception as error:  # the item before the failure is still given
            yield current, None
            raise error
        yield current, following
        current = following


def _next_region(region: typing.Optional[np.ndarray], face: Face) -> np.ndarray:
    """Mesh region `(cx, cy, side)` for the next frame, moved only when the face moved enough."""
    x0, y0, x1, y1 = face.box
    proposal = np.array([(x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * ROI_SCALE])
    if region is None:
        return np.round(proposal, 1)
    moved = np.hypot(*(proposal[:2] - region[:2])) > ROI_MOVE_TOLERANCE * region[2]
    resized = abs(proposal[2] - region[2]) > ROI_SIZE_TOLERANCE * region[2]
    return np.round(proposal, 1) if (moved or resized) else region


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _is_image(image) -> bool:
    return isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def _check_image(image: np.ndarray) -> None:
    if not _is_image(image):
        raise ValueError(f"images must be (H, W, 3) uint8 RGB, got {getattr(image, 'shape', None)} {getattr(image, 'dtype', None)}")
