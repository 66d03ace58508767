"""Audio front-end: Wav2Lip-compatible log-mel (batch and streaming), per-video-frame mel windows,
and an energy-based voice-activity measure per video frame.

Contract (DESIGN.md): 16 kHz mono float32 in [-1, 1]; 80 mel bins, n_fft 800, hop 200, win 800,
fmin 55, fmax 7600, pre-emphasis 0.97, magnitude STFT with reflect padding of n_fft/2 at both
ends (librosa `center=True` as Wav2Lip used it), dB with ref 20 and floor -100, normalised
symmetrically to [-4, 4]. That is 80 mel frames per second; mel frame j is centred on sample
j * hop. The window for video frame i at `fps` starts at mel frame int(i * 80 / fps) (+ offset)
and spans 16 frames (0.2 s); windows that run past either end are padded with the silence value -4.

The streaming classes produce exactly the batch numbers whatever the chunking; they share the
per-frame maths with the batch path.
"""

from __future__ import annotations

import math
import typing

import numpy as np

from avatar.config import MelConfig, VadConfig
from avatar.errors import MediaError


# ----------------------------------------------------------------------------- mel filterbank
def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mel = hz / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    log_region = hz >= min_log_hz
    mel = np.where(log_region, min_log_mel + np.log(np.maximum(hz, 1e-12) / min_log_hz) / logstep, mel)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    hz = f_sp * mel
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), hz)


def mel_filterbank(config: MelConfig) -> np.ndarray:
    """Slaney-normalised triangular filters, `(n_mels, n_fft // 2 + 1) float64`."""
    n_bins = config.n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, config.sample_rate / 2.0, n_bins)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(config.fmin), _hz_to_mel(config.fmax), config.n_mels + 2))
    spacing = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    weights = np.zeros((config.n_mels, n_bins))
    for m in range(config.n_mels):
        lower = -ramps[m] / spacing[m]
        upper = ramps[m + 2] / spacing[m + 1]
        weights[m] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2 : config.n_mels + 2] - mel_points[: config.n_mels]))[:, None]
    return weights


class _MelMaths:
    """The per-frame maths shared by the batch and streaming paths (float64 throughout)."""

    def __init__(self, config: MelConfig):
        if config.win_length != config.n_fft:
            raise ValueError("win_length must equal n_fft for the Wav2Lip-compatible mel")
        self.config = config
        n = np.arange(config.n_fft)
        self.window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)  # periodic Hann
        self.filters = mel_filterbank(config)
        self.min_amplitude = 10.0 ** (config.min_level_db / 20.0)

    def frames_to_mel(self, frames: np.ndarray) -> np.ndarray:
        """`frames: (F, n_fft) float64` pre-emphasised, padded samples → `(F, n_mels) float32` in [-4, 4]."""
        c = self.config
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=c.n_fft, axis=1))
        mel = magnitude @ self.filters.T
        db = 20.0 * np.log10(np.maximum(self.min_amplitude, mel)) - c.ref_level_db
        normalised = (2.0 * c.max_abs_value) * ((db - c.min_level_db) / (-c.min_level_db)) - c.max_abs_value
        return np.clip(normalised, -c.max_abs_value, c.max_abs_value).astype(np.float32)


def check_audio(audio: np.ndarray) -> np.ndarray:
    """`(N,)` floating audio in [-1, 1] as float64; a clear error for anything else."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be float in [-1, 1], got {audio.dtype}")
    return audio.astype(np.float64)


class MelFrontend:
    """Batch log-mel: `(N,) float32` 16 kHz audio → `(F, 80) float32` in [-4, 4], F = 1 + N // 200."""

    def __init__(self, config: MelConfig = MelConfig()):
        self.config = config
        self._maths = _MelMaths(config)

    @property
    def frames_per_second(self) -> float:
        return self.config.sample_rate / self.config.hop_length

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        c = self.config
        y = check_audio(audio)
        if y.size == 0:
            raise MediaError("the audio is empty (0 samples); give speech at least one frame long")
        emphasised = np.empty_like(y)
        emphasised[0] = y[0]
        emphasised[1:] = y[1:] - c.preemphasis * y[:-1]
        padded = np.pad(emphasised, c.n_fft // 2, mode="reflect")
        n_frames = 1 + y.size // c.hop_length
        frames = np.lib.stride_tricks.sliding_window_view(padded, c.n_fft)[:: c.hop_length][:n_frames]
        return self._maths.frames_to_mel(frames)


class StreamingMelFrontend:
    """Streaming log-mel giving exactly the batch frames for any chunking.

    `push(chunk)` takes `(n,) float` audio of any length (0 to minutes) and returns the mel frames
    that became complete, `(k, 80) float32`; `flush()` ends the stream and returns the rest. A mel
    frame centred on sample s needs samples up to s + n_fft/2, so the look-ahead is
    `lookahead_ms` (25 ms at the defaults).
    """

    def __init__(self, config: MelConfig = MelConfig()):
        self.config = config
        self._maths = _MelMaths(config)
        self.reset()

    def reset(self) -> None:
        self._last_sample = 0.0
        self._raw: typing.List[np.ndarray] = []  # pre-emphasised samples not yet consumed
        self._buffer = np.zeros(0)  # padded-domain samples from `_buffer_start`
        self._buffer_start = 0  # index into the padded signal of _buffer[0]
        self._started = False  # left reflect pad applied
        self._n_samples = 0
        self._n_emitted = 0
        self._head = np.zeros(0)  # the first samples, kept until the left pad can be built
        self._finished = False

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * (self.config.n_fft // 2) / self.config.sample_rate

    @property
    def n_samples(self) -> int:
        return self._n_samples

    def _emphasise(self, chunk: np.ndarray) -> np.ndarray:
        if chunk.size == 0:
            return chunk
        out = np.empty_like(chunk)
        out[0] = chunk[0] - (self.config.preemphasis * self._last_sample if self._n_samples else 0.0)
        out[1:] = chunk[1:] - self.config.preemphasis * chunk[:-1]
        self._last_sample = chunk[-1]
        return out

    def _emit(self) -> np.ndarray:
        """Compute every mel frame now complete in the buffer (frame j covers padded[j*hop : j*hop + n_fft])."""
        c = self.config
        available_end = self._buffer_start + self._buffer.size
        ready = (available_end - c.n_fft) // c.hop_length + 1 if available_end >= c.n_fft else 0
        ready = min(ready, 1 + self._n_samples // c.hop_length)
        if ready <= self._n_emitted:
            return np.zeros((0, c.n_mels), np.float32)
        starts = np.arange(self._n_emitted, ready) * c.hop_length - self._buffer_start
        frames = np.lib.stride_tricks.sliding_window_view(self._buffer, c.n_fft)[starts]
        mel = self._maths.frames_to_mel(frames)
        self._n_emitted = ready
        keep_from = self._n_emitted * c.hop_length - self._buffer_start
        self._buffer = self._buffer[keep_from:]
        self._buffer_start += keep_from
        return mel

    def push(self, chunk: np.ndarray) -> np.ndarray:
        if self._finished:
            raise RuntimeError("push() after flush(); call reset() to start a new stream")
        y = check_audio(chunk)
        if y.size == 0:
            return np.zeros((0, self.config.n_mels), np.float32)
        emphasised = self._emphasise(y)
        self._n_samples += y.size
        half = self.config.n_fft // 2
        if not self._started:
            self._head = np.concatenate([self._head, emphasised])
            if self._head.size <= half:
                return np.zeros((0, self.config.n_mels), np.float32)
            left_pad = self._head[1 : half + 1][::-1]
            self._buffer = np.concatenate([left_pad, self._head])
            self._head = np.zeros(0)
            self._started = True
        else:
            self._buffer = np.concatenate([self._buffer, emphasised])
        return self._emit()

    def flush(self) -> np.ndarray:
        """End of stream: pad the end by reflection (as the batch path does) and return the rest."""
        c = self.config
        half = c.n_fft // 2
        self._finished = True
        if self._n_samples == 0:
            raise MediaError("the audio stream ended with 0 samples; send speech before ending it")
        if not self._started:
            # Shorter than n_fft/2: the batch path's reflect padding of the whole signal.
            padded = np.pad(self._head, half, mode="reflect")
            self._buffer, self._buffer_start, self._started = padded, 0, True
        else:
            # Reflect needs the last half+1 real samples; they are in the buffer tail (>= n_fft kept).
            signal_end_in_buffer = self._buffer.size
            tail = self._buffer[signal_end_in_buffer - half - 1 : signal_end_in_buffer - 1][::-1]
            self._buffer = np.concatenate([self._buffer, tail])
        return self._emit()


# ------------------------------------------------------------------- per-video-frame windows
def n_video_frames(n_samples: int, fps: float, sample_rate: int = 16000) -> int:
    """Number of video frames at `fps` that cover `n_samples` of audio (at least 1)."""
    return max(1, int(math.ceil(n_samples * fps / sample_rate - 1e-9)))


def window_start(i: int, fps: float, config: MelConfig = MelConfig()) -> int:
    """Mel index where video frame i's window starts: int(i * mel_fps / fps) + offset (DESIGN.md)."""
    return int(i * (config.sample_rate / config.hop_length) / fps) + config.window_offset


def window_starts(n_frames: int, fps: float, config: MelConfig = MelConfig()) -> np.ndarray:
    """`window_start` for frames 0..T-1: `(T,) int64`."""
    return np.array([window_start(i, fps, config) for i in range(n_frames)], np.int64)


def mel_windows(mel: np.ndarray, fps: float, n_frames: int, config: MelConfig = MelConfig()) -> np.ndarray:
    """Cut per-video-frame windows from a mel: `(F, 80)` → `(T, window_frames, 80) float32`.

    Windows that reach before the first or past the last mel frame are padded with the silence
    value `-max_abs_value` (both ends).
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return cut_windows(mel, window_starts(n_frames, fps, config), config)


def timestamp_window_starts(timestamps: np.ndarray, config: MelConfig = MelConfig()) -> np.ndarray:
    """Window starts for frames at given times (variable frame rate): `(T,) int64`."""
    mel_fps = config.sample_rate / config.hop_length
    return np.floor(np.asarray(timestamps, np.float64) * mel_fps + 1e-6).astype(np.int64) + config.window_offset


def cut_windows(mel: np.ndarray, starts: np.ndarray, config: MelConfig = MelConfig()) -> np.ndarray:
    """`mel: (F, 80)`, `starts: (T,) int` → `(T, window_frames, 80) float32`, silence-padded at both ends."""
    w = config.window_frames
    starts = np.asarray(starts, np.int64)
    if starts.size == 0:
        return np.zeros((0, w, mel.shape[1]), np.float32)
    pad_before = max(0, -int(starts.min()))
    pad_after = max(0, int(starts.max()) + w - mel.shape[0])
    padded = np.pad(mel, ((pad_before, pad_after), (0, 0)), constant_values=-config.max_abs_value)
    index = starts[:, None] + pad_before + np.arange(w)[None, :]
    return padded[index].astype(np.float32)


class StreamingMelWindows:
    """Per-video-frame mel windows from streamed audio, equal to `mel_windows` on the whole audio.

    `push(chunk)` returns `(frame_indices (k,), windows (k, 16, 80))` for the frames whose window
    became complete; `flush()` returns the rest, up to `n_video_frames(total samples, fps)`.
    Look-ahead (how far past a frame's timestamp audio must have arrived): `lookahead_ms`.
    """

    def __init__(self, fps: float, config: MelConfig = MelConfig()):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.config = config
        self.frontend = StreamingMelFrontend(config)
        self._mel = np.zeros((0, config.n_mels), np.float32)
        self._mel_start = 0  # absolute index of self._mel[0]
        self._next_frame = 0

    @property
    def lookahead_ms(self) -> float:
        c = self.config
        last_mel = c.window_offset + c.window_frames - 1
        return 1000.0 * (last_mel * c.hop_length + c.n_fft // 2) / c.sample_rate

    def _start(self, i: int) -> int:
        return window_start(i, self.fps, self.config)

    def _take(self, n_mel_total: int, final: bool) -> typing.Tuple[np.ndarray, np.ndarray]:
        c = self.config
        w = c.window_frames
        last = n_video_frames(self.frontend.n_samples, self.fps, c.sample_rate) if final else None
        indices, windows = [], []
        while True:
            i = self._next_frame
            if final and i >= last:
                break
            start = self._start(i)
            if not final and start + w > n_mel_total:
                break
            rows = np.arange(start, start + w)
            window = np.full((w, c.n_mels), -c.max_abs_value, np.float32)
            valid = (rows >= 0) & (rows < n_mel_total)
            window[valid] = self._mel[rows[valid] - self._mel_start]
            indices.append(i)
            windows.append(window)
            self._next_frame += 1
        # Drop mel frames no future window needs.
        keep_from = max(0, self._start(self._next_frame) - self._mel_start)
        if keep_from > 0:
            self._mel = self._mel[keep_from:]
            self._mel_start += keep_from
        if not indices:
            return np.zeros(0, np.int64), np.zeros((0, w, c.n_mels), np.float32)
        return np.array(indices, np.int64), np.stack(windows)

    def push(self, chunk: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        new = self.frontend.push(chunk)
        self._mel = np.concatenate([self._mel, new])
        return self._take(self._mel_start + self._mel.shape[0], final=False)

    def flush(self) -> typing.Tuple[np.ndarray, np.ndarray]:
        new = self.frontend.flush()
        self._mel = np.concatenate([self._mel, new])
        return self._take(self._mel_start + self._mel.shape[0], final=True)


# ---------------------------------------------------------------------- voice activity
class EnergyVad:
    """Energy-based voice activity per video frame, streaming and batch alike.

    For frame i (audio samples [i/fps, (i+1)/fps) s) the RMS level in dBFS is compared with a
    threshold `max(noise_floor + margin_db, absolute_floor_dbfs)`, where the noise floor follows
    quiet frames at once and rises at most `floor_rise_db_per_s`. The result is a soft score in
    [0, 1] (0.5 at the threshold) with a hangover so that short dips inside words stay voiced.
    """

    def __init__(self, fps: float, sample_rate: int = 16000, config: VadConfig = VadConfig()):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps, self.sample_rate, self.config = fps, sample_rate, config
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0)
        self._consumed = 0  # samples consumed into whole frames
        self._frame = 0
        self._floor: typing.Optional[float] = None
        self._hang = 0

    def _frame_bounds(self, i: int) -> typing.Tuple[int, int]:
        return (int(round(i * self.sample_rate / self.fps)), int(round((i + 1) * self.sample_rate / self.fps)))

    def _score(self, samples: np.ndarray) -> float:
        c = self.config
        level = 10.0 * math.log10(float(np.mean(samples * samples)) + 1e-12) if samples.size else -120.0
        rise = c.floor_rise_db_per_s / self.fps
        self._floor = level if self._floor is None else min(level, self._floor + rise)
        threshold = max(self._floor + c.margin_db, c.absolute_floor_dbfs)
        score = 1.0 / (1.0 + math.exp(-(level - threshold) / c.softness_db))
        if score >= 0.5:
            self._hang = max(1, int(round(c.hangover_s * self.fps)))
            return score
        if self._hang > 0:  # hold speech on through short dips, fading towards the threshold
            remaining = self._hang / max(1, int(round(c.hangover_s * self.fps)))
            self._hang -= 1
            return max(score, 0.5 + 0.5 * remaining)
        return score

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """`chunk: (n,) float` → scores `(k,) float32` for the frames completed by it."""
        self._pending = np.concatenate([self._pending, check_audio(chunk)])
        scores = []
        while True:
            start, end = self._frame_bounds(self._frame)
            if end - self._consumed > self._pending.size:
                break
            begin = start - self._consumed
            scores.append(self._score(self._pending[begin : end - self._consumed]))
            self._pending = self._pending[end - self._consumed :]
            self._consumed = end
            self._frame += 1
        return np.array(scores, np.float32)

    def flush(self, n_frames: typing.Optional[int] = None) -> np.ndarray:
        """Score the last, partial frame(s) up to `n_frames` in all (default: cover every sample)."""
        total = self._consumed + self._pending.size
        if n_frames is None:
            n_frames = n_video_frames(total, self.fps, self.sample_rate)
        scores = []
        while self._frame < n_frames:
            start, end = self._frame_bounds(self._frame)
            piece = self._pending[max(0, start - self._consumed) : max(0, end - self._consumed)]
            scores.append(self._score(piece))
            self._frame += 1
        return np.array(scores, np.float32)


def voice_activity(
    audio: np.ndarray, fps: float, n_frames: typing.Optional[int] = None, sample_rate: int = 16000,
    config: VadConfig = VadConfig(),
) -> np.ndarray:
    """Voice-activity score per video frame, `(T,) float32` in [0, 1]; > 0.5 means speech."""
    vad = EnergyVad(fps, sample_rate, config)
    scores = vad.push(audio)
    if n_frames is not None and scores.size >= n_frames:
        return scores[:n_frames]
    return np.concatenate([scores, vad.flush(n_frames)])
