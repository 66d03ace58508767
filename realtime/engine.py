"""The live engine: PCM chunks of any size in, video frames with presentation timestamps out.

    engine = Engine()                                    # models load here (onnxruntime: TRT → CUDA → CPU)
    avatar = engine.prepare(portrait)                    # once per person; cached by content
    session = engine.open(avatar, sample_rate=48000)
    session.push(chunk)                                  # float32 mono at that rate, any size (cheap)
    engine.step()                                        # hears the new audio, renders what is due, all sessions in one batch
    for frame in session.pop_frames(): frame.pts, frame.image, frame.audio, frame.repeated

Clock: frame i has `pts = i / fps` on the session's audio clock (second 0 is the first sample
pushed) and carries the 16 kHz audio of `[pts, pts + 1/fps)`, so a player that follows pts stays in
sync whatever the network does. A frame can be made once its speech context has arrived (the motion
model's look-ahead, 102.5 ms at 25 fps). Each has a deadline on the wall clock: `anchor + pts + look-ahead +
max_backlog_s`, where the anchor is when audio second 0 arrived, slipping forward only when audio
comes later than real time (a client that sends faster than real time, like a TTS service, is never
dropped; a jittery one only moves the schedule). When the renderer cannot keep up, frames that would
miss their deadline are not rendered: the previous image is sent again under the new pts
(`repeated`, counted as dropped). Sync never drifts, only smoothness suffers.

Capacity: `calibrate(avatar)` measures what one session costs here (render time per frame, speech
models per second of audio), and the running estimates follow the load; `admission(max_load)` says
why one more session would not be served in real time (their summed load would pass `max_load`, or
frames are being repeated already), so that a server refuses it instead of degrading everyone.

Idling: `keep_alive(now)` feeds silence when no audio has come for `silence_after_s`, up to
`silence_after_s` behind real time (never ahead of it, so a late packet only adds that much delay),
so the mouth closes and the avatar keeps blinking and moving a little instead of freezing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import threading
import time
import typing

import numpy as np

from avatar import idle
from avatar.config import C2paConfig, FaceConfig, IdentityConfig, IdleConfig, RealtimeConfig
from avatar.errors import MediaError

STREAM_RATE = 16000  # what the motion model hears
ADMISSION_WINDOW_S = 3.0  # how far back `Engine.recent_repeats` looks
MAX_REPEATS_TO_ADMIT = 0.05  # no new session while more of the recent frames than this were repeated


@dataclasses.dataclass
class Avatar:
    """A prepared person: a portrait `(H, W, 3) uint8` (scaled to `max_side`; an enrolled avatar's
    first idle-loop frame), its landmarks `(478, 3)`, the renderer/drift identity, and where idle head
    motion turns about; `loop`: an enrolled avatar's idle loop (`avatar.enroll.IdleLoop`), played
    behind the speaking mouth instead of the still with synthetic blinks and sway."""

    key: str
    portrait: np.ndarray
    landmarks: np.ndarray
    identity: typing.Any
    centre: np.ndarray
    height: float
    loop: typing.Any = None


@dataclasses.dataclass
class OutputFrame:
    """index: frame number in the session; pts: seconds on the session's audio clock; image:
    `(H, W, 3) uint8`; audio: `(n,) float32` 16 kHz for [pts, pts + 1/fps); repeated: the renderer was
    behind, so this is the previous image again; ready_at: wall time the frame's audio was complete
    (its look-ahead included); made_at: wall time it was finished; source_audio: the same span as
    pushed, `(m,) float32` at the session's own sample rate (silence where the engine idled)."""

    index: int
    pts: float
    image: np.ndarray
    audio: np.ndarray
    repeated: bool
    ready_at: float
    made_at: float
    source_audio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def latency_s(self) -> float:
        """From the moment the frame could be made (its audio had arrived) to the moment it was."""
        return self.made_at - self.ready_at


class Resampler:
    """Streaming resampling of float32 mono from `rate` to `to` Hz (PyAV's swresample keeps its filter
    state between chunks); the chunks themselves when the rates agree."""

    def __init__(self, rate: int, to: int = STREAM_RATE):
        import av

        self.rate, self.to = rate, to
        self.resampler = None if rate == to else av.AudioResampler(format="flt", layout="mono", rate=to)
        self.pts = 0

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        if self.resampler is None or chunk.size == 0:
            return chunk
        import av

        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self.pts
        self.pts += chunk.size
        out = [f.to_ndarray()[0] for f in self.resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class _FrameAudio:
    """Audio at `rate` handed out frame by frame: what has come and not been handed out yet starts at
    sample `offset`; `received` counts every sample added."""

    def __init__(self, rate: int):
        self.rate = rate
        self.samples = np.zeros(0, np.float32)
        self.offset = self.received = 0

    def add(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, samples])
        self.received += samples.size

    def take(self, index: int, fps: float) -> np.ndarray:
        """Frame `index`'s span `[index / fps, (index + 1) / fps)` (what of it has come), once; what lies
        before it is let go."""
        begin, end = int(round(index / fps * self.rate)), int(round((index + 1) / fps * self.rate))
        piece = self.samples[max(0, begin - self.offset): max(0, end - self.offset)]
        drop = max(0, end - self.offset)
        self.samples = self.samples[drop:]
        self.offset += drop
        return piece


class Session:
    """One live stream of one avatar. `push` audio; the engine's `step` renders; `pop_frames` takes
    what is finished. Thread-safe: push/pop from the I/O side, step from the render side."""

    def __init__(self, engine: "Engine", avatar: Avatar, sample_rate: int, now: typing.Optional[float] = None):
        if not 8000 <= sample_rate <= 192000:
            raise MediaError(f"sample rate {sample_rate} Hz is not supported; send 8-192 kHz audio")
        self.engine, self.avatar, self.sample_rate = engine, avatar, sample_rate
        config = engine.config
        self.fps = config.fps
        self.motion = engine.pipeline.live_motion.stream(config.fps, avatar.identity.rest, avatar.identity.adaptation)
        self.lookahead_s = self.motion.lookahead_ms / 1000.0
        self.resample = Resampler(sample_rate)
        self.blinks = idle.BlinkSchedule(engine.idle_config)
        self.lock = threading.Lock()
        self.samples = 0  # 16 kHz samples received (the audio clock)
        self.inbox: typing.Deque[typing.Tuple[np.ndarray, float, bool]] = collections.deque()  # (16 kHz samples, arrival, real) not yet heard
        self.heard = _FrameAudio(STREAM_RATE)  # 16 kHz audio the speech models have heard, for the frames
        self.source = _FrameAudio(sample_rate)  # the same audio as pushed (silence fed included), for the frames
        self.pending: typing.Deque[typing.Tuple[int, np.ndarray, float]] = collections.deque()  # (index, mouth, ready_at)
        self.done: typing.Deque[OutputFrame] = collections.deque()
        self.last_image = avatar.portrait
        self.frames_out = 0
        self.dropped = 0
        self.artifact_frames = 0  # frames that failed the artifact check and show the portrait's own mouth
        self.monitor = None
        self._drift_checks: typing.List[concurrent.futures.Future] = []  # samples on the engine's background thread
        if config.drift_every_s > 0:
            from avatar.identity import DriftMonitor

            self.monitor = DriftMonitor(avatar.identity.drift_references, IdentityConfig(sample_every_s=config.drift_every_s),
                                        embedder=engine.pipeline.embedder)
        # The wall time of audio second 0 (see the module doc), once the session is ready: embedding an enrolled
        # person's drift references takes ~0.5 s, which would otherwise count as silence before the first audio.
        self.anchor = engine.clock() if now is None else now
        self.last_audio_at = self.anchor

    # ---------------------------------------------------------------- input side
    def push(self, chunk: np.ndarray, now: typing.Optional[float] = None) -> None:
        """Audio `(n,)` float32 in [-1, 1] at the session's sample rate. Cheap (a resample and a
        copy): the speech models run on the render side (`hear`), so a busy renderer never delays
        reading the audio and every chunk's arrival time is the true one."""
        chunk = np.asarray(chunk, np.float32).reshape(-1)
        if not np.isfinite(chunk).all():
            raise MediaError("audio contains NaN or infinity; send PCM in [-1, 1]")
        now = self.engine.clock() if now is None else now
        chunk = np.clip(chunk, -1.0, 1.0)
        self._push16(self.resample(chunk), chunk, now, real=True)
        self.last_audio_at = now

    def _push16(self, samples: np.ndarray, source: np.ndarray, now: float, real: bool) -> None:
        with self.lock:
            self.samples += samples.size
            self.inbox.append((samples, now, real))
            self.source.add(source)
        self.engine.audio_arrived.set()

    def plan_hearing(self) -> typing.List[typing.Tuple[typing.Any, np.ndarray, float, bool]]:
        """The audio that has arrived, taken from the inbox (render side), with the speech encoder
        windows each chunk completes: `(plan, samples, arrival, real)` per chunk, for `finish_hearing`
        once the windows are encoded (the engine encodes every session's in one call)."""
        with self.lock:
            chunks = list(self.inbox)
            self.inbox.clear()
        return [(self.motion.plan(samples), samples, arrived, real) for samples, arrived, real in chunks]

    def finish_hearing(self, planned, encoded: typing.Sequence[np.ndarray]) -> float:
        """The motion model on the chunks of `plan_hearing`, given their windows encoded: each frame whose
        look-ahead a chunk completes joins `pending`, ready from that chunk's arrival. Returns the seconds
        of audio heard."""
        heard = 0
        for (plan, samples, arrived, real), outputs in zip(planned, encoded):
            indices, mouths = self.motion.take(plan, outputs)
            heard += samples.size
            with self.lock:
                self.heard.add(samples)
                for index, mouth in zip(indices, mouths):
                    if real:  # real audio later than real time moves the schedule; our own silence does not
                        self.anchor = max(self.anchor, arrived - index / self.fps - self.lookahead_s)
                    self.pending.append((int(index), mouth, arrived))
        return heard / STREAM_RATE

    def keep_alive(self, now: typing.Optional[float] = None) -> None:
        """When no audio has come for `silence_after_s`, feed silence up to that far behind the wall
        clock, so that frames keep coming (idling) and a late packet adds at most that much delay."""
        now = self.engine.clock() if now is None else now
        if now - self.last_audio_at < self.engine.config.silence_after_s:
            return
        missing = int((now - self.anchor - self.engine.config.silence_after_s) * STREAM_RATE) - self.samples
        if missing > 0:
            source = int(round((self.samples + missing) * self.sample_rate / STREAM_RATE)) - self.source.received
            self._push16(np.zeros(missing, np.float32), np.zeros(max(0, source), np.float32), now, real=False)

    def pop_frames(self) -> typing.List[OutputFrame]:
        with self.lock:
            out = list(self.done)
            self.done.clear()
        return out

    # ---------------------------------------------------------------- render side (Engine.step)
    def deadline(self, index: int) -> float:
        return self.anchor + index / self.fps + self.lookahead_s + self.engine.config.max_backlog_s

    def take_due(self, now: float, limit: int, render_s: float = 0.0) -> typing.List[typing.Tuple[int, np.ndarray, float]]:
        """Drop what would miss its deadline if rendered now (`render_s`: how long the coming batch is
        expected to take), repeating the last image instead; hand out up to `limit` frames to render,
        oldest first. The newest frame is never dropped."""
        with self.lock:
            while len(self.pending) > 1 and self.deadline(self.pending[0][0]) < now + render_s:
                index, _, ready = self.pending.popleft()
                self._finish(index, self.last_image, True, ready, now)
            taken = []
            while self.pending and len(taken) < limit:
                taken.append(self.pending.popleft())
            return taken

    def _finish(self, index: int, image: np.ndarray, repeated: bool, ready_at: float, now: float) -> None:
        self.done.append(OutputFrame(index, index / self.fps, image, self.heard.take(index, self.fps), repeated, ready_at, now,
                                     self.source.take(index, self.fps)))
        self.frames_out += 1
        self.dropped += int(repeated)
        self.engine.frames_out += 1
        self.engine.dropped += int(repeated)

    def deliver(self, items: typing.Sequence[typing.Tuple[int, float]], images: typing.Sequence[np.ndarray],
                landmarks: typing.Sequence[np.ndarray], now: float) -> None:
        with self.lock:
            for (index, ready), image in zip(items, images):
                self.last_image = image
                self._finish(index, image, False, ready, now)
        if self.monitor is not None:  # measured on the engine's background thread, not the render thread (an embedding)
            self._drift_checks = [check for check in self._drift_checks if not check.done()]
            for (index, _), image, points in zip(items, images, landmarks):
                if self.monitor.due(index / self.fps) and points is not None:
                    self._drift_checks.append(self.engine.background.submit(self.monitor.observe, index / self.fps, image, points))

    @property
    def backlog(self) -> int:
        """Frames waiting to be rendered, plus one while audio waits to be heard."""
        return len(self.pending) + int(bool(self.inbox))

    def stats(self) -> typing.Dict[str, typing.Any]:
        return {"frames": self.frames_out, "dropped": self.dropped, "audio_s": self.samples / STREAM_RATE,
                "lookahead_ms": 1000 * self.lookahead_s, "backlog": self.backlog,
                "drift_alarms": len(self.monitor.alarms) if self.monitor is not None else 0,
                "artifact_frames": self.artifact_frames}

    def close(self) -> None:
        """Leave the engine, once the drift samples asked for are measured."""
        concurrent.futures.wait(self._drift_checks)
        self.engine.forget(self)


class Engine:
    """Shared models and the render step for every live session."""

    def __init__(self, pipeline=None, config: RealtimeConfig = RealtimeConfig(), idle_config: IdleConfig = IdleConfig(),
                 providers: typing.Optional[typing.Sequence[str]] = None, clock: typing.Callable[[], float] = time.perf_counter,
                 face_config: typing.Optional[FaceConfig] = None):
        """`clock`: seconds of the wall clock (injected by tests that simulate time); `face_config`: the
        face front-end's settings (which face of several, as `animate`'s `--face-index`)."""
        from avatar.pipeline import AvatarPipeline

        self.config, self.idle_config, self.clock = config, idle_config, clock
        self.pipeline = pipeline or AvatarPipeline.from_pretrained(
            config=config.pipeline, providers=providers, face_config=face_config or FaceConfig(),
            c2pa_config=C2paConfig(enabled=False))  # live frames are not files
        self.pipeline.warm_up(config.pipeline.batch)
        self.avatars: typing.Dict[str, Avatar] = {}
        self.sessions: typing.List[Session] = []
        self.lock = threading.Lock()
        self.frame_seconds = 0.05  # running estimate of the render time per frame (`calibrate` measures it)
        self.hearing = [0.0, 0.0]  # decaying sums: seconds spent in the speech models, seconds of audio heard
        self.frames_out = self.dropped = 0  # every session's frames, since the start
        self.recent: typing.Deque[typing.Tuple[float, int, int]] = collections.deque()  # (clock, frames_out, dropped) per step
        # off the render thread: the speech models while a batch renders (`step`), and drift samples, each on a thread of its own
        self.hearing_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-hearing")
        self.audio_arrived = threading.Event()  # set by every session's push (wakes the hearing while a batch renders)
        self.background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-background")

    # ------------------------------------------------------------------ capacity
    def session_load(self) -> float:
        """The share of the render thread one session takes, measured: `fps` frames at the running
        render time per frame, plus the speech models' time per second of audio."""
        work, audio = self.hearing
        return self.config.fps * self.frame_seconds + (work / audio if audio > 0 else 0.0)

    def recent_repeats(self, now: typing.Optional[float] = None) -> float:
        """Share of the frames of the last `ADMISSION_WINDOW_S` seconds that were repeated (the renderer was late)."""
        now = self.clock() if now is None else now
        since = next((entry for entry in self.recent if entry[0] >= now - ADMISSION_WINDOW_S), None)
        if since is None or self.frames_out == since[1]:
            return 0.0
        return (self.dropped - since[2]) / (self.frames_out - since[1])

    def admission(self, max_load: float, now: typing.Optional[float] = None) -> typing.Optional[str]:
        """None when one more session fits, or why not: the sessions' measured load (`session_load`
        each) would pass `max_load` (1.0: the renderer's whole time), or frames are being repeated
        already. The first session is always admitted."""
        with self.lock:
            count = len(self.sessions)
        if count == 0:
            return None
        load = self.session_load()
        if (count + 1) * load > max_load:
            return (f"the server is at capacity: a session takes {100 * load:.0f}% of its renderer here "
                    f"({1 / self.frame_seconds:.0f} frames/s), {count} open; try again later")
        repeats = self.recent_repeats(now)
        if repeats > MAX_REPEATS_TO_ADMIT:
            return f"the server is at capacity: {100 * repeats:.0f}% of its recent frames came late, {count} session(s) open; try again later"
        return None

    def calibrate(self, avatar: Avatar, seconds: float = 2.0) -> float:
        """Measure what one session of `avatar` costs on this machine (before any session is open):
        stream `seconds` of the bundled sample speech through a session, every frame rendered, which
        sets the running render and speech-model costs. Returns `session_load()`."""
        from avatar import media
        from avatar.runtime import asset_path

        with self.lock:
            if self.sessions:
                raise RuntimeError("calibrate before any session is open")
        speech = media.read_audio(asset_path("samples/speech.flac"), STREAM_RATE)
        speech = np.resize(speech, int(seconds * STREAM_RATE))
        session = self.open(avatar, STREAM_RATE, now=0.0)
        try:
            for start in range(0, speech.size, STREAM_RATE // 50):
                session.push(speech[start:start + STREAM_RATE // 50], now=0.0)
                while self.step(now=0.0, render_s=0.0):  # simulated time: nothing is late; the costs are measured on the clock
                    pass
        finally:
            session.close()
            self.frames_out = self.dropped = 0
            self.recent.clear()
        return self.session_load()

    def prepare(self, image: np.ndarray) -> Avatar:
        """A portrait `(H, W, 3) uint8` → Avatar, cached by the picture's content."""
        from avatar.frames import fit_image

        image = np.ascontiguousarray(image, np.uint8)
        key = hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()[:16]
        if key in self.avatars:
            return self.avatars[key]
        portrait = fit_image(image, self.config.pipeline.max_side)
        with self.pipeline.face_tracker() as tracker:
            landmarks = tracker.select(portrait, what="the portrait").landmarks
        self.pipeline.check_portrait_pose(landmarks, "the portrait")
        identity = self.pipeline.prepare_image(portrait, landmarks)
        centre, height = idle.face_centre_and_height(landmarks)
        avatar = Avatar(key, portrait, landmarks, identity, centre, height)
        self.avatars[key] = avatar
        return avatar

    def prepare_enrolled(self, enrolled) -> Avatar:
        """An enrolled person (`avatar.enroll.Avatar`, from `load_avatar`) → Avatar: its idle loop
        (scaled to `max_side`) or, for a photo-only avatar, its photo."""
        if enrolled.idle is None:
            portrait, landmarks = enrolled.still
            loop = None
        else:
            loop = enrolled.idle.scaled(self.config.pipeline.max_side)
            portrait, landmarks = loop.frames[0], loop.frame_landmarks[0]
        key = "enrolled-" + hashlib.sha256(np.ascontiguousarray(portrait).tobytes()).hexdigest()[:16]
        centre, height = idle.face_centre_and_height(landmarks)
        avatar = Avatar(key, portrait, landmarks, enrolled.identity, centre, height, loop)
        self.avatars[key] = avatar
        return avatar

    def open(self, avatar: Avatar, sample_rate: int = STREAM_RATE, now: typing.Optional[float] = None) -> Session:
        session = Session(self, avatar, sample_rate, now)
        with self.lock:
            self.sessions.append(session)
        return session

    def forget(self, session: Session) -> None:
        with self.lock:
            if session in self.sessions:
                self.sessions.remove(session)

    def _hear(self, sessions: typing.Sequence[Session]) -> float:
        """Every session's new audio through the speech models, the speech encoder's windows of all
        sessions in one call (one batch, instead of a call per session and 40 ms of audio). Returns the
        seconds of audio heard."""
        planned = [session.plan_hearing() for session in sessions]
        if not any(planned):  # no audio has come
            return 0.0
        encoded = self.pipeline.encoder.encode_windows(np.concatenate([plan.windows for chunks in planned for plan, *_ in chunks]))
        heard, start = 0.0, 0
        for session, chunks in zip(sessions, planned):
            outputs = []
            for plan, *_ in chunks:
                outputs.append(encoded[start:start + len(plan.windows)])
                start += len(plan.windows)
            heard += session.finish_hearing(chunks, outputs)
        return heard

    def step(self, now: typing.Optional[float] = None, render_s: typing.Optional[float] = None,
             dispatch: typing.Optional[typing.Callable[[], None]] = None) -> int:
        """Hear the audio that has come and render one batch of due frames across sessions (round robin,
        oldest first per session). While the batch renders, the audio that comes meanwhile is heard on
        a thread of its own (its frames join the next batch), so the speech models and the frame pool
        work at once (one live session of a large enrolled face, a 35 ms frame and 12 ms of speech
        models per 40 ms on 2 cores, keeps up only so). `now`: the wall clock
        (default: the engine's `clock`); `render_s`: how long the batch is expected to take (default:
        the running estimate of past batches); frames that would be late by then are repeated instead,
        and `dispatch()` is called then, before the batch renders, so that they can be sent at once.
        Returns how many frames were rendered."""
        with self.lock:
            sessions = list(self.sessions)
        if not sessions:
            return 0
        # 1. Hear the new audio first when no frame is waiting (the new frames are due now).
        if not any(session.pending for session in sessions):
            self._hear_timed(sessions)
        # 2. Render what is due, hearing alongside.
        rendered = threading.Event()
        hearing = self.hearing_thread.submit(self._hear_until, sessions, rendered)
        try:
            return self._render_due(sessions, now, render_s, dispatch)
        finally:
            rendered.set()
            self.audio_arrived.set()
            hearing.result()

    def _hear_until(self, sessions: typing.Sequence[Session], rendered: threading.Event) -> None:
        """`_hear` each time audio arrives, until `rendered` is set (and `audio_arrived` after it)."""
        while True:
            self.audio_arrived.clear()  # before the test: a `rendered` set after it still wakes the wait below
            if rendered.is_set():
                return
            if self._hear(sessions) == 0.0:
                self.audio_arrived.wait()

    def _hear_timed(self, sessions: typing.Sequence[Session]) -> None:
        """`_hear`, its cost kept in the running estimate of the speech models' time per second of audio
        (`session_load`; measured when they run alone: beside a rendering batch their time would count
        the render's share of the cores as well)."""
        started = self.clock()
        heard = self._hear(sessions)
        if heard > 0:
            work, audio = self.hearing
            self.hearing = [0.98 * work + self.clock() - started, 0.98 * audio + heard]

    def _render_due(self, sessions: typing.Sequence[Session], now: typing.Optional[float], render_s: typing.Optional[float],
                    dispatch: typing.Optional[typing.Callable[[], None]]) -> int:
        """The rest of `step`: take each session's due frames, render them in one batch, deliver them."""
        now = self.clock() if now is None else now
        self.recent.append((now, self.frames_out, self.dropped))
        while len(self.recent) > 2 and self.recent[1][0] < now - ADMISSION_WINDOW_S:
            self.recent.popleft()
        batch = self.config.pipeline.batch
        share = max(1, batch // len(sessions))
        if render_s is None:  # the frames this batch will render (each session's waiting ones, up to its share) at the running cost
            render_s = self.frame_seconds * min(batch, sum(min(share, len(session.pending)) for session in sessions))
        work = [(s, s.take_due(now, share, render_s)) for s in sessions]
        if dispatch is not None:
            dispatch()
        parts, identities, indices = [], [], []  # per frame its job, or what a still's job is made of; each session's contiguous
        for session, items in work:
            avatar = session.avatar
            for index, mouth, _ in items:
                if avatar.loop is not None:  # the person's real footage, looped
                    parts.append(dataclasses.replace(avatar.loop.job(index, mouth, avatar.identity.rest), stream=session))
                else:  # the still, with synthetic blinks and sway: moved on the frame pool's threads (a warp of the portrait)
                    closure = float(session.blinks.closure(np.array([index / session.fps]))[0])
                    move = idle.head_motion(1, session.fps, self.idle_config, avatar.centre, avatar.height, start=index)[0]
                    parts.append((avatar, mouth, closure, move))
                identities.append(avatar.identity)
                indices.append(index)
        if not parts:
            return 0

        def job(k: int):
            if not isinstance(parts[k], tuple):
                return parts[k]
            avatar, mouth, closure, move = parts[k]
            return self.pipeline.still_job(avatar.identity, avatar.portrait, avatar.landmarks, mouth, closure, move)

        jobs = self.pipeline.pool.map(job, range(len(parts)))
        started = self.clock()
        failed: typing.List[typing.Tuple[int, typing.Any]] = []
        images = self.pipeline.render_batch(jobs, identities, indices, failed)
        self.frame_seconds = 0.8 * self.frame_seconds + 0.2 * (self.clock() - started) / len(jobs)
        first = 0
        failed_at = {k for k, _ in failed}
        for session, items in work:
            last = first + len(items)
            session.artifact_frames += sum(1 for k in range(first, last) if k in failed_at)
            if items:
                session.deliver([(index, ready) for index, _, ready in items], images[first:last],
                                [job.frame_landmarks for job in jobs[first:last]], self.clock())
            first = last
        return len(jobs)
