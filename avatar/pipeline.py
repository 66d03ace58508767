"""The engine end to end: speech + a face → a lip-synced video (`avatar animate`, `avatar dub`).

    pipeline = AvatarPipeline.from_pretrained()            # assets/ (or a folder of models)
    result = pipeline.animate("face.jpg", "speech.wav", "out.mp4")
    result = pipeline.dub("talk.mp4", "new_speech.wav", "dubbed.mp4")
    identity = pipeline.prepare_image(portrait)             # once per person, then frame by frame:
    for frame in pipeline.animate_frames(identity, portrait, landmarks, samples): ...

The parts, each in its own module:
- speech → mouths: the speech encoder (`avatar/speech/`) and the motion models (`avatar/motion/`);
- the person: `avatar/person.py` (rest mouth, references, the open mouth, drift references);
- per output frame, a `FrameJob` (the frame, its face's alignment, the target mouth): from a video's
  tracked frames (`dub`) or a still with blinks and head motion (`avatar/idle.py`, `animate`);
- the renderer (`PipelineConfig.renderer`, behind `avatar.render.base.FaceRenderer`): jobs in
  batches → the finished face region of each frame, by the numbered steps of `avatar/render/base.py`;
  the pipeline places each region into its frame;
- the identity-drift monitor samples the output frames as they are written (`avatar/identity.py`);
- the writer (`avatar/media.py`), the report (`avatar/report.py`) and provenance labels
  (`avatar/provenance.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import time
import typing

import numpy as np
from tqdm import tqdm

from avatar import __version__, idle, media, provenance
from avatar import audio as audio_frontend
from avatar.artifacts import ArtifactCheck, Verdict
from avatar.config import (AlignConfig, ArtifactConfig, C2paConfig, DubConfig, FaceConfig, IdentityConfig, IdleConfig, PipelineConfig,
                           SilenceConfig)
from avatar.enroll import SUFFIX as AVATAR_SUFFIX
from avatar.enroll import Avatar
from avatar.errors import FaceError, MediaError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, FaceRegion, apply_transform, invert_transform
from avatar.frames import fit_image, pingpong_schedule
from avatar.motion.pose import HEAD_POINTS
from avatar.person import IdentityBuilder
from avatar.render.base import FrameJob, FramePool, FrameStream, Identity, RenderBatch, one_blas_thread
from avatar.render.renderers import RENDER_MODEL, make_renderer
from avatar.render.warp import InnerMouth
from avatar.report import RunResult, StageClock
from avatar.runtime import asset_path

PathLike = typing.Union[str, os.PathLike]
SPEECH_MODEL, MOTION_MODEL, LIVE_MOTION_MODEL = "speech.onnx", "motion_offline.onnx", "motion_live.onnx"
MODEL_FILES = (SPEECH_MODEL, MOTION_MODEL, LIVE_MOTION_MODEL, RENDER_MODEL)
MIN_SPEECH_S = 0.2  # shorter audio would make a video of a few frames
ESTIMATE_AFTER_S = 5.0  # a long job says how long it will take once it has rendered for this long


class AvatarPipeline:
    """Speech encoder + motion models + renderer + face front-ends + drift monitor + writer.

    Construct with `from_pretrained()`; the ONNX sessions and the renderer load here, not at import.
    Files (`animate`, `dub`) use the offline motion model (`motion`); live streams the live one
    (`live_motion`), loaded on first use like the drift monitor's face embedder.
    """

    def __init__(self, folder: PathLike, config: PipelineConfig = PipelineConfig(),
                 face_config: FaceConfig = FaceConfig(), identity_config: IdentityConfig = IdentityConfig(),
                 providers: typing.Optional[typing.Sequence[str]] = None, silence_config: SilenceConfig = SilenceConfig(),
                 artifact_config: ArtifactConfig = ArtifactConfig(), c2pa_config: C2paConfig = C2paConfig()):
        from avatar.motion.runner import MotionPredictor
        from avatar.speech.encoder import SpeechEncoder

        self.config, self.face_config, self.identity_config = config, face_config, identity_config
        self.folder = pathlib.Path(folder)
        self.crop_size = AlignConfig().crop_size  # the canonical crop the landmarks live in (the diffusion model's too)
        self.aligner = FaceAligner(AlignConfig(crop_size=self.crop_size))
        self.pool = FramePool(config.workers)  # per-frame CPU work of a batch
        self.renderer = make_renderer(config, self.folder, self.crop_size, providers, self.pool)
        self.speech_threads = config.speech_threads or config.threads  # the speech encoder's and the motion models'
        self.encoder = SpeechEncoder(self.folder / SPEECH_MODEL, threads=self.speech_threads, providers=providers)
        self.silence_config = silence_config
        self.motion = MotionPredictor(self.folder / MOTION_MODEL, threads=self.speech_threads, providers=providers, encoder=self.encoder,
                                      silence=silence_config)
        self._live_motion = None
        self._providers = providers
        self.people = IdentityBuilder(face_config, self.crop_size, self.renderer.references)
        self.artifact_check = ArtifactCheck(artifact_config)
        used = [SPEECH_MODEL, MOTION_MODEL, *self.renderer.model_files]
        self.model_hashes = {name: provenance.file_sha256(self.folder / name) for name in used}
        self.credentials = None  # C2PA signing of every video written (the key is read, or made, here: a bad one fails now)
        if c2pa_config.enabled:
            from avatar.credentials import CredentialSigner

            self.credentials = CredentialSigner(c2pa_config)
        self._embedder = None

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

            self._live_motion = MotionPredictor(self.folder / LIVE_MOTION_MODEL, threads=self.speech_threads,
                                                providers=self._providers, encoder=self.encoder, silence=self.silence_config)
            self.model_hashes[LIVE_MOTION_MODEL] = provenance.file_sha256(self.folder / LIVE_MOTION_MODEL)
        return self._live_motion

    @property
    def providers(self) -> typing.List[str]:
        """The onnxruntime providers in use, best first."""
        return self.motion.session.providers

    def warm_up(self, batch: int = 1) -> None:
        """Run the live models once, so that a provider's lazy set-up (graph building, CUDA/TensorRT
        kernels) is not paid by the first frame of a live session."""
        from avatar.face.align import crop_template

        self.renderer.warm_up(batch)
        self.live_motion.from_audio(np.zeros(self.encoder.config.sample_rate // 2, np.float32), 25.0,
                                    crop_template(self.crop_size)[lm.MOUTH_AND_JAW])

    @property
    def embedder(self):
        if self._embedder is None:
            from avatar.identity import FaceEmbedder

            self._embedder = FaceEmbedder(providers=self._providers)
        return self._embedder

    # ------------------------------------------------------------------ the person (avatar/person.py)
    def face_tracker(self):
        """A FaceTracker with the pipeline's face settings (use as a context manager)."""
        return self.people.face_tracker()

    def prepare_image(self, image: np.ndarray, landmarks: typing.Optional[np.ndarray] = None, what: str = "the image",
                      extra_references: typing.Sequence[PathLike] = ()) -> Identity:
        """A person from one portrait `(H, W, 3) uint8` (`IdentityBuilder.from_image`)."""
        return self.people.from_image(image, landmarks, what, extra_references)

    def prepare_frames(self, crops: typing.Sequence[np.ndarray], crop_landmarks: np.ndarray,
                       drift_frames: typing.Sequence[typing.Tuple[np.ndarray, np.ndarray]],
                       extra_references: typing.Sequence[PathLike] = (), inner: typing.Optional[InnerMouth] = None) -> Identity:
        """A person from frames of a video (`IdentityBuilder.from_frames`)."""
        return self.people.from_frames(crops, crop_landmarks, drift_frames, extra_references, inner)

    def reference_frames(self, crop_landmarks: np.ndarray) -> typing.List[int]:
        """Which frames give the renderer's references (`avatar.person.reference_frames`)."""
        return self.people.reference_frames(crop_landmarks)

    def open_mouth(self, frame: np.ndarray, transform: np.ndarray, crop_landmarks: np.ndarray) -> InnerMouth:
        """The warp renderer's open mouth from a frame (`IdentityBuilder.open_mouth`)."""
        return self.people.open_mouth(frame, transform, crop_landmarks)

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
                     frame_indices: typing.Sequence[int],
                     failed: typing.Optional[typing.List[typing.Tuple[int, Verdict]]] = None,
                     clock: typing.Optional[StageClock] = None) -> typing.List[np.ndarray]:
        """Output frames `(H, W, 3) uint8` for a batch of jobs, in one renderer call: each job with its
        person (several live sessions can share a call) and its output frame index (the watermark's
        phase); each finished face region passes the artifact check (`avatar/artifacts.py`) and is
        placed into its frame; a job without a face, or whose region fails, gives its frame as it
        came. `failed` collects `(position in the batch, verdict)` of the frames that failed; `clock`
        times the stages "render" and "artifacts"."""
        clock = clock or StageClock()
        with clock.time("render"):
            regions = self.renderer.render(RenderBatch(jobs, identities, frame_indices))
        rendered = [k for k, region in enumerate(regions) if region is not None]
        with clock.time("artifacts"):  # each region checked on the frame pool's threads
            verdicts = dict(zip(rendered, self.pool.map(lambda k: self.review(jobs[k], regions[k]), rendered)))
        frames = []
        for k, (job, region) in enumerate(zip(jobs, regions)):
            if region is not None and not verdicts[k].ok:
                region = None
                if failed is not None:
                    failed.append((k, verdicts[k]))
            frames.append(job.frame if region is None else region.place(job.frame))
        return frames

    def pose_limit(self, yaw: float) -> typing.Optional[str]:
        """Why a face turned `yaw` degrees is not rendered (`ArtifactConfig.max_yaw_deg`: beyond it the
        warp smears the jaw along the far cheek), or None."""
        limit = self.artifact_check.config.max_yaw_deg
        if self.artifact_check.config.enabled and abs(yaw) > limit:
            return f"pose: the face is turned {abs(yaw):.0f}° (> {limit:g}°); the frame is passed through"
        return None

    def check_portrait_pose(self, landmarks: np.ndarray, what: str) -> None:
        """Raise a one-line FaceError when a portrait's face (`landmarks (478, 3)`) is turned beyond the
        pose limit: every frame of it would be passed through."""
        yaw = float(lm.yaw_degrees(landmarks))
        if self.pose_limit(yaw):
            raise FaceError(f"{what}: the face is turned {abs(yaw):.0f}° from frontal (at most "
                            f"{self.artifact_check.config.max_yaw_deg:g}° can be animated); give a portrait that faces the camera more")

    def review(self, job: FrameJob, region: FaceRegion) -> Verdict:
        """The artifact check of one finished region against the job's frame."""
        offset = np.array([region.left, region.top], np.float64)
        landmarks = np.asarray(job.frame_landmarks, np.float64)[:, :2] - offset
        mouth = apply_transform(job.mouth, invert_transform(job.transform)) - offset
        return self.artifact_check(region.pixels, job.frame[region.box], region.alpha, landmarks, lm.with_mouth(landmarks, mouth))

    def render_jobs(self, identity: Identity, jobs: typing.Iterable[FrameJob], fps: float, monitor=None,
                    clock: typing.Optional[StageClock] = None,
                    failures: typing.Optional[typing.List[typing.Dict[str, typing.Any]]] = None) -> typing.Iterator[np.ndarray]:
        """Output frames for a stream of jobs, in order, rendered `config.batch` at a time; each frame
        is offered to the drift monitor (which samples at its own rate). `failures` collects the frames
        that failed the artifact check: `{"frame", "t", "why"}`. The next batch renders (and is
        checked) on a thread of its own while the caller takes this one's frames (the drift monitor
        here, the encoder in `_write`), so the stages overlap and their seconds add up to more than
        the wall time."""
        clock = clock or StageClock()
        size = self.config.batch  # at least 1 (PipelineConfig)

        def batches() -> typing.Iterator[typing.Tuple[int, typing.List[FrameJob]]]:
            pending: typing.List[FrameJob] = []
            start, stream = 0, FrameStream()  # this run's frames: the renderer's bank choices start afresh
            for job in jobs:
                pending.append(job if job.stream is not None else dataclasses.replace(job, stream=stream))
                if len(pending) == size:
                    yield start, pending
                    start, pending = start + size, []
            if pending:
                yield start, pending

        def render(start: int, batch: typing.List[FrameJob]) -> typing.Tuple[typing.List[np.ndarray], list]:
            failed: typing.List[typing.Tuple[int, Verdict]] = []
            return self.render_batch(batch, [identity] * len(batch), range(start, start + len(batch)), failed, clock), failed

        def finish(start: int, batch: typing.List[FrameJob], rendered: concurrent.futures.Future) -> typing.Iterator[np.ndarray]:
            frames, failed = rendered.result()
            if failures is not None:
                failures.extend({"frame": start + k, "t": round((start + k) / fps, 3), "why": str(verdict)} for k, verdict in failed)
            for k, (job, frame) in enumerate(zip(batch, frames)):
                if monitor is not None and job.frame_landmarks is not None:
                    with clock.time("drift"):
                        monitor.observe((start + k) / fps, frame, job.frame_landmarks)
                yield frame

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="render-ahead", initializer=one_blas_thread) as ahead:
            previous = None
            for start, batch in batches():
                submitted = (start, batch, ahead.submit(render, start, batch))
                if previous is not None:
                    yield from finish(*previous)
                previous = submitted
            if previous is not None:
                yield from finish(*previous)

    def still_job(self, identity: Identity, portrait: np.ndarray, landmarks: np.ndarray, mouth: np.ndarray,
                  closure: float = 0.0, move: typing.Optional[np.ndarray] = None) -> FrameJob:
        """One frame of a still portrait (`avatar.idle.still_job` at the pipeline's crop)."""
        return idle.still_job(self.aligner, identity, portrait, landmarks, mouth, closure, move)

    def animate_frames(self, identity: Identity, portrait: np.ndarray, landmarks: np.ndarray, samples: np.ndarray,
                       idle_config: IdleConfig = IdleConfig(), fps: typing.Optional[float] = None,
                       monitor=None, clock: typing.Optional[StageClock] = None,
                       failures: typing.Optional[typing.List[typing.Dict[str, typing.Any]]] = None) -> typing.Iterator[np.ndarray]:
        """Frames `(H, W, 3) uint8` of `portrait` speaking `samples` (16 kHz mono float32), one at a time."""
        fps = fps or self.config.fps
        clock = clock or StageClock()
        n = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
        with clock.time("motion"):
            mouths = self.motion.from_audio(samples, fps, identity.rest, n, adaptation=identity.adaptation)
        closure = idle.blink_curve(n, fps, idle_config)
        moves = idle.head_motion(n, fps, idle_config, *idle.face_centre_and_height(landmarks))

        def jobs() -> typing.Iterator[FrameJob]:
            for i in range(n):
                with clock.time("idle"):
                    job = self.still_job(identity, portrait, landmarks, mouths[i], float(closure[i]), moves[i])
                yield job

        yield from self.render_jobs(identity, jobs(), fps, monitor, clock, failures)

    # ------------------------------------------------------------------ commands
    def read_speech(self, path: PathLike) -> np.ndarray:
        """The speech of an audio (or video) file, `(N,) float32` mono at the encoder's rate; one-line
        errors for samples that are not numbers and for less than MIN_SPEECH_S of it."""
        rate = self.encoder.config.sample_rate
        samples = media.read_audio(path, rate)
        if not np.isfinite(samples).all():
            raise MediaError(f"{path}: the audio holds samples that are not numbers (NaN or infinite); re-export it")
        if samples.size < MIN_SPEECH_S * rate:
            raise MediaError(f"{path}: {samples.size / rate:.2f} s of audio; give at least {MIN_SPEECH_S:g} s of speech")
        return samples

    def _check_video_output(self, output: PathLike, inputs: typing.Sequence[PathLike]) -> pathlib.Path:
        """The output rules (`media.check_output_path`), and a container that can carry C2PA when signing."""
        path = media.check_output_path(output, inputs, media.VIDEO_EXTENSIONS)
        if self.credentials is not None:
            self.credentials.check_format(path)
        return path

    def check_length(self, seconds: float, what: str) -> None:
        """Refuse, before any work, an output longer than `config.max_minutes` (one line naming the option)."""
        if seconds > 60 * self.config.max_minutes:
            raise MediaError(f"{what} is {seconds / 60:.1f} min long, more than the {self.config.max_minutes:g} min this "
                             f"makes without asking; give --max-minutes {math.ceil(seconds / 60)} (or more) for a job this long")

    def _write(self, output: pathlib.Path, fps: float, samples: np.ndarray, inputs: typing.Sequence[PathLike],
               frames: typing.Iterable[np.ndarray], total: int, what: str, progress: bool, clock: StageClock,
               timer: typing.Callable[[], float] = time.perf_counter, source: typing.Optional[PathLike] = None) -> None:
        """Encode `frames` with the speech and the synthetic labels to `output` (atomically; C2PA-signed
        before it appears, `source`: a dub's video, the manifest's parent ingredient), with a progress
        bar; a job with more than a minute left after its first `ESTIMATE_AFTER_S` says how long it will take."""
        metadata = provenance.container_metadata(self.model_hashes)
        started, estimated = timer(), not progress
        def sign(tmp: pathlib.Path) -> None:
            with clock.time("encode"):
                self.credentials.sign(tmp, what, self.model_hashes, output, source)

        with media.VideoWriter(output, fps, samples, self.encoder.config.sample_rate, crf=self.config.crf, preset=self.config.preset,
                               metadata=metadata, inputs=inputs, finish=sign if self.credentials is not None else None) as writer:
            for done, frame in enumerate(tqdm(frames, total=total, desc=what, unit="frame", disable=not progress), 1):
                with clock.time("encode"):
                    writer.write(frame)
                elapsed = timer() - started
                if not estimated and elapsed >= ESTIMATE_AFTER_S:
                    estimated = True
                    left = (total - done) * elapsed / done
                    if left > 60:
                        tqdm.write(f"note: {total} frames ({total / fps / 60:.1f} min of video); at the pace of the first "
                                   f"{done}, about {left / 60:.0f} min more ({done / elapsed / fps:.2f}× real time)")

    def _finish(self, command: str, output: pathlib.Path, inputs: typing.Dict[str, typing.Optional[str]], frames: int,
                fps: float, samples: np.ndarray, started: float, clock: StageClock, monitor, events,
                failures: typing.List[typing.Dict[str, typing.Any]], extra: typing.Dict[str, typing.Any],
                report_path: typing.Optional[PathLike]) -> RunResult:
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
            "artifacts": {"config": dataclasses.asdict(self.artifact_check.config), "frames": failures,
                          "ms_per_frame": round(1000 * clock.seconds.get("artifacts", 0.0) / max(frames, 1), 3)},
        }
        if report_path is not None:
            path = pathlib.Path(report_path)
            with media.atomic_output(path, [p for p in inputs.values() if p]) as tmp:
                tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
        return RunResult(output, frames, fps, audio_seconds, seconds, report, sidecar)

    def animate(self, image: typing.Optional[PathLike], audio: PathLike, output: PathLike, idle_config: IdleConfig = IdleConfig(),
                references: typing.Sequence[PathLike] = (), report: typing.Optional[PathLike] = None,
                progress: bool = True, avatar: typing.Optional[Avatar] = None) -> RunResult:
        """A still portrait (`image`), or an enrolled person (`avatar`, `load_avatar`), + speech → a
        talking video written atomically to `output`. A portrait gets synthetic blinks and head motion
        (`idle_config`) at `config.fps`; an avatar from video plays its idle loop (the person's real
        footage, at its frame rate) behind the speaking mouth."""
        if (image is None) == (avatar is None):
            raise MediaError("animate needs a portrait (--image) or an enrolled avatar (--avatar), one of the two")
        inputs = [p for p in (image, audio, *references) if p is not None]
        output = self._check_video_output(output, inputs)
        if report is not None:
            media.check_output_path(report, inputs + [output])
        started, clock = time.perf_counter(), StageClock()
        with clock.time("decode"):
            samples = self.read_speech(audio)
        self.check_length(samples.size / self.encoder.config.sample_rate, f"{audio}'s speech")
        if avatar is not None and avatar.idle is not None:
            return self._animate_loop(avatar, audio, output, inputs, samples, started, clock, report, progress)
        with clock.time("decode"):
            portrait = fit_image(media.read_image(image), self.config.max_side) if avatar is None else avatar.still[0]
        with clock.time("face"):
            if avatar is None:
                with self.face_tracker() as tracker:
                    landmarks = tracker.select(portrait, what=str(image)).landmarks
                self.check_portrait_pose(landmarks, str(image))
                identity = self.prepare_image(portrait, landmarks, what=str(image), extra_references=references)
            else:
                landmarks, identity = avatar.still[1], avatar.identity
        fps = self.config.fps
        events: typing.List[typing.Dict[str, typing.Any]] = []
        monitor = self._drift_monitor(identity, events)
        n = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
        failures: typing.List[typing.Dict[str, typing.Any]] = []
        frames = self.animate_frames(identity, portrait, landmarks, samples, idle_config, fps, monitor, clock, failures)
        self._write(output, fps, samples, inputs, frames, n, "animate", progress, clock)
        return self._finish("animate", output, {"image": str(image) if image is not None else None, "audio": str(audio),
                                                "avatar": avatar.source if avatar is not None else None}, n, fps,
                            samples, started, clock, monitor, events, failures,
                            {"idle": dataclasses.asdict(idle_config), "rest_inferred": identity.rest_inferred,
                             "identity_references": len(identity.drift_references), "person": "avatar" if avatar else "portrait"}, report)

    def _animate_loop(self, avatar: Avatar, audio: PathLike, output: pathlib.Path, inputs: typing.List[PathLike], samples: np.ndarray,
                      started: float, clock: StageClock, report: typing.Optional[PathLike], progress: bool) -> RunResult:
        """`animate` of an avatar with an idle loop: the loop's frames, over and over, as a dub's."""
        loop, identity = avatar.idle.scaled(self.config.max_side), avatar.identity
        fps = loop.fps
        n = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
        with clock.time("motion"):
            mouths = self.motion.from_audio(samples, fps, identity.rest, n, adaptation=identity.adaptation)
        events: typing.List[typing.Dict[str, typing.Any]] = []
        monitor = self._drift_monitor(identity, events)
        failures: typing.List[typing.Dict[str, typing.Any]] = []
        jobs = [loop.job(i, mouths[i], identity.rest) for i in range(n)]  # each at its loop frame's head pose
        if identity.bank is not None:
            path = identity.bank.path(np.stack([job.mouth for job in jobs]), np.stack([job.crop_landmarks[HEAD_POINTS] for job in jobs]))
            jobs = [dataclasses.replace(job, bank_index=int(entry)) for job, entry in zip(jobs, path)]
        self._write(output, fps, samples, inputs, self.render_jobs(identity, jobs, fps, monitor, clock, failures), n, "animate",
                    progress, clock)
        failures.sort(key=lambda item: item["frame"])
        extra = {"person": "avatar", "idle_loop_frames": len(loop), "mouth_bank": len(identity.bank) if identity.bank is not None else 0,
                 "motion_adapted": identity.adaptation is not None, "identity_references": len(identity.drift_references)}
        return self._finish("animate", output, {"image": None, "audio": str(audio), "avatar": avatar.source}, n, fps, samples, started,
                            clock, monitor, events, failures, extra, report)

    # ------------------------------------------------------------------ enrollment (avatar/enroll.py)
    def enroll(self, videos: typing.Sequence[PathLike] = (), image: typing.Optional[PathLike] = None,
               output: typing.Optional[PathLike] = None, references: typing.Sequence[PathLike] = (),
               progress: bool = True) -> Avatar:
        """An enrolled person from videos of them (or one photo), written to `output` when given."""
        from avatar.enroll import avatar_from_image, build_avatar, save_avatar, track_video

        if bool(videos) == (image is not None):
            raise MediaError("enroll from videos (--video, repeatable) or from one photo (--image), not both or neither")
        inputs = [*videos, *([image] if image is not None else []), *references]
        if output is not None:
            media.check_output_path(output, inputs, (AVATAR_SUFFIX,))
        if image is not None:
            portrait = fit_image(media.read_image(image), self.config.max_side)
            with self.face_tracker() as tracker:
                landmarks = tracker.select(portrait, what=str(image)).landmarks
            self.check_portrait_pose(landmarks, str(image))
            avatar = avatar_from_image(self, portrait, landmarks, str(image), references)
        else:
            footages = []
            try:
                for video in videos:
                    footages.append(track_video(self, video, progress))
                avatar = build_avatar(self, footages, progress, references)
            finally:
                for footage in footages:
                    footage.close()
        if output is not None:
            save_avatar(avatar, output, inputs)
        return avatar

    def load_avatar(self, path: PathLike) -> Avatar:
        """An avatar file written by `enroll` (`avatar.enroll.load_avatar`)."""
        from avatar.enroll import load_avatar

        return load_avatar(path)

    def dub(self, video: PathLike, audio: PathLike, output: PathLike, dub_config: DubConfig = DubConfig(),
            references: typing.Sequence[PathLike] = (), report: typing.Optional[PathLike] = None,
            progress: bool = True, avatar: typing.Optional[Avatar] = None, enroll: bool = True, footage=None) -> RunResult:
        """Re-lip-sync `video` to `audio`; outside the repainted lower face every pixel is the input's.
        The person comes from `avatar` (enrolled before, from other footage of them) or, with
        `enroll` (default), from the video itself enrolled on the fly (its mouths are the bank, its
        own speech and lips the motion adaptation); `enroll=False`: the generic path (one open mouth).
        `footage`: `video` tracked already (`avatar.enroll.track_video`, with its audio when it is
        enrolled on the fly), as batch workers do for their next job while one renders; closed here."""
        from avatar.enroll import build_avatar, track_video

        if dub_config.audio_longer not in ("pingpong", "loop", "trim"):
            raise MediaError(f"audio_longer must be pingpong, loop or trim, not {dub_config.audio_longer!r}")
        if dub_config.audio_shorter not in ("trim", "keep"):
            raise MediaError(f"audio_shorter must be trim or keep, not {dub_config.audio_shorter!r}")
        inputs = [video, audio, *references]
        output = self._check_video_output(output, inputs)
        if report is not None:
            media.check_output_path(report, inputs + [output])
        started, clock = time.perf_counter(), StageClock()
        with clock.time("decode"):
            samples = self.read_speech(audio)
            self.check_length(samples.size / self.encoder.config.sample_rate, f"{audio}'s speech")
            if dub_config.audio_shorter == "keep":  # the whole video is kept
                self.check_length(media.probe(video).duration, f"{video}")

        # 1. Track the face through the whole video once; keep the frames on disk for random access.
        with clock.time("face"):
            if footage is None:
                footage = track_video(self, video, progress, with_audio=enroll and avatar is None)
        try:
            fps, good = footage.fps, footage.good

            # 2. The person: enrolled before, enrolled now from the video, or its rest mouth and references.
            with clock.time("enroll" if enroll and avatar is None else "face"):
                if avatar is not None:  # its mouths, motion and references; the rest mouth of this video's own geometry
                    from avatar.motion.runner import rest_pose

                    rest, anchor = rest_pose(np.stack([footage.crop_landmarks[i] for i in good]))
                    identity = dataclasses.replace(avatar.identity, rest=rest, rest_anchor=anchor, rest_inferred=False,
                                                   drift_references=avatar.identity.drift_references + self.people.reference_photos(references))
                else:  # enrolled from this video (its bank and adaptation), or the generic person (neither)
                    identity = build_avatar(self, [footage], progress=False, references=references, adapt=enroll, idle=False,
                                            bank=enroll, strict=False).identity

            # 3. Fit the speech to the video: output length and which source frame each shows.
            # (a variable-rate video is played on a constant `fps` grid, each frame at its own time)
            grid = footage.constant_rate()
            n_source = len(grid)
            n_audio = audio_frontend.n_video_frames(samples.size, fps, self.encoder.config.sample_rate)
            if n_audio > n_source and dub_config.audio_longer == "trim":
                n_out = n_source
            elif n_audio < n_source and dub_config.audio_shorter == "keep":
                n_out = n_source
            else:
                n_out = n_audio
            samples_out = samples[: int(round(n_out / fps * self.encoder.config.sample_rate))]
            transforms = np.stack([t if t is not None else np.zeros((2, 3)) for t in footage.transforms])[grid]
            motion = np.r_[0.0, np.linalg.norm(np.diff(transforms, axis=0), axis=(1, 2))]
            schedule = grid[pingpong_schedule(n_source, n_out, motion, fps, dub_config.audio_longer)]

            # 4. Mouths from the new speech (closed after it ends, when the video is kept longer).
            with clock.time("motion"):
                mouths = self.motion.from_audio(samples_out, fps, identity.rest, n_out, adaptation=identity.adaptation)

            events: typing.List[typing.Dict[str, typing.Any]] = []
            monitor = self._drift_monitor(identity, events)
            failures: typing.List[typing.Dict[str, typing.Any]] = []
            jobs = self.footage_jobs(identity, footage.store.__getitem__, footage.valid, footage.transforms, footage.crop_landmarks,
                                     footage.frame_landmarks, schedule, mouths, fps, failures)
            self._write(output, fps, samples_out, inputs, self.render_jobs(identity, jobs, fps, monitor, clock, failures), n_out,
                        "dub", progress, clock, source=video)
        finally:
            footage.close()
        steps = np.diff(schedule)
        loops = int(np.sum((steps < 0) & (np.r_[0, steps[:-1]] >= 0)))  # times the video turned or jumped back
        person = "avatar" if avatar is not None else ("enrolled from the video" if enroll else "generic")
        extra = {"dub": dataclasses.asdict(dub_config), "source_frames": len(footage.valid), "constant_rate_frames": n_source,
                 "frames_without_face": int(len(footage.valid) - good.size),
                 "speech_frames": n_audio, "reversals_or_restarts": loops, "identity_references": len(identity.drift_references),
                 "person": person, "mouth_bank": len(identity.bank) if identity.bank is not None else 0,
                 "motion_adapted": identity.adaptation is not None}
        failures.sort(key=lambda item: item["frame"])
        return self._finish("dub", output, {"video": str(video), "audio": str(audio),
                                            "avatar": avatar.source if avatar is not None else None}, n_out, fps, samples_out, started,
                            clock, monitor, events, failures, extra, report)

    def footage_jobs(self, identity: Identity, frame_at: typing.Callable[[int], np.ndarray], valid: typing.Sequence[bool],
                     transforms: typing.Sequence[typing.Optional[np.ndarray]], crop_landmarks: typing.Sequence[typing.Optional[np.ndarray]],
                     frame_landmarks: typing.Sequence[typing.Optional[np.ndarray]], schedule: np.ndarray, mouths: np.ndarray,
                     fps: float, failures: typing.List[typing.Dict[str, typing.Any]]) -> typing.Iterator[FrameJob]:
        """Jobs that put `mouths (T, 59, 2)` (relative to the person's rest anchor) on frames of
        footage: output frame j shows source frame `schedule[j]` (`frame_at(i)`, with its tracked
        face); a frame without a face, or turned beyond the pose limit (listed in `failures`), passes
        through. With a mouth bank, each job carries its entry of the whole sequence's Viterbi path.
        Each mouth is placed at its frame's head pose (`avatar.motion.pose`: the closed frames' mouth
        turned with the head), where the person's rest mouth is this footage's own."""
        from avatar.motion.pose import PosedRest
        from avatar.motion.runner import closed_frames

        faces = np.stack([np.asarray(crop_landmarks[i], np.float64) for i in range(len(valid)) if valid[i]]) if any(valid) else None
        posed = None
        if faces is not None and faces.shape[-1] >= 3:
            posed = PosedRest.from_frames(faces, identity.rest, closed_frames(faces[..., :2]))
        placed = np.array(mouths, np.float64)  # each output frame's mouth at its source frame's head pose
        for j, source in enumerate(schedule):
            if valid[int(source)]:
                face = crop_landmarks[int(source)]
                placed[j] = posed.place(face, mouths[j]) if posed is not None else \
                    mouths[j] + (lm.mouth_anchor(face) - identity.rest_anchor)
        path = None
        if identity.bank is not None:
            path = identity.bank.path(placed, None if posed is None else np.stack([
                np.asarray(crop_landmarks[int(i)], np.float64)[HEAD_POINTS] if valid[int(i)] else np.full((len(HEAD_POINTS), 3), np.nan)
                for i in schedule]))
        for j, source in enumerate(schedule):
            source = int(source)
            frame = frame_at(source)
            if not valid[source]:
                yield FrameJob(frame)
                continue
            turned = self.pose_limit(float(lm.yaw_degrees(frame_landmarks[source])))
            if turned:  # beyond what the renderers draw correctly: the frame as it is
                failures.append({"frame": j, "t": round(j / fps, 3), "why": turned})
                yield FrameJob(frame)
                continue
            yield FrameJob(frame, transforms[source], crop_landmarks[source], frame_landmarks[source], placed[j],
                           None if path is None else int(path[j]))
