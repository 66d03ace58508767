"""Front-end speed on this machine, as ratios to real time (> 1 means faster than real time).

    python -m benchmarks.frontends [--video PATH] [--seconds 8]

Stages, each on real media from ../shared/data: audio decode + resample, batch mel, streaming mel
in 20 ms chunks (the live path), voice activity, video decode, face tracking (mesh + smoothing),
alignment crop, paste-back, the identity embedding of the drift checks (onnxruntime, and dlib's own
network for comparison), H.264 + AAC encode. One process, one thread per stage as run.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import dlib
import numpy as np

from avatar import audio, media
from avatar.config import AlignConfig
from avatar.face.align import FaceAligner
from avatar.face.video import align_video
from avatar.identity import EMBEDDING_MODEL, FaceEmbedder, face_model_file

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def timed(fn, repeat=3):
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=pathlib.Path, default=DATA / "video/OpenTalker__SadTalker/WDA_KatieHill_000.mp4")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    info = media.probe(args.video)
    n_frames = int(args.seconds * info.fps)
    rows = []

    def report(stage, seconds, media_seconds, note=""):
        rows.append((stage, media_seconds / seconds, seconds, note))

    t, samples = timed(lambda: media.read_audio(args.video, 16000))
    duration = samples.size / 16000
    report("audio decode + resample", t, duration)
    t, mel = timed(lambda: audio.MelFrontend()(samples))
    report("mel (batch)", t, duration)

    def stream():
        frontend = audio.StreamingMelWindows(info.fps)
        for start in range(0, samples.size, 320):
            frontend.push(samples[start : start + 320])
        frontend.flush()
    t, _ = timed(stream, repeat=1)
    report("mel windows (streaming, 20 ms chunks)", t, duration, f"look-ahead {audio.StreamingMelWindows(info.fps).lookahead_ms:.1f} ms")
    t, _ = timed(lambda: audio.voice_activity(samples, info.fps))
    report("voice activity", t, duration)

    def decode():
        return [frame for i, (_, frame) in zip(range(n_frames), media.iter_video_frames(args.video))]
    t, frames = timed(decode)
    video_seconds = len(frames) / info.fps
    report(f"video decode {info.width}x{info.height}", t, video_seconds)
    t, aligned = timed(lambda: list(align_video(((i / info.fps, f) for i, f in enumerate(frames)))), repeat=1)
    report("face tracking + smoothing + 128 crop", t, video_seconds, "mediapipe face mesh, 478 points")
    aligner = FaceAligner(AlignConfig(crop_size=128))
    t, _ = timed(lambda: [aligner.align(a.image, a.frame_landmarks, a.aligned.transform) for a in aligned])
    report("alignment crop 128", t, video_seconds)
    masks = [aligner.lower_face_mask(a.aligned.landmarks) for a in aligned]
    t, pasted = timed(lambda: [aligner.paste_back(a.image, a.aligned.crop, a.aligned.transform, m) for a, m in zip(aligned, masks)])
    report("lower-face mask paste-back", t, video_seconds)
    embedder = FaceEmbedder()
    faces = [a for a in aligned if a.valid]
    t, _ = timed(lambda: [embedder.embed(a.image, a.frame_landmarks) for a in faces])
    report("identity embedding, every frame (onnxruntime)", t, len(faces) / info.fps, f"{1000 * t / len(faces):.1f} ms a face")
    dlib_network = dlib.face_recognition_model_v1(str(face_model_file(EMBEDDING_MODEL)))

    def through_dlib():  # the same chips through dlib's own network (the wheel has no BLAS)
        for a in faces:
            x0, y0 = a.frame_landmarks[:, :2].min(axis=0)
            x1, y1 = a.frame_landmarks[:, :2].max(axis=0)
            image = np.ascontiguousarray(a.image)
            shape = embedder.shape_predictor(image, dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
            dlib_network.compute_face_descriptor(dlib.get_face_chip(image, shape, size=150, padding=0.25))
    t, _ = timed(through_dlib, repeat=1)
    report("identity embedding, every frame (dlib)", t, len(faces) / info.fps, f"{1000 * t / len(faces):.1f} ms a face")
    out = pathlib.Path("/tmp/avatar_bench_encode.mp4")
    t, _ = timed(lambda: media.write_video(out, pasted, info.fps, samples[: int(video_seconds * 16000)]), repeat=1)
    report(f"H.264 + AAC encode {info.width}x{info.height}", t, video_seconds)
    out.unlink(missing_ok=True)

    print(f"front-end speed on {args.video.name} ({info.width}x{info.height}, {info.fps:g} fps, {video_seconds:.1f} s of video)")
    print(f"{'stage':44s} {'x real time':>12s} {'seconds':>9s}")
    for stage, ratio, seconds, note in rows:
        print(f"{stage:44s} {ratio:12.1f} {seconds:9.3f}  {note}")
    per_frame = sum(r[2] for r in rows if r[0].startswith(("face", "alignment", "lower", "video decode", "H.264"))) / len(frames)
    print(f"video path per frame: {1000 * per_frame:.1f} ms = {1 / per_frame / info.fps:.2f}x real time at {info.fps:g} fps")


if __name__ == "__main__":
    main()
