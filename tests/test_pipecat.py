"""The pipecat service (`realtime/pipecat_service.py`) in a pipeline built by pipecat's own test
utilities, offline: TTS audio in, the avatar's frames out with the same audio in sync."""

import asyncio

import numpy as np
import pytest

from avatar import media
from avatar.config import IdleConfig, RealtimeConfig
from conftest import DATA, PORTRAIT

SPEECH = DATA / "speech/kleinlee__DH_live/audio0.wav"  # real speech
RATE = 24000  # a usual TTS rate, and the pipeline's output rate here


def tts_frames(samples: np.ndarray, rate: int, chunk_s: float = 0.02):
    from pipecat.frames.frames import TTSAudioRawFrame

    pcm = (np.clip(samples, -1, 32767 / 32768) * 32768).round().astype(np.int16)
    step = int(chunk_s * rate)
    return [TTSAudioRawFrame(audio=pcm[k:k + step].tobytes(), sample_rate=rate, num_channels=1, context_id="utterance-1")
            for k in range(0, pcm.size, step)], pcm


@pytest.fixture(scope="module")
def engine():
    """An engine on a frozen clock that never gives up on a frame: none is late or repeated and no idle
    silence is fed, however busy the machine."""
    from realtime.engine import Engine

    return Engine(config=RealtimeConfig(drift_every_s=0.0, max_backlog_s=60.0), idle_config=IdleConfig(enabled=False),
                  clock=lambda: 0.0)


def run(service, frames, observers=()):
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test

    down, _ = asyncio.run(run_test(service, frames_to_send=frames, observers=list(observers),
                                   pipeline_params=PipelineParams(audio_out_sample_rate=RATE)))
    return down


def test_tts_audio_becomes_frames_with_the_same_audio_in_sync(engine):
    from pipecat.frames.frames import OutputAudioRawFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame

    from realtime.pipecat_service import AvatarVideoService
    from test_realtime import mouth_openings

    speech = media.read_audio(SPEECH, RATE)[: 3 * RATE]
    audio_frames, pcm = tts_frames(speech, RATE)
    service = AvatarVideoService(str(PORTRAIT), engine=engine)
    down = run(service, [TTSStartedFrame(), *audio_frames, TTSStoppedFrame()])

    kinds = [type(f) for f in down]
    assert kinds[0] is TTSStartedFrame and kinds[-1] is OutputAudioRawFrame  # the look-ahead's silence closes it
    body = down[1:]
    stopped = kinds.index(TTSStoppedFrame) - 1
    pictures, audio = body[0:stopped:2], body[1:stopped:2]
    assert len(pictures) == 75 and all(isinstance(p, OutputImageRawFrame) and p.sync_with_audio for p in pictures)  # 3 s at 25 fps
    assert all(type(a) is TTSAudioRawFrame and a.sample_rate == RATE and a.context_id == "utterance-1" for a in audio)
    # the speech comes back sample for sample, cut at the frames (960 samples each), each picture just before its own
    passed = np.frombuffer(b"".join(a.audio for a in audio), np.int16)
    assert passed.size == pcm.size and np.array_equal(passed, pcm)
    assert all(len(a.audio) == 2 * RATE // 25 for a in audio)
    # the TTSStoppedFrame comes after every frame of the speech; what follows is the look-ahead's silence, not speech
    after = body[stopped + 1:]
    assert after and all(type(f) in (OutputImageRawFrame, OutputAudioRawFrame) for f in after)
    assert not any(np.frombuffer(f.audio, np.int16).any() for f in after if isinstance(f, OutputAudioRawFrame))
    # the pictures are the engine's own for this speech, in order, and the mouth moves with it
    width, height = pictures[0].size
    images = [np.frombuffer(p.image, np.uint8).reshape(height, width, 3) for p in pictures]
    session = engine.open(service.avatar, RATE)
    session.push(np.concatenate([pcm / 32768.0, np.zeros(RATE // 2)]).astype(np.float32))
    while engine.step():
        pass
    direct = session.pop_frames()[:75]
    session.close()
    # the same up to float rounding (the service's session heard 20 ms chunks, this one the whole speech at once)
    diffs = [int(np.abs(image.astype(int) - frame.image).max()) for image, frame in zip(images, direct)]
    assert len(direct) == 75 and max(diffs) <= 2, diffs
    assert np.ptp(mouth_openings(images[::2])) > 0.04


def test_an_interruption_drops_the_speech_not_yet_shown(engine, monkeypatch):
    """Speech A, then the user barges in (an InterruptionFrame), then speech B: only B is shown and
    heard. The engine renders nothing until the interruption has passed the service (its step waits
    on an event the pipeline's observer sets), so all of A is still pending when it comes."""
    import threading

    from pipecat.frames.frames import InterruptionFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame
    from pipecat.observers.base_observer import BaseObserver
    from pipecat.tests.utils import SleepFrame

    from realtime.pipecat_service import AvatarVideoService

    service = AvatarVideoService(str(PORTRAIT), engine=engine)
    interrupted = threading.Event()
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda *args, **kwargs: interrupted.wait(60) and step(*args, **kwargs))

    class Interruptions(BaseObserver):
        async def on_push_frame(self, data):
            if data.source is service and isinstance(data.frame, InterruptionFrame):
                interrupted.set()

    speech = media.read_audio(SPEECH, 16000)  # another rate than the output's: resampled
    first, _ = tts_frames(speech[:2 * 16000], 16000, chunk_s=0.5)
    second, _ = tts_frames(speech[2 * 16000:3 * 16000], 16000, chunk_s=0.5)
    frames = [TTSStartedFrame(), *first, SleepFrame(0.5), InterruptionFrame(), *second]  # the sleep: A is taken before the system frame
    down = run(service, frames, [Interruptions()])
    spoken = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert interrupted.is_set() and all(f.sample_rate == RATE for f in spoken)
    assert 0.9 * RATE <= sum(len(f.audio) // 2 for f in spoken) <= 1.1 * RATE  # B's second, none of A's two
    assert len([f for f in down if isinstance(f, OutputImageRawFrame)]) >= 25



def test_the_example_pipeline_writes_a_synced_video(tmp_path):
    """`examples/pipecat_avatar.py` offline: a speech file through a pipecat pipeline into an mp4 whose
    video covers the speech and whose audio is that speech."""
    import subprocess
    import sys

    from conftest import REPO

    speech = media.read_audio(SPEECH, 48000)[: 2 * 48000]
    wav = media.write_audio(tmp_path / "speech.wav", speech, 48000)
    output = tmp_path / "avatar.mp4"
    result = subprocess.run([sys.executable, "examples/pipecat_avatar.py", "--audio", str(wav), "--output", str(output),
                             "--image", str(PORTRAIT)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"to {output}" in result.stdout
    clip = media.read_video(output)
    assert 50 <= len(clip.frames) <= 50 + 10  # 2 s at 25 fps, then the look-ahead and idling: a few frames of silence
    heard = media.read_audio(output, 48000)
    assert abs(heard.size / 48000 - len(clip.frames) / 25) <= 1 / 25
    envelope = lambda x: np.sqrt((x[: x.size // 1920 * 1920].reshape(-1, 1920) ** 2).mean(axis=1))  # loudness per 40 ms
    n = min(speech.size, heard.size)
    assert np.corrcoef(envelope(heard[:n]), envelope(speech[:n]))[0, 1] > 0.9  # its audio is the speech
