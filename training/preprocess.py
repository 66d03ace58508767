"""Preprocess the real media in `../shared/data` into a compact training cache.

    python -m training.preprocess --src ../shared/data --out cache [--crop-sizes 128 256] [--workers 2]

For every video in `manifest.csv` (kinds `video` and `video_silent` by default) the face is tracked
and aligned, and one folder per clip is written under `<out>/clips/<clip_id>/`:

- `crops_<S>.mp4`: the aligned face crops (S×S, H.264 yuv444p, CRF 16), one per video frame;
- `data.npz`:
  - `timestamps (T,) float64` s; `valid (T,) bool` face found; `reason (T,) uint8` (see REASONS);
  - `transforms (T, 2, 3) float32`: frame → 128-crop similarity (`rescale_transform` for other sizes);
  - `yaw`, `face_px`, ... (below); the landmarks are in `landmarks.bin` (next item);
  - `yaw (T,) float16` degrees, `face_px (T,) float16` face height in source pixels,
    `sharpness (T,) float32` Laplacian variance of the lower face in the 128 crop;
  - with audio: `mel (F, 80) float16` (the whole clip's Wav2Lip mel) and `mel_start (T,) int32`:
    frame i's window is `mel[mel_start[i] : mel_start[i] + 16]` (silence-padded at the ends,
    `avatar.audio.cut_windows`), the per-frame mel windows without storing them 16 times over;
    `vad (T,) float16` voice activity in [0, 1];
- `landmarks.bin`: `(T, 478, 2)` landmarks in 128-crop pixels, lzma-compressed int16 time
  differences at 1/64 px (`training.cache.encode_landmarks`; read with `ClipCache.landmarks()`,
  NaN where no face; about 0.7 kB a frame instead of 1.9 kB as float16);
- `meta.json`: clip id, source file, kind, identity (manifest and person key), split, fps, size,
  frame counts per reason, cache version. Written last: a clip with `meta.json` is complete.

At the top level: `split.json` (train/validation people and clips; see `training/split.py`) and
`summary.json` (frames kept/dropped and why, clips skipped and why, throughput in frames/s).
Resumable: complete clips are skipped. Parallel over clips (`--workers`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import sys
import time
import typing

import cv2
import numpy as np
from tqdm import tqdm

from avatar import audio as audio_frontend
from avatar import media
from avatar.config import AlignConfig, FaceConfig, MelConfig, PreprocessConfig, add_config_arguments, config_from_args
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, rescale_transform, warp_image
from avatar.face.video import align_video
from training.cache import BASE_CROP, encode_landmarks, open_cache
from training.split import VAL_FRACTION, person_key, split_identities

CACHE_VERSION = 4
REASONS = ("kept", "no_face", "profile", "blur", "small")
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".avi", ".m4v"}


def clip_id_for(file: str) -> str:
    """A folder name for a manifest file path: `video/owner__repo/name.mp4` → `video__owner__repo__name`."""
    stem = str(pathlib.PurePosixPath(file).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__"))[:150]


@dataclasses.dataclass
class ClipJob:
    row: typing.Dict[str, str]
    src: pathlib.Path
    out: pathlib.Path
    config: PreprocessConfig
    face: FaceConfig
    split: str


_TRACKER = None


def _worker_tracker(face_config: FaceConfig):
    global _TRACKER
    if _TRACKER is None:
        from avatar.face.tracker import FaceTracker

        _TRACKER = FaceTracker(face_config)
    return _TRACKER


def _lower_face_sharpness(crop: np.ndarray, landmarks: np.ndarray, aligner: FaceAligner) -> float:
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    mask = aligner.lower_face_mask(landmarks, feather=False) > 0.5
    lap = cv2.Laplacian(gray, cv2.CV_32F)
    return float(lap[mask].var()) if mask.any() else 0.0


def process_clip(job: ClipJob) -> typing.Dict[str, typing.Any]:
    """Track, align and cache one clip; returns its summary (also stored as `meta.json`)."""
    row, cfg = job.row, job.config
    clip_id = clip_id_for(row["file"])
    final = job.out / "clips" / clip_id
    meta_path = final / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == CACHE_VERSION and sorted(meta.get("crop_sizes", [])) == sorted(cfg.crop_sizes):
            meta["resumed"] = True
            return meta
    partial = job.out / "clips" / f".{clip_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    path = job.src / row["file"]
    base = {"clip_id": clip_id, "file": row["file"], "kind": row["kind"], "identity": row["identity"],
            "person": person_key(row["identity"], row["file"]), "split": job.split, "source": row.get("source", ""),
            "license": row.get("license", ""), "version": CACHE_VERSION, "crop_sizes": sorted(cfg.crop_sizes)}
    started = time.perf_counter()
    try:
        info = media.probe(path)
        result = _track_and_write(path, partial, job, info.fps or 25.0)
    except AvatarError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        return {**base, "skipped": str(exc), "n_frames": 0, "seconds": time.perf_counter() - started}
    arrays, fps = result
    n = int(arrays["timestamps"].size)
    if info.has_audio and row["kind"] == "video":
        try:
            samples = media.read_audio(path, 16000)
        except AvatarError:
            samples = None
        if samples is not None:
            mel_config = MelConfig()
            arrays["mel"] = audio_frontend.MelFrontend(mel_config)(samples).astype(np.float16)
            arrays["mel_start"] = audio_frontend.timestamp_window_starts(
                arrays["timestamps"], dataclasses.replace(mel_config, window_offset=0)).astype(np.int32)
            arrays["vad"] = audio_frontend.voice_activity(samples, fps, n).astype(np.float16)
    (partial / "landmarks.bin").write_bytes(encode_landmarks(arrays.pop("landmarks"), arrays["valid"]))
    np.savez_compressed(partial / "data.npz", **arrays)
    counts = {name: int((arrays["reason"] == code).sum()) for code, name in enumerate(REASONS)}
    meta = {**base, "fps": fps, "n_frames": n, "width": info.width, "height": info.height,
            "duration": float(n / fps) if fps else 0.0, "has_audio": "mel" in arrays, "frames": counts,
            "seconds": time.perf_counter() - started}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return meta


def _track_and_write(path: pathlib.Path, folder: pathlib.Path, job: ClipJob, fps: float):
    """Track and align every frame, write the crop videos; returns (per-frame arrays, fps)."""
    cfg = job.config
    tracker = _worker_tracker(job.face)
    aligner = FaceAligner(AlignConfig(crop_size=BASE_CROP))
    columns: typing.Dict[str, list] = {k: [] for k in ("timestamps", "valid", "transforms", "landmarks", "yaw", "face_px", "sharpness")}
    pending = []  # frames before the first face: cropped with the first face's transform

    def record(frame, transform: np.ndarray) -> None:
        columns["timestamps"].append(frame.timestamp)
        columns["valid"].append(frame.valid)
        columns["transforms"].append(transform.astype(np.float32))
        if frame.valid:
            points = frame.aligned.landmarks
            columns["landmarks"].append(points[:, :2].astype(np.float32))
            columns["yaw"].append(float(lm.yaw_degrees(points)))
            columns["face_px"].append(float(np.ptp(frame.frame_landmarks[:, 1])))
            columns["sharpness"].append(_lower_face_sharpness(frame.aligned.crop, points, aligner))
        else:
            columns["landmarks"].append(np.full((lm.N_LANDMARKS, 2), np.nan, np.float32))
            for key in ("yaw", "face_px", "sharpness"):
                columns[key].append(np.nan)

    with contextlib.ExitStack() as stack:
        writers = {size: stack.enter_context(media.VideoWriter(
            folder / f"crops_{size}.mp4", fps, crf=cfg.crop_crf, preset="fast", pix_fmt="yuv444p"))
            for size in cfg.crop_sizes}

        def write_crops(image: np.ndarray, transform: np.ndarray, base_crop: typing.Optional[np.ndarray] = None) -> None:
            for size, writer in writers.items():
                if size == BASE_CROP and base_crop is not None:
                    writer.write(base_crop)
                else:
                    writer.write(warp_image(image, rescale_transform(transform, BASE_CROP, size), size))

        frames = align_video(media.iter_video_frames(path), job.face, AlignConfig(crop_size=BASE_CROP),
                             tracker=tracker, what=str(path))
        for frame in frames:
            if frame.aligned is None:
                pending.append(frame)
                continue
            for early in pending:
                write_crops(early.image, frame.aligned.transform)
                record(early, frame.aligned.transform)
            pending.clear()
            write_crops(frame.image, frame.aligned.transform, frame.aligned.crop)
            record(frame, frame.aligned.transform)

    arrays = {
        "timestamps": np.array(columns["timestamps"], np.float64),
        "valid": np.array(columns["valid"], bool),
        "transforms": np.stack(columns["transforms"]).astype(np.float32),
        "landmarks": np.stack(columns["landmarks"]),
        "yaw": np.array(columns["yaw"], np.float16),
        "face_px": np.array(columns["face_px"], np.float16),
        "sharpness": np.array(columns["sharpness"], np.float32),
    }
    arrays["reason"] = frame_reasons(arrays, cfg, job.face)
    return arrays, float(fps)


def frame_reasons(arrays: typing.Dict[str, np.ndarray], cfg: PreprocessConfig, face: FaceConfig) -> np.ndarray:
    """Why each frame is kept (0) or dropped: no face, profile (|yaw| too large), blur (lower face
    much less sharp than the clip's median), small (face below the minimum size). `(T,) uint8`."""
    reason = np.zeros(arrays["valid"].shape, np.uint8)
    valid = arrays["valid"]
    sharp = arrays["sharpness"]
    median = float(np.nanmedian(sharp[valid])) if valid.any() else 0.0
    with np.errstate(invalid="ignore"):
        small = valid & (arrays["face_px"].astype(np.float32) < face.min_face_size)
        blur = valid & (sharp < cfg.min_sharpness_ratio * median)
        profile = valid & (np.abs(arrays["yaw"].astype(np.float32)) > cfg.max_yaw_deg)
    reason[small] = REASONS.index("small")
    reason[blur] = REASONS.index("blur")
    reason[profile] = REASONS.index("profile")
    reason[~valid] = REASONS.index("no_face")
    return reason


def read_manifest(src: pathlib.Path, kinds: typing.Sequence[str], suffixes: typing.Optional[typing.Collection[str]] = VIDEO_SUFFIXES
                  ) -> typing.List[typing.Dict[str, str]]:
    """The manifest rows of the given kinds whose files end in one of `suffixes` (None: any)."""
    manifest = src / "manifest.csv"
    if not manifest.exists():
        raise AvatarError(f"{manifest}: not found; --src must be the shared data folder holding manifest.csv")
    with manifest.open(newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["kind"] in kinds and (suffixes is None or pathlib.PurePosixPath(r["file"]).suffix.lower() in suffixes)]
    return rows


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("../shared/data"), help="shared data folder (with manifest.csv)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="cache folder to write")
    parser.add_argument("--clips", nargs="*", default=None, help="only files whose manifest path contains one of these")
    add_config_arguments(parser, PreprocessConfig, "")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, PreprocessConfig, "")
    try:
        rows = read_manifest(args.src, cfg.kinds)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.clips:
        rows = [r for r in rows if any(c in r["file"] for c in args.clips)]
    if not rows:
        print("error: no clips match; check --src, --kinds and --clips", file=sys.stderr)
        return 2
    # The split is a property of each person (a keyed hash), computed over the whole manifest so that
    # it does not depend on --kinds or --clips.
    everyone = {person_key(r["identity"], r["file"]) for r in read_manifest(args.src, ("video", "video_silent"))}
    split = split_identities(everyone, cfg.val_seed)
    val_people = set(split["val"])
    face = FaceConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [ClipJob(r, args.src, args.out, cfg, face,
                    "val" if person_key(r["identity"], r["file"]) in val_people else "train")
            for r in sorted(rows, key=lambda r: -float(r["duration_s"] or 0))]
    started = time.perf_counter()
    results = []
    context = multiprocessing.get_context("spawn")
    progress = tqdm(total=len(jobs), desc="clips", unit="clip")
    if cfg.workers > 1:
        with context.Pool(cfg.workers) as pool:
            for meta in pool.imap_unordered(process_clip, jobs):
                results.append(meta)
                progress.set_postfix(frames=sum(m.get("n_frames", 0) for m in results))
                progress.update()
    else:
        for job in jobs:
            results.append(process_clip(job))
            progress.set_postfix(frames=sum(m.get("n_frames", 0) for m in results))
            progress.update()
    progress.close()
    elapsed = time.perf_counter() - started
    summary = {"kinds": list(cfg.kinds), "clips_filter": args.clips, **summarise(results, elapsed)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    cached = [clip.meta for clip in open_cache(args.out)]  # every complete clip, from this run or earlier ones
    clips_by_split = {name: sorted(m["clip_id"] for m in cached if m["split"] == name) for name in ("train", "val")}
    (args.out / "split.json").write_text(json.dumps(
        {"seed": cfg.val_seed, "fraction": VAL_FRACTION, "people": split, "clips": clips_by_split}, indent=1))
    print_summary(summary, args.out)
    return 0


def summarise(results: typing.List[typing.Dict[str, typing.Any]], elapsed: float) -> typing.Dict[str, typing.Any]:
    done = [m for m in results if not m.get("skipped")]
    fresh = [m for m in done if not m.get("resumed")]
    frames = {name: sum(m["frames"][name] for m in done) for name in REASONS}
    fresh_frames = sum(m["n_frames"] for m in fresh)
    return {
        "clips": len(done), "clips_resumed": len(done) - len(fresh),
        "clips_skipped": {m["clip_id"]: m["skipped"] for m in results if m.get("skipped")},
        "frames_total": sum(frames.values()), "frames_kept": frames["kept"],
        "frames_dropped": {k: v for k, v in frames.items() if k != "kept"},
        "seconds": elapsed, "frames_processed": fresh_frames,
        "frames_per_second": fresh_frames / elapsed if elapsed > 0 else 0.0,
        "video_seconds": sum(m["duration"] for m in done),
    }


def print_summary(summary: typing.Dict[str, typing.Any], out: pathlib.Path) -> None:
    dropped = ", ".join(f"{k} {v}" for k, v in summary["frames_dropped"].items())
    print(f"{summary['clips']} clips ({summary['clips_resumed']} resumed), {summary['frames_total']} frames: "
          f"kept {summary['frames_kept']}, dropped {dropped}")
    for clip, why in summary["clips_skipped"].items():
        print(f"skipped {clip}: {why}")
    print(f"{summary['frames_processed']} frames in {summary['seconds']:.1f} s = {summary['frames_per_second']:.1f} frames/s")
    print(f"cache written to {out}")


if __name__ == "__main__":
    sys.exit(main())
