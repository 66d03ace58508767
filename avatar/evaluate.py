"""`avatar eval`: the model cards' metrics for any generated/real pair of videos.

Both videos are tracked with the same face front-end and aligned to the canonical 128² crop; frame i
of one is compared with frame i of the other (up to the shorter). Metrics:
- mouth_landmark_distance: lips and jaw measured from the mouth anchor (so head motion does not
  count), mean absolute difference in % of the inter-ocular distance; lips_distance: the same for
  the 40 lip points alone (the jaw line is the least certain part of a tracked mesh);
- mouth_distance_in_head: the same lips and jaw with each frame's head pose (yaw, pitch, roll) taken
  out through the mesh's 3D points (`mouth_distance_in_head`), so that two videos whose heads turn
  differently (a dub of a picture played backwards against the real video) differ by the mouth alone;
- mouth_opening_r: Pearson r of the inner-lip gaps (over the inter-ocular distance);
- mouth_opening_r_second_tracker (with `second_tracker`): the same r through an independent tracker,
  dlib's 68 points (`avatar.face.dlib_shape`), so that a mouth only the engine's own tracker reads
  does not score;
- identity_distance: dlib embedding distance of sampled generated frames to the reference photo
  (or, without one, to sampled frames of the real video); same person typically < 0.6;
- sharpness_ratio: Laplacian variance of the lower face, generated / real (≥ 0.8 is sharp enough);
- flicker_ratio: mean absolute frame-to-frame change of the lower face, generated / real;
- artifact_frames: the frames that fail the per-frame artifact check (`avatar/artifacts.py`, the one
  `animate` and `dub` run on every frame), the real frame standing in for the renderer's input and
  the repaint region being the lower face as it is in either video;
- av_offset_ms: where the generated video's mouth opening best matches the opening that the motion
  model predicts from the generated video's own audio, searched over ±`max_offset_frames`
  (positive: the picture is late). The same estimate for the real video is given beside it.
"""

from __future__ import annotations

import dataclasses
import os
import typing

import numpy as np
from tqdm import tqdm

from avatar import media
from avatar.artifacts import ArtifactCheck
from avatar.config import AlignConfig, ArtifactConfig, FaceConfig
from avatar.errors import MediaError, NoFaceError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner
from avatar.metrics import mouth_landmark_distance, pearson, sharpness

PathLike = typing.Union[str, os.PathLike]
CROP = 128


@dataclasses.dataclass
class TrackedVideo:
    """crops `(T, S, S, 3) uint8`; landmarks `(T, 478, 3)` crop pixels (NaN without a face);
    frames: a few sampled `(frame, frame landmarks)` pairs for identity; fps; audio (16 kHz) or None."""

    crops: np.ndarray
    landmarks: np.ndarray
    samples: typing.List[typing.Tuple[np.ndarray, np.ndarray]]
    fps: float
    audio: typing.Optional[np.ndarray]


def track_video(path: PathLike, max_frames: int, sample_every_s: float = 0.5, progress: bool = False,
                face_config: FaceConfig = FaceConfig()) -> TrackedVideo:
    from avatar.face.video import align_video

    info = media.probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video track; eval compares two videos")
    fps = info.fps or 25.0
    step = max(1, int(round(sample_every_s * fps)))
    crops, points, samples = [], [], []
    frames = (item for _, item in zip(range(max_frames), media.iter_video_frames(path)))
    total = min(max_frames, info.n_frames) if info.n_frames else None
    for item in tqdm(align_video(frames, face_config, AlignConfig(crop_size=CROP), what=str(path)), total=total,
                     desc=f"tracking {os.path.basename(str(path))}", unit="frame", disable=not progress):
        if item.valid:
            crops.append(item.aligned.crop)
            points.append(item.aligned.landmarks)
            if item.index % step == 0:
                samples.append((item.image, item.frame_landmarks))
        else:
            crops.append(np.zeros((CROP, CROP, 3), np.uint8))
            points.append(np.full((lm.N_LANDMARKS, 3), np.nan, np.float32))
    if not samples:
        raise NoFaceError(f"{path}: no face found; eval needs a visible face in both videos")
    audio = media.read_audio(path) if info.has_audio else None
    return TrackedVideo(np.stack(crops), np.stack(points), samples, fps, audio)


def _lower_face_regions(landmarks: np.ndarray, aligner: FaceAligner) -> np.ndarray:
    return np.stack([aligner.lower_face_mask(p, feather=False) > 0.5 if np.isfinite(p).all() else np.zeros((CROP, CROP), bool)
                     for p in landmarks])


def _sharpness(crops: np.ndarray, regions: np.ndarray, keep: np.ndarray) -> float:
    values = [sharpness(c, r) for c, r, k in zip(crops, regions, keep) if k and r.any()]
    return float(np.mean(values)) if values else float("nan")


def _flicker(crops: np.ndarray, regions: np.ndarray, keep: np.ndarray) -> float:
    values = [np.abs(crops[i].astype(np.float32) - crops[i - 1].astype(np.float32))[regions[i] & regions[i - 1]].mean()
              for i in range(1, len(crops)) if keep[i] and keep[i - 1] and (regions[i] & regions[i - 1]).any()]
    return float(np.mean(values)) if values else float("nan")


def estimate_av_offset(video: TrackedVideo, predictor, max_offset_frames: int = 8) -> typing.Optional[typing.Dict[str, float]]:
    """Best shift (frames, ms; positive: picture late) between the video's measured mouth opening and
    the motion model's (`predictor`, a MotionPredictor) prediction from its own audio, with the
    correlation there. None without audio."""
    from avatar.motion.runner import rest_pose

    keep = np.isfinite(video.landmarks).all(axis=(1, 2))
    if video.audio is None or keep.sum() < 2 * max_offset_frames + 4:
        return None
    rest, _ = rest_pose(video.landmarks, keep)
    predicted = predictor.from_audio(video.audio, video.fps, rest, len(video.landmarks))
    predicted_gap = lm.inner_gap(predicted)
    measured_gap = np.where(keep, lm.mouth_opening(np.nan_to_num(video.landmarks)), np.nan)
    scores = {}
    for shift in range(-max_offset_frames, max_offset_frames + 1):
        a = measured_gap[max(0, shift): len(measured_gap) + min(0, shift)]
        b = predicted_gap[max(0, -shift): len(predicted_gap) + min(0, -shift)]
        ok = np.isfinite(a)
        if ok.sum() > 8:
            scores[shift] = pearson(a[ok], b[ok])
    if not scores:
        return None
    best = max(scores, key=scores.get)
    return {"frames": float(best), "ms": 1000.0 * best / video.fps, "r": float(scores[best])}


def artifact_frames(gen: TrackedVideo, ref: TrackedVideo, both: np.ndarray, aligner: FaceAligner,
                    config: ArtifactConfig = ArtifactConfig()) -> typing.List[typing.Dict[str, typing.Any]]:
    """`{"frame", "t", "why"}` of the generated frames that fail the artifact check against the real ones."""
    check = ArtifactCheck(config)
    failed = []
    for i in np.flatnonzero(both):
        real_points, generated_points = ref.landmarks[i][:, :2], gen.landmarks[i][:, :2]
        verdict = check(gen.crops[i], ref.crops[i], aligner.repaint_mask(real_points, generated_points), real_points, generated_points)
        if not verdict.ok:
            failed.append({"frame": int(i), "t": round(float(i) / gen.fps, 3), "why": str(verdict)})
    return failed


def _mouths_in_head(generated: np.ndarray, real: np.ndarray) -> typing.Tuple[np.ndarray, np.ndarray, float]:
    """Both videos' mouth and jaw `(T, 59, 2)` in the real video's first head's coordinates, relative
    to the mouth anchor, and that head's inter-ocular distance."""
    from avatar.motion.pose import HEAD_POINTS, in_head

    head = np.asarray(real[0], np.float64)[HEAD_POINTS]
    anchor = np.r_[lm.MOUTH_ANCHOR]
    mouths = []
    for faces in (generated, real):
        points = [in_head(f, head, np.r_[lm.MOUTH_AND_JAW, anchor])[:, :2] for f in faces]
        mouths.append(np.stack([p[:len(lm.MOUTH_AND_JAW)] - p[len(lm.MOUTH_AND_JAW):].mean(0) for p in points]))
    iod = float(np.linalg.norm((head[2, :2] + head[3, :2] - head[0, :2] - head[1, :2]) / 2))  # HEAD_POINTS starts with the eye corners
    return mouths[0], mouths[1], iod


def mouth_distance_in_head(generated: np.ndarray, real: np.ndarray) -> typing.Tuple[float, float]:
    """Mouth and jaw distance with each frame's head pose taken out (`avatar.motion.pose.in_head`: the
    face mesh's 3D points brought into one head's coordinates, the real video's first frame's):
    `generated, real (T, 478, 3)` → (mean |Δ| per coordinate (x, y, relative to the mouth anchor), %
    of the inter-ocular distance; Pearson r of the inner-lip gaps there). Unlike the measures in the
    picture, two videos whose heads turn differently (a picture played backwards) are compared on the
    mouth alone."""
    ours, theirs, iod = _mouths_in_head(generated, real)
    gap = lambda mouths: lm.inner_gap(mouths)
    return mouth_landmark_distance(ours, theirs, iod), pearson(gap(ours), gap(theirs))


def second_tracker_openings(tracker, path: PathLike, max_frames: int, progress: bool = False) -> np.ndarray:
    """The first `max_frames` frames' mouth openings `(T,) float64` through `tracker`, dlib's 68 points
    (`avatar.face.dlib_shape.DlibMouthTracker`), NaN where it finds no face."""
    frames = (image for _, (_, image) in zip(range(max_frames), media.iter_video_frames(path)))
    return tracker.openings(tqdm(frames, desc=f"dlib {os.path.basename(str(path))}", unit="frame", disable=not progress))


def evaluate_pair(generated: PathLike, real: PathLike, reference: typing.Optional[PathLike] = None,
                  max_frames: int = 1500, progress: bool = False, second_tracker: bool = False) -> typing.Dict[str, typing.Any]:
    """The metrics of the module docstring (JSON-ready)."""
    from avatar.identity import FaceEmbedder
    from avatar.motion.runner import MotionPredictor

    gen = track_video(generated, max_frames, progress=progress)
    ref = track_video(real, max_frames, progress=progress)
    n = min(len(gen.landmarks), len(ref.landmarks))
    g, r = gen.landmarks[:n], ref.landmarks[:n]
    both = np.isfinite(g).all(axis=(1, 2)) & np.isfinite(r).all(axis=(1, 2))
    if both.sum() < 2:
        raise NoFaceError("fewer than two frames have a face in both videos; nothing to compare")
    relative = lambda points: points[:, lm.MOUTH_AND_JAW, :2] - lm.mouth_anchor(points)[:, None]
    iod = lm.interocular(r[both])
    distance = mouth_landmark_distance(relative(g[both]), relative(r[both]), iod)
    lips = len(lm.LIPS_OUTER) + len(lm.LIPS_INNER)  # MOUTH_AND_JAW starts with the lips
    lips_distance = mouth_landmark_distance(relative(g[both])[:, :lips], relative(r[both])[:, :lips], iod)
    opening_r = pearson(lm.mouth_opening(g[both]) / lm.interocular(g[both]), lm.mouth_opening(r[both]) / iod)
    head_distance, head_opening_r = mouth_distance_in_head(g[both], r[both])

    aligner = FaceAligner(AlignConfig(crop_size=CROP))
    regions_g, regions_r = _lower_face_regions(g, aligner), _lower_face_regions(r, aligner)
    sharp = _sharpness(gen.crops[:n], regions_g, both) / max(_sharpness(ref.crops[:n], regions_r, both), 1e-9)
    flicker = _flicker(gen.crops[:n], regions_g, both) / max(_flicker(ref.crops[:n], regions_r, both), 1e-9)
    artifacts = artifact_frames(gen, ref, both, aligner)

    embedder = FaceEmbedder()
    if reference is not None:
        from avatar.face.tracker import FaceTracker

        photo = media.read_image(reference)
        with FaceTracker() as tracker:
            reference_embeddings = [embedder.embed(photo, tracker.select(photo, what=str(reference)).landmarks)]
    else:
        reference_embeddings = [embedder.embed(image, points) for image, points in ref.samples]
    identity = [min(float(np.linalg.norm(embedder.embed(image, points) - e)) for e in reference_embeddings) for image, points in gen.samples]
    predictor = MotionPredictor()
    second = {}
    if second_tracker:
        from avatar.face.dlib_shape import DlibMouthTracker

        tracker = DlibMouthTracker()
        ours, theirs = (second_tracker_openings(tracker, path, n, progress) for path in (generated, real))
        found = np.isfinite(ours) & np.isfinite(theirs)
        second = {"mouth_opening_r_second_tracker": pearson(ours[found], theirs[found]) if found.sum() >= 2 else float("nan"),
                  "frames_compared_second_tracker": int(found.sum())}
    return {
        "generated": str(generated), "real": str(real), "reference": str(reference) if reference else None,
        "frames_compared": int(both.sum()), "frames_generated": len(gen.landmarks), "frames_real": len(ref.landmarks),
        "mouth_landmark_distance_pct_iod": distance, "lips_distance_pct_iod": lips_distance, "mouth_opening_r": opening_r,
        "mouth_distance_in_head_pct_iod": head_distance, "mouth_opening_r_in_head": head_opening_r,
        "identity_distance": float(np.mean(identity)), "identity_distance_max": float(np.max(identity)),
        "sharpness_ratio": float(sharp), "flicker_ratio": float(flicker), "artifact_frames": artifacts,
        "av_offset_generated": estimate_av_offset(gen, predictor), "av_offset_real": estimate_av_offset(ref, predictor),
        **second,
    }


def format_evaluation(result: typing.Dict[str, typing.Any]) -> str:
    def offset(entry):
        return "n/a (no audio)" if entry is None else f"{entry['ms']:+.0f} ms (r {entry['r']:.2f})"

    return "\n".join([
        f"frames compared: {result['frames_compared']} (generated {result['frames_generated']}, real {result['frames_real']})",
        f"mouth landmark distance: {result['mouth_landmark_distance_pct_iod']:.2f} % of the inter-ocular distance "
        f"(lips alone {result['lips_distance_pct_iod']:.2f} %; head pose taken out {result['mouth_distance_in_head_pct_iod']:.2f} %)",
        f"mouth-opening correlation: r = {result['mouth_opening_r']:.3f}"
        + (f" (dlib's 68 points: r = {result['mouth_opening_r_second_tracker']:.3f} over {result['frames_compared_second_tracker']} frames)"
           if "mouth_opening_r_second_tracker" in result else ""),
        f"identity distance: {result['identity_distance']:.3f} mean, {result['identity_distance_max']:.3f} worst (same person < 0.6)",
        f"sharpness ratio: {result['sharpness_ratio']:.2f} (≥ 0.8 is sharp enough)",
        f"flicker ratio: {result['flicker_ratio']:.2f} (1 = as steady as the real video)",
        f"artifact check: {len(result['artifact_frames'])} of {result['frames_compared']} frames fail"
        + "".join(f"\n  {item['t']:.2f} s: {item['why']}" for item in result["artifact_frames"][:10])
        + ("\n  ..." if len(result["artifact_frames"]) > 10 else ""),
        f"A/V offset: generated {offset(result['av_offset_generated'])}, real {offset(result['av_offset_real'])} (positive: picture late)",
    ])
