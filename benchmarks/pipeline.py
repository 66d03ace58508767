"""End-to-end speed of `avatar dub` and `avatar animate` on this machine, per stage, as ratios to
real time (audio seconds / wall seconds; > 1 is faster than real time).

    python -m benchmarks.pipeline [--seconds 10] [--threads 0] [--workers 0] [--renderer retrieval|warp|diffusion] [--preset veryfast] [--crf 17]

Dub: a 512² talking clip from ../shared/data re-lip-synced to its own speech. Animate: a real
portrait from ../shared/data with the same speech. Both write real files (H.264 + AAC) and run the
drift monitor and watermark, as the commands do.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from avatar import media
from avatar.config import X264_PRESETS, PipelineConfig
from avatar.pipeline import AvatarPipeline
from avatar.render.renderers import RENDERERS

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def show(name: str, result) -> None:
    audio = result.audio_seconds
    print(f"\n{name}: {result.frames} frames, {audio:.1f} s of speech, {result.seconds:.1f} s wall "
          f"= {audio / result.seconds:.2f}× real time (providers {', '.join(result.report['providers'])})")
    for stage, seconds in sorted(result.report["stages_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<8} {seconds:7.2f} s  {audio / max(seconds, 1e-9):8.2f}× real time  {1000 * seconds / result.frames:7.1f} ms/frame")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=pathlib.Path, default=DATA / "video/OpenTalker__SadTalker/WDA_KatieHill_000.mp4")
    parser.add_argument("--image", type=pathlib.Path, default=DATA / "faces/ageitgey__face_recognition/obama.jpg")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("--workers", type=int, default=PipelineConfig.workers, help="threads for the per-frame CPU work (0: one per core)")
    parser.add_argument("--renderer", choices=RENDERERS, default=PipelineConfig.renderer)
    parser.add_argument("--preset", choices=X264_PRESETS, default=PipelineConfig.preset, help="x264 preset of the outputs")
    parser.add_argument("--crf", type=int, default=PipelineConfig.crf, help="H.264 quality of the outputs (lower is better)")
    args = parser.parse_args(argv)
    config = PipelineConfig(threads=args.threads, workers=args.workers, renderer=args.renderer, preset=args.preset, crf=args.crf)
    pipeline = AvatarPipeline.from_pretrained(config=config)
    info = media.probe(args.video)
    print(f"clip: {args.video.name} {info.width}x{info.height} at {info.fps:g} fps; portrait: {args.image.name}; "
          f"{args.renderer} renderer, x264 preset {args.preset} at crf {args.crf}")
    with tempfile.TemporaryDirectory() as tmp:
        clip = media.read_video(args.video, max_frames=int(args.seconds * info.fps))
        source = pathlib.Path(tmp) / "clip.mp4"
        media.write_video(source, clip.frames, clip.fps, clip.audio[: int(len(clip.frames) / clip.fps * 16000)], crf=12)
        speech = pathlib.Path(tmp) / "speech.wav"
        media.write_audio(speech, media.read_audio(source))
        show("dub", pipeline.dub(source, speech, pathlib.Path(tmp) / "dub.mp4", progress=False))
        show("animate", pipeline.animate(args.image, speech, pathlib.Path(tmp) / "animate.mp4", progress=False))


if __name__ == "__main__":
    main()
