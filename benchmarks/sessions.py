"""Many live sessions in one process at real-time pace, the engine alone (no network, no browser):
how many 25 fps sessions one renderer serves.

    python -m benchmarks.sessions [--sessions 1 2 4] [--renderer warp|retrieval|diffusion] [--frame-graph]
                                  [--batch 0] [--seconds 8] [--image PHOTO | --avatar ME.avatar] [--out FILE.json]

A feeder thread pushes 20 ms of real speech into every session every 20 ms of the wall clock (as
microphones or a TTS service would); the main thread runs the engine's render step in a loop, as the
server's render thread does (the speech models of all sessions in one call, then one render batch of
the frames due). Per session count: frames/s per session, the share of frames repeated because the
renderer was late, and the audio → frame latency p50/p95 (a frame finished minus the moment the audio
it needs, its look-ahead included, had been pushed). `--batch` 0: a render batch as large as the
session count (at least 8), so that one call renders every session's due frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import threading
import time

import numpy as np

from avatar import media
from avatar.config import LIVE_PIPELINE, RealtimeConfig
from avatar.render.renderers import RENDERERS
from avatar.runtime import ASSETS
from benchmarks import write_rows
from realtime.engine import STREAM_RATE, Engine

CHUNK_S = 0.02


def run(engine: Engine, avatar, speech: np.ndarray, sessions: int, seconds: float) -> dict:
    """`sessions` sessions of `speech` for `seconds` at real-time pace → the figures."""
    opened = [engine.open(avatar, STREAM_RATE) for _ in range(sessions)]
    frames = [[] for _ in opened]
    stop = threading.Event()
    chunk = int(CHUNK_S * STREAM_RATE)

    def feed() -> None:
        start, k = time.perf_counter(), 0
        while not stop.is_set() and k * CHUNK_S < seconds:
            piece = speech[(k * chunk) % (len(speech) - chunk):][:chunk]
            for session in opened:
                session.push(piece)
            k += 1
            time.sleep(max(0.0, start + k * CHUNK_S - time.perf_counter()))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        while feeder.is_alive():
            if engine.step() == 0:
                time.sleep(0.002)
            for i, session in enumerate(opened):
                frames[i].extend(session.pop_frames())
    finally:
        stop.set()
        for session in opened:
            session.close()
    made = [f for per in frames for f in per]
    latency = np.array([f.made_at - f.ready_at for f in made if not f.repeated]) * 1000
    return {"sessions": sessions, "frames_per_s": float(np.mean([len(per) for per in frames]) / seconds),
            "repeated": float(np.mean([f.repeated for f in made])) if made else 1.0,
            "p50_ms": float(np.percentile(latency, 50)) if latency.size else None,
            "p95_ms": float(np.percentile(latency, 95)) if latency.size else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--renderer", choices=RENDERERS, default=LIVE_PIPELINE.renderer)
    parser.add_argument("--frame-graph", action="store_true", help="render through the frame graph (avatar/render/graph.py)")
    parser.add_argument("--batch", type=int, default=0, help="frames per render call (0: the session count, at least 8)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--image", type=pathlib.Path, default=ASSETS / "samples" / "portrait.jpg")
    parser.add_argument("--avatar", type=pathlib.Path, help="an enrolled person (`avatar enroll`) instead of --image: "
                                                            "its idle loop, and its mouth bank for the retrieval renderer")
    parser.add_argument("--out", type=pathlib.Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    speech = media.read_audio(ASSETS / "samples" / "speech.flac", STREAM_RATE)
    rows = []
    print(f"{'sessions':>8} {'fps/session':>12} {'repeated':>9} {'p50':>8} {'p95':>8}")
    for count in args.sessions:
        pipeline = dataclasses.replace(LIVE_PIPELINE, renderer=args.renderer, frame_graph=args.frame_graph,
                                       batch=args.batch or max(8, count))
        engine = Engine(config=RealtimeConfig(pipeline=pipeline, max_sessions=count))
        if args.avatar:
            from avatar.enroll import load_avatar

            avatar = engine.prepare_enrolled(load_avatar(args.avatar))
        else:
            avatar = engine.prepare(media.read_image(args.image))
        engine.calibrate(avatar, seconds=1.0)
        row = run(engine, avatar, speech, count, args.seconds)
        row.update(renderer=args.renderer, frame_graph=args.frame_graph, batch=pipeline.batch, providers=engine.pipeline.providers)
        rows.append(row)
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f} ms"
        p95 = "-" if row["p95_ms"] is None else f"{row['p95_ms']:.0f} ms"
        print(f"{count:>8} {row['frames_per_s']:>12.1f} {100 * row['repeated']:>8.0f}% {p50:>8} {p95:>8}", flush=True)
    print(f"{args.avatar or args.image}, renderer {args.renderer}{' through the frame graph' if args.frame_graph else ''}, providers "
          f"{', '.join(rows[0]['providers']) if rows else '-'}; {args.seconds:g} s per session count, sessions and feeder in this process")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
