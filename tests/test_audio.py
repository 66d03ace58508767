"""Audio front-end: Wav2Lip mel, batch vs streaming parity, windows, look-ahead, voice activity."""

import zlib

import numpy as np
import pytest

from avatar import audio, media
from avatar.config import MelConfig
from avatar.errors import MediaError
from conftest import DATA, SPEECH_FLAC, feed_in_chunks


def wav2lip_reference_mel(y: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.melspectrogram, written with librosa and scipy as Wav2Lip does."""
    import librosa
    import scipy.signal

    emphasised = scipy.signal.lfilter([1, -0.97], [1], y)
    stft = librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(stft)
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4).T


def test_mel_matches_wav2lip_recipe(speech_16k):
    y = speech_16k[: 16000 * 4]
    ours = audio.MelFrontend()(y)
    assert ours.shape == (1 + y.size // 200, 80) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, wav2lip_reference_mel(y.astype(np.float64)), atol=1e-4)
    assert -4 <= ours.min() and ours.max() <= 4


@pytest.mark.parametrize("path", [SPEECH_FLAC, DATA / "speech/ali-vilab__dreamtalk/noisy_audio_meeting_snr_0.wav",
                                  DATA / "speech/tencent-ailab__V-Express/aud.mp3"])
def test_streaming_mel_equals_batch_for_many_chunkings(path):
    y = media.read_audio(path, 16000)[: 16000 * 6]
    batch = audio.MelFrontend()(y)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # the same chunkings on every run
    for _ in range(12):
        np.testing.assert_allclose(feed_in_chunks(audio.StreamingMelFrontend(), y, rng), batch, atol=1e-5, rtol=0)


def test_streaming_mel_one_sample_at_a_time_and_tiny_inputs(speech_16k):
    y = speech_16k[:6000]
    stream = audio.StreamingMelFrontend()
    out = np.concatenate([stream.push(y[i : i + 1]) for i in range(y.size)] + [stream.flush()])
    np.testing.assert_allclose(out, audio.MelFrontend()(y), atol=1e-5, rtol=0)
    for n in (1, 7, 399, 400, 401, 801):  # shorter than the reflect padding, and around it
        stream = audio.StreamingMelFrontend()
        part = np.concatenate([stream.push(speech_16k[:n]), stream.flush()])
        np.testing.assert_allclose(part, audio.MelFrontend()(speech_16k[:n]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fps", [25, 29.97, 30, 60])
def test_streaming_windows_equal_batch_windows(speech_16k, fps):
    y = speech_16k[: 16000 * 5]
    n = audio.n_video_frames(y.size, fps)
    batch = audio.mel_windows(audio.MelFrontend()(y), fps, n)
    assert batch.shape == (n, 16, 80)
    indices, windows = feed_in_chunks(audio.StreamingMelWindows(fps), y, np.random.default_rng(int(fps * 100)))
    np.testing.assert_array_equal(indices, np.arange(n))
    np.testing.assert_allclose(windows, batch, atol=1e-5, rtol=0)


def test_window_starts_follow_the_contract_and_pad_both_ends(speech_16k):
    mel = audio.MelFrontend()(speech_16k[:16000])  # 81 mel frames
    for fps in (25, 29.97, 30, 60):
        starts = audio.window_starts(10, fps)
        assert list(starts) == [int(i * 80 / fps) for i in range(10)]
    centred = MelConfig(window_offset=-8)
    windows = audio.mel_windows(mel, 25, 25, centred)
    assert (windows[0, :8] == -4).all() and np.allclose(windows[0, 8:], mel[:8])
    tail = audio.mel_windows(mel, 25, 25)[-1]  # frame 24 starts at mel 76: 5 real frames, 11 padded
    assert np.allclose(tail[:5], mel[76:81]) and (tail[5:] == -4).all()


def test_stated_lookahead_is_exactly_what_the_stream_needs(speech_16k):
    """Window i must be out once audio reaches t_i + look-ahead, and not a sample earlier."""
    fps = 25
    for offset in (0, -8):
        config = MelConfig(window_offset=offset)
        stream = audio.StreamingMelWindows(fps, config)
        lookahead = stream.lookahead_ms / 1000
        frame = 20
        needed = int(round((frame / fps + lookahead) * 16000))
        got, _ = stream.push(speech_16k[: needed - 1])
        assert frame not in got
        got, _ = stream.push(speech_16k[needed - 1 : needed])
        assert frame in got
    assert audio.StreamingMelWindows(25).lookahead_ms == pytest.approx(212.5)
    assert audio.StreamingMelFrontend().lookahead_ms == pytest.approx(25.0)


def test_voice_activity_on_real_speech_and_silence(speech_16k):
    fps = 25
    silence = np.zeros(16000, np.float32)
    y = np.concatenate([silence, speech_16k[: 16000 * 3], silence])
    vad = audio.voice_activity(y, fps)
    assert vad.shape == (audio.n_video_frames(y.size, fps),)
    assert (vad[:25] < 0.5).all() and (vad[-20:] < 0.5).all()  # digital silence (after the hangover)
    assert (vad[25:100] > 0.5).mean() > 0.6  # LibriSpeech: mostly voiced, with short pauses
    noise = np.random.default_rng(0).normal(0, 10 ** (-50 / 20), 16000 * 2).astype(np.float32)  # -50 dBFS room noise
    assert (audio.voice_activity(noise, fps) < 0.5).all()


def test_voice_activity_streaming_equals_batch(speech_16k):
    y = speech_16k[: 16000 * 4]
    batch = audio.voice_activity(y, 29.97)
    np.testing.assert_array_equal(feed_in_chunks(audio.EnergyVad(29.97), y, np.random.default_rng(3)), batch)


def test_empty_audio_is_a_clear_error():
    with pytest.raises(MediaError, match="empty"):
        audio.MelFrontend()(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="mono"):
        audio.MelFrontend()(np.zeros((2, 100), np.float32))
