"""Enrollment: a person's own avatar from a short video (or a photo), saved in one file and used by
every command (`avatar enroll`, `--avatar`, `AvatarPipeline.load_avatar`).

    footage = track_video(pipeline, "me.mp4")               # the face tracked through the video
    avatar = build_avatar(pipeline, [footage])               # identity, mouth bank, idle loop, adaptation
    save_avatar(avatar, "me.avatar"); avatar = load_avatar("me.avatar")

What an avatar holds (`Avatar`):
- the identity (`avatar.render.base.Identity`): rest mouth, the renderer's references, the drift
  monitor's references (face regions of frames spread over the footage), the open mouth;
- the mouth bank (`avatar.render.retrieval.MouthBank`): up to BANK_SIZE of the person's mouths,
  closed and open, aligned face crops at the face's own resolution (256² to the warp's largest crop,
  `PipelineConfig.warp_max_size`), sharp and frontal ones chosen to cover the lip shapes found
  (farthest points in lip-shape space, from the most open);
- the idle loop (`IdleLoop`): a LOOP_MIN_S-LOOP_S stretch of the person's real footage, chosen so its last
  frame leads back into its first with the smallest jump (whole-frame thumbnails and head pose) and
  the mouth mostly at rest, with each frame's alignment and landmarks; `animate` and the live
  server play it behind the speaking mouth. A photo-only avatar keeps the photo instead (`still`);
- the motion adaptation (`avatar.motion.adapt`), fitted on the footage's own speech and lips when
  there is speech and it pays (cross-validated).

The file (FORMAT_VERSION 2, suffix `.avatar`) is a zip read without pickle:
- `manifest.json`: {"format": "avatar", "version", "engine", "created", "summary", "identity",
  "bank", "idle", "still", "adaptation" (with the sha256 of the speech encoder and motion model it
  was fitted with, and its amplitude "gain": files written before it read as 1), "files": {member: sha256}};
- `.npy` arrays (`np.load(allow_pickle=False)`): identity/rest, identity/rest_anchor,
  identity/inner_mouth, identity/drift_landmarks_K, bank/mouths, bank/heads (each entry's head
  pose: its 3D head points; files without them still load, their entries drawn at any pose), idle/transforms,
  idle/crop_landmarks, idle/frame_landmarks, still/landmarks, adaptation/{x_mean,y_mean,weights};
- images: identity/reference_K.png, identity/inner.png (the crop the open mouth is made from),
  identity/drift_K.jpg, bank/K.png (lossless, for the teeth's detail), still/image.png; the idle
  loop as idle/loop.mp4 (H.264).
A file of another version, or whose members do not match their hashes, is refused with one line.
(Version 1 held an adaptation fitted on the 4-block speech encoder's features, replaced by 2 blocks.)
An adaptation without `"fit": "head"` (fitted before 2026-11-30's eighth session, on mouths with the
head's turn left in: its jaw slid with the head) is refused with one line too: enroll again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import pathlib
import tempfile
import typing
import zipfile

import cv2
import numpy as np
from tqdm import tqdm

from avatar import __version__, media
from avatar import audio as audio_frontend
from avatar.errors import AvatarError, MediaError, NoFaceError
from avatar.face import landmarks as lm
from avatar.config import AlignConfig, RenderConfig
from avatar.face.align import FaceAligner, rescale_points, rescale_transform, transform_scale
from avatar.frames import FrameStore
from avatar.motion.adapt import FIT as ADAPTATION_FIT, MotionAdaptation, fit_adaptation
from avatar.motion.pose import HEAD_POINTS
from avatar.render.base import FrameJob, Identity
from avatar.render.retrieval import MouthBank, lip_shape
from avatar.render.warp import open_inner

PathLike = typing.Union[str, os.PathLike]
FORMAT, FORMAT_VERSION, SUFFIX = "avatar", 2, ".avatar"
MIN_FACE_S = 2.0  # seconds of frames with a face that an enrollment needs at the least
MIN_FACE_SHARE = 0.25  # a video whose face is found in fewer of its frames is refused
BANK_SIZE = 48  # mouths kept
BANK_MAX_YAW = 25.0  # degrees: mouths turned further are not banked
LOOP_S, LOOP_MIN_S = 6.0, 2.0  # the idle loop's longest and shortest length
DRIFT_MARGIN = 0.6  # drift references keep the face's box grown by this × its size on each side
THUMB = 48  # side of the thumbnails the idle loop's jump is judged on
JPEG_QUALITY = 92


@dataclasses.dataclass
class Footage:
    """One video with its face tracked: frames on disk (`store`), per frame `valid`, `transforms`
    (`(2, 3)` frame → crop, or None), `crop_landmarks` / `frame_landmarks` (`(478, 3)` or None),
    `timestamps (N,)` seconds (true presentation
    times: a variable-rate video's are uneven); `samples`: its audio at 16 kHz or None."""

    path: str
    store: FrameStore
    fps: float
    valid: np.ndarray
    transforms: typing.List[typing.Optional[np.ndarray]]
    crop_landmarks: typing.List[typing.Optional[np.ndarray]]
    frame_landmarks: typing.List[typing.Optional[np.ndarray]]
    timestamps: np.ndarray
    samples: typing.Optional[np.ndarray] = None

    @property
    def good(self) -> np.ndarray:
        return np.flatnonzero(self.valid)

    def constant_rate(self) -> np.ndarray:
        """For each frame of a constant `fps` grid over the video, the frame shown then `(T,) int64`:
        `arange(N)` for a constant-rate video; a variable-rate one's frames repeated or skipped so that
        none moves from its time (its speech) by more than half a grid step."""
        n = len(self.timestamps)
        if n < 2 or np.abs(self.timestamps - np.arange(n) / self.fps).max() <= 0.25 / self.fps:
            return np.arange(n)
        return media.resample_timestamps(self.timestamps, self.fps)

    def close(self) -> None:
        self.store.close()


def track_video(pipeline, path: PathLike, progress: bool = True, with_audio: bool = True,
                max_frames: typing.Optional[int] = None) -> Footage:
    """Track the face through a video once (`avatar.face.video.align_video` with the pipeline's face
    settings), keeping its frames on disk (its first `max_frames` only, when given); one-line errors
    for a video without frames or faces."""
    import contextlib
    import itertools

    from avatar.face.video import align_video

    info = media.probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video frames; give a video with a face in it")
    store = FrameStore()
    try:
        valid, transforms, crop_lms, frame_lms, times = [], [], [], [], []
        # the next frames are decoded on a thread of their own while this one is tracked
        with contextlib.closing(media.read_ahead(itertools.islice(media.iter_video_frames(path), max_frames))) as frames:
            tracked = align_video(frames, pipeline.face_config, AlignConfig(crop_size=pipeline.crop_size), what=str(path))
            for item in tqdm(tracked, total=min(info.n_frames or max_frames or 0, max_frames or info.n_frames or 0) or None, desc="tracking", unit="frame", disable=not progress):
                store.append(item.image)
                valid.append(item.valid)
                transforms.append(item.aligned.transform if item.aligned is not None else None)
                crop_lms.append(item.aligned.landmarks if item.valid else None)
                frame_lms.append(item.frame_landmarks)
                times.append(item.timestamp)
        if store.count == 0:
            raise MediaError(f"{path}: no frame could be decoded; the file may be corrupt")
        if not any(valid):
            raise NoFaceError(f"{path}: no face found in any frame; give a video where a face is visible")
        samples = None
        if with_audio and info.has_audio:
            samples = media.read_audio(path, pipeline.encoder.config.sample_rate)
            samples = samples[: int(round(store.count / (info.fps or pipeline.config.fps) * pipeline.encoder.config.sample_rate))]
            if not np.isfinite(samples).all():
                samples = None
        return Footage(str(path), store, info.fps or pipeline.config.fps, np.array(valid), transforms, crop_lms, frame_lms,
                       np.array(times, np.float64), samples)
    except BaseException:
        store.close()
        raise


@dataclasses.dataclass
class IdleLoop:
    """Real footage to play behind the speaking mouth, looped: `frames (F, H, W, 3) uint8`,
    `transforms (F, 2, 3)` frame → crop, `crop_landmarks` / `frame_landmarks (F, 478, 3)`, at `fps`."""

    frames: np.ndarray
    transforms: np.ndarray
    crop_landmarks: np.ndarray
    frame_landmarks: np.ndarray
    fps: float
    _posed: typing.Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.frames)

    def job(self, index: int, mouth: np.ndarray, rest: np.ndarray, bank_index: typing.Optional[int] = None) -> FrameJob:
        """Frame `index` (looped) with the target `mouth (59, 2)`, the motion model's for the person's
        rest mouth `rest (59, 2)`, placed at this frame's head pose (`avatar.motion.pose`: the loop's
        own closed mouth turned with its head, the model's change from `rest` added)."""
        from avatar.motion.pose import PosedRest
        from avatar.motion.runner import closed_frames

        k = index % len(self.frames)
        if self._posed is None or self._posed[0] is not rest:  # made once per person's rest mouth
            faces = np.asarray(self.crop_landmarks, np.float64)
            self._posed = (rest, PosedRest.from_frames(faces, rest, closed_frames(faces[..., :2])))
        placed = self._posed[1].place(self.crop_landmarks[k], mouth)
        return FrameJob(self.frames[k], self.transforms[k], self.crop_landmarks[k], self.frame_landmarks[k], placed, bank_index)

    def scaled(self, max_side: int) -> "IdleLoop":
        """The loop with frames downscaled (area) so the longer side is at most `max_side`."""
        scale = max_side / max(self.frames.shape[1:3])
        if scale >= 1:
            return self
        size = (max(2, round(self.frames.shape[2] * scale)), max(2, round(self.frames.shape[1] * scale)))
        frames = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in self.frames])
        sx, sy = size[0] / self.frames.shape[2], size[1] / self.frames.shape[1]
        transforms = self.transforms.copy()
        transforms[:, :, 0] /= sx  # frame → crop: the frame's coordinates are now scaled
        transforms[:, :, 1] /= sy
        landmarks = self.frame_landmarks.copy()
        landmarks[..., 0] *= sx
        landmarks[..., 1] *= sy
        return IdleLoop(frames, transforms, self.crop_landmarks, landmarks, self.fps)


@dataclasses.dataclass
class Avatar:
    """An enrolled person (see the module docstring). `still`: `(image, landmarks (478, 3))` of a
    photo-only avatar; `summary`: what enrollment found (also in the file's manifest);
    `inner_source`: the crop and mouth the identity's open mouth comes from
    (`IdentityBuilder.inner_source`; a file rebuilds the open mouth, a borrowed one included)."""

    identity: Identity
    idle: typing.Optional[IdleLoop] = None
    still: typing.Optional[typing.Tuple[np.ndarray, np.ndarray]] = None
    summary: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)
    inner_source: typing.Optional[typing.Tuple[np.ndarray, np.ndarray]] = None
    source: typing.Optional[str] = None  # the file it was loaded from (`load_avatar`): recorded in outputs' provenance

    def describe(self) -> str:
        """One line: what the avatar holds."""
        s = self.summary
        parts = [f"{s.get('seconds_used', 0):.1f} s of footage" if self.idle is not None else "photo only",
                 f"{len(self.identity.bank) if self.identity.bank is not None else 0} mouth shapes"]
        if self.idle is not None:
            parts.append(f"idle loop {len(self.idle) / self.idle.fps:.1f} s")
        parts.append(f"speech {s['speech_seconds']:.1f} s" if s.get("speech_seconds") else "no speech found")
        adaptation = self.identity.adaptation
        if adaptation is None:
            parts.append(f"motion not adapted ({s.get('adaptation_skipped', 'no speech')})")
        else:
            parts.append(f"motion adapted ({'a correction' if np.isfinite(adaptation.lam) else f'its amplitude × {adaptation.gain:.2f}'})")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------- choosing
def bank_side(transforms: typing.Sequence[np.ndarray], crop_size: int, largest: int) -> int:
    """The side at which bank crops are kept: the median face's own resolution (the side of a crop
    whose pixels match the frame's, `transforms` mapping frames to `crop_size` crops), as a multiple
    of 16 between INNER_SIZE and `largest` (the warp's crop side at most): the renderer draws an
    entry at the face's own resolution, so a smaller entry would be drawn upscaled and soft."""
    from avatar.person import INNER_SIZE

    native = float(np.median([crop_size / transform_scale(t) for t in transforms]))
    return int(np.clip(16 * round(native / 16), INNER_SIZE, max(INNER_SIZE, largest)))


def choose_bank(shapes: np.ndarray, candidates: np.ndarray, size: int = BANK_SIZE) -> np.ndarray:
    """Up to `size` of the `candidates` (indices into `shapes (N, 40, 2)`, `lip_shape`) covering the
    shapes: the most open first, then each time the one farthest from those chosen."""
    if len(candidates) == 0:
        return np.zeros(0, np.int64)
    flat = shapes[candidates].reshape(len(candidates), -1)
    heights = np.ptp(shapes[candidates][..., 1], axis=1)
    chosen = [int(np.argmax(heights))]
    distance = np.linalg.norm(flat - flat[chosen[0]], axis=1)
    while len(chosen) < min(size, len(candidates)):
        k = int(np.argmax(distance))
        if distance[k] <= 0:
            break
        chosen.append(k)
        distance = np.minimum(distance, np.linalg.norm(flat - flat[k], axis=1))
    return candidates[np.array(chosen)]


def choose_loop(thumbs: np.ndarray, transforms: np.ndarray, openings: np.ndarray, usable: np.ndarray, fps: float,
                longest_s: float = LOOP_S, shortest_s: float = LOOP_MIN_S) -> typing.Tuple[int, int]:
    """`[start, stop)` of the idle loop: every frame in it usable (a face, not turned), and of those
    stretches the one whose frame `stop` is most like `start` (the jump when it loops: thumbnails'
    mean absolute difference, in grey levels, plus the head's move, in crop pixels), with the mouth
    least open on average (`openings (N,)`, inner gap over mouth width; a stretch of open mouths
    costs up to 4 grey levels more). Raises when no usable stretch of `shortest_s` exists."""
    n = len(thumbs)
    longest, shortest = max(2, int(round(longest_s * fps))), max(2, int(round(shortest_s * fps)))
    run = np.zeros(n + 1, np.int64)  # usable frames in a row ending at each frame
    for i in range(n):
        run[i + 1] = run[i] + 1 if usable[i] else 0
    best, best_cost = None, np.inf
    centre = transforms[:, :, 2]
    cumulative = np.r_[0.0, np.cumsum(np.nan_to_num(openings))]
    for stop in range(shortest, n):  # frame `stop` (usable) plays the role of `start` again
        if not usable[stop]:
            continue
        lengths = np.arange(shortest, min(longest, run[stop]) + 1)  # frames start..stop-1 all usable
        if lengths.size == 0:
            continue
        starts = stop - lengths
        jump = np.abs(thumbs[starts].astype(np.float32) - thumbs[stop]).mean(axis=(1, 2)) + np.linalg.norm(centre[starts] - centre[stop], axis=1)
        opening = (cumulative[stop] - cumulative[starts]) / lengths
        cost = jump + 4.0 * np.clip(opening / 0.3, 0, 1) - 0.1 * lengths / longest  # longer loops repeat less often
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best, best_cost = (int(starts[k]), int(stop)), float(cost[k])
    if best is None:
        raise AvatarError(f"no stretch of {shortest_s:g} s with the face visible and facing the camera; enroll from steadier footage")
    return best


def _face_box(landmarks: np.ndarray, shape: typing.Tuple[int, ...]) -> typing.Tuple[int, int, int, int]:
    points = np.asarray(landmarks)[:, :2]
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    mx, my = DRIFT_MARGIN * (x1 - x0), DRIFT_MARGIN * (y1 - y0)
    h, w = shape[:2]
    return int(max(0, x0 - mx)), int(max(0, y0 - my)), int(min(w, x1 + mx + 1)), int(min(h, y1 + my + 1))


def face_region(image: np.ndarray, landmarks: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray]:
    """A drift reference kept small: the face's region of `image` and its landmarks moved into it."""
    x0, y0, x1, y1 = _face_box(landmarks, image.shape)
    moved = np.array(landmarks, np.float32, copy=True)
    moved[:, 0] -= x0
    moved[:, 1] -= y0
    return np.ascontiguousarray(image[y0:y1, x0:x1]), moved


# ---------------------------------------------------------------------------------------- building
def build_avatar(pipeline, footages: typing.Sequence[Footage], progress: bool = True,
                 references: typing.Sequence[PathLike] = (), adapt: bool = True, idle: bool = True, bank: bool = True,
                 strict: bool = True) -> Avatar:
    """An avatar from tracked videos of one person (`track_video`); see the module docstring.
    `adapt` / `idle` / `bank` False: without the motion adaptation / the idle loop / the mouth bank
    (all three off: the generic person of `dub --no-enroll`). `strict` False (a dub's own video):
    whatever frames have a face, however few."""
    from avatar.motion.runner import POINTS, rest_pose
    from avatar.person import INNER_SIZE, reference_frames

    seconds = sum(f.good.size / f.fps for f in footages)
    total = sum(len(f.valid) for f in footages)
    found = sum(f.good.size for f in footages)
    if strict and found < MIN_FACE_SHARE * total:
        raise AvatarError(f"{', '.join(f.path for f in footages)}: the face is found in only {found} of {total} frames; "
                          f"enroll from footage where the person stays in view")
    if strict and seconds < MIN_FACE_S:
        raise AvatarError(f"{', '.join(f.path for f in footages)}: a face in only {seconds:.1f} s of video; "
                          f"enroll from at least {MIN_FACE_S:g} s (a minute or two is best)")
    steps = tqdm(total=4, desc="enroll", unit="step", disable=not progress)
    # All usable frames, across the videos: (footage, frame) pairs and their crop landmarks.
    where = [(k, int(i)) for k, f in enumerate(footages) for i in f.good]
    crop_lms = np.stack([footages[k].crop_landmarks[i] for k, i in where]).astype(np.float64)
    frame_lms = [footages[k].frame_landmarks[i] for k, i in where]
    yaw = np.array([float(lm.yaw_degrees(p)) for p in frame_lms])
    frame_of = lambda j: footages[where[j][0]].store[where[j][1]]
    transform_of = lambda j: footages[where[j][0]].transforms[where[j][1]]

    # 1. The identity: rest mouth, references, drift references (face regions), the open mouth.
    rest, anchor = rest_pose(crop_lms)
    picks = reference_frames(crop_lms, RenderConfig.references)  # kept whatever the renderer: the avatar serves them all
    spread = np.linspace(0, len(where) - 1, min(pipeline.config.drift_references, len(where))).round().astype(int)
    drift = [face_region(frame_of(j), frame_lms[j]) for j in spread]
    extra = pipeline.people.reference_photos(references)
    widest = int(np.argmax(lm.mouth_opening(crop_lms) / lm.interocular(crop_lms)))
    inner_source = pipeline.people.inner_source(frame_of(widest), transform_of(widest), crop_lms[widest])
    inner = open_inner(*inner_source, INNER_SIZE)
    identity = Identity([pipeline.aligner.crop(frame_of(j), transform_of(j)) for j in picks], rest, anchor, drift + extra, inner)
    steps.update()

    # 2. The mouth bank: sharp, frontal mouths covering the shapes found (the closed ones too: the
    # renderer draws the entry's lips, and closed lips are drawn best from closed lips).
    mouths = crop_lms[:, POINTS, :2]
    candidates = np.flatnonzero((np.abs(yaw) <= BANK_MAX_YAW) & bank)
    if candidates.size:
        sharp = np.array(pipeline.pool.map(lambda j: _mouth_sharpness(pipeline, frame_of(j), transform_of(j), mouths[j]), candidates))
        candidates = candidates[sharp >= np.quantile(sharp, 0.3)]
    chosen = choose_bank(lip_shape(mouths), candidates)
    if chosen.size:
        side = bank_side([transform_of(j) for j in chosen], pipeline.crop_size, pipeline.config.warp_max_size)
        aligner = FaceAligner(AlignConfig(crop_size=side))
        bank_crops = np.stack([aligner.crop(frame_of(j), rescale_transform(transform_of(j), pipeline.crop_size, side)) for j in chosen])
        identity.bank = MouthBank(bank_crops, rescale_points(mouths[chosen], pipeline.crop_size, side), pipeline.crop_size,
                                  heads=rescale_points(crop_lms[chosen][:, HEAD_POINTS], pipeline.crop_size, side))
    steps.update()

    # 3. The idle loop, from the video with the most usable frames.
    footage = footages[max(range(len(footages)), key=lambda k: footages[k].good.size)]
    loop, loop_summary = (_idle_loop(pipeline, footage) if idle else (None, None))
    steps.update()

    # 4. The motion adaptation, on the footage's own speech and lips.
    speech_seconds, skipped = 0.0, "turned off"
    if adapt:
        identity.adaptation, skipped, speech_seconds = _adapt(pipeline, footages, rest)
    steps.update()
    steps.close()
    summary = {"sources": [f.path for f in footages], "frames": total, "frames_with_face": found, "seconds_used": round(seconds, 2),
               "mouth_shapes": int(chosen.size), "speech_seconds": round(speech_seconds, 2), "idle_loop": loop_summary,
               "adaptation": identity.adaptation.meta() if identity.adaptation is not None else None,
               "adaptation_skipped": None if identity.adaptation is not None else skipped}
    return Avatar(identity, loop, None, summary, inner_source)


def _idle_loop(pipeline, footage: Footage) -> typing.Tuple[IdleLoop, typing.Dict[str, typing.Any]]:
    from avatar.motion.runner import POINTS

    n = len(footage.valid)
    transforms = np.stack([t if t is not None else np.zeros((2, 3)) for t in footage.transforms]).astype(np.float64)
    usable = footage.valid.copy()
    openings = np.full(n, np.nan)
    for i in footage.good:
        usable[i] = abs(float(lm.yaw_degrees(footage.frame_landmarks[i]))) <= pipeline.artifact_check.config.max_yaw_deg
        openings[i] = lm.inner_gap_ratio(footage.crop_landmarks[i][POINTS])
    thumbs = np.stack([cv2.cvtColor(cv2.resize(footage.store[i], (THUMB, THUMB), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
                       for i in range(n)])
    start, stop = choose_loop(thumbs, transforms, openings, usable, footage.fps)
    span = range(start, stop)
    idle = IdleLoop(np.stack([footage.store[i] for i in span]), transforms[start:stop].astype(np.float32),
                    np.stack([footage.crop_landmarks[i] for i in span]).astype(np.float32),
                    np.stack([footage.frame_landmarks[i] for i in span]).astype(np.float32), footage.fps)
    return idle, {"source": footage.path, "start_frame": start, "frames": stop - start, "fps": footage.fps}


def _mouth_sharpness(pipeline, frame: np.ndarray, transform: np.ndarray, mouth: np.ndarray) -> float:
    """Variance of the Laplacian over the lips' box in the canonical crop (motion blur is low)."""
    crop = pipeline.aligner.crop(frame, transform)
    (x0, y0), (x1, y1) = np.floor(mouth[:40].min(0)).astype(int), np.ceil(mouth[:40].max(0)).astype(int)
    patch = cv2.cvtColor(crop[max(0, y0):y1 + 1, max(0, x0):x1 + 1], cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(patch, cv2.CV_32F).var()) if patch.size else 0.0


def _adapt(pipeline, footages: typing.Sequence[Footage], rest: np.ndarray) -> typing.Tuple[typing.Optional[MotionAdaptation], str, float]:
    from avatar.motion.pose import PosedRest
    from avatar.motion.runner import POINTS, closed_frames

    rate = pipeline.encoder.config.sample_rate
    features, general, real, keep = [], [], [], []
    speech_seconds = 0.0
    for footage in footages:
        if footage.samples is None or footage.samples.size < rate // 2:
            continue
        n = len(footage.valid)
        vad = audio_frontend.voice_activity(footage.samples, footage.fps, n, rate) > 0.5
        speech_seconds += float(vad.sum()) / footage.fps
        feats = pipeline.motion.features_for(footage.samples, footage.fps, n)
        features.append(feats)
        general.append(pipeline.motion.predict(feats, rest))
        tracked = np.full((n, len(POINTS), 2), np.nan)
        if footage.good.size:  # the head pose taken out, as the offsets are drawn (`PosedRest.place`)
            faces = np.stack([footage.crop_landmarks[i] for i in footage.good]).astype(np.float64)
            posed = PosedRest.from_frames(faces, rest, closed_frames(faces[..., :2]))
            tracked[footage.good] = rest + np.stack([posed.offsets_of(face) for face in faces])
        real.append(tracked)
        keep.append(vad & footage.valid)
    if not features:
        return None, "no speech in the footage", 0.0
    real_all = np.concatenate(real)
    keep_all = np.concatenate(keep) & np.isfinite(real_all).all(axis=(1, 2))
    adaptation, why = fit_adaptation(np.concatenate(features), np.concatenate(general), np.nan_to_num(real_all), rest, keep_all,
                                     pipeline.motion.models)
    return adaptation, why, speech_seconds


def avatar_from_image(pipeline, image: np.ndarray, landmarks: np.ndarray, what: str,
                      references: typing.Sequence[PathLike] = ()) -> Avatar:
    """A photo-only avatar: the identity of `IdentityBuilder.from_image`, the photo as the still."""
    identity = pipeline.prepare_image(image, landmarks, what=what, extra_references=references)
    identity.drift_references = [face_region(*pair) for pair in identity.drift_references]
    aligned = pipeline.aligner.align(image, landmarks)
    inner_source = pipeline.people.inner_source(image, aligned.transform, aligned.landmarks)
    summary = {"sources": [what], "frames": 1, "frames_with_face": 1, "seconds_used": 0.0, "mouth_shapes": 0, "speech_seconds": 0.0,
               "idle_loop": None, "adaptation": None, "adaptation_skipped": "a photo has no speech"}
    return Avatar(identity, None, (image, np.asarray(landmarks, np.float32)), summary, inner_source)


# ---------------------------------------------------------------------------------------- the file
def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _image(array: np.ndarray, kind: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if kind == ".jpg" else []
    ok, data = cv2.imencode(kind, cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise MediaError(f"could not encode a {kind} image of shape {array.shape}")
    return data.tobytes()


def save_avatar(avatar: Avatar, path: PathLike, inputs: typing.Sequence[PathLike] = ()) -> pathlib.Path:
    """Write `avatar` to `path` (atomically; never over an input)."""
    identity = avatar.identity
    members: typing.Dict[str, bytes] = {
        "identity/rest.npy": _npy(identity.rest.astype(np.float32)),
        "identity/rest_anchor.npy": _npy(np.asarray(identity.rest_anchor, np.float32)),
    }
    for k, crop in enumerate(identity.references):
        members[f"identity/reference_{k}.png"] = _image(crop, ".png")
    for k, (image, points) in enumerate(identity.drift_references):
        members[f"identity/drift_{k}.jpg"] = _image(image, ".jpg")
        members[f"identity/drift_landmarks_{k}.npy"] = _npy(np.asarray(points, np.float32))
    if avatar.inner_source is not None:
        members["identity/inner.png"] = _image(avatar.inner_source[0], ".png")
        members["identity/inner_mouth.npy"] = _npy(np.asarray(avatar.inner_source[1], np.float32))
    bank = identity.bank
    if bank is not None:
        members["bank/mouths.npy"] = _npy(bank.mouths.astype(np.float32))
        if bank.heads is not None:
            members["bank/heads.npy"] = _npy(bank.heads.astype(np.float32))
        for k, crop in enumerate(bank.crops):
            members[f"bank/{k}.png"] = _image(crop, ".png")
    if avatar.idle is not None:
        idle = avatar.idle
        with tempfile.TemporaryDirectory(prefix="avatar-enroll-") as tmp:
            loop = pathlib.Path(tmp) / "loop.mp4"
            media.write_video(loop, idle.frames, idle.fps, crf=14)
            members["idle/loop.mp4"] = loop.read_bytes()
        members["idle/transforms.npy"] = _npy(idle.transforms.astype(np.float32))
        members["idle/crop_landmarks.npy"] = _npy(idle.crop_landmarks.astype(np.float32))
        members["idle/frame_landmarks.npy"] = _npy(idle.frame_landmarks.astype(np.float32))
    if avatar.still is not None:
        members["still/image.png"] = _image(avatar.still[0], ".png")
        members["still/landmarks.npy"] = _npy(np.asarray(avatar.still[1], np.float32))
    adaptation = identity.adaptation
    if adaptation is not None:
        for name, array in adaptation.arrays().items():
            members[f"adaptation/{name}.npy"] = _npy(np.asarray(array, np.float32))
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "engine": f"avatar {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": avatar.summary,
        "identity": {"references": len(identity.references), "drift_references": len(identity.drift_references),
                     "rest_inferred": identity.rest_inferred, "inner": avatar.inner_source is not None},
        "bank": {"entries": len(bank), "crop_size": bank.size, "heads": bank.heads is not None} if bank is not None else None,
        "idle": {"frames": len(avatar.idle), "fps": avatar.idle.fps} if avatar.idle is not None else None,
        "still": avatar.still is not None,
        "adaptation": adaptation.meta() if adaptation is not None else None,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    with media.atomic_output(path, inputs) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=float))
            for name, data in members.items():
                archive.writestr(name, data)
    return pathlib.Path(path)


class _Reader:
    """Members of an avatar file, each checked against the manifest's hash when read."""

    def __init__(self, path: PathLike, archive: zipfile.ZipFile, files: typing.Mapping[str, str]):
        self.path, self.archive, self.files = path, archive, files

    def bytes(self, name: str) -> bytes:
        if name not in self.files:
            raise AvatarError(f"{self.path}: the avatar file lacks {name}; it is damaged, enroll again")
        try:
            data = self.archive.read(name)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise AvatarError(f"{self.path}: cannot read {name} ({exc}); the avatar file is damaged, enroll again") from exc
        if hashlib.sha256(data).hexdigest() != self.files[name]:
            raise AvatarError(f"{self.path}: {name} does not match its checksum; the avatar file is damaged, enroll again")
        return data

    def array(self, name: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.bytes(name)), allow_pickle=False)
        except ValueError as exc:
            raise AvatarError(f"{self.path}: {name} is not a plain array ({exc}); the avatar file is damaged, enroll again") from exc

    def image(self, name: str) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(self.bytes(name), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise AvatarError(f"{self.path}: {name} is not an image; the avatar file is damaged, enroll again")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_avatar(path: PathLike) -> Avatar:
    """Read an avatar file; one-line `AvatarError`s for a missing, corrupt or other-version file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such avatar file; make one with `avatar enroll --video ... --output {path.name}`")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise AvatarError(f"{path}: not an avatar file (not a zip archive); make one with `avatar enroll`") from exc
    with archive:
        try:
            manifest = json.loads(archive.read("manifest.json"))
        except (KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise AvatarError(f"{path}: not an avatar file (no readable manifest); make one with `avatar enroll`") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise AvatarError(f"{path}: not an avatar file (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise AvatarError(f"{path}: an avatar file of format version {manifest.get('version')} (made by "
                              f"{manifest.get('engine', 'another engine')}); this engine reads version {FORMAT_VERSION}: enroll again")
        read = _Reader(path, archive, manifest.get("files") or {})
        ident = manifest["identity"]
        references = [read.image(f"identity/reference_{k}.png") for k in range(int(ident["references"]))]
        drift = [(read.image(f"identity/drift_{k}.jpg"), read.array(f"identity/drift_landmarks_{k}.npy"))
                 for k in range(int(ident["drift_references"]))]
        identity = Identity(references, read.array("identity/rest.npy"), read.array("identity/rest_anchor.npy"), drift,
                            rest_inferred=bool(ident.get("rest_inferred")))
        inner_source = None
        if ident.get("inner"):
            from avatar.person import INNER_SIZE

            inner_source = (read.image("identity/inner.png"), read.array("identity/inner_mouth.npy").astype(np.float64))
            identity.inner = open_inner(*inner_source, INNER_SIZE)
        if manifest.get("bank"):
            mouths = read.array("bank/mouths.npy")
            crops = np.stack([read.image(f"bank/{k}.png") for k in range(int(manifest["bank"]["entries"]))])
            heads = read.array("bank/heads.npy").astype(np.float64) if manifest["bank"].get("heads") else None
            identity.bank = MouthBank(crops, mouths, heads=heads)
        if manifest.get("adaptation"):
            if manifest["adaptation"].get("fit") != ADAPTATION_FIT:
                raise AvatarError(f"{path}: its motion adaptation was fitted on mouths with the head's turn left in (the jaw "
                                  f"drawn sliding with the head's turns); enroll again")
            arrays = {name: read.array(f"adaptation/{name}.npy") for name in ("x_mean", "y_mean", "weights")}
            identity.adaptation = MotionAdaptation.from_parts(arrays, manifest["adaptation"])
        idle = None
        if manifest.get("idle"):
            with tempfile.TemporaryDirectory(prefix="avatar-load-") as tmp:
                loop = pathlib.Path(tmp) / "loop.mp4"
                loop.write_bytes(read.bytes("idle/loop.mp4"))
                frames = np.stack([frame for _, frame in media.iter_video_frames(loop)])
            idle = IdleLoop(frames, read.array("idle/transforms.npy"), read.array("idle/crop_landmarks.npy"),
                            read.array("idle/frame_landmarks.npy"), float(manifest["idle"]["fps"]))
            if not len(idle.frames) == len(idle.transforms) == len(idle.crop_landmarks):
                raise AvatarError(f"{path}: the idle loop's frames and alignments differ in number; the avatar file is damaged, enroll again")
        still = (read.image("still/image.png"), read.array("still/landmarks.npy")) if manifest.get("still") else None
    return Avatar(identity, idle, still, manifest.get("summary") or {}, inner_source, str(path))
