"""A pipecat pipeline with a face: speech in, a lip-synced video file out, offline.

    python examples/pipecat_avatar.py --audio speech.wav --output avatar.mp4 [--image portrait.jpg | --avatar me.avatar]

The speech file stands in for a TTS service: its audio enters the pipeline as the `TTSAudioRawFrame`s
a TTS would push (between `TTSStartedFrame` and `TTSStoppedFrame`, faster than real time, as TTS
services send). `AvatarVideoService` turns them into the avatar's frames, each picture followed by
its own audio; `Mp4Sink` (this file) writes them, where a live assistant has its output transport:

    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts,
                         AvatarVideoService(image="portrait.jpg"), transport.output(), assistant_aggregator])

with the transport's `video_out_enabled=True` and the avatar's size as `video_out_width/height`.
Needs the `pipecat` extra (`pip install -e .[pipecat]`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys

import numpy as np

from pipecat.frames.frames import (EndFrame, Frame, OutputAudioRawFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame,
                                   TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from avatar import media  # noqa: E402
from realtime.pipecat_service import AvatarVideoService  # noqa: E402

RATE = 48000  # the pipeline's output rate: the video file's own audio rate, so its audio is written sample for sample
CHUNK_S = 0.02  # the TTS frames' length


class Mp4Sink(FrameProcessor):
    """Writes the avatar's frames into an open `media.VideoWriter` at RATE: each picture once its audio has come."""

    def __init__(self, writer: media.VideoWriter):
        super().__init__()
        self.writer = writer
        self.audio = np.zeros(RATE * 60, np.float32)  # what has come, in a buffer that grows by doubling
        self.samples = 0
        self.picture = None
        self.frames = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            width, height = frame.size
            self.picture = np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)
        elif isinstance(frame, OutputAudioRawFrame):  # a TTSAudioRawFrame (speech) or idle silence
            pcm = np.frombuffer(frame.audio, np.int16).astype(np.float32) / 32768.0
            if self.samples + pcm.size > self.audio.size:
                self.audio = np.concatenate([self.audio, np.zeros(max(self.audio.size, pcm.size), np.float32)])
            self.audio[self.samples:self.samples + pcm.size] = pcm
            self.samples += pcm.size
            self.writer.audio = self.audio[:self.samples]
            if self.picture is not None:
                self.writer.write(self.picture)
                self.picture, self.frames = None, self.frames + 1
        await self.push_frame(frame, direction)


async def run(audio_path: pathlib.Path, output: pathlib.Path, image=None, avatar=None) -> int:
    """Speak `audio_path` through the pipeline into `output`; returns the frames written."""
    service = AvatarVideoService(image, avatar=avatar)
    speech = media.read_audio(audio_path, RATE)
    pcm = (np.clip(speech, -1, 32767 / 32768) * 32768).round().astype(np.int16)
    step = int(CHUNK_S * RATE)
    tts = [TTSStartedFrame(), *[TTSAudioRawFrame(audio=pcm[k:k + step].tobytes(), sample_rate=RATE, num_channels=1)
                                for k in range(0, pcm.size, step)], TTSStoppedFrame(), EndFrame()]
    with media.VideoWriter(output, service.engine.config.fps, np.zeros(0, np.float32), RATE) as writer:
        sink = Mp4Sink(writer)
        worker = PipelineWorker(Pipeline([service, sink]), params=PipelineParams(audio_out_sample_rate=RATE),
                                cancel_on_idle_timeout=False)
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def on_started(worker, frame):
            started.set()

        async def speak():
            await started.wait()  # processors drop frames that come before the StartFrame
            await worker.queue_frames(tts)

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.gather(runner.run(), speak())
    return sink.frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=pathlib.Path, required=True, help="the speech (any format ffmpeg reads)")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="the video to write (.mp4)")
    face = parser.add_mutually_exclusive_group()
    face.add_argument("--image", help="a portrait (default: the bundled sample)")
    face.add_argument("--avatar", help="an enrolled avatar (avatar enroll)")
    args = parser.parse_args(argv)
    frames = asyncio.run(run(args.audio, args.output, args.image, args.avatar))
    print(f"wrote {frames} frames to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
