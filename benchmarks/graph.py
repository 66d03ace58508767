"""The frame graph against the per-frame path: frames/s of whole renders (from the frames' face
regions to the finished regions) at several batch sizes, and the host's share of the graph's time.

    python -m benchmarks.graph [--batches 1 8 32 64] [--seconds 3] [--renderers warp diffusion] [--image PHOTO] [--out FILE.json]

Jobs: the sample portrait (`assets/samples/portrait.jpg`, 512², the face about 250 px; it travels with
the checkout, so this runs on a lent GPU host too) with the mouth opening step by step over 8 jobs,
repeated to the batch size. Rows per renderer: the per-frame path (`make_renderer`, the pipeline's defaults: the
warp at the face's own resolution, its CPU work on a thread pool) and the graph (`GraphRenderer`, one
onnxruntime call per batch on the best provider here). Printed: ms per frame, frames/s, the 25 fps
streams that rate could feed (frames/s ÷ 25), and for the graph the host's milliseconds per frame
outside the onnxruntime call (preparing its inputs at the crop's side, padding, slicing the regions).
"""

from __future__ import annotations

import argparse
import pathlib
import time
import typing

import numpy as np

from avatar import media
from avatar.config import PipelineConfig
from avatar.face import landmarks as lm
from avatar.face.video import align_video
from avatar.pipeline import AvatarPipeline
from avatar.render.base import FrameJob, RenderBatch
from avatar.render.graph import GraphRenderer
from avatar.render.renderers import make_renderer
from avatar.runtime import ASSETS
from benchmarks import write_rows

STREAM_FPS = 25.0


def real_jobs(pipeline: AvatarPipeline, image: pathlib.Path, count: int = 8):
    """`count` jobs on a real photo, the lower inner lip dropped 0-14 px, and the person."""
    tracked = [t for t in align_video([(0.0, media.read_image(image))]) if t.valid]
    if not tracked:
        raise SystemExit(f"error: {image}: no face found")
    t = tracked[0]
    identity = pipeline.prepare_image(t.image, t.frame_landmarks)
    jobs = []
    for k in range(count):
        mouth = identity.rest.copy()
        mouth[20:40, 1] += np.where(np.arange(20) > 10, 2.0 * k, 0.0)
        jobs.append(FrameJob(t.image, t.aligned.transform, t.aligned.landmarks, t.frame_landmarks,
                             mouth + (lm.mouth_anchor(t.aligned.landmarks) - identity.rest_anchor)))
    return jobs, identity


def time_renders(render: typing.Callable[[RenderBatch], typing.Any], batch: RenderBatch, seconds: float,
                 session: typing.Optional["TimedSession"] = None) -> typing.Tuple[float, float]:
    """Mean seconds per call after one warm-up call, over at least `seconds` and 3 calls, and of those
    the seconds inside `session.run` (0 without one)."""
    render(batch)
    if session is not None:
        session.seconds = 0.0
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        render(batch)
        calls += 1
    return (time.perf_counter() - start) / calls, (session.seconds / calls if session is not None else 0.0)


class TimedSession:
    """An OnnxSession whose `run` time is added up."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, **inputs):
        start = time.perf_counter()
        try:
            return self.session.run(**inputs)
        finally:
            self.seconds += time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--renderers", nargs="+", choices=("warp", "diffusion"), default=["warp", "diffusion"])
    parser.add_argument("--image", type=pathlib.Path, default=ASSETS / "samples" / "portrait.jpg")
    parser.add_argument("--out", type=pathlib.Path, help="also write the figures here (JSON)")
    parser.add_argument("--save-inputs", type=pathlib.Path,
                        help="also save each renderer's graph inputs for the 8 jobs and the ONNX outputs on them (npz), "
                             "for `python -m benchmarks.graph_cuda` on a host without our front-ends")
    args = parser.parse_args(argv)
    rows, saved = [], {}
    print(f"{'renderer':>9} {'path':>10} {'batch':>6} {'ms/frame':>9} {'frames/s':>9} {'streams':>8} {'host ms/frame':>14}  provider")
    for renderer in args.renderers:
        config = PipelineConfig(renderer=renderer)
        pipeline = AvatarPipeline.from_pretrained(config=config)
        jobs, identity = real_jobs(pipeline, args.image)
        per_frame = make_renderer(config, ASSETS, pool=pipeline.pool)
        graph = GraphRenderer(ASSETS, config, pool=pipeline.pool)
        if args.save_inputs:
            feeds = graph.stack([graph.prepare(job, identity, k, None,
                                               graph.aligner.paste_box(job.frame.shape, job.transform)) for k, job in enumerate(jobs)])
            outputs = graph.session.run(**feeds)
            saved.update({f"{renderer}/{k}": v for k, v in feeds.items() if k in graph.session.input_names})
            saved.update({f"{renderer}/output_{k}": v for k, v in outputs.items()})
        if graph.plain is not None:  # these jobs' person has no bank: the diffusion graph without the entry's path runs
            graph.plain = timed = TimedSession(graph.plain)
        else:
            graph.session = timed = TimedSession(graph.session)
        provider = timed.providers[0]
        for path, renderer_object, batches in (("per-frame", per_frame, [8]), ("graph", graph, args.batches)):
            for size in batches:
                picked = [jobs[k % len(jobs)] for k in range(size)]
                batch = RenderBatch(picked, [identity] * size, list(range(size)))
                seconds, inside = time_renders(renderer_object.render, batch, args.seconds, timed if path == "graph" else None)
                host = (seconds - inside) / size if path == "graph" else None
                fps = size / seconds
                rows.append({"renderer": renderer, "path": path, "batch": size, "ms_per_frame": 1000 * seconds / size,
                             "frames_per_s": fps, "streams_25fps": fps / STREAM_FPS,
                             "host_ms_per_frame": None if host is None else 1000 * host, "provider": provider})
                host_text = "" if host is None else f"{1000 * host:.1f}"
                print(f"{renderer:>9} {path:>10} {size:>6} {1000 * seconds / size:>9.1f} {fps:>9.1f} {fps / STREAM_FPS:>8.2f} "
                      f"{host_text:>14}  {provider}", flush=True)
    write_rows(args.out, rows)
    if args.save_inputs:
        np.savez_compressed(args.save_inputs, **saved)
        print(f"wrote {args.save_inputs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
