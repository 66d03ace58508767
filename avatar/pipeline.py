"""The engine end to end: speech + a face → a lip-synced video (`avatar animate`, `avatar dub`).

    pipeline = AvatarPipeline.from_pretrained()            # assets/ (or a folder of models)
    result = pipeline.animate("face.jpg", "speech.wav", "out.mp4")
    result = pipeline.dub("talk.mp4", "new_speech.wav", "dubbed.mp4")
    identity = pipeline.prepare_image(portrait)             # once per person, then frame by frame:
    for frame in pipeline.animate_frames(identity, samples): ...

Per output frame (the numbered loop in `render_batch`):
1. crop the face at the frame's alignment transform;
2. the target mouth: the motion model's lips and jaw for this frame's speech (relative to the
   person's rest mouth, placed at the frame's mouth anchor);
3. the repaint mask: the lower face as it is ∪ as it will be (the old jaw must go, the new one fits);
4. the lower face drawn to the target mouth by one of two renderers (`PipelineConfig.renderer`):
   "warp" (default) moves the person's own pixels there (`avatar/render/warp.py`, on a crop at the
   face's own resolution); "diffusion" conditions the learned denoiser on the masked crop, the
   mask, the person's reference crops and the mouth sketch, and runs a few DDIM steps with noise
   that is the same for every frame (so a still target does not flicker): by default it refines the
   warp renderer's frame (its crop noised to `diffusion_start`), or draws from pure noise (1.0);
5. (diffusion) colour matching of the repainted region to the crop; the invisible watermark;
6. paste back into the frame with the mask's feathered edge (every pixel outside it is the input's),
   and give the repainted region back the fine detail of the frame (or of the warp renderer's frame
   it refined) where it agrees with the rendering (a face larger than the crop would otherwise come
   back smoother than its surroundings).
The identity-drift monitor samples output frames as they are written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import tempfile
import time
import typing

import numpy as np
from tqdm import tqdm

from avatar import __version__, idle, media, provenance
from avatar import audio as audio_frontend
from avatar.config import AlignConfig, DubConfig, FaceConfig, IdentityConfig, IdleConfig, PipelineConfig, SilenceConfig
from avatar.errors import AvatarError, MediaError, NoFaceError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, apply_transform, rescale_points, rescale_transform, transform_scale
from avatar.render.condition import build_condition, colour_match, from_unit, to_unit, transfer_detail
from avatar.render.sampling import steps_from
from avatar.render.warp import MIN_OPEN, InnerMouth, borrowed_mouth, inner_gap_ratio, render_warp, resize_inner
from avatar.runtime import asset_path

PathLike = typing.Union[str, os.PathLike]
SPEECH_MODEL, MOTION_MODEL, LIVE_MOTION_MODEL, RENDER_MODEL = "speech.onnx", "motion_offline.onnx", "motion_live.onnx", "render.onnx"
MODEL_FILES = (SPEECH_MODEL, MOTION_MODEL, LIVE_MOTION_MODEL, RENDER_MODEL)
INNER_SIZE = 256  # crop side at which an identity's open mouth is kept for the warp renderer
# Detail transfer after the diffusion renderer (luma levels of coarse disagreement that stop it): from
# the input frame only where the mouth did not move; from the warp renderer's frame that the model
# refined, much more freely (its pixels are the person's, already at the target mouth). Measured (teacher model) on
# two held-out dubs: sharpness ratio 0.44 → 0.62 and 0.62 → 0.74 from 10 to 30 levels.
FRAME_DETAIL_TOLERANCE, DRAFT_DETAIL_TOLERANCE = 10.0, 30.0


@dataclasses.dataclass
class Identity:
    """A person, prepared once.

    references: the diffusion renderer's reference crops, `(S, S, 3) uint8` each (a closed mouth
    first, then an open one when the source has one). inner: the open mouth the warp renderer takes
    the inside of the mouth from (at `INNER_SIZE`), if the person has one. rest / rest_anchor: the closed mouth `(59, 2)` and its
    anchor `(2,)` in crop pixels (`avatar.motion.runner.rest_pose`). drift_references: `(image,
    landmarks (478, 3))` pairs in image pixels for the drift monitor.
    """

    references: typing.List[np.ndarray]
    rest: np.ndarray
    rest_anchor: np.ndarray
    drift_references: typing.List[typing.Tuple[np.ndarray, np.ndarray]]
    inner: InnerMouth = dataclasses.field(default_factory=lambda: InnerMouth(None, None))


class _Prepared(typing.NamedTuple):
    """One frame's inputs to the diffusion renderer (`render_batch`): the crop `(S, S, 3) uint8`, the
    repaint mask `(S, S)`, the condition `(C, S, S)`, the frame whose detail comes back at paste-back,
    and the draft `(3, S, S)` in [-1, 1] to start from (None when sampling from noise)."""

    crop: np.ndarray
    mask: np.ndarray
    condition: np.ndarray
    source: np.ndarray
    draft: typing.Optional[np.ndarray]


@dataclasses.dataclass
class FrameJob:
    """One output frame to make. transform None: no face, the frame is passed through.

    frame: `(H, W, 3) uint8`; transform: `(2, 3)` frame → crop; crop_landmarks: `(478, 3)` the face as it
    is, crop pixels; frame_landmarks: the same in frame pixels; mouth: `(59, 2)` target, crop pixels.
    """

    frame: np.ndarray
    transform: typing.Optional[np.ndarray] = None
    crop_landmarks: typing.Optional[np.ndarray] = None
    frame_landmarks: typing.Optional[np.ndarray] = None
    mouth: typing.Optional[np.ndarray] = None


@dataclasses.dataclass
class RunResult:
    output: pathlib.Path
    frames: int
    fps: float
    audio_seconds: float
    seconds: float
    report: typing.Dict[str, typing.Any]
    sidecar: typing.Optional[pathlib.Path] = None

    def summary(self) -> str:
        drift = self.report.get("drift", {})
        alarms = len(drift.get("alarms", [])) if drift else 0
        identity = drift.get("signals", {}).get("identity", {}).get("mean") if drift else None
        parts = [f"{self.frames} frames at {self.fps:g} fps ({self.frames / self.fps:.1f} s)",
                 f"{self.seconds:.1f} s ({self.seconds / max(self.audio_seconds, 1e-9):.1f}× the audio's length)"]
        if identity is not None:
            parts.append(f"identity distance {identity:.2f}, {alarms} drift alarm{'s' * (alarms != 1)}")
        return ", ".join(parts)


class StageClock:
    """Seconds spent per named stage."""

    def __init__(self):
        self.seconds: typing.Dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, stage: str) -> typing.Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


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


def face_centre_and_height(landmarks: np.ndarray) -> typing.Tuple[np.ndarray, float]:
    """Centre `(2,)` and height (px) of the landmarks' box: what idle head motion turns about."""
    box = np.asarray(landmarks)[:, :2]
    return box.mean(axis=0), float(np.ptp(box[:, 1]))


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


class AvatarPipeline:
    """Speech encoder + motion models + renderer + face front-ends + drift monitor + writer.

    Construct with `from_pretrained()`; the ONNX sessions, the face tracker and the embedder load here,
    not at import. Files (`animate`, `dub`) use the offline motion model (`motion`); live streams the
    live one (`live_motion`), loaded on first use like the diffusion model (`renderer="diffusion"`).
    """

    def __init__(self, folder: PathLike, config: PipelineConfig = PipelineConfig(),
                 face_config: FaceConfig = FaceConfig(), identity_config: IdentityConfig = IdentityConfig(),
                 providers: typing.Optional[typing.Sequence[str]] = None, silence_config: SilenceConfig = SilenceConfig()):
        from avatar.motion.runner import MotionPredictor
        from avatar.speech.encoder import SpeechEncoder

        if config.renderer not in ("warp", "diffusion"):
            raise AvatarError(f"renderer must be warp or diffusion, not {config.renderer!r}")
        if not 0.0 < config.diffusion_start <= 1.0:
            raise AvatarError(f"diffusion_start must be in (0, 1] (1: from pure noise), not {config.diffusion_start}")
        self.config, self.face_config, self.identity_config = config, face_config, identity_config
        self.folder = pathlib.Path(folder)
        self.encoder = SpeechEncoder(self.folder / SPEECH_MODEL, threads=config.threads, providers=providers)
        self.silence_config = silence_config
        self.motion = MotionPredictor(self.folder / MOTION_MODEL, threads=config.threads, providers=providers, encoder=self.encoder,
                                      silence=silence_config)
        self._live_motion = None
        self._render_model, self._providers, self._renderer = self.folder / RENDER_MODEL, providers, None
        self.crop_size = AlignConfig().crop_size  # the canonical crop the landmarks live in (the diffusion model's too)
        self.aligner = FaceAligner(AlignConfig(crop_size=self.crop_size))
        used = [SPEECH_MODEL, MOTION_MODEL] + ([RENDER_MODEL] if config.renderer == "diffusion" else [])
        self.model_hashes = {name: provenance.file_sha256(self.folder / name) for name in used}
        self.noise = np.random.default_rng(config.seed).standard_normal((3, self.crop_size, self.crop_size)).astype(np.float32)
        self._embedder = None
        self._aligners: typing.Dict[int, FaceAligner] = {self.crop_size: self.aligner}
        self._pool: typing.Optional[concurrent.futures.ThreadPoolExecutor] = None  # per-frame CPU work (`_each`)

    @classmethod
    def from_pretrained(cls, folder: typing.Optional[PathLike] = None, **kwargs) -> "AvatarPipeline":
        """The default models from `assets/` (or `AVATAR_ASSETS`), or from `folder`."""
        if folder is None:
            return cls(asset_path(MOTION_MODEL).parent, **kwargs)
        folder = pathlib.Path(folder)
        for name in MODEL_FILES:
            if not (folder / name).exists():
                raise MediaError(f"{folder / name}: missing; a model folder needs {', '.join(MODEL_FILES)}")
        return cls(folder, **kwargs)

    @property
    def live_motion(self):
        """The live (causal) motion model (`avatar.motion.runner.MotionPredictor`), loaded on first use;
        its hash joins `model_hashes`."""
        if self._live_motion is None:
            from avatar.motion.runner import MotionPredictor

            self._live_motion = MotionPredictor(self.folder / LIVE_MOTION_MODEL, threads=self.config.threads,
                                                providers=self._providers, encoder=self.encoder, silence=self.silence_config)
            self.model_hashes[LIVE_MOTION_MODEL] = provenance.file_sha256(self.folder / LIVE_MOTION_MODEL)
        return self._live_motion

    @property
    def renderer(self):
        """The diffusion renderer (`avatar.render.runner.Renderer`), loaded on first use."""
        if self._renderer is None:
            from avatar.render.runner import Renderer

            renderer = Renderer(self._render_model, threads=self.config.threads, providers=self._providers,
                                fp16=self.config.fp16)
            if renderer.config.crop_size != self.crop_size:
                raise AvatarError(f"{self._render_model}: renders {renderer.config.crop_size}² crops; this pipeline aligns to "
                                  f"{self.crop_size}²")
            self._renderer = renderer
        return self._renderer

    @property
    def diffusion_references(self) -> int:
        """How many reference crops an identity keeps for the diffusion renderer (none for the warp)."""
        return self.renderer.config.references if self.config.renderer == "diffusion" else 0

    @property
    def providers(self) -> typing.List[str]:
        """The onnxruntime providers in use, best first."""
        return self.motion.session.providers

    def warm_up(self, batch: int = 1) -> None:
        """Run the live models once, so that a provider's lazy set-up (graph building, CUDA/TensorRT
        kernels) is not paid by the first frame of a live session."""

        if self.config.renderer == "diffusion":
            config = self.renderer.config
            self.renderer.sample(np.zeros((batch, config.condition_channels, self.crop_size, self.crop_size), np.float32),
                                 np.zeros((batch, 3, self.crop_size, self.crop_size), np.float32), steps=1)
        from avatar.face.align import crop_template

        if self.config.renderer == "warp" or self.config.diffusion_start < 1:  # the warp's first call loads scipy's spline code
            face = crop_template(self.crop_size)
            crop = np.full((self.crop_size, self.crop_size, 3), 128, np.uint8)
            render_warp(crop, face, face[lm.MOUTH_AND_JAW], self.aligner.lower_face_mask(face), InnerMouth(None, None))
        self.live_motion.from_audio(np.zeros(self.encoder.config.sample_rate // 2, np.float32), 25.0,
                                    crop_template(self.crop_size)[lm.MOUTH_AND_JAW])

    @property
    def embedder(self):
        if self._embedder is None:
            from avatar.identity import FaceEmbedder

            self._embedder = FaceEmbedder()
        return self._embedder

    # ------------------------------------------------------------------ identity
    def face_tracker(self):
        """A FaceTracker with the pipeline's face settings (use as a context manager)."""
        from avatar.face.tracker import FaceTracker

        return FaceTracker(self.face_config)

    def _reference_photos(self, paths: typing.Sequence[PathLike]) -> typing.List[typing.Tuple[np.ndarray, np.ndarray]]:
        out = []
        with self.face_tracker() as tracker:
            for path in paths:
                image = media.read_image(path)
                out.append((image, tracker.select(image, what=str(path)).landmarks))
        return out

    def prepare_image(self, image: np.ndarray, landmarks: typing.Optional[np.ndarray] = None, what: str = "the image",
                      extra_references: typing.Sequence[PathLike] = ()) -> Identity:
        """A person from one portrait `(H, W, 3) uint8` (its face found unless `landmarks (478, 3)` given)."""
        from avatar.motion.runner import rest_pose

        if landmarks is None:
            with self.face_tracker() as tracker:
                landmarks = tracker.select(image, what=what).landmarks
        aligned = self.aligner.align(image, landmarks)
        rest, anchor = rest_pose(aligned.landmarks)
        references = [aligned.crop] * self.diffusion_references
        return Identity(references, rest, anchor, [(image, landmarks)] + self._reference_photos(extra_references),
                        self.open_mouth(image, aligned.transform, aligned.landmarks))

    def reference_frames(self, crop_landmarks: np.ndarray) -> typing.List[int]:
        """Which of N frames (`crop_landmarks (N, 478, 3)`) give the renderer's K references: the
        median of the most-closed tenth of the mouths, then of the most-open tenth, alternating, so
        the renderer sees the lips at rest and the teeth."""
        order = np.argsort(lm.mouth_opening(crop_landmarks))
        tenth = max(1, len(order) // 10)
        closed, opened = order[:tenth], order[-tenth:]
        return [int(closed[len(closed) // 2]) if k % 2 == 0 else int(opened[len(opened) // 2])
                for k in range(self.diffusion_references)]

    def open_mouth(self, frame: np.ndarray, transform: np.ndarray, crop_landmarks: np.ndarray) -> InnerMouth:
        """A frame's mouth at INNER_SIZE for the warp renderer if it is open; if it is not, the bundled
        open mouth that suits these lips best (`avatar.render.warp.borrowed_mouth`).
        `transform`: frame → crop at the pipeline's crop size; `crop_landmarks` in that crop."""
        mouth = rescale_points(np.asarray(crop_landmarks)[lm.MOUTH_AND_JAW, :2], self.crop_size, INNER_SIZE)
        crop = self._aligner(INNER_SIZE).crop(frame, rescale_transform(transform, self.crop_size, INNER_SIZE))
        if inner_gap_ratio(mouth) <= MIN_OPEN:
            return borrowed_mouth(crop, mouth)
        return InnerMouth(crop, mouth, INNER_SIZE)

    def prepare_frames(self, crops: typing.Sequence[np.ndarray], crop_landmarks: np.ndarray,
                       drift_frames: typing.Sequence[typing.Tuple[np.ndarray, np.ndarray]],
                       extra_references: typing.Sequence[PathLike] = (), inner: typing.Optional[InnerMouth] = None) -> Identity:
        """A person from frames of a video: `crop_landmarks (N, 478, 3)` crop pixels of every usable
        frame, and `crops`, the K crops `(S, S, 3) uint8` of `reference_frames(crop_landmarks)`.
        `drift_frames`: `(frame, landmarks)` pairs for the drift monitor; `inner`: the open mouth
        (`open_mouth` of the most open frame)."""
        from avatar.motion.runner import rest_pose

        rest, anchor = rest_pose(crop_landmarks)
        return Identity(list(crops), rest, anchor, list(drift_frames) + self._reference_photos(extra_references),
                        inner or InnerMouth(None, None))

    def _aligner(self, size: int) -> FaceAligner:
        if size not in self._aligners:
            self._aligners[size] = FaceAligner(AlignConfig(crop_size=size))
        return self._aligners[size]

    # ------------------------------------------------------------------ rendering
    def _drift_monitor(self, identity: Identity, events: typing.List[typing.Dict[str, typing.Any]]):
        if not self.config.drift:
            return None
        from avatar.identity import DriftMonitor

        def on_alarm(alarm) -> None:
            # The renderer keeps no state between frames (every frame is conditioned on the
            # references afresh), so re-anchoring has nothing to reset; the alarm is reported.
            events.append({"t": alarm.start, "kind": alarm.kind, "value": alarm.peak, "threshold": alarm.threshold})

        return DriftMonitor(identity.drift_references, self.identity_config, embedder=self.embedder, on_alarm=on_alarm)

    def render_batch(self, jobs: typing.Sequence[FrameJob], identities: typing.Sequence[Identity],
                     frame_indices: typing.Sequence[int], steps: typing.Optional[int] = None) -> typing.List[np.ndarray]:
        """The numbered per-frame loop of the module docstring for a batch of frames, in one renderer
        call; each job has its person (`identities`, so several live sessions can share a call) and its
        output frame index (which sets the watermark's phase). Returns the output frames."""
        todo = [i for i, job in enumerate(jobs) if job.transform is not None]
        outputs = [job.frame for job in jobs]
        if not todo:
            return outputs
        if self.config.renderer == "warp":
            for i, frame in zip(todo, self._each(lambda i: self._warp_frame(jobs[i], identities[i], int(frame_indices[i])), todo)):
                outputs[i] = frame
            return outputs
        start = self.config.diffusion_start

        def prepare(i: int) -> _Prepared:
            job = jobs[i]
            crop = self.aligner.crop(job.frame, job.transform)  # 1.
            mask = self.aligner.repaint_mask(job.crop_landmarks, lm.with_mouth(job.crop_landmarks, job.mouth))  # 2., 3.
            condition = build_condition(crop, mask, identities[i].references, job.mouth)  # 4.
            if start >= 1:
                return _Prepared(crop, mask, condition, job.frame, None)
            # the draft: the warp renderer's frame, at the face's own resolution, cropped
            warped = self._warp_frame(job, identities[i], int(frame_indices[i]), watermark=False)
            return _Prepared(crop, mask, condition, warped, to_unit(self.aligner.crop(warped, job.transform)))

        prepared = self._each(prepare, todo)
        noise = np.broadcast_to(self.noise, (len(todo), *self.noise.shape)).copy()
        steps = steps or self.config.steps or steps_from(start, self.renderer.config.steps)
        drafts = np.stack([p.draft for p in prepared]) if start < 1 else None
        rendered = self.renderer.sample(np.stack([p.condition for p in prepared]), noise, steps, init=drafts, start=start)

        def finish(k: int) -> np.ndarray:
            i, (crop, mask, _, source, _) = todo[k], prepared[k]
            face = from_unit(rendered[k])
            if self.config.colour_match > 0:  # 5.
                face = colour_match(face, crop, mask, self.config.colour_match)
            if self.config.watermark:
                face = provenance.embed_watermark(face, mask, int(frame_indices[i]))
            pasted = self.aligner.paste_back(jobs[i].frame, face, jobs[i].transform, mask)  # 6.
            if self.config.detail:
                scale = transform_scale(jobs[i].transform)  # crop px per frame px
                alpha = self.aligner.paste_alpha(jobs[i].frame.shape, jobs[i].transform, mask)
                tolerance = DRAFT_DETAIL_TOLERANCE if start < 1 else FRAME_DETAIL_TOLERANCE
                pasted = transfer_detail(source, pasted, alpha, sigma=0.7 / scale, tolerance=tolerance)
            return pasted

        for i, frame in zip(todo, self._each(finish, range(len(todo)))):
            outputs[i] = frame
        return outputs

    def _each(self, work: typing.Callable[[int], typing.Any], items: typing.Sequence[int]) -> typing.List[typing.Any]:
        """`[work(i) for i in items]`, on `config.workers` threads (numpy, OpenCV and onnxruntime
        release the GIL for most of a frame's work)."""
        workers = self.config.workers or min(8, os.cpu_count() or 1)
        if workers <= 1 or len(items) <= 1:
            return [work(i) for i in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="frame")
        return list(self._pool.map(work, items))

    def _warp_frame(self, job: FrameJob, identity: Identity, frame_index: int, watermark: bool = True) -> np.ndarray:
        """The warp renderer's version of steps 1-6, on a crop at the face's own resolution (a multiple
        of 16 between the pipeline's crop size and `warp_max_size`); `watermark=False` for a draft."""
        native = self.crop_size / transform_scale(job.transform)
        size = int(np.clip(16 * round(native / 16), self.crop_size, max(self.crop_size, self.config.warp_max_size)))
        aligner = self._aligner(size)
        transform = rescale_transform(job.transform, self.crop_size, size)
        crop = aligner.crop(job.frame, transform)  # 1.
        landmarks = rescale_points(np.asarray(job.crop_landmarks)[:, :2], self.crop_size, size)
        mouth = rescale_points(job.mouth, self.crop_size, size)  # 2.
        mask = aligner.repaint_mask(landmarks, lm.with_mouth(landmarks, mouth))  # 3.
        face = render_warp(crop, landmarks, mouth, mask, resize_inner(identity.inner, size))  # 4.
        if self.config.watermark and watermark:  # 5.
            face = provenance.embed_watermark(face, mask, frame_index)
        return aligner.paste_back(job.frame, face, transform, mask)  # 6.

    def render_jobs(self, identity: Identity, jobs: typing.Iterable[FrameJob], fps: float,
                    monitor=None, clock: typing.Optional[StageClock] = None) -> typing.Iterator[np.ndarray]:
        """Output frames for a stream of jobs, in order, rendered `config.batch` at a time; each frame
        is offered to the drift monitor (which samples at its own rate)."""
        clock = clock or StageClock()
        pending: typing.List[FrameJob] = []
        index = 0

        def flush():
            nonlocal index
            with clock.time("render"):
                frames = self.render_batch(pending, [identity] * len(pending), range(index, index + len(pending)))
            for job, frame in zip(pending, frames):
                if monitor is not None and job.frame_landmarks is not None:
                    with clock.time("drift"):
                        monitor.observe(index / fps, frame, job.frame_landmarks)
                index += 1
                yield frame
            pending.clear()

        for job in jobs:
            pending.append(job)
            if len(pending) >= max(1, self.config.batch):
                yield from flush()
        if pending:
            yield from flush()

    def still_job(self, identity: Identity, portrait: np.ndarray, landmarks: np.ndarray, mouth: np.ndarray,
                  closure: float = 0.0, move: typing.Optional[np.ndarray] = None) -> FrameJob:
        """One frame of a still portrait: eyes closed by `closure`, the picture moved by `move`
        (`(2, 3)`, frame → moved frame; None: still), the motion model's `mouth (59, 2)` (relative to
        the rest anchor) placed on the moved face."""
        frame = idle.close_eyes(portrait, landmarks, closure)
        frame_landmarks = np.asarray(landmarks, np.float32)
        if move is not None:
            frame = idle.move_frame(frame, move)
            frame_landmarks = apply_transform(landmarks, move).astype(np.float32)
        transform = self.aligner.transform_for(frame_landmarks)
        crop_landmarks = apply_transform(frame_landmarks, transform).astype(np.float32)
        return FrameJob(frame, transform, crop_landmarks, frame_landmarks,
                        mouth + (lm.mouth_anchor(crop_landmarks) - identity.rest_anchor))

    def animate_frames(self, identity: Identity, portrait: np.ndarray, landmarks: np.ndarray, samples: np.ndarray,
                       idle_config: IdleConfig = IdleConfig(), fps: typing.Optional[float] = None,
                       monitor=None, clock: typing.Optional[StageClock] = None) -> typing.Iterator[np.ndarray]:
        """Frames `(H, W, 3) uint8` of `portrait` speaking `samples` (16 kHz mono float32), one at a time."""
        fps = fps or self.config.fps
        clock = clock or StageClock()
        n = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
        with clock.time("motion"):
            mouths = self.motion.from_audio(samples, fps, identity.rest, n)
        closure = idle.blink_curve(n, fps, idle_config)
        moves = idle.head_motion(n, fps, idle_config, *face_centre_and_height(landmarks))

        def jobs() -> typing.Iterator[FrameJob]:
            for i in range(n):
                with clock.time("idle"):
                    job = self.still_job(identity, portrait, landmarks, mouths[i], float(closure[i]), moves[i])
                yield job

        yield from self.render_jobs(identity, jobs(), fps, monitor, clock)

    # ------------------------------------------------------------------ commands
    def _finish(self, command: str, output: pathlib.Path, inputs: typing.Dict[str, typing.Optional[str]], frames: int,
                fps: float, samples: np.ndarray, started: float, clock: StageClock, monitor, events,
                extra: typing.Dict[str, typing.Any], report_path: typing.Optional[PathLike]) -> RunResult:
        sidecar = provenance.write_sidecar(output, provenance.manifest(output, command, inputs, self.model_hashes))
        seconds = time.perf_counter() - started
        audio_seconds = samples.size / self.encoder.config.sample_rate
        report = {
            "engine": f"avatar {__version__}", "command": command, "output": str(output), "frames": frames, "fps": fps,
            "audio_seconds": audio_seconds, "seconds": seconds, "real_time_factor": seconds / max(audio_seconds, 1e-9),
            "stages_s": {k: round(v, 3) for k, v in clock.seconds.items()},
            "models": {name: f"sha256:{digest}" for name, digest in self.model_hashes.items()},
            "providers": self.providers, "config": dataclasses.asdict(self.config), **extra,
            "drift": monitor.summary() if monitor is not None else None,
            "drift_per_second": monitor.per_second() if monitor is not None else None,
            "drift_events": events, "provenance": str(sidecar),
        }
        if report_path is not None:
            path = pathlib.Path(report_path)
            with media.atomic_output(path, [p for p in inputs.values() if p]) as tmp:
                tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
        return RunResult(output, frames, fps, audio_seconds, seconds, report, sidecar)

    def animate(self, image: PathLike, audio: PathLike, output: PathLike, idle_config: IdleConfig = IdleConfig(),
                references: typing.Sequence[PathLike] = (), report: typing.Optional[PathLike] = None,
                progress: bool = True) -> RunResult:
        """A still portrait + speech → a talking video at `config.fps`, written atomically to `output`."""
        inputs = [image, audio, *references]
        output = media.check_output_path(output, inputs)
        if report is not None:
            media.check_output_path(report, inputs + [output])
        started, clock = time.perf_counter(), StageClock()
        with clock.time("decode"):
            samples = media.read_audio(audio, self.encoder.config.sample_rate)
            portrait = fit_image(media.read_image(image), self.config.max_side)
        with clock.time("face"):
            with self.face_tracker() as tracker:
                landmarks = tracker.select(portrait, what=str(image)).landmarks
            identity = self.prepare_image(portrait, landmarks, what=str(image), extra_references=references)
        fps = self.config.fps
        events: typing.List[typing.Dict[str, typing.Any]] = []
        monitor = self._drift_monitor(identity, events)
        n = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
        if n == 0:
            raise MediaError(f"{audio}: the speech is shorter than one video frame; give longer audio")
        metadata = provenance.container_metadata(self.model_hashes)
        with media.VideoWriter(output, fps, samples, self.encoder.config.sample_rate, crf=self.config.crf,
                               metadata=metadata, inputs=inputs) as writer:
            frames = self.animate_frames(identity, portrait, landmarks, samples, idle_config, fps, monitor, clock)
            for frame in tqdm(frames, total=n, desc="animate", unit="frame", disable=not progress):
                with clock.time("encode"):
                    writer.write(frame)
        return self._finish("animate", output, {"image": str(image), "audio": str(audio)}, n, fps, samples, started, clock,
                            monitor, events, {"idle": dataclasses.asdict(idle_config),
                                              "identity_references": len(identity.drift_references)}, report)

    def dub(self, video: PathLike, audio: PathLike, output: PathLike, dub_config: DubConfig = DubConfig(),
            references: typing.Sequence[PathLike] = (), report: typing.Optional[PathLike] = None,
            progress: bool = True) -> RunResult:
        """Re-lip-sync `video` to `audio`; outside the repainted lower face every pixel is the input's."""
        from avatar.face.video import align_video

        if dub_config.audio_longer not in ("pingpong", "loop", "trim"):
            raise MediaError(f"audio_longer must be pingpong, loop or trim, not {dub_config.audio_longer!r}")
        if dub_config.audio_shorter not in ("trim", "keep"):
            raise MediaError(f"audio_shorter must be trim or keep, not {dub_config.audio_shorter!r}")
        inputs = [video, audio, *references]
        output = media.check_output_path(output, inputs)
        if report is not None:
            media.check_output_path(report, inputs + [output])
        started, clock = time.perf_counter(), StageClock()
        info = media.probe(video)
        if not info.has_video:
            raise MediaError(f"{video}: has no video frames; give a video with a face in it")
        fps = info.fps or self.config.fps
        with clock.time("decode"):
            samples = media.read_audio(audio, self.encoder.config.sample_rate)

        # 1. Track the face through the whole video once; keep the frames on disk for random access.
        store = FrameStore()
        try:
            valid, transforms, crop_lms, frame_lms = [], [], [], []
            with clock.time("face"):
                tracked = align_video(media.iter_video_frames(video), self.face_config, AlignConfig(crop_size=self.crop_size), what=str(video))
                for item in tqdm(tracked, total=info.n_frames or None, desc="tracking", unit="frame", disable=not progress):
                    store.append(item.image)
                    valid.append(item.valid)
                    transforms.append(item.aligned.transform if item.aligned is not None else None)
                    crop_lms.append(item.aligned.landmarks if item.valid else None)
                    frame_lms.append(item.frame_landmarks)
            n_source = store.count
            if n_source == 0:
                raise MediaError(f"{video}: no frame could be decoded; the file may be corrupt")
            good = np.flatnonzero(valid)
            if good.size == 0:
                raise NoFaceError(f"{video}: no face found in any frame; give a video where a face is visible")

            # 2. The person: rest mouth and references from the video's own frames (+ extra photos).
            with clock.time("face"):
                spread = good[np.linspace(0, good.size - 1, min(self.config.drift_references, good.size)).round().astype(int)]
                good_lms = np.stack([crop_lms[i] for i in good])
                picks = [int(good[k]) for k in self.reference_frames(good_lms)]
                widest = int(good[np.argmax(lm.mouth_opening(good_lms) / lm.interocular(good_lms))])
                identity = self.prepare_frames([self.aligner.crop(store[i], transforms[i]) for i in picks], good_lms,
                                               [(store[i], frame_lms[i]) for i in spread], references,
                                               self.open_mouth(store[widest], transforms[widest], crop_lms[widest]))

            # 3. Fit the speech to the video: output length and which source frame each shows.
            n_audio = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
            if n_audio == 0:
                raise MediaError(f"{audio}: the speech is shorter than one video frame; give longer audio")
            if n_audio > n_source and dub_config.audio_longer == "trim":
                n_out = n_source
            elif n_audio < n_source and dub_config.audio_shorter == "keep":
                n_out = n_source
            else:
                n_out = n_audio
            samples_out = samples[: int(round(n_out / fps * self.encoder.config.sample_rate))]
            anchors = np.full((n_source, 2), np.nan)
            anchors[good] = lm.mouth_anchor(good_lms)
            motion = np.r_[0.0, np.linalg.norm(np.diff(np.stack([t if t is not None else np.zeros((2, 3)) for t in transforms]), axis=0), axis=(1, 2))]
            schedule = pingpong_schedule(n_source, n_out, motion, fps, dub_config.audio_longer)

            # 4. Mouths from the new speech (closed after it ends, when the video is kept longer).
            with clock.time("motion"):
                mouths = self.motion.from_audio(samples_out, fps, identity.rest, n_out)

            events: typing.List[typing.Dict[str, typing.Any]] = []
            monitor = self._drift_monitor(identity, events)

            def jobs() -> typing.Iterator[FrameJob]:
                for j, source in enumerate(schedule):
                    frame = store[int(source)]
                    if not valid[source]:
                        yield FrameJob(frame)
                        continue
                    mouth = mouths[j] + (anchors[source] - identity.rest_anchor)
                    yield FrameJob(frame, transforms[source], crop_lms[source], frame_lms[source], mouth)

            metadata = provenance.container_metadata(self.model_hashes)
            with media.VideoWriter(output, fps, samples_out, self.encoder.config.sample_rate, crf=self.config.crf,
                                   metadata=metadata, inputs=inputs) as writer:
                for frame in tqdm(self.render_jobs(identity, jobs(), fps, monitor, clock), total=n_out, desc="dub",
                                  unit="frame", disable=not progress):
                    with clock.time("encode"):
                        writer.write(frame)
        finally:
            store.close()
        steps = np.diff(schedule)
        loops = int(np.sum((steps < 0) & (np.r_[0, steps[:-1]] >= 0)))  # times the video turned or jumped back
        extra = {"dub": dataclasses.asdict(dub_config), "source_frames": n_source, "frames_without_face": int(n_source - good.size),
                 "speech_frames": n_audio, "reversals_or_restarts": loops, "identity_references": len(identity.drift_references)}
        return self._finish("dub", output, {"video": str(video), "audio": str(audio)}, n_out, fps, samples_out, started,
                            clock, monitor, events, extra, report)
