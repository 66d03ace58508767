"""A pipecat service (pipecat-ai 1.14, the `pipecat` extra): give an assistant pipeline a face by
adding one processor after its TTS.

    from realtime.pipecat_service import AvatarVideoService
    avatar = AvatarVideoService(image="portrait.jpg")      # or avatar="me.avatar"; the models load here
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar, transport.output(),
                         assistant_aggregator])
    # the output transport: TransportParams(video_out_enabled=True, video_out_width=W, video_out_height=H, ...)

In: `TTSAudioRawFrame`s (PCM16, any rate and channel count). Out, for each video frame of the
avatar (`config.pipeline.fps`, 25 by default): an `OutputImageRawFrame` (RGB, the avatar's size) with
`sync_with_audio` set, then that frame's span of the speech as a `TTSAudioRawFrame` at the pipeline's
output rate, so the output transport shows each picture as its audio starts to play. The TTS audio
is not passed on by itself: the frames carry it (sample for sample, when it already has the output
rate), a look-ahead later (102.5 ms at 25 fps) plus the render time. Between utterances the avatar
idles (mouth at rest, blinks, head sway): its frames carry silence as plain `OutputAudioRawFrame`s,
which do not count as the bot speaking. Frames that follow the speech in the pipeline (a
`TTSStoppedFrame`, text frames) are held back until the speech before them has gone out, so the
order downstream stays that of the TTS; system frames pass at once. An `InterruptionFrame` (the user
barged in) drops the speech not yet rendered; an `EndFrame` first renders every frame its speech
allows.

Rendering runs on a worker thread (`Engine.step`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import math
import typing

import numpy as np

from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame, OutputImageRawFrame,
                                   StartFrame, SystemFrame, TTSAudioRawFrame, TTSStoppedFrame)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from avatar.config import IdleConfig, RealtimeConfig


class _Timeline:
    """Which samples of the session's audio clock were speech (pushed) and which silence (fed to idle
    or to flush the look-ahead): `(end sample, is speech)` runs, oldest first."""

    def __init__(self):
        self.runs: typing.List[typing.Tuple[int, bool]] = []
        self.end = 0

    def add(self, count: int, speech: bool) -> None:
        if count <= 0:
            return
        self.end += count
        if self.runs and self.runs[-1][1] == speech:
            self.runs[-1] = (self.end, speech)
        else:
            self.runs.append((self.end, speech))

    def speech_in(self, begin: int, end: int) -> bool:
        """Whether any sample of `[begin, end)` was speech; runs that end before `begin` are let go."""
        while len(self.runs) > 1 and self.runs[0][0] <= begin:
            self.runs.pop(0)
        start = 0
        for run_end, speech in self.runs:
            if speech and run_end > begin and start < end:
                return True
            start = run_end
        return False


class AvatarVideoService(FrameProcessor):
    """TTS audio in, the avatar's video frames out with the audio in sync (see the module docstring).

    `image`: a portrait (default: the bundled sample); `avatar`: an enrolled avatar (`avatar enroll`)
    instead; `engine`: a `realtime.engine.Engine` to share between services (default: one made with
    `config` and `idle_config`)."""

    def __init__(self, image: typing.Optional[str] = None, *, avatar: typing.Optional[str] = None, engine=None,
                 config: RealtimeConfig = RealtimeConfig(), idle_config: IdleConfig = IdleConfig(), **kwargs):
        super().__init__(**kwargs)
        from avatar import media
        from avatar.enroll import load_avatar
        from avatar.runtime import asset_path
        from realtime.engine import Engine

        self.engine = engine or Engine(config=config, idle_config=idle_config)
        if avatar is not None:
            self.avatar = self.engine.prepare_enrolled(load_avatar(avatar))
        else:
            self.avatar = self.engine.prepare(media.read_image(image or asset_path("samples/portrait.jpg")))
        height, width = self.avatar.portrait.shape[:2]
        self.size = (width, height)
        self.sample_rate = 0  # the pipeline's output rate, from the StartFrame
        self.session = None
        self.timeline = _Timeline()
        self.held: typing.List[typing.Tuple[int, Frame]] = []  # (position on the audio clock, frame) waiting for the speech before it
        self.context_id: typing.Optional[str] = None
        self._resampler = None  # `realtime.engine.Resampler` from the TTS's rate to the output rate
        self._next_index = 0  # the next frame to go out
        self._render_task: typing.Optional[asyncio.Task] = None
        self._rendering = False  # the render loop goes on while set

    # ---------------------------------------------------------------- pipeline events
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._open()
            self._rendering = True
            self._render_task = self.create_task(self._render_loop())
        elif isinstance(frame, TTSAudioRawFrame):
            self.context_id = frame.context_id
            samples = self._to_output_rate(frame)
            self.session.push(samples)
            self.timeline.add(samples.size, speech=True)
        elif isinstance(frame, InterruptionFrame):
            self._open()  # the speech not yet rendered is dropped; the avatar idles at once
            self.held.clear()
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._stop_rendering()
            await self._drain()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop_rendering()
            await self.push_frame(frame, direction)
        elif isinstance(frame, SystemFrame) or self.session is None or self.timeline.end <= self._emitted_until():
            await self.push_frame(frame, direction)
        else:
            self.held.append((self.timeline.end, frame))
            if isinstance(frame, TTSStoppedFrame):  # the utterance's last frames need its look-ahead now, not after the idle wait
                self._flush_lookahead()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self.sample_rate = setup.audio_out_sample_rate

    async def cleanup(self):
        await super().cleanup()
        await self._stop_rendering()
        if self.session is not None:
            self.session.close()
            self.session = None

    # ---------------------------------------------------------------- audio
    def _open(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.engine.open(self.avatar, self.sample_rate)
        self.timeline = _Timeline()
        self._next_index = 0

    def _to_output_rate(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """PCM16 of any rate and channel count → `(n,) float32` mono at the output rate (scaled by 1/32768,
        so that PCM16 at that rate comes back out sample for sample)."""
        from realtime.engine import Resampler

        pcm = np.frombuffer(frame.audio, np.int16).reshape(-1, max(1, frame.num_channels))
        if self._resampler is None or (self._resampler.rate, self._resampler.to) != (frame.sample_rate, self.sample_rate):
            self._resampler = Resampler(frame.sample_rate, self.sample_rate)
        return self._resampler(pcm.mean(axis=1).astype(np.float32) / 32768.0)

    def _flush_lookahead(self) -> None:
        """Silence enough for the motion model's look-ahead past the speech so far (its last frames can be made)."""
        count = int(math.ceil((self.session.lookahead_s + 1.0 / self.session.fps) * self.sample_rate))
        self.session.push(np.zeros(count, np.float32))
        self.timeline.add(count, speech=False)

    def _emitted_until(self) -> int:
        """The audio clock's sample up to which frames have gone out."""
        return int(round(self._next_index / self.session.fps * self.sample_rate))

    # ---------------------------------------------------------------- frames
    async def _render_loop(self) -> None:
        """Render what is due (on a worker thread) and send it; feed silence when the TTS is quiet (idling)."""
        while self._rendering:
            session = self.session
            before = session.source.received
            session.keep_alive()
            self.timeline.add(session.source.received - before, speech=False)
            made = await asyncio.to_thread(self.engine.step)
            if session is self.session:  # not replaced by an interruption meanwhile
                await self._emit(session.pop_frames())
            if made == 0:
                await asyncio.sleep(0.005)

    async def _emit(self, frames) -> None:
        fps = self.session.fps
        for frame in frames:
            begin = int(round(frame.index / fps * self.sample_rate))
            end = int(round((frame.index + 1) / fps * self.sample_rate))
            image = OutputImageRawFrame(image=frame.image.tobytes(), size=self.size, format="RGB")
            image.sync_with_audio = True  # shown when the audio before it has been played
            await self.push_frame(image)
            pcm = (np.clip(frame.source_audio, -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16).tobytes()
            if self.timeline.speech_in(begin, end):
                await self.push_frame(TTSAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1,
                                                       context_id=self.context_id))
            else:
                await self.push_frame(OutputAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1))
            self._next_index = frame.index + 1
            while self.held and self.held[0][0] <= end:
                await self.push_frame(self.held.pop(0)[1])

    async def _drain(self) -> None:
        """Every frame the speech so far allows, then the frames held behind it (at the end of the pipeline)."""
        if self.session is None:
            return
        if self.timeline.end > self._emitted_until():
            self._flush_lookahead()
        while True:  # until this session's frames are out (an engine shared with other services renders theirs too)
            await asyncio.to_thread(self.engine.step)
            await self._emit(self.session.pop_frames())
            if self.session.backlog == 0:
                break
        for _, frame in self.held:
            await self.push_frame(frame)
        self.held.clear()

    async def _stop_rendering(self) -> None:
        """End the render loop after its step in flight (a worker thread's step cannot be cancelled, and the
        frames it makes are still to be sent)."""
        self._rendering = False
        if self._render_task is not None:
            await self._render_task
            self._render_task = None
