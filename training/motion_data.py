"""Training data for the motion model, read from the preprocessing cache.

Per clip (talking videos with audio): the clip's mel, the mel position of each video frame, and the
mouth/jaw landmarks as offsets from the person's rest shape in units of the rest mouth width,
measured relative to the mouth anchor (the nostril wings), so that the shift of the whole mouth that
head pose causes is not in the target: audio cannot predict it, the video (or idle motion) gives it.
The rest shape is the median of the clip's most-closed-mouth frames (`avatar.motion.runner.rest_pose`,
the rule the engine uses too).

`MotionSampler` draws sequences with augmentations that keep sync: vocal tract length perturbation
(the mel-frequency axis stretched by ±12%), gain and spectral tilt (in the log-mel domain), added noise, a small time-stretch (mel and landmarks resampled together), mirroring
(x flipped, left/right points swapped); and some sequences of digital silence or low room noise whose
target is the rest shape (closed mouth).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import typing

import numpy as np

from avatar.config import MotionConfig
from avatar.face import landmarks as lm
from avatar.face.align import canonical_template
from avatar.motion.model import CORNERS, POINTS
from avatar.motion.runner import rest_pose
from training.cache import ClipCache, open_cache

SILENCE = -4.0


@functools.lru_cache(maxsize=None)
def mirror_permutation() -> np.ndarray:
    """For each of the model's points, the index (within POINTS) of its mirror image."""
    template = canonical_template()  # eye midpoint at x = 0: the face's midline
    points = template[POINTS]
    mirrored = points * np.array([-1.0, 1.0])
    distance = np.linalg.norm(mirrored[:, None] - points[None], axis=-1)
    permutation = distance.argmin(axis=1)
    if not (permutation[permutation] == np.arange(len(POINTS))).all():
        raise RuntimeError("the mouth/jaw mirror map is not an involution")
    return permutation


def width_of(rest: np.ndarray) -> float:
    return float(np.linalg.norm(rest[CORNERS[1]] - rest[CORNERS[0]]))


@dataclasses.dataclass
class MotionClip:
    """clip arrays. mel: `(F, 80) float32`; frame_mel: `(T,) float64` mel index at each frame's time;
    mouth: `(T, K, 2) float32` crop-128 pixels (NaN where no face); anchor_shift: `(T, 2)` the mouth
    anchor's displacement from its rest place (head pose); offsets: `(T, K, 2)` in rest mouth widths,
    = (mouth - anchor_shift - rest) / width; keep: `(T,) bool`; rest: `(K, 2)`; iod: inter-ocular
    distance in crop-128 pixels."""

    clip_id: str
    person: str
    fps: float
    mel: np.ndarray
    frame_mel: np.ndarray
    mouth: np.ndarray
    anchor_shift: np.ndarray
    offsets: np.ndarray
    keep: np.ndarray
    rest: np.ndarray
    width: float
    iod: float
    visemes: typing.Optional[np.ndarray] = None  # (F,) int8 per mel frame, when labelled

    @property
    def n_frames(self) -> int:
        return int(self.keep.size)


@dataclasses.dataclass
class SpeechClip:
    """Speech without video: mel `(F, 80) float32` and viseme labels `(F,) int8` per mel frame."""

    clip_id: str
    mel: np.ndarray
    visemes: np.ndarray


def motion_clip(cache: ClipCache, min_kept: int = 25) -> typing.Optional[MotionClip]:
    """The motion-training view of a cached clip, or None when it has no audio or too few kept frames."""
    if not cache.has_audio or int(cache.keep.sum()) < min_kept:
        return None
    landmarks = cache.landmarks()
    keep = cache.keep & np.isfinite(landmarks).all(axis=(1, 2))
    mouth = landmarks[:, POINTS]
    rest, rest_anchor = rest_pose(landmarks, keep)
    anchor_shift = (lm.mouth_anchor(landmarks) - rest_anchor).astype(np.float32)
    width = width_of(rest)
    offsets = ((mouth - anchor_shift[:, None] - rest) / width).astype(np.float32)
    iod = float(np.median(lm.interocular(landmarks[keep])))
    frame_mel = cache.arrays["timestamps"] * 80.0
    viseme_file = cache.folder / "visemes.npy"
    visemes = np.load(viseme_file) if viseme_file.exists() else None
    return MotionClip(cache.clip_id, cache.meta["person"], cache.fps, cache.arrays["mel"].astype(np.float32),
                      frame_mel, mouth.astype(np.float32), np.nan_to_num(anchor_shift), offsets, keep,
                      rest.astype(np.float32), width, iod, visemes)


def load_motion_clips(cache_root, split: str) -> typing.List[MotionClip]:
    clips = [motion_clip(c) for c in open_cache(cache_root, split=split, kind="video")]
    return [c for c in clips if c is not None]


# One normalised log-mel unit is 12.5 dB; the power sum of two mels a, b is logaddexp(k a, k b) / k.
POWER_SCALE = 12.5 / 10.0 * np.log(10.0)


def noise_bank(seed: int = 0, seconds: float = 3.0, count: int = 48) -> typing.List[np.ndarray]:
    """Mels `(F, 80)` of background-noise recordings made here: white, pink, brown and mains hum
    (with harmonics) at -72 to -38 dBFS, through the real mel front-end."""
    from avatar.audio import MelFrontend

    rng = np.random.default_rng(10_000 + seed)
    frontend = MelFrontend()
    n = int(seconds * 16000)
    bank = []
    for i in range(count):
        kind = ("white", "pink", "brown", "hum")[i % 4]
        if kind == "hum":
            t = np.arange(n) / 16000
            base = rng.choice([50.0, 60.0])
            signal = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) for h in range(1, 6))
            signal = signal + 0.05 * rng.normal(0, 1, n)
        else:
            spectrum = np.fft.rfft(rng.normal(0, 1, n))
            freqs = np.maximum(np.fft.rfftfreq(n, 1 / 16000), 1.0)
            spectrum /= {"white": 1.0, "pink": np.sqrt(freqs), "brown": freqs}[kind]
            signal = np.fft.irfft(spectrum, n)
        level_dbfs = rng.uniform(-72, -38)
        signal = signal / np.sqrt(np.mean(signal ** 2)) * 10 ** (level_dbfs / 20)
        bank.append(frontend(signal.astype(np.float32)))
    return bank


def room_tone(clips: typing.Sequence[MotionClip], min_frames: int = 40) -> typing.List[np.ndarray]:
    """Mel stretches of the training recordings' own background: runs of mel frames quieter than the
    clip's speech floor (a real room, with its hum and breaths)."""
    stretches = []
    for clip in clips:
        loudness = clip.mel.mean(axis=1)
        quiet = loudness < np.percentile(loudness, 15) + 0.1
        edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start >= min_frames:
                stretches.append(clip.mel[start:end])
    return stretches


def load_speech_clips(cache_root) -> typing.List[SpeechClip]:
    """Speech-only clips labelled by `python -m training.visemes` (none if it has not run)."""
    clips = []
    for path in sorted((pathlib.Path(cache_root) / "speech").glob("*.npz")):
        with np.load(path) as data:
            if data["mel"].shape[0] >= 64:
                clips.append(SpeechClip(path.stem, data["mel"].astype(np.float32), data["visemes"].astype(np.int8)))
    return clips


def interpolate_rows(table: np.ndarray, positions: np.ndarray, fill: float) -> np.ndarray:
    """Linear interpolation of `table: (N, D)` rows at float `positions: (...)` → `(..., D)`;
    positions outside [0, N-1] give `fill`."""
    n = table.shape[0]
    lo = np.floor(positions).astype(np.int64)
    frac = (positions - lo)[..., None].astype(np.float32)
    padded = np.concatenate([np.full((1, table.shape[1]), fill, table.dtype), table,
                             np.full((1, table.shape[1]), fill, table.dtype)])
    lo_i = np.clip(lo + 1, 0, n + 1)
    hi_i = np.clip(lo + 2, 0, n + 1)
    return padded[lo_i] * (1 - frac) + padded[hi_i] * frac


def clip_windows(clip: MotionClip, config: MotionConfig, frames: typing.Optional[np.ndarray] = None) -> np.ndarray:
    """Unaugmented per-frame mel contexts `(T, W, 80) float32` exactly as the engine cuts them."""
    from avatar.audio import cut_windows

    frames = np.arange(clip.n_frames) if frames is None else frames
    starts = np.floor(clip.frame_mel[frames] + 1e-6).astype(np.int64) + config.mel_window_offset
    return cut_windows(clip.mel, starts, config.mel_config())


class MotionSampler:
    """Random training sequences: `batch(n)` → windows `(n, L, W, 80)`, offsets `(n, L, K, 2)`, keep `(n, L)`
    (frames with landmark targets), visemes `(n, L)` int64 (-1: unknown). With `speech`, a fraction
    `speech_prob` of the sequences come from speech-only clips (viseme targets only)."""

    def __init__(self, clips: typing.Sequence[MotionClip], config: MotionConfig, seq_len: int = 32,
                 augment: bool = True, silence_prob: float = 0.08, seed: int = 0,
                 speech: typing.Sequence[SpeechClip] = (), speech_prob: float = 0.0):
        if not clips:
            raise ValueError("no training clips with audio and kept frames")
        self.clips, self.config, self.seq_len = list(clips), config, seq_len
        self.augment, self.silence_prob = augment, silence_prob
        self.speech, self.speech_prob = list(speech), (speech_prob if speech else 0.0)
        self.rng = np.random.default_rng(seed)
        weights = np.array([c.keep.sum() for c in self.clips], np.float64)
        self.weights = weights / weights.sum()
        self.mirror = mirror_permutation()
        self.noise_bank = noise_bank(seed) + room_tone(self.clips)

    def _noise_windows(self, length: int) -> np.ndarray:
        """`(length, W, 80)` mel contexts of background noise: a real noise recording's mel from the bank."""
        W = self.config.mel_window_frames
        noise = self.noise_bank[self.rng.integers(len(self.noise_bank))]
        start = self.rng.integers(0, max(1, noise.shape[0] - length - W))
        rows = start + np.arange(length)[:, None] + np.arange(W)[None, :]
        return noise[np.minimum(rows, noise.shape[0] - 1)]

    def _speech_sequence(self):
        """A sequence from speech without video: windows and viseme targets, no landmark targets."""
        c, rng, L, W = self.config, self.rng, self.seq_len, self.config.mel_window_frames
        clip = self.speech[rng.integers(len(self.speech))]
        stretch = rng.uniform(0.92, 1.08) if self.augment else 1.0
        step = 80.0 / rng.choice([25.0, 29.97, 30.0]) * stretch  # mel frames from one video frame to the next
        start = rng.uniform(0, max(1.0, clip.mel.shape[0] - L * step))
        frame_mel = start + np.arange(L) * step
        rows = frame_mel[:, None] + (c.mel_window_offset + np.arange(W))[None, :] * stretch
        windows = interpolate_rows(clip.mel, rows, SILENCE)
        windows = self._augment_mel(windows) if self.augment else windows
        visemes = clip.visemes[np.clip(np.round(frame_mel).astype(np.int64), 0, clip.visemes.size - 1)].astype(np.int64)
        return windows.astype(np.float32), np.zeros((L, len(POINTS), 2), np.float32), np.zeros(L, bool), visemes

    def _sequence(self):
        c, rng, L, W = self.config, self.rng, self.seq_len, self.config.mel_window_frames
        k = len(POINTS)
        if self.augment and rng.random() < self.silence_prob:  # silence or background noise: the mouth rests
            windows = np.full((L, W, 80), SILENCE, np.float32) if rng.random() < 0.25 else self._noise_windows(L)
            return windows, np.zeros((L, k, 2), np.float32), np.ones(L, bool), np.zeros(L, np.int64)
        if self.speech and rng.random() < self.speech_prob:
            return self._speech_sequence()
        clip = self.clips[rng.choice(len(self.clips), p=self.weights)]
        stretch = rng.uniform(0.92, 1.08) if self.augment else 1.0
        span = (L - 1) * stretch
        start = rng.uniform(-0.25 * L, max(0.0, clip.n_frames - 1 - span) + 0.25 * L)  # edges too: silence padding
        positions = start + np.arange(L) * stretch
        inside = (positions >= 0) & (positions <= clip.n_frames - 1)
        lo = np.clip(np.floor(positions).astype(np.int64), 0, clip.n_frames - 1)
        hi = np.clip(lo + 1, 0, clip.n_frames - 1)
        frac = np.clip(positions - lo, 0, 1)[:, None, None]
        keep = inside & clip.keep[lo] & clip.keep[hi]
        offsets = np.nan_to_num(clip.offsets[lo] * (1 - frac) + clip.offsets[hi] * frac).astype(np.float32)
        # Mel rows for each frame's context, on the stretched time axis.
        frame_mel = np.interp(positions, np.arange(clip.n_frames), clip.frame_mel)
        frame_mel = np.where(positions < 0, clip.frame_mel[0] + positions * 80 / clip.fps, frame_mel)
        beyond = positions - (clip.n_frames - 1)
        frame_mel = np.where(beyond > 0, clip.frame_mel[-1] + beyond * 80 / clip.fps, frame_mel)
        if not self.augment:
            frame_mel = np.floor(frame_mel + 1e-6)
        rows = frame_mel[:, None] + (c.mel_window_offset + np.arange(W))[None, :] * stretch
        windows = interpolate_rows(clip.mel, rows, SILENCE)
        if clip.visemes is not None:
            at = np.round(frame_mel).astype(np.int64)
            visemes = np.where((at >= 0) & (at < clip.visemes.size), clip.visemes[np.clip(at, 0, clip.visemes.size - 1)], 0)
        else:
            visemes = np.full(L, -1, np.int64)
        if self.augment:
            windows = self._augment_mel(windows)
            if rng.random() < 0.5:
                offsets = offsets[:, self.mirror] * np.array([-1.0, 1.0], np.float32)
        return windows.astype(np.float32), offsets, keep, visemes.astype(np.int64)

    def _augment_mel(self, windows: np.ndarray) -> np.ndarray:
        rng = self.rng
        # Vocal tract length perturbation: stretch the mel-frequency axis (another speaker's formants).
        warp = rng.uniform(0.88, 1.12)
        source_bins = np.clip(np.arange(80) * warp, 0, 79)
        lo = np.floor(source_bins).astype(np.int64)
        hi = np.minimum(lo + 1, 79)
        frac = (source_bins - lo).astype(np.float32)
        windows = windows[..., lo] * (1 - frac) + windows[..., hi] * frac
        gain = rng.uniform(-0.6, 0.6)  # ±7.5 dB
        tilt = rng.uniform(-0.4, 0.4) * np.linspace(-1, 1, 80)
        out = windows + gain + tilt
        if rng.random() < 0.35:
            noise = self._noise_windows(out.shape[0])
            out = np.logaddexp(out * POWER_SCALE, noise * POWER_SCALE) / POWER_SCALE  # power sum of speech and noise
        return np.clip(out, -4.0, 4.0)

    def batch(self, size: int) -> typing.Dict[str, np.ndarray]:
        items = [self._sequence() for _ in range(size)]
        return {"windows": np.stack([i[0] for i in items]), "offsets": np.stack([i[1] for i in items]),
                "keep": np.stack([i[2] for i in items]), "visemes": np.stack([i[3] for i in items])}


def pca_basis(clips: typing.Sequence[MotionClip], n_components: int) -> typing.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncentred PCA of kept-frame offsets (with their mirror images): basis `(C, K*2)`, mean `(K*2,)`
    (zeros: offsets of 0, the rest shape, must be exactly coefficients of 0), and the fraction of the
    offsets' energy each component explains `(C,)`."""
    mirror = mirror_permutation()
    rows = []
    for clip in clips:
        kept = clip.offsets[clip.keep]
        rows.append(kept)
        rows.append(kept[:, mirror] * np.array([-1.0, 1.0], np.float32))
    data = np.concatenate(rows).reshape(-1, len(POINTS) * 2).astype(np.float64)
    mean = np.zeros(data.shape[1])
    _, singular, vt = np.linalg.svd(data, full_matrices=False)
    explained = singular ** 2 / (singular ** 2).sum()
    return vt[:n_components].astype(np.float32), mean.astype(np.float32), explained[:n_components]
