"""Run the motion models (ONNX exports in `assets/`) on the speech encoder's features, offline or streaming.

    predictor = MotionPredictor()                                         # assets/motion_offline.onnx: files
    landmarks = predictor.from_audio(samples, fps=25, rest=rest)         # (T, K, 2) crop pixels
    live = MotionPredictor(live=True)                                    # assets/motion_live.onnx: live streams
    stream = live.stream(fps=25, rest=rest)
    indices, landmarks = stream.push(chunk)                               # = live.from_audio(...), as audio arrives

`rest`: the person's closed, relaxed mouth and jaw, `(K, 2)` crop pixels in `POINTS` order
(`rest_pose` picks it from reference frames, the same rule training uses).
"""

from __future__ import annotations

import functools
import os
import typing

import numpy as np

from avatar import audio as audio_frontend
from avatar.config import MotionConfig, SilenceConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.provenance import file_sha256
from avatar.runtime import OnnxSession, asset_path, weight_only_int8
from avatar.speech.encoder import FRAME_S, SpeechEncoder, frame_positions, interpolate_frames

POINTS = lm.MOUTH_AND_JAW  # the model's points (same order as avatar.motion.model.POINTS)
OFFLINE_MODEL = "motion_offline.onnx"
VAD_WINDOW = 16000 * 60  # samples pushed through the voice-activity measure at a time
LIVE_MODEL = "motion_live.onnx"
POSITION_BLOCK = 256  # video frames whose encoder positions a stream computes at once


REST_QUANTILE = 10.0  # percent of most-closed frames that define the rest shape


def closed_frames(landmarks: np.ndarray, keep: typing.Optional[np.ndarray] = None) -> np.ndarray:
    """`(N,) bool`: the frames of `landmarks (N, 478, 2+)` whose mouth is among the most closed
    (the lowest REST_QUANTILE % of inner-lip gaps) of the kept ones (`keep`, default: every frame
    with finite landmarks)."""
    landmarks = np.asarray(landmarks, np.float64)
    finite = np.isfinite(landmarks).all(axis=(1, 2))
    keep = finite if keep is None else np.asarray(keep, bool) & finite
    if not keep.any():
        raise ValueError("no reference frame with a face to take the rest mouth from")
    gap = lm.mouth_opening(landmarks)
    return keep & (gap <= np.percentile(gap[keep], REST_QUANTILE))


def rest_pose(landmarks: np.ndarray, keep: typing.Optional[np.ndarray] = None) -> typing.Tuple[np.ndarray, np.ndarray]:
    """The person's closed, relaxed mouth from reference landmarks `(N, 478, 2+)` (or one `(478, 2+)`).

    Among the kept frames (`keep: (N,) bool`; default every frame with finite landmarks), those with
    the smallest inner-lip gap (the lowest REST_QUANTILE %) are the closed ones. Returns `rest (K, 2)`,
    the median of their mouth and jaw in `POINTS` order measured from the mouth anchor (so head motion
    between them does not blur it), and `anchor (2,)`, the anchor's median there. The model's
    output is relative to that anchor: add `lm.mouth_anchor(frame) - anchor` to place it in a frame.
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim == 2:
        landmarks = landmarks[None]
    closed = closed_frames(landmarks, keep)
    anchors = lm.mouth_anchor(landmarks)
    anchor = np.median(anchors[closed], axis=0)
    mouth = landmarks[:, POINTS, :2] - (anchors - anchor)[:, None]
    return np.median(mouth[closed], axis=0).astype(np.float32), anchor.astype(np.float32)


READOUT_INT8_MIN_WEIGHTS = 500_000  # the live read-out's MatMul (1.13 M weights) in 8 bits on the CPU; the network's (≤ 123 k) stay float
READOUT_WEIGHT = 0.5  # how far a blend model's landmarks go to its linear read-out's where the voice is on


class MotionPredictor:
    """Speech (or its encoder features) + rest shape → mouth and jaw landmarks, through onnxruntime.

    The model file says whether it is the live (causal, live features) or the offline model; the
    speech encoder is shared when given (`encoder`), else loaded from `assets/`.
    """

    def __init__(self, model_path: typing.Optional[typing.Union[str, os.PathLike]] = None, threads: int = 0,
                 providers: typing.Optional[typing.Sequence[str]] = None, encoder: typing.Optional[SpeechEncoder] = None,
                 live: bool = False, silence: SilenceConfig = SilenceConfig()):
        self.session = OnnxSession(model_path or asset_path(LIVE_MODEL if live else OFFLINE_MODEL), providers=providers,
                                   threads=threads)
        meta = self.session.metadata
        self.config = MotionConfig(features=int(meta.get("features", 384)), temporal_kernel=int(meta.get("temporal_kernel", 3)),
                                   temporal_layers=int(meta.get("temporal_layers", 4)), causal=meta.get("causal") == "True")
        self.encoder = encoder or SpeechEncoder(threads=threads, providers=providers)
        self.silence = silence
        given = self.encoder.live_width if self.live else self.encoder.width
        if given != self.config.features:  # e.g. a live model made before its features held the window's look-ahead rows
            raise AvatarError(f"{self.session.path}: the {'live' if self.live else 'offline'} motion model reads "
                              f"{self.config.features}-wide features, but the speech encoder gives {given}; use motion "
                              f"models made for this version (the bundled ones, or train them again)")
        if self.live:
            _ = self.encoder.live_session  # built here, not on a stream's first window
            if self.encoder.live_int8 and self.session.providers[0] == "CPUExecutionProvider" and self.has_readout:
                # the read-out's 1.13 M weights, read once a frame in a stream, in 8 bits (SpeechConfig.live_int8)
                self.session = OnnxSession(self.session.path, providers=providers, threads=threads,
                                           model=weight_only_int8(self.session.path, READOUT_INT8_MIN_WEIGHTS))

    @property
    def live(self) -> bool:
        return self.config.causal

    @functools.cached_property
    def models(self) -> typing.Tuple[str, str]:
        """sha256 of the speech encoder's and this motion model's files (what a person's adaptation is
        fitted with: `avatar.motion.adapt.fit_adaptation`)."""
        return file_sha256(self.encoder.session.path), file_sha256(self.session.path)

    def check_adaptation(self, adaptation) -> None:
        """A person's adaptation reads this encoder's features and, offline, this model's mouths: one
        fitted with other models is refused (the live model's output takes the offline model's
        adaptation, so only the encoder must match there)."""
        if adaptation is None:
            return
        speech, motion = self.models
        if adaptation.speech_model != speech or (not self.live and adaptation.motion_model != motion):
            raise AvatarError("the person's motion adaptation was fitted with another speech encoder or motion model "
                              "than these; enroll them again")

    @property
    def sample_rate(self) -> int:
        return self.encoder.config.sample_rate

    @property
    def has_readout(self) -> bool:
        """Whether the model gives a linear read-out beside its landmarks (`MotionBlend`)."""
        return "readout" in self.session.output_names

    def predict(self, features: np.ndarray, rest: np.ndarray, voice: typing.Optional[np.ndarray] = None,
                newest: typing.Optional[int] = None) -> np.ndarray:
        """`features: (T, D) float32` at video frames, `rest: (K, 2)` → `(T, K, 2) float32` landmarks, or
        those of the `newest` N frames only `(N, K, 2)` (a stream's: the frames before them only feed
        them, and the model computes what it can for those N alone).
        A model with a read-out (`has_readout`) moves the landmarks READOUT_WEIGHT of the way to the
        read-out's, times `voice` in [0, 1] of the frames returned (voice activity: the network alone in
        silence and noise, where the read-out jitters; None: speech everywhere)."""
        features = np.ascontiguousarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.config.features:
            raise ValueError(f"features must be (T, {self.config.features}), got {features.shape}")
        rest = np.ascontiguousarray(rest, np.float32)
        if rest.shape != (len(POINTS), 2):
            raise ValueError(f"rest must be ({len(POINTS)}, 2), got {rest.shape}")
        if features.shape[0] == 0:
            return np.zeros((0, len(POINTS), 2), np.float32)
        first = len(features) - (len(features) if newest is None else newest)
        if not 0 <= first < len(features) or (voice is not None and len(voice) != len(features) - first):
            raise ValueError(f"newest must be 1..{len(features)} and voice one value per frame returned, "
                             f"got newest={newest} and {None if voice is None else len(voice)} values")
        if "frames" in self.session.input_names:
            out = self.session.run(features=features[None], rest=rest[None], frames=np.arange(first, len(features)))
        else:  # a file exported before the `frames` input (the shipped motion_offline.onnx): all computed
            out = {k: v[:, first:] for k, v in self.session.run(features=features[None], rest=rest[None]).items()}
        if "readout" not in out:
            return out["landmarks"][0]
        weight = READOUT_WEIGHT * (np.ones(len(features) - first, np.float32) if voice is None else np.asarray(voice, np.float32))
        return (out["landmarks"][0] + weight[:, None, None] * (out["readout"][0] - out["landmarks"][0])).astype(np.float32)

    def features_for(self, samples: np.ndarray, fps: float, n_frames: typing.Optional[int] = None) -> np.ndarray:
        """16 kHz mono `(N,) float32` → the model's input `(T, D)` for T video frames at `fps`."""
        n = n_frames or audio_frontend.n_video_frames(samples.size, fps, self.sample_rate)
        return interpolate_frames(self.encoder.features(samples, live=self.live), self.positions(fps, n))

    def positions(self, fps: float, n_frames: int, first: int = 0) -> np.ndarray:
        """Where video frames first.. at `fps` read the encoder's frames `(n_frames,) float64`: at their
        times (`frame_positions`), or for the live model within its look-ahead (`SpeechEncoder.live_positions`)."""
        return self.encoder.live_positions(fps, n_frames, first) if self.live else frame_positions(fps, n_frames, first)

    def from_audio(self, samples: np.ndarray, fps: float, rest: np.ndarray, n_frames: typing.Optional[int] = None,
                   adaptation=None) -> np.ndarray:
        """16 kHz mono `(N,) float32` → `(T, K, 2)` landmarks for T video frames at `fps` (the mouth at
        rest in long silences, `SilenceConfig`); `adaptation`: the person's
        (`avatar.motion.adapt.MotionAdaptation`), applied to the model's output."""
        self.check_adaptation(adaptation)
        n = n_frames or audio_frontend.n_video_frames(samples.size, fps, self.sample_rate)
        vad_scores = None
        if self.silence.enabled or self.has_readout:
            vad = audio_frontend.EnergyVad(fps, self.sample_rate)  # pushed a window at a time: no copy of the whole input
            scores = [vad.push(samples[k:k + VAD_WINDOW]) for k in range(0, samples.size, VAD_WINDOW)]
            vad_scores = np.concatenate(scores + [vad.flush(n)])[:n]
        if self.live:
            features = self.features_for(samples, fps, n)
            landmarks = self.predict(features, rest, voice=vad_scores)
            if adaptation is not None:  # it reads one row per frame: the frame's own (`SpeechConfig.live_ahead`)
                landmarks = adaptation.apply(self.encoder.own_rows(features), landmarks, rest, smooth=True)
        else:
            landmarks = self._offline_landmarks(samples, fps, rest, n, adaptation, vad_scores)
        if not self.silence.enabled:
            return landmarks
        return SilenceHold(fps, self.silence).apply(landmarks, rest, vad_scores)

    def _offline_landmarks(self, samples: np.ndarray, fps: float, rest: np.ndarray, n: int, adaptation,
                           voice: typing.Optional[np.ndarray] = None) -> np.ndarray:
        """The offline model's landmarks `(n, K, 2)`, as on the whole input's features, made a speech
        encoder window at a time: each run covers the frames whose context (the model's reach each
        side, one more for the adaptation's smoothing) has been heard, so only a window's features are
        ever held (memory does not grow with the input's length)."""
        reach = self.config.temporal_reach + (1 if adaptation is not None else 0)
        total = self.encoder.n_features(samples.size)
        positions = frame_positions(fps, n)
        out = np.zeros((n, len(POINTS), 2), np.float32)
        held, held_start, done = np.zeros((0, self.config.features), np.float32), 0, 0
        for start, rows in self.encoder.offline_chunks(samples):
            held = np.concatenate([held, rows])
            heard = start + rows.shape[0]
            if heard == total:
                ready = finish = n
            else:  # frames whose two encoder frames are heard; exact up to `reach` before the last of them
                ready = int(np.searchsorted(positions, heard - 1 - 1e-9))
                finish = max(done, ready - reach)
            if finish == done:
                continue
            first = max(0, done - reach)
            features = interpolate_frames(held, positions[first:ready] - held_start)
            landmarks = self.predict(features, rest, voice=None if voice is None else voice[first:ready])
            if adaptation is not None:
                landmarks = adaptation.apply(features, landmarks, rest, smooth=True)
            out[done:finish] = landmarks[done - first: finish - first]
            done = finish
            drop = max(0, int(np.floor(positions[max(0, done - reach)] + 1e-9)) - held_start)
            held, held_start = held[drop:], held_start + drop
        return out

    def stream(self, fps: float, rest: np.ndarray, adaptation=None) -> "MotionStream":
        if not self.live:
            raise ValueError("the offline motion model looks ahead without bound; stream with the live model (live=True)")
        self.check_adaptation(adaptation)
        return MotionStream(self, fps, rest, adaptation)


class SilenceHold:
    """Eases the mouth to rest after `hold_after_s` of continuous silence (`SilenceConfig`), frame by
    frame: `apply` may be called on consecutive pieces of a stream and gives the whole-file result."""

    def __init__(self, fps: float, config: SilenceConfig = SilenceConfig()):
        self.fps, self.config = fps, config
        self.silent_frames = 0  # consecutive silent frames up to the last one seen

    def apply(self, landmarks: np.ndarray, rest: np.ndarray, vad: np.ndarray) -> np.ndarray:
        """`landmarks: (T, K, 2)`, `rest: (K, 2)`, `vad: (T,)` scores in [0, 1] → `(T, K, 2) float32`."""
        if not self.config.enabled or len(landmarks) == 0:
            return landmarks
        gate = np.ones(len(landmarks), np.float32)
        for i, score in enumerate(np.asarray(vad)[: len(landmarks)]):
            self.silent_frames = 0 if score >= 0.5 else self.silent_frames + 1
            quiet_s = self.silent_frames / self.fps - self.config.hold_after_s
            gate[i] = np.clip(1.0 - quiet_s / self.config.ease_s, 0.0, 1.0)
        return (rest + (landmarks - rest) * gate[:, None, None]).astype(np.float32)


class MotionStream:
    """Streaming motion: push audio chunks of any size, get each video frame's landmarks as soon as
    the encoder frames around its time are out; the numbers equal `MotionPredictor.from_audio` on the
    whole audio (live model).

    Look-ahead (audio needed past a frame's timestamp): `lookahead_ms` (102.5 ms at 25 fps, where
    video frames fall on even encoder frames; 115.8 ms at 30 fps, where some fall between two; at
    most 120 ms at any rate, `SpeechConfig.live_max_lookahead_ms`).
    """

    def __init__(self, predictor: MotionPredictor, fps: float, rest: np.ndarray, adaptation=None):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.predictor, self.fps = predictor, fps
        self.rest = np.asarray(rest, np.float32)
        self.adaptation = adaptation
        self.speech = predictor.encoder.stream()
        self.encoded = np.zeros((0, predictor.config.features), np.float32)  # encoder frames from `encoded_start`
        self.encoded_start = 0
        self.next_frame = 0
        self.history = np.zeros((0, predictor.config.features), np.float32)
        self.context = predictor.config.receptive_frames - 1  # past frames each output depends on
        self.n_samples = 0
        self.vad = audio_frontend.EnergyVad(fps, predictor.sample_rate)
        self.vad_scores = np.zeros(0, np.float32)  # of frames from `next_frame` on
        self.hold = SilenceHold(fps, predictor.silence)
        self._table = (0, predictor.positions(fps, POSITION_BLOCK))  # frames' encoder positions, a block at a time

    def _positions(self, first: int, n: int) -> np.ndarray:
        """Encoder positions of frames [first, first + n) `(n,) float64` (`MotionPredictor.positions`)."""
        start, table = self._table
        if first < start or first + n > start + len(table):
            start, table = first, self.predictor.positions(self.fps, max(n, POSITION_BLOCK), first)
            self._table = (start, table)
        return table[first - start: first - start + n]

    def _position(self, i: int) -> float:
        return float(self._positions(i, 1)[0])

    @property
    def lookahead_ms(self) -> float:
        """The most audio past a frame's time that a frame waits for (the live window of the encoder frame
        at or after its time), over the stream's first 1,000 frames."""
        encoder = self.predictor.encoder
        positions = self.predictor.positions(self.fps, 1000)
        needed = np.array([encoder.needed_ms(int(np.ceil(p - 1e-9))) for p in positions])
        return float(np.max(needed - 1000 * FRAME_S * frame_positions(self.fps, 1000)))

    def _take(self, final: bool, n_frames: typing.Optional[int] = None) -> typing.Tuple[np.ndarray, np.ndarray]:
        available = self.encoded_start + self.encoded.shape[0]
        indices = []
        i = self.next_frame
        # A frame reads the encoder frames on either side of its time (only the one it falls on, if any).
        while (i < n_frames) if final else (int(np.ceil(self._position(i) - 1e-9)) < available):
            indices.append(i)
            i += 1
        if not indices:
            return np.zeros(0, np.int64), np.zeros((0, len(POINTS), 2), np.float32)
        rows = interpolate_frames(self.encoded, self._positions(indices[0], len(indices)) - self.encoded_start)
        stack = np.concatenate([self.history, rows])
        if self.vad_scores.size < len(indices):  # frame i's score needs audio up to (i + 1) / fps only: never
            raise RuntimeError("voice activity lags the motion frames")
        out = self.predictor.predict(stack, self.rest, voice=self.vad_scores[: len(indices)], newest=len(indices))
        if self.adaptation is not None:
            out = self.adaptation.apply(self.predictor.encoder.own_rows(rows), out, self.rest, smooth=False)
        out = self.hold.apply(out, self.rest, self.vad_scores[: len(indices)])
        self.vad_scores = self.vad_scores[len(indices):]
        self.history = stack[-self.context:] if self.context else stack[:0]
        self.next_frame = i
        drop = max(0, int(np.floor(self._position(i) + 1e-9)) - self.encoded_start)
        drop = min(drop, max(0, self.encoded.shape[0] - 1))  # keep the last frame: held past the end
        self.encoded, self.encoded_start = self.encoded[drop:], self.encoded_start + drop
        return np.array(indices, np.int64), out

    def plan(self, chunk: np.ndarray):
        """Audio `(n,) float32` 16 kHz → the speech encoder windows it completes (`SpeechStream.plan`); a
        server encodes those of all its streams in one call and gives each stream its own to `take`."""
        self.n_samples += np.asarray(chunk).size
        self.vad_scores = np.concatenate([self.vad_scores, self.vad.push(chunk)])
        return self.speech.plan(chunk)

    def take(self, plan, outputs: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """A plan and its windows encoded (`SpeechEncoder.encode_windows`) → (frame indices `(k,)`,
        landmarks `(k, K, 2)`)."""
        if not plan.ends:  # no new encoder frame: no new video frame
            return np.zeros(0, np.int64), np.zeros((0, len(POINTS), 2), np.float32)
        _, rows = self.speech.rows(plan, outputs)
        self.encoded = np.concatenate([self.encoded, rows])
        return self._take(final=False)

    def push(self, chunk: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """Audio `(n,) float32` 16 kHz → (frame indices `(k,)`, landmarks `(k, K, 2)`)."""
        plan = self.plan(chunk)
        return self.take(plan, self.speech.encoder.encode_windows(plan.windows))

    def flush(self) -> typing.Tuple[np.ndarray, np.ndarray]:
        """The remaining frames, up to `n_video_frames(samples pushed, fps)`."""
        _, rows = self.speech.flush()
        self.encoded = np.concatenate([self.encoded, rows])
        n = audio_frontend.n_video_frames(self.n_samples, self.fps, self.predictor.sample_rate)
        self.vad_scores = np.concatenate([self.vad_scores, self.vad.flush(n)])
        return self._take(final=True, n_frames=n)

