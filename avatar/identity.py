"""Identity-drift checks: does the output still look like the reference person?

Three signals per sampled output frame, each compared with the person's reference frames:
- identity: distance of dlib's 128-d face embedding (ResNet, from the face-recognition-models
  package; runs offline) to the nearest reference embedding (same person typically < 0.6);
- geometry: face-shape ratios from the 478 landmarks (eye widths, nose length and width, face and
  jaw width, eyes to nose base, over the inter-ocular distance, in 3D), as the largest relative
  change. Measured on real clips, this is a weak signal: the mesh regresses towards an average face,
  so the same person varies by up to ~0.12 with pose and expression, while a face stretched 35%
  or a lower face pasted 25% too tall moves it by only 0.11-0.14. It is reported in the series and
  alarms only on gross failures (0.2); people and pasted faces are told apart by the embedding;
- colour: the repainted lower face's mean CIELAB colour minus the upper face's, against the same
  difference in the references (ΔE), so that lighting that changes the whole face is not drift.

`DriftMonitor.observe()` takes output frames; every `sample_every_s` it measures, keeps a series,
raises alarms after `consecutive` samples over a threshold (ending with hysteresis), and calls the
re-anchor hook when an alarm starts (the pipeline then resets its conditioning to the references).
`summary()` and `per_second()` are what reports print.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import typing

import cv2
import numpy as np

from avatar.config import IdentityConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.dlib_resnet import CHIP_SIZE

EMBEDDING_MODEL = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
SHAPE_MODEL = "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
KINDS = ("identity", "geometry", "colour")


def face_model_file(relative: str) -> pathlib.Path:
    """A file of the face-recognition-models distribution, found without importing the package
    (its __init__ imports the deprecated pkg_resources)."""
    try:
        path = pathlib.Path(importlib.metadata.distribution("face_recognition_models").locate_file(relative))
    except importlib.metadata.PackageNotFoundError as exc:
        raise AvatarError("face-recognition-models is not installed; run `make install`") from exc
    if not path.exists():
        raise AvatarError(f"{path}: missing from face-recognition-models; reinstall it")
    return path


class FaceEmbedder:
    """dlib's 128-d face embedding, aligned by its 5-point predictor inside the box that our landmarks
    give. The network runs in onnxruntime (`avatar.face.dlib_resnet`: dlib's own weights, the same
    numbers; 4.9 ms a face on this CPU, alignment included, against 58 through dlib), on `threads`
    threads (1: a drift sample runs beside the frame path's threads)."""

    def __init__(self, threads: int = 1, providers: typing.Optional[typing.Sequence[str]] = None):
        import dlib

        from avatar.face.dlib_resnet import read_dlib_resnet, resnet_onnx
        from avatar.runtime import OnnxSession

        self._dlib = dlib
        self.shape_predictor = dlib.shape_predictor(str(face_model_file(SHAPE_MODEL)))
        weights = face_model_file(EMBEDDING_MODEL)
        self.recogniser = OnnxSession(weights, providers=providers, threads=threads, model=resnet_onnx(read_dlib_resnet(weights)))

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """`image: (H, W, 3) uint8` RGB, `landmarks: (478, 2+)` in its pixels → `(128,) float32`."""
        x0, y0 = np.asarray(landmarks)[:, :2].min(axis=0)
        x1, y1 = np.asarray(landmarks)[:, :2].max(axis=0)
        box = self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        image = np.ascontiguousarray(image, np.uint8)  # dlib takes only C-contiguous uint8 arrays
        shape = self.shape_predictor(image, box)
        chip = self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=0.25)
        return self.recogniser.run(chip=np.asarray(chip, np.uint8)[None])["descriptor"][0]


# Face-shape ratios: pairs of landmarks whose distance, over the inter-ocular distance, is a property
# of the face, not of speech or expression.
GEOMETRY_PAIRS = np.array([
    [33, 133], [362, 263],  # eye widths
    [168, 1],  # nose bridge to tip
    [98, 327],  # nose width
    [234, 454],  # face width at the cheeks
    [58, 288],  # jaw width
    [168, 2],  # eyes to the base of the nose
])


def face_geometry(landmarks: np.ndarray) -> np.ndarray:
    """`(478, 2|3)` → `(len(GEOMETRY_PAIRS),)` distances over the inter-ocular distance, in 3D when
    the landmarks carry the mesh's depth (far less sensitive to head pose than 2D ratios)."""
    points = np.asarray(landmarks, np.float64)[:, :3]
    distances = np.linalg.norm(points[GEOMETRY_PAIRS[:, 0]] - points[GEOMETRY_PAIRS[:, 1]], axis=1)
    eyes = [points[lm.RIGHT_EYE_CORNERS].mean(axis=0), points[lm.LEFT_EYE_CORNERS].mean(axis=0)]
    return distances / float(np.linalg.norm(eyes[1] - eyes[0]))


def _region_masks(shape: typing.Tuple[int, int], landmarks: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the lower face (jaw line up to under the nose) and of the upper face
    (eyes to forehead, inside the face oval), in frame pixels."""
    points = np.asarray(landmarks)[:, :2]
    lower = np.zeros(shape, np.uint8)
    cv2.fillPoly(lower, [np.round(lm.lower_face_polygon(points)).astype(np.int32)], 1)
    oval = np.zeros(shape, np.uint8)
    cv2.fillPoly(oval, [np.round(points[lm.FACE_OVAL]).astype(np.int32)], 1)
    eye_line = float(lm.eye_centres(points)[:, 1].mean())
    upper = oval.astype(bool) & (np.arange(shape[0])[:, None] < eye_line + 0.1 * float(lm.interocular(points)))
    return lower.astype(bool), upper


def colour_difference(frame: np.ndarray, landmarks: np.ndarray, region: typing.Optional[np.ndarray] = None) -> np.ndarray:
    """Mean CIELAB of the repainted region (default: the lower face) minus the upper face's, `(3,)`."""
    lower, upper = _region_masks(frame.shape[:2], landmarks)
    if region is not None:
        lower = np.asarray(region) > 0.5
    if not lower.any() or not upper.any():
        return np.full(3, np.nan)
    x, y, w, h = cv2.boundingRect((lower | upper).view(np.uint8))  # only the face's box is converted
    box = (slice(y, y + h), slice(x, x + w))
    lab = cv2.cvtColor(np.ascontiguousarray(frame[box]), cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab[lower[box]].mean(axis=0) - lab[upper[box]].mean(axis=0)


@dataclasses.dataclass
class DriftSample:
    t: float
    identity: float
    geometry: float
    colour: float


@dataclasses.dataclass
class Alarm:
    kind: str  # "identity", "geometry" or "colour"
    start: float
    end: typing.Optional[float]  # None while it lasts
    peak: float
    threshold: float


class DriftMonitor:
    """Watches output frames for identity loss against reference frames of the person.

    references: `(image (H, W, 3) uint8 RGB, landmarks (478, 2+) in its pixels)` pairs, at least one.
    on_alarm: called as `on_alarm(alarm)` when an alarm starts (the re-anchor hook).
    """

    def __init__(self, references: typing.Sequence[typing.Tuple[np.ndarray, np.ndarray]],
                 config: IdentityConfig = IdentityConfig(), embedder: typing.Optional[FaceEmbedder] = None,
                 on_alarm: typing.Optional[typing.Callable[[Alarm], None]] = None):
        if not references:
            raise ValueError("the drift monitor needs at least one reference frame")
        self.config = config
        self.embedder = embedder or FaceEmbedder()
        self.on_alarm = on_alarm
        self.reference_embeddings = np.stack([self.embedder.embed(image, points) for image, points in references])
        geometry = np.stack([face_geometry(points) for _, points in references])
        self.reference_geometry = np.median(geometry, axis=0)
        self.reference_colour = np.nanmedian(np.stack([colour_difference(image, points) for image, points in references]), axis=0)
        self.samples: typing.List[DriftSample] = []
        self.alarms: typing.List[Alarm] = []
        self._over = {kind: 0 for kind in KINDS}
        self._active: typing.Dict[str, Alarm] = {}
        self._next_sample_t = -np.inf

    def measure(self, frame: np.ndarray, landmarks: np.ndarray, region: typing.Optional[np.ndarray] = None) -> typing.Dict[str, float]:
        """The three drift values for one frame (no bookkeeping)."""
        embedding = self.embedder.embed(frame, landmarks)
        identity = float(np.linalg.norm(self.reference_embeddings - embedding, axis=1).min())
        geometry = float(np.max(np.abs(face_geometry(landmarks) / self.reference_geometry - 1.0)))
        colour = float(np.linalg.norm(colour_difference(frame, landmarks, region) - self.reference_colour))
        return {"identity": identity, "geometry": geometry, "colour": colour}

    def thresholds(self) -> typing.Dict[str, float]:
        c = self.config
        return {"identity": c.identity_threshold, "geometry": c.geometry_threshold, "colour": c.colour_threshold}

    def due(self, t: float) -> bool:
        """Whether a frame at `t` s would be measured (`observe`), sampling at `sample_every_s`."""
        return t >= self._next_sample_t

    def observe(self, t: float, frame: np.ndarray, landmarks: typing.Optional[np.ndarray],
                region: typing.Optional[np.ndarray] = None) -> typing.Optional[DriftSample]:
        """Offer an output frame at time `t` s (its face landmarks in frame pixels, and optionally the
        repainted region as an `(H, W)` mask). Measures it when a sample is due; returns the sample."""
        if not self.due(t) or landmarks is None:
            return None
        self._next_sample_t = t + self.config.sample_every_s
        values = self.measure(frame, landmarks, region)
        sample = DriftSample(t, values["identity"], values["geometry"], values["colour"])
        self.samples.append(sample)
        for kind, threshold in self.thresholds().items():
            value = values[kind]
            active = self._active.get(kind)
            if active is not None:
                active.peak = max(active.peak, value)
                if value < threshold * self.config.clear_fraction:
                    active.end = t
                    del self._active[kind]
                continue
            self._over[kind] = self._over[kind] + 1 if value > threshold else 0
            if self._over[kind] >= self.config.consecutive:
                alarm = Alarm(kind, t, None, value, threshold)
                self.alarms.append(alarm)
                self._active[kind] = alarm
                self._over[kind] = 0
                if self.on_alarm is not None:
                    self.on_alarm(alarm)
        return sample

    @property
    def alarm_active(self) -> bool:
        return bool(self._active)

    def per_second(self) -> typing.List[typing.Dict[str, float]]:
        """Mean of each signal per whole second of output: `[{"second": s, "identity": ..., ...}]`."""
        rows: typing.Dict[int, typing.List[DriftSample]] = {}
        for sample in self.samples:
            rows.setdefault(int(sample.t), []).append(sample)
        return [{"second": second, **{kind: float(np.mean([getattr(s, kind) for s in group])) for kind in KINDS}}
                for second, group in sorted(rows.items())]

    def summary(self) -> typing.Dict[str, typing.Any]:
        """Statistics of each signal, the thresholds and the alarms, for reports (JSON-ready)."""
        stats = {}
        for kind in KINDS:
            values = np.array([getattr(s, kind) for s in self.samples], np.float64)
            stats[kind] = ({"mean": float(values.mean()), "p95": float(np.percentile(values, 95)), "max": float(values.max())}
                           if values.size else {})
        return {"samples": len(self.samples), "thresholds": self.thresholds(), "signals": stats,
                "alarms": [dataclasses.asdict(a) for a in self.alarms]}
