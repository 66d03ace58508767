"""Run the motion model (the ONNX export in `assets/motion.onnx` by default), offline or streaming.

    predictor = MotionPredictor()
    landmarks = predictor.from_audio(samples, fps=25, rest=rest)         # (T, K, 2) crop pixels
    stream = predictor.stream(fps=25, rest=rest)                          # live audio
    indices, landmarks = stream.push(chunk)                               # identical numbers

`rest`: the person's closed, relaxed mouth and jaw, `(K, 2)` crop pixels in `POINTS` order
(`rest_pose` picks it from reference frames, the same rule training uses).
"""

from __future__ import annotations

import os
import typing

import numpy as np

from avatar import audio as audio_frontend
from avatar.config import MelConfig, MotionConfig
from avatar.face import landmarks as lm
from avatar.runtime import OnnxSession, asset_path

POINTS = lm.MOUTH_AND_JAW  # the model's points (same order as avatar.motion.model.POINTS)
DEFAULT_MODEL = "motion.onnx"


REST_QUANTILE = 10.0  # percent of most-closed frames that define the rest shape


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
    finite = np.isfinite(landmarks).all(axis=(1, 2))
    keep = finite if keep is None else np.asarray(keep, bool) & finite
    if not keep.any():
        raise ValueError("no reference frame with a face to take the rest mouth from")
    gap = lm.mouth_opening(landmarks)
    closed = keep & (gap <= np.percentile(gap[keep], REST_QUANTILE))
    anchors = lm.mouth_anchor(landmarks)
    anchor = np.median(anchors[closed], axis=0)
    mouth = landmarks[:, POINTS, :2] - (anchors - anchor)[:, None]
    return np.median(mouth[closed], axis=0).astype(np.float32), anchor.astype(np.float32)


class MotionPredictor:
    """Mel windows (or audio) + rest shape → mouth and jaw landmarks, through onnxruntime."""

    def __init__(self, model_path: typing.Optional[typing.Union[str, os.PathLike]] = None, threads: int = 0,
                 providers: typing.Optional[typing.Sequence[str]] = None):
        self.session = OnnxSession(model_path or asset_path(DEFAULT_MODEL), providers=providers, threads=threads)
        meta = self.session.metadata
        self.config = MotionConfig(mel_window_frames=int(meta.get("mel_window_frames", 32)),
                                   mel_window_offset=int(meta.get("mel_window_offset", -24)),
                                   temporal_kernel=int(meta.get("temporal_kernel", 5)),
                                   temporal_layers=int(meta.get("temporal_layers", 2)))

    @property
    def mel_config(self) -> MelConfig:
        return self.config.mel_config()

    def predict(self, windows: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """`windows: (T, W, 80) float32`, `rest: (K, 2)` → `(T, K, 2) float32` landmarks."""
        windows = np.ascontiguousarray(windows, np.float32)
        if windows.ndim != 3 or windows.shape[1:] != (self.config.mel_window_frames, 80):
            raise ValueError(f"windows must be (T, {self.config.mel_window_frames}, 80), got {windows.shape}")
        rest = np.ascontiguousarray(rest, np.float32)
        if rest.shape != (len(POINTS), 2):
            raise ValueError(f"rest must be ({len(POINTS)}, 2), got {rest.shape}")
        if windows.shape[0] == 0:
            return np.zeros((0, len(POINTS), 2), np.float32)
        return self.session.run(windows=windows[None], rest=rest[None])["landmarks"][0]

    def windows_for(self, samples: np.ndarray, fps: float, n_frames: typing.Optional[int] = None) -> np.ndarray:
        mel = audio_frontend.MelFrontend(self.mel_config)(samples)
        n = n_frames or audio_frontend.n_video_frames(samples.size, fps, self.mel_config.sample_rate)
        return audio_frontend.mel_windows(mel, fps, n, self.mel_config)

    def from_audio(self, samples: np.ndarray, fps: float, rest: np.ndarray, n_frames: typing.Optional[int] = None) -> np.ndarray:
        """16 kHz mono `(N,) float32` → `(T, K, 2)` landmarks for T video frames at `fps`."""
        return self.predict(self.windows_for(samples, fps, n_frames), rest)

    def stream(self, fps: float, rest: np.ndarray) -> "MotionStream":
        return MotionStream(self, fps, rest)


class MotionStream:
    """Streaming motion: push audio chunks of any size, get each frame's landmarks as soon as its
    mel context is complete; the numbers equal `MotionPredictor.from_audio` on the whole audio.

    Look-ahead (audio needed past a frame's timestamp): `lookahead_ms` (112.5 ms at the defaults).
    """

    def __init__(self, predictor: MotionPredictor, fps: float, rest: np.ndarray):
        self.predictor = predictor
        self.rest = np.asarray(rest, np.float32)
        self.windows = audio_frontend.StreamingMelWindows(fps, predictor.mel_config)
        self.history = np.zeros((0, predictor.config.mel_window_frames, 80), np.float32)
        self.context = predictor.config.receptive_frames - 1  # past frames each output depends on

    @property
    def lookahead_ms(self) -> float:
        return self.windows.lookahead_ms

    def _predict(self, indices: np.ndarray, windows: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        if indices.size == 0:
            return indices, np.zeros((0, len(POINTS), 2), np.float32)
        stack = np.concatenate([self.history, windows])
        out = self.predictor.predict(stack, self.rest)[-indices.size:]
        self.history = stack[-self.context:] if self.context else stack[:0]
        return indices, out

    def push(self, chunk: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
        """Audio `(n,) float32` 16 kHz → (frame indices `(k,)`, landmarks `(k, K, 2)`)."""
        return self._predict(*self.windows.push(chunk))

    def flush(self) -> typing.Tuple[np.ndarray, np.ndarray]:
        return self._predict(*self.windows.flush())
