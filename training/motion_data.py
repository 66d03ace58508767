"""Training data for the motion model, read from the preprocessing cache.

Per clip (talking videos with audio): the speech encoder's features of the clip's audio (offline and
live, clean and noisy variants; `training.speech_features`), each video frame's position among them,
and the mouth/jaw landmarks as offsets from the person's rest shape in units of the rest mouth width,
measured relative to the mouth anchor (the nostril wings), so that the shift of the whole mouth that
head pose causes is not in the target: audio cannot predict it, the video (or idle motion) gives it.
The rest shape is the median of the clip's most-closed-mouth frames (`avatar.motion.runner.rest_pose`,
the rule the engine uses too).

`MotionSampler` draws sequences with augmentations that keep sync: the audio variant (clean, or, a
`noisy_share` of the time, at another level with noise mixed in), a small time-stretch (features and landmarks resampled together),
mirroring (x flipped, left/right points swapped); and some sequences of digital silence or background
noise whose target is the rest shape (closed mouth).
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
from avatar.speech.encoder import interpolate_frames
from training.cache import ClipCache, open_cache

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


def count_variants(speech: typing.Mapping[str, np.ndarray], mode: str) -> int:
    """How many audio variants (`<mode>_0`, `<mode>_1`, ...) a clip's features hold."""
    return sum(1 for key in speech if key.startswith(mode + "_"))


@dataclasses.dataclass
class MotionClip:
    """clip arrays. speech: `{"offline_0": (K, D) float16, "live_0": ..., "offline_1": ...}` encoder
    features of the clip's audio between silent pads (variant 0 clean; `training.speech_features`);
    frame_pos: `(T,) float64` each video frame's position among them (50 × (its time + the head pad));
    pad_s: seconds of silence the features hold before and after the clip; vad: `(T,)` voice activity;
    mouth: `(T, K, 2) float32` crop-128 pixels (NaN where no face);
    anchor_shift: `(T, 2)` the mouth anchor's displacement from its rest place (head pose); offsets:
    `(T, K, 2)` in rest mouth widths, = (mouth - anchor_shift - rest) / width; keep: `(T,) bool`;
    rest: `(K, 2)`; iod: inter-ocular distance in crop-128 pixels."""

    clip_id: str
    person: str
    fps: float
    speech: typing.Dict[str, np.ndarray]
    frame_pos: np.ndarray
    mouth: np.ndarray
    anchor_shift: np.ndarray
    offsets: np.ndarray
    keep: np.ndarray
    rest: np.ndarray
    width: float
    iod: float
    vad: np.ndarray  # (T,) voice activity per frame (avatar.audio.voice_activity)
    pad_s: typing.Tuple[float, float] = (0.0, 0.0)

    @property
    def pad_frames(self) -> typing.Tuple[int, int]:
        """Video frames of silence the pads hold before and after the clip."""
        return int(self.pad_s[0] * self.fps), int(self.pad_s[1] * self.fps)

    @property
    def n_frames(self) -> int:
        return int(self.keep.size)


def motion_clip(cache: ClipCache, min_kept: int = 25) -> typing.Optional[MotionClip]:
    """The motion-training view of a cached clip, or None when it has no audio, no speech features
    or too few kept frames."""
    features = cache.folder / "speech.npz"
    if not cache.has_audio or int(cache.keep.sum()) < min_kept or not features.exists():
        return None
    landmarks = cache.landmarks()
    keep = cache.keep & np.isfinite(landmarks).all(axis=(1, 2))
    mouth = landmarks[:, POINTS]
    rest, rest_anchor = rest_pose(landmarks, keep)
    anchor_shift = (lm.mouth_anchor(landmarks) - rest_anchor).astype(np.float32)
    width = width_of(rest)
    offsets = ((mouth - anchor_shift[:, None] - rest) / width).astype(np.float32)
    iod = float(np.median(lm.interocular(landmarks[keep])))
    with np.load(features) as data:
        speech = {k: data[k] for k in data.files if k.startswith(("offline_", "live_"))}
        pad_s = tuple(float(x) for x in data["pad_s"]) if "pad_s" in data.files else (0.0, 0.0)
    frame_pos = (cache.arrays["timestamps"] + pad_s[0]) * 50.0
    return MotionClip(cache.clip_id, cache.meta["person"], cache.fps, speech, frame_pos, mouth.astype(np.float32),
                      np.nan_to_num(anchor_shift), offsets, keep, rest.astype(np.float32), width, iod,
                      cache.arrays["vad"].astype(np.float32), pad_s)


def load_motion_clips(cache_root, split: str) -> typing.List[MotionClip]:
    clips = [motion_clip(c) for c in open_cache(cache_root, split=split, kind="video")]
    return [c for c in clips if c is not None]


def load_noise_features(cache_root, mode: str) -> typing.List[np.ndarray]:
    """Encoder features `(K, D)` of digital silence and background noise (`training.speech_features`)."""
    path = pathlib.Path(cache_root) / "speech_noise.npz"
    if not path.exists():
        return []
    with np.load(path) as data:
        return [data[k].astype(np.float32) for k in sorted(data.files) if k.startswith(mode + "_")]


@dataclasses.dataclass
class SpeechOnlyClip:
    """A speech clip without video: `speech` as in MotionClip (no pads), and `targets: (K, N_POINTS, 2)`
    offsets in rest mouth widths at every encoder frame, as the teacher (the offline model) predicts them."""

    clip_id: str
    speech: typing.Dict[str, np.ndarray]
    targets: np.ndarray


def iter_speech_only(cache_root, fps: float = 25.0) -> typing.Iterator[typing.Tuple[str, typing.Dict[str, np.ndarray], np.ndarray]]:
    """The speech-only clips of `training.speech_features` of at least 16 video frames at `fps`: (clip id,
    its features by kind and variant (`offline_0`, `live_0`, ...), the video frames' encoder positions `(n,)`)."""
    for path in sorted((pathlib.Path(cache_root) / "speech_only").glob("*.npz")):
        with np.load(path) as data:
            speech = {k: data[k] for k in data.files if k.startswith(("offline_", "live_"))}
        n = int(speech["offline_0"].shape[0] * fps * 0.02)
        if n >= 16:
            yield path.stem, speech, np.arange(n) * 50.0 / fps


def load_speech_only(cache_root, teacher: typing.Callable[[np.ndarray], np.ndarray], fps: float = 25.0) -> typing.List[SpeechOnlyClip]:
    """The speech-only clips of `training.speech_features` (`iter_speech_only`), labelled by `teacher`
    (offline features `(T, D)` at `fps` → offsets `(T, N_POINTS, 2)`), the labels resampled to encoder frames."""
    clips = []
    for clip_id, speech, at in iter_speech_only(cache_root, fps):
        offline = speech["offline_0"].astype(np.float32)
        n = len(at)
        at_frames = teacher(interpolate_frames(offline, at)).reshape(n, -1)  # (n, K * 2)
        at_encoder_frames = interpolate_frames(at_frames, np.arange(offline.shape[0]) * fps / 50.0)
        clips.append(SpeechOnlyClip(clip_id, speech, at_encoder_frames.reshape(offline.shape[0], -1, 2)))
    return clips


def clip_features(clip: MotionClip, live: bool, variant: int = 0) -> np.ndarray:
    """Unaugmented per-frame features `(T, D) float32` exactly as the engine computes them."""
    return interpolate_frames(clip.speech[f"{'live' if live else 'offline'}_{variant}"].astype(np.float32), clip.frame_pos)


class MotionSampler:
    """Random training sequences: `batch(n)` → features `(n, L, D)`, offsets `(n, L, K, 2)`, keep `(n, L)`
    (frames with landmark targets)."""

    def __init__(self, clips: typing.Sequence[MotionClip], config: MotionConfig, seq_len: int = 48,
                 augment: bool = True, silence_prob: float = 0.08, seed: int = 0,
                 noise: typing.Sequence[np.ndarray] = (), noisy_share: float = 0.67,
                 speech_only: typing.Sequence[SpeechOnlyClip] = (), speech_only_share: float = 0.0):
        if not clips:
            raise ValueError("no training clips with speech features and kept frames")
        self.clips, self.config, self.seq_len = list(clips), config, seq_len
        self.mode = "live" if config.causal else "offline"
        self.augment, self.silence_prob, self.noisy_share = augment, (silence_prob if noise else 0.0), noisy_share
        self.noise = list(noise)
        self.speech_only, self.speech_only_share = list(speech_only), (speech_only_share if speech_only else 0.0)
        self.rng = np.random.default_rng(seed)
        weights = np.array([c.keep.sum() for c in self.clips], np.float64)
        self.weights = weights / weights.sum()
        self.mirror = mirror_permutation()

    def _features(self, speech: typing.Mapping[str, np.ndarray]) -> np.ndarray:
        """One variant of a clip's features, `(K, D) float32`: a noisy one `noisy_share` of the time."""
        count = count_variants(speech, self.mode)
        noisy = self.augment and count > 1 and self.rng.random() < self.noisy_share
        return speech[f"{self.mode}_{int(self.rng.integers(1, count)) if noisy else 0}"].astype(np.float32)

    def _noise_sequence(self):
        rng, L = self.rng, self.seq_len
        features = self.noise[rng.integers(len(self.noise))]
        step = 50.0 / rng.choice([25.0, 29.97, 30.0])
        start = rng.uniform(0, max(0.0, features.shape[0] - 1 - L * step))
        rows = interpolate_frames(features, start + np.arange(L) * step)
        return rows, np.zeros((L, len(POINTS), 2), np.float32), np.ones(L, bool)

    def _speech_only_sequence(self):
        """A speech-only clip's features with the teacher's offsets as the target."""
        rng, L = self.rng, self.seq_len
        clip = self.speech_only[rng.integers(len(self.speech_only))]
        step = 50.0 / rng.choice([25.0, 29.97, 30.0]) * (rng.uniform(0.92, 1.08) if self.augment else 1.0)
        features = clip.speech[f"{self.mode}_0"]
        start = rng.uniform(0, max(0.0, features.shape[0] - 1 - (L - 1) * step))
        positions = start + np.arange(L) * step
        rows = interpolate_frames(self._features(clip.speech), positions)
        offsets = interpolate_frames(clip.targets.reshape(len(clip.targets), -1), positions).reshape(L, len(POINTS), 2)
        if self.augment and rng.random() < 0.5:
            offsets = offsets[:, self.mirror] * np.array([-1.0, 1.0], np.float32)
        return rows, offsets.astype(np.float32), np.ones(L, bool)

    def _sequence(self):
        rng, L = self.rng, self.seq_len
        if self.augment and rng.random() < self.silence_prob:  # silence or background noise: the mouth rests
            return self._noise_sequence()
        if rng.random() < self.speech_only_share:
            return self._speech_only_sequence()
        clip = self.clips[rng.choice(len(self.clips), p=self.weights)]
        stretch = rng.uniform(0.92, 1.08) if self.augment else 1.0
        span = (L - 1) * stretch
        # Sequences may reach half their length into the silent pads, where the mouth rests.
        before, after = min(clip.pad_frames[0], L // 2), min(clip.pad_frames[1], L // 2)
        start = rng.uniform(-before, max(-before, clip.n_frames - 1 - span + after))
        positions = start + np.arange(L) * stretch
        inside = (positions >= 0) & (positions <= clip.n_frames - 1)
        lo = np.clip(np.floor(positions).astype(np.int64), 0, clip.n_frames - 1)
        hi = np.clip(lo + 1, 0, clip.n_frames - 1)
        frac = np.clip(positions - lo, 0, 1)
        keep = np.where(inside, clip.keep[lo] & clip.keep[hi], True)
        offsets = clip.offsets[lo] * (1 - frac[:, None, None]) + clip.offsets[hi] * frac[:, None, None]
        offsets = np.where(inside[:, None, None], np.nan_to_num(offsets), 0.0).astype(np.float32)
        feature_pos = clip.frame_pos[lo] * (1 - frac) + clip.frame_pos[hi] * frac
        step = 50.0 / clip.fps  # encoder frames per video frame, for the pads
        feature_pos = np.where(positions < 0, clip.frame_pos[0] + positions * step, feature_pos)
        feature_pos = np.where(positions > clip.n_frames - 1, clip.frame_pos[-1] + (positions - clip.n_frames + 1) * step, feature_pos)
        features = interpolate_frames(self._features(clip.speech), feature_pos)
        if self.augment and rng.random() < 0.5:
            offsets = offsets[:, self.mirror] * np.array([-1.0, 1.0], np.float32)
        return features, offsets, keep

    def batch(self, size: int) -> typing.Dict[str, np.ndarray]:
        items = [self._sequence() for _ in range(size)]
        return {"features": np.stack([i[0] for i in items]), "offsets": np.stack([i[1] for i in items]),
                "keep": np.stack([i[2] for i in items])}


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
