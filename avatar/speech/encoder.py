"""The speech encoder: Whisper's log-mel and its encoder (ONNX, `assets/speech.onnx`), offline and live.

    encoder = SpeechEncoder()                                   # assets/speech.onnx, any provider
    features = encoder.features(samples)                        # (K, D) float32, 50 frames/s, whole-utterance context
    live = encoder.features(samples, live=True)                 # what a stream gives, in one call
    stream = encoder.stream()
    indices, rows = stream.push(chunk)                          # encoder frames as their look-ahead arrives
    per_frame = frame_features(features, fps=25, n_frames=T)    # (T, D) at video frame times

Timing contract (see `SpeechConfig`): mel frame j is centred on sample 160 j; encoder frame k on
20 k ms. `SpeechStream` gives the offline-live numbers (`features(..., live=True)`) whatever the
chunking, up to float rounding of onnxruntime's batched and unbatched kernels (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing

import numpy as np

from avatar.audio import check_audio, mel_filterbank
from avatar.config import MelConfig, SpeechConfig
from avatar.errors import MediaError
from avatar.runtime import OnnxSession, asset_path

DEFAULT_MODEL = "speech.onnx"
FRAME_S = 0.02  # one encoder frame
LIVE_BATCH = 128  # live windows per encoder call when a whole file is encoded


class WhisperMel:
    """Whisper's log-mel with a fixed floor: `(N,)` 16 kHz audio → `(M, 80) float32`, M = ceil(N / 160),
    values in [(log_floor + 4) / 4, ~1.6]. Frame j covers samples [160 j − 200, 160 j + 200), zeros outside."""

    def __init__(self, config: SpeechConfig = SpeechConfig()):
        self.config = config
        mel = MelConfig(sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
                        win_length=config.n_fft, n_mels=config.n_mels, fmin=0.0, fmax=config.sample_rate / 2)
        self.filters = mel_filterbank(mel)  # librosa's default (Slaney) filters, as Whisper's
        n = np.arange(config.n_fft)
        self.window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)  # periodic Hann, as torch.hann_window

    @property
    def silence(self) -> float:
        """The value of a mel bin with no energy."""
        return (self.config.log_floor + 4.0) / 4.0

    def n_frames(self, n_samples: int) -> int:
        return -(-n_samples // self.config.hop_length)

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        """`(F, n_fft) float64` samples → `(F, 80) float32`."""
        power = np.abs(np.fft.rfft(frames * self.window, axis=1)) ** 2
        log = np.log10(np.maximum(power @ self.filters.T, 1e-10))
        return ((np.maximum(log, self.config.log_floor) + 4.0) / 4.0).astype(np.float32)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        c = self.config
        y = check_audio(audio)
        m = self.n_frames(y.size)
        half = c.n_fft // 2
        padded = np.pad(y, (half, m * c.hop_length + half - y.size))
        frames = np.lib.stride_tricks.sliding_window_view(padded, c.n_fft)[:: c.hop_length][:m]
        return self.from_frames(frames)


class StreamingWhisperMel:
    """`WhisperMel` over audio pushed in chunks of any size: exactly the batch frames. Frame j is out
    once sample 160 j + 199 has arrived (12.5 ms after its centre); `flush()` pads with zeros."""

    def __init__(self, mel: WhisperMel):
        self.mel = mel
        half = mel.config.n_fft // 2
        self.buffer = np.zeros(half)  # the zero padding before sample 0, then audio
        self.buffer_start = -half  # sample index of buffer[0]
        self.n_samples = 0
        self.next_frame = 0

    def _emit(self, available_end: int, limit: typing.Optional[int] = None) -> np.ndarray:
        c = self.mel.config
        half = c.n_fft // 2
        ready = (available_end - half) // c.hop_length + 1 if available_end >= half else 0
        if limit is not None:
            ready = min(ready, limit)
        if ready <= self.next_frame:
            return np.zeros((0, c.n_mels), np.float32)
        starts = np.arange(self.next_frame, ready) * c.hop_length - half - self.buffer_start
        frames = self.buffer[starts[:, None] + np.arange(c.n_fft)]  # (a few frames: cheaper than a sliding view)
        self.next_frame = ready
        keep = self.next_frame * c.hop_length - half - self.buffer_start
        self.buffer, self.buffer_start = self.buffer[keep:], self.buffer_start + keep
        return self.mel.from_frames(frames)

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """`(n,)` audio → the mel frames it completed, `(k, 80) float32`."""
        y = check_audio(chunk)
        self.buffer = np.concatenate([self.buffer, y])
        self.n_samples += y.size
        return self._emit(self.n_samples)

    def flush(self) -> np.ndarray:
        """The last frames (zeros after the audio), up to `WhisperMel.n_frames(samples pushed)`."""
        end = self.mel.n_frames(self.n_samples)
        pad = max(0, (end - 1) * self.mel.config.hop_length + self.mel.config.n_fft // 2 - self.n_samples)
        self.buffer = np.concatenate([self.buffer, np.zeros(pad)])
        return self._emit(self.n_samples + pad, limit=end)


class SpeechEncoder:
    """Audio → Whisper encoder features `(K, D) float32`, 50 frames/s, through onnxruntime."""

    def __init__(self, model_path: typing.Optional[typing.Union[str, os.PathLike]] = None, config: SpeechConfig = SpeechConfig(),
                 threads: int = 0, providers: typing.Optional[typing.Sequence[str]] = None):
        self.session = OnnxSession(model_path or asset_path(DEFAULT_MODEL), providers=providers, threads=threads)
        self.config = config
        self.mel = WhisperMel(config)
        self.width = int(self.session.metadata.get("width", 384))
        self._providers, self._threads = providers, threads

    @functools.cached_property
    def _live_graphs(self) -> typing.Tuple[bytes, bytes]:
        """The encoder cut after its convolutions (`avatar.speech.live_graph`): (the convolutions, each
        one MatMul over the call's frames, the blocks computing only the rows a live window gives, in
        int8 where `live_int8`)."""
        import onnx

        from avatar.speech.live_graph import int8_graph, live_blocks_graph, matmul_convolutions, split_at_convolutions

        convolutions, blocks = split_at_convolutions(onnx.load(str(self.session.path)))
        model = live_blocks_graph(blocks, self.live_window_rows(), self.config.live_window)
        return matmul_convolutions(convolutions), int8_graph(model) if self.live_int8 else model

    @functools.cached_property
    def live_conv_session(self) -> OnnxSession:
        """The encoder's convolutions: mel `(B, 80, M)` → `conv (B, D, M/2)` (before the positions), each
        one MatMul over the call's frames (`matmul_convolutions`). On the CPU whatever the provider: a
        live window needs only 2 pieces of 8 mel frames (`conv_windows`), less work than a round trip
        to a GPU."""
        return OnnxSession(self.session.path, providers=["CPUExecutionProvider"], threads=self._threads, model=self._live_graphs[0])

    @functools.cached_property
    def live_session(self) -> OnnxSession:
        """The encoder's blocks for live windows: the convolutions' output `conv (W, D, live_window)` →
        the rows each window gives (`live_window_rows`), `(W, R, D)`; the same numbers as `encode`
        gives for those rows, 38 % fewer multiply-adds, or on the CPU their int8 approximation
        (`live_int8`). Built from the encoder's file on first use (~0.2 s, ~0.5 s with int8; the live
        motion model builds it when it loads)."""
        return OnnxSession(self.session.path, providers=self._providers, threads=self._threads, model=self._live_graphs[1])

    @functools.cached_property
    def live_int8(self) -> bool:
        """Whether live windows run in int8 (`SpeechConfig.live_int8`, on the CPU provider only)."""
        return self.config.live_int8 and self.session.providers[0] == "CPUExecutionProvider"

    def live_window_rows(self) -> np.ndarray:
        """Which rows of a live window are computed `(R,) int64`: the `live_hop` frames it gives (ending
        `live_right` before its end) and the `live_ahead` after them that their features hold, up to
        the window's last."""
        c = self.config
        first = c.live_window - c.live_hop - c.live_right + 1
        return np.arange(first, min(c.live_window, c.live_window - c.live_right + 1 + c.live_ahead))

    @property
    def live_width(self) -> int:
        """The width of a live frame's features: its own row and `SpeechConfig.live_ahead` after it."""
        return self.width * (1 + self.config.live_ahead)

    def own_rows(self, live_features: np.ndarray) -> np.ndarray:
        """`(T, live_width)` live features → `(T, D)`: each frame's own row (what reads one row a frame,
        as a person's motion adaptation)."""
        return live_features[:, :self.width]

    @property
    def lookahead_ms(self) -> float:
        """Audio a live frame needs past its centre, at most (over the `live_hop` frames of a window)."""
        return max(self.needed_ms(k) - 1000 * FRAME_S * k for k in range(self.config.live_hop))

    def needed_ms(self, k: int) -> float:
        """How much audio (ms from the start) a stream must have before it gives encoder frame k: up to
        the last sample of the last mel frame of k's live window."""
        c = self.config
        return 1000 * ((2 * self.window_end(k) - 1) * c.hop_length + c.n_fft // 2) / c.sample_rate

    def live_positions(self, fps: float, n_frames: int, first: int = 0) -> np.ndarray:
        """Encoder-frame positions `(n_frames,) float64` of video frames first.. at `fps` for the live
        model (`frame_positions`), each moved back to the encoder frame before it where the one after it
        would make the frame wait more than `live_max_lookahead_ms` (`SpeechConfig`)."""
        positions = frame_positions(fps, n_frames, first)
        waits = np.array([self.needed_ms(int(np.ceil(p - 1e-9))) for p in positions]) - 1000 * FRAME_S * positions
        return np.where(waits > self.config.live_max_lookahead_ms + 1e-9, np.floor(positions + 1e-9), positions)

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """`(B, M, 80)` log-mel, M even → `(B, M/2, D) float32`."""
        mel = np.ascontiguousarray(np.asarray(mel, np.float32).transpose(0, 2, 1))
        if mel.shape[2] % 2:
            raise ValueError(f"the encoder takes an even number of mel frames, got {mel.shape[2]}")
        return self.session.run(mel=mel)["features"]

    def features(self, samples: np.ndarray, live: bool = False) -> np.ndarray:
        """16 kHz mono `(N,) float32` → `(ceil(M / 2), D) float32`; `live` gives what `stream()` gives."""
        if not live:
            return np.concatenate([rows for _, rows in self.offline_chunks(samples)])
        mel = self.mel(samples)
        if mel.shape[0] == 0:
            raise MediaError("the audio is empty (0 samples); give speech at least one frame long")
        return self.live_frames(mel, 0, -(-mel.shape[0] // 2))

    def n_features(self, n_samples: int) -> int:
        """Encoder frames of `n_samples` of audio: ceil(mel frames / 2)."""
        return -(-self.mel.n_frames(n_samples) // 2)

    def offline_chunks(self, samples: np.ndarray) -> typing.Iterator[typing.Tuple[int, np.ndarray]]:
        """The whole-utterance features of 16 kHz `samples (N,)`, one encoder window at a time, in order:
        (first encoder frame, `(k, D) float32` rows). Whisper hears `offline_chunk` frames (30 s) at
        once; each window keeps its middle, `offline_context` frames from its ends (the first and last
        reach the audio's ends). Only one window's log-mel and features are held, so a long input
        costs no more memory than a short one; the rows concatenated are `features(samples)`."""
        c = self.config
        n = self.n_features(samples.size)
        if n == 0:
            raise MediaError("the audio is empty (0 samples); give speech at least one frame long")
        if n <= c.offline_chunk:
            yield 0, self.encode(self.mel_range(samples, 0, 2 * n)[None])[0]
            return
        stride = c.offline_chunk - 2 * c.offline_context
        for start in range(0, n, stride):
            begin = min(max(0, start - c.offline_context), max(0, n - c.offline_chunk))
            chunk = self.encode(self.mel_range(samples, 2 * begin, 2 * (begin + c.offline_chunk))[None])[0]
            yield start, chunk[start - begin : min(n, start + stride) - begin]

    def _padded(self, mel: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Mel frames [start, stop) with silence outside [0, M)."""
        out = np.full((stop - start, mel.shape[1]), self.mel.silence, np.float32)
        lo, hi = max(start, 0), min(stop, mel.shape[0])
        if hi > lo:
            out[lo - start : hi - start] = mel[lo:hi]
        return out

    def mel_range(self, samples: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Log-mel frames [start, stop) of `samples` `(stop - start, 80) float32`, as `self.mel(samples)[start:stop]`
        (made from those frames' own samples only), and silence for frames past the audio's last."""
        c = self.config
        out = np.full((stop - start, c.n_mels), self.mel.silence, np.float32)
        last = min(stop, self.mel.n_frames(samples.size))
        if last > start:
            half = c.n_fft // 2
            first_sample, end_sample = start * c.hop_length - half, (last - 1) * c.hop_length + half
            piece = check_audio(samples[max(0, first_sample): max(0, end_sample)])
            padded = np.pad(piece, (max(0, -first_sample), end_sample - first_sample - max(0, -first_sample) - piece.size))
            frames = np.lib.stride_tricks.sliding_window_view(padded, c.n_fft)[:: c.hop_length][: last - start]
            out[: last - start] = self.mel.from_frames(frames)
        return out

    def window_end(self, k: int) -> int:
        """The end (exclusive, in encoder frames) of the live window that gives frame k: the first end
        at least `live_right` frames past k among the ends `live_phase`, `live_phase + live_hop`, ..."""
        c = self.config
        return int(math.ceil((k + c.live_right - c.live_phase) / c.live_hop) * c.live_hop) + c.live_phase

    def live_windows(self, mel: np.ndarray, first: int, stop: int, base: int = 0,
                     carry: typing.Optional["ConvCarry"] = None) -> "LiveWindows":
        """The live windows that give frames [first, stop), their convolutions computed
        (`conv_windows`, with the stream's `carry`; None: a new one); `mel` holds mel frames from
        `base` on, silence stands for any frame outside it (before the audio's start and after its end)."""
        c = self.config
        ends = list(range(self.window_end(first), self.window_end(stop - 1) + 1, c.live_hop)) if stop > first else []
        return LiveWindows(first, stop, ends, self.conv_windows(mel, ends, base, ConvCarry() if carry is None else carry))

    def conv_windows(self, mel: np.ndarray, ends: typing.Sequence[int], base: int, carry: "ConvCarry") -> np.ndarray:
        """The convolutions' output `(W, D, live_window) float32` of the live windows ending at encoder
        frames `ends` (`live_hop` apart): what the convolutions give on each window's log-mel
        (`_padded(mel, 2·(end − live_window), 2·end)`), to float rounding. A window's inner frames are
        the same in every window that holds them (only its first and last see the zero padding at its
        ends), so each is computed once and kept in `carry`: the window ending at e adds frames e − 3
        and e − 2 and gives its last frame, all from mel frames [2e − 8, 2e); its first frame comes
        from its first 8 mel frames. Every piece is 8 mel frames (a batch item each) whose numbers do
        not depend on the others in the call, so a stream gets the numbers a whole file gets, to the
        bit. `mel` holds mel frames from `base` on (silence outside it)."""
        c, size = self.config, self.config.live_window
        if not ends:
            return np.zeros((0, self.width, size), np.float32)
        if c.live_hop != 2:
            raise ValueError(f"the convolutions are carried over windows 2 encoder frames apart, not {c.live_hop}")
        lo = ends[0] - size + 1  # the first window's first inner frame
        if carry.frames is None or carry.end < lo or (carry.end - lo) % 2:
            carry.start, carry.frames = lo, np.zeros((self.width, 0), np.float32)
        pairs = list(range(carry.end + 3, ends[-1] + 1, 2))  # the windows (by end) whose two frames are added
        lasts = sorted(set(pairs) | set(ends))  # the ends whose last 8 mel frames are convolved
        pieces = [self._padded(mel, 2 * e - 8 - base, 2 * e - base) for e in lasts] + \
                 [self._padded(mel, 2 * (e - size) - base, 2 * (e - size) + 8 - base) for e in ends]
        conv = self.live_conv_session.run(mel=np.ascontiguousarray(np.stack(pieces).transpose(0, 2, 1)))["conv"]  # (L + W, D, 4)
        last, firsts = {e: conv[i] for i, e in enumerate(lasts)}, conv[len(lasts):]
        carry.frames = np.concatenate([carry.frames, *(last[p][:, 1:3] for p in pairs)], axis=1)
        out = np.empty((len(ends), self.width, size), np.float32)
        for k, end in enumerate(ends):
            out[k, :, 0], out[k, :, -1] = firsts[k, :, 0], last[end][:, 3]
            out[k, :, 1:-1] = carry.frames[:, end - size + 1 - carry.start: end - 1 - carry.start]
        keep = ends[-1] + c.live_hop - size + 1 - carry.start  # the next window's first inner frame
        carry.frames, carry.start = carry.frames[:, max(0, keep):], carry.start + max(0, keep)
        return out

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """The convolutions of live windows `(W, D, live_window)` (`conv_windows`; any number, those of
        several streams at once: one call per LIVE_BATCH, or per window in int8, `live_int8`) → the
        rows each computes (`live_window_rows`), `(W, R, D) float32`."""
        if len(windows) == 0:
            return np.zeros((0, len(self.live_window_rows()), self.width), np.float32)
        conv = np.ascontiguousarray(windows, np.float32)
        batch = 1 if self.live_int8 else LIVE_BATCH
        return np.concatenate([self.live_session.run(conv=conv[k:k + batch])["features"] for k in range(0, len(conv), batch)])

    def live_rows(self, plan: "LiveWindows", outputs: np.ndarray) -> np.ndarray:
        """Frames [plan.first, plan.stop) `(k, live_width) float32` from the encoded windows `outputs`
        (`encode_windows`): each frame's row and the `live_ahead` after it (the window's last repeated)."""
        c = self.config
        if not plan.ends:
            return np.zeros((0, self.live_width), np.float32)
        ahead = np.minimum(np.arange(c.live_hop)[:, None] + np.arange(1 + c.live_ahead)[None], outputs.shape[1] - 1)  # (hop, 1 + ahead)
        rows = [np.zeros((0, self.live_width), np.float32)]
        for end, out in zip(plan.ends, outputs):
            ks = np.arange(end - c.live_hop - c.live_right + 1, end - c.live_right + 1)  # the frames `out` gives
            keep = (ks >= plan.first) & (ks < plan.stop)
            rows.append(out[ahead[keep]].reshape(int(keep.sum()), -1))
        return np.concatenate(rows)

    def live_frames(self, mel: np.ndarray, first: int, stop: int, base: int = 0) -> np.ndarray:
        """Frames [first, stop) from their live windows (`live_windows`), encoded LIVE_BATCH at a time."""
        rows = [np.zeros((0, self.live_width), np.float32)]
        step = LIVE_BATCH * self.config.live_hop  # bounded memory for long files
        carry = ConvCarry()
        for start in range(first, stop, step):
            plan = self.live_windows(mel, start, min(stop, start + step), base, carry)
            rows.append(self.live_rows(plan, self.encode_windows(plan.windows)))
        return np.concatenate(rows)

    def stream(self) -> "SpeechStream":
        return SpeechStream(self)


@dataclasses.dataclass
class ConvCarry:
    """A stream's encoder convolutions kept between its live windows (`SpeechEncoder.conv_windows`):
    `frames (D, n) float32`, those of encoder frames [start, start + n)."""

    start: int = 0
    frames: typing.Optional[np.ndarray] = None

    @property
    def end(self) -> int:
        return self.start + (0 if self.frames is None else self.frames.shape[1])


@dataclasses.dataclass
class LiveWindows:
    """The encoder windows that give frames [first, stop) of a stream, ending at encoder frames `ends`:
    `windows (W, D, live_window) float32`, their convolutions' output (`SpeechEncoder.conv_windows`)."""

    first: int
    stop: int
    ends: typing.List[int]
    windows: np.ndarray


class SpeechStream:
    """Live features: push 16 kHz audio in chunks of any size, get each encoder frame once the audio
    its window needs has arrived (`SpeechEncoder.lookahead_ms` past its centre, at most).

    In two steps, so that a server runs the windows of all its streams in one encoder call:
    `plan(chunk)` gives the windows a chunk completes, `rows(plan, encoder.encode_windows(windows))`
    their frames; `push(chunk)` is both at once."""

    def __init__(self, encoder: SpeechEncoder):
        self.encoder = encoder
        self.mel_stream = StreamingWhisperMel(encoder.mel)
        self.mel = np.zeros((0, encoder.config.n_mels), np.float32)
        self.mel_start = 0  # mel frame index of self.mel[0]
        self.next_frame = 0  # next encoder frame to emit
        self.carry = ConvCarry()

    def _plan(self, final: bool) -> LiveWindows:
        c, enc = self.encoder.config, self.encoder
        n_mel = self.mel_start + self.mel.shape[0]
        if final:
            stop = -(-n_mel // 2)
        else:  # frames whose window's mel frames have all arrived
            complete = n_mel // 2  # encoder frames with both their mel frames
            stop = self.next_frame
            while enc.window_end(stop) <= complete:
                stop += 1
        first = self.next_frame
        if stop <= first:
            return enc.live_windows(self.mel, first, first)
        base = max(0, 2 * (enc.window_end(first) - c.live_window))  # the first mel frame any window needs
        plan = enc.live_windows(self.mel[base - self.mel_start :], first, stop, base, self.carry)
        self.next_frame = stop
        drop = max(0, 2 * (enc.window_end(stop) - c.live_window) - self.mel_start)
        self.mel, self.mel_start = self.mel[drop:], self.mel_start + drop
        return plan

    def plan(self, chunk: np.ndarray) -> LiveWindows:
        """Audio `(n,)` → the windows it completes (the stream moves on: give their encoding to `rows`)."""
        self.mel = np.concatenate([self.mel, self.mel_stream.push(chunk)])
        return self._plan(final=False)

    def rows(self, plan: LiveWindows, outputs: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """A plan and its windows encoded → (encoder frame indices `(k,)`, features `(k, D) float32`)."""
        return np.arange(plan.first, plan.stop), self.encoder.live_rows(plan, outputs)

    def push(self, chunk: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """Audio `(n,)` → (encoder frame indices `(k,)`, features `(k, D) float32`)."""
        plan = self.plan(chunk)
        return self.rows(plan, self.encoder.encode_windows(plan.windows))

    def flush(self) -> typing.Tuple[np.ndarray, np.ndarray]:
        """The rest, up to `ceil(mel frames / 2)`; silence after the audio."""
        self.mel = np.concatenate([self.mel, self.mel_stream.flush()])
        plan = self._plan(final=True)
        return self.rows(plan, self.encoder.encode_windows(plan.windows))


def interpolate_frames(features: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Encoder features `(K, D)` at fractional frame `positions: (T,)` → `(T, D) float32` (linear; the
    last frame is held past the end)."""
    low = np.minimum(np.floor(positions + 1e-9).astype(np.int64), features.shape[0] - 1)
    high = np.minimum(low + 1, features.shape[0] - 1)
    weight = np.clip(positions - low, 0.0, 1.0)[:, None]
    return ((1 - weight) * features[low] + weight * features[high]).astype(np.float32)


def frame_positions(fps: float, n_frames: int, first: int = 0) -> np.ndarray:
    """Encoder-frame positions `(n_frames,) float64` of video frames first.. at `fps` (frame i at i / fps s)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return np.arange(first, first + n_frames) / (fps * FRAME_S)


def frame_features(features: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """Encoder features `(K, D)` at 50 frames/s → `(n_frames, D) float32` at video frame times i / fps."""
    return interpolate_frames(features, frame_positions(fps, n_frames))
