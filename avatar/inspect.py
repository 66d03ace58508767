"""Visualise the front-ends and the motion model on a face and some speech.

Each output frame shows, left, the aligned face crop with the lower-face mask the renderer will
repaint (red tint), the alignment's stable points (yellow), the tracked mouth/jaw landmarks (green;
for a still they do not move) and the mouth/jaw the motion model predicts from the speech (magenta);
right, the frame's mel window and its voice-activity score. The audio is muxed in.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import typing

import cv2
import numpy as np
from tqdm import tqdm

from avatar import audio as audio_frontend
from avatar import media
from avatar.config import AlignConfig, FaceConfig, MelConfig, VadConfig
from avatar.errors import MediaError
from avatar.face import landmarks as lm
from avatar.face.align import AlignedFace, FaceAligner
from avatar.face.tracker import FaceTracker
from avatar.face.video import align_video
from avatar.motion.runner import MotionPredictor, rest_pose

PANEL = 256


@dataclasses.dataclass
class InspectResult:
    output: pathlib.Path
    n_frames: int
    fps: float
    audio_seconds: float
    speech_fraction: float
    face_frames: int
    seconds: float


def _draw_points(panel: np.ndarray, points: np.ndarray, scale: float, colour: typing.Tuple[int, int, int]) -> None:
    for x, y in np.asarray(points)[:, :2] * scale + (scale - 1) / 2:
        cv2.circle(panel, (int(round(x)), int(round(y))), 2, colour, -1, cv2.LINE_AA)


def _draw_face(aligned: typing.Optional[AlignedFace], aligner: FaceAligner, predicted: typing.Optional[np.ndarray] = None) -> np.ndarray:
    if aligned is None or aligned.landmarks.shape[0] == 0:
        panel = np.zeros((PANEL, PANEL, 3), np.uint8) if aligned is None else cv2.resize(aligned.crop, (PANEL, PANEL))
        cv2.putText(panel, "no face", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 80, 80), 1, cv2.LINE_AA)
        return panel
    crop = aligned.crop.astype(np.float32)
    mask = aligner.lower_face_mask(aligned.landmarks)[..., None]
    tinted = crop * (1 - 0.35 * mask) + np.array([255.0, 0, 0]) * 0.35 * mask
    scale = PANEL / aligner.size
    panel = cv2.resize(np.clip(tinted, 0, 255).astype(np.uint8), (PANEL, PANEL), interpolation=cv2.INTER_CUBIC)
    _draw_points(panel, aligned.landmarks[lm.MOUTH_AND_JAW], scale, (0, 255, 0))
    _draw_points(panel, aligned.landmarks[lm.STABLE], scale, (255, 255, 0))
    if predicted is not None:
        _draw_points(panel, predicted, scale, (255, 0, 255))
    return panel


def _draw_audio(window: np.ndarray, vad: float, config: MelConfig) -> np.ndarray:
    panel = np.zeros((PANEL, PANEL, 3), np.uint8)
    image = ((window.T[::-1] + config.max_abs_value) / (2 * config.max_abs_value) * 255).astype(np.uint8)
    coloured = cv2.applyColorMap(cv2.resize(image, (PANEL - 16, 180), interpolation=cv2.INTER_NEAREST), cv2.COLORMAP_MAGMA)
    panel[8:188, 8:PANEL - 8] = coloured[..., ::-1]
    cv2.putText(panel, "mel window (0.2 s)", (8, 206), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1, cv2.LINE_AA)
    bar = int(round((PANEL - 16) * float(vad)))
    colour = (80, 220, 80) if vad > 0.5 else (140, 140, 140)
    cv2.rectangle(panel, (8, 216), (8 + bar, 232), colour, -1)
    cv2.putText(panel, f"{'speech' if vad > 0.5 else 'silence'} {vad:.2f}", (8, 250), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (220, 220, 220), 1, cv2.LINE_AA)
    return panel


def inspect_frontends(
    output: typing.Union[str, pathlib.Path],
    image: typing.Optional[typing.Union[str, pathlib.Path]] = None,
    video: typing.Optional[typing.Union[str, pathlib.Path]] = None,
    audio: typing.Optional[typing.Union[str, pathlib.Path]] = None,
    fps: float = 25.0,
    face_config: FaceConfig = FaceConfig(),
    align_config: AlignConfig = AlignConfig(),
    mel_config: MelConfig = MelConfig(),
    vad_config: VadConfig = VadConfig(),
    progress: bool = True,
    motion: bool = True,
) -> InspectResult:
    """Write the front-end visualisation of (`image` + `audio`) or (`video` [+ `audio`]) to `output`."""
    if (image is None) == (video is None):
        raise MediaError("give exactly one of an image or a video")
    if image is not None and audio is None:
        raise MediaError("an image needs speech: give an audio file too")
    inputs = [p for p in (image, video, audio) if p is not None]
    media.check_output_path(output, inputs)
    started = time.perf_counter()

    # 1. Audio: decode to 16 kHz mono, mel, per-frame windows and voice activity.
    if video is not None:
        info = media.probe(video)
        fps = info.fps or fps
        if audio is None and not info.has_audio:
            raise MediaError(f"{video}: has no audio track; give speech with the audio option")
    samples = media.read_audio(audio if audio is not None else video, mel_config.sample_rate)
    mel = audio_frontend.MelFrontend(mel_config)(samples)
    n_frames = audio_frontend.n_video_frames(samples.size, fps, mel_config.sample_rate)

    # 2. Face: one aligned crop for a still, or tracking through the video.
    aligner = FaceAligner(align_config)
    if image is not None:
        portrait = media.read_image(image)
        with FaceTracker(face_config) as tracker:
            face = tracker.select(portrait, what=str(image))
        still = aligner.align(portrait, face.landmarks)
        faces: typing.Iterator[typing.Optional[AlignedFace]] = (still for _ in range(n_frames))
    else:
        n_frames = max(1, info.n_frames) if info.n_frames else n_frames
        faces = (frame.aligned for frame in align_video(media.iter_video_frames(video), face_config, align_config, what=str(video)))
    windows = audio_frontend.mel_windows(mel, fps, n_frames, mel_config)
    vad = audio_frontend.voice_activity(samples, fps, n_frames, mel_config.sample_rate, vad_config)
    predictor = MotionPredictor() if motion else None

    # 3. Motion model: mouth and jaw from the speech, relative to the person's rest mouth, placed at each
    #    frame's head pose (the mouth anchor's shift from the rest frame).
    predicted = None
    rest_anchor = None

    # 4. Per frame: draw the panels and encode them with the audio.
    face_frames = 0
    written = 0
    with media.VideoWriter(output, fps, samples, mel_config.sample_rate, inputs=inputs) as writer:
        for i, aligned in enumerate(tqdm(faces, total=n_frames, desc="frames", unit="frame", disable=not progress)):
            if i >= n_frames:
                break
            has_face = aligned is not None and aligned.landmarks.shape[0] > 0
            face_frames += int(has_face)
            points = None
            if predictor is not None and has_face:
                if predicted is None:  # the first face is the reference: its mouth is the rest shape
                    rest, rest_anchor = rest_pose(aligned.landmarks)
                    predicted = predictor.from_audio(samples, fps, rest, n_frames)
                points = predicted[i] + (lm.mouth_anchor(aligned.landmarks) - rest_anchor)
            writer.write(np.concatenate([_draw_face(aligned, aligner, points), _draw_audio(windows[i], vad[i], mel_config)], axis=1))
            written += 1
    return InspectResult(pathlib.Path(output), written, fps, samples.size / mel_config.sample_rate,
                         float((vad[:written] > 0.5).mean()), face_frames, time.perf_counter() - started)
