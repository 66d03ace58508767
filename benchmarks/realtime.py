"""Live serving on this machine: 1, 2 and 4 concurrent sessions over loopback WebSockets.

    python -m benchmarks.realtime [--seconds 8] [--sessions 1 2 4] [--renderer retrieval|warp|diffusion] [--steps 1] [--workers 0] [--no-admission]

Sessions arrive half a second apart; with admission control (the default) the server refuses those
it cannot serve in real time (counted as refused), and the figures are those of the admitted ones.

Each session streams real speech at real-time pace in 20 ms chunks (as a microphone would) and
receives the frames. Per session count: sustained frames/s per session, first-frame latency (first
sample sent → first frame received), audio → frame latency p50/p95 (a frame's arrival minus the moment
the audio it needs, pts + look-ahead, had been sent), the look-ahead, frames repeated to hold sync
(dropped), and the encode cost per frame and stream (JPEG, on the server's encode pool). The server
runs in this process (one render thread, the encode pool); the clients share its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib

import numpy as np

from avatar import media
from avatar.config import LIVE_PIPELINE, RealtimeConfig
from avatar.errors import AvatarError
from avatar.enroll import load_avatar
from avatar.render.renderers import RENDERERS
from realtime.client import stream_file
from realtime.engine import Engine
from realtime.server import AvatarServer, BackgroundServer

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


async def run_sessions(url: str, samples: np.ndarray, count: int):
    """`count` sessions at once → the results of those admitted, and how many were refused."""
    async def one(delay: float):
        await asyncio.sleep(delay)  # one after another, as users arrive: the server measures the load as it grows
        try:
            return await stream_file(url, samples, 16000)
        except AvatarError:
            return None

    results = await asyncio.gather(*(one(0.5 * k) for k in range(count)))
    return [r for r in results if r is not None], sum(r is None for r in results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=LIVE_PIPELINE.steps)
    parser.add_argument("--renderer", choices=RENDERERS, default=LIVE_PIPELINE.renderer)
    parser.add_argument("--workers", type=int, default=LIVE_PIPELINE.workers, help="threads for the per-frame CPU work (0: one per core)")
    parser.add_argument("--image", type=pathlib.Path, default=DATA / "faces/ageitgey__face_recognition/obama.jpg")
    parser.add_argument("--avatar", type=pathlib.Path, help="an enrolled avatar (`avatar enroll`) instead of --image")
    parser.add_argument("--audio", type=pathlib.Path, default=DATA / "speech/kleinlee__DH_live/audio0.wav")
    parser.add_argument("--no-admission", action="store_true", help="admit every session (to measure overload)")
    args = parser.parse_args(argv)
    pipeline = dataclasses.replace(LIVE_PIPELINE, steps=args.steps, renderer=args.renderer, workers=args.workers)
    config = RealtimeConfig(pipeline=pipeline, max_sessions=max(args.sessions), admission=not args.no_admission)
    engine = Engine(config=config)
    samples = media.read_audio(args.audio, 16000)
    samples = np.resize(samples, int(args.seconds * 16000))
    renderer = engine.pipeline.config.renderer
    detail = f"{pipeline.steps} diffusion step(s)" if renderer == "diffusion" else renderer
    person = f"avatar {args.avatar.name} (its idle loop)" if args.avatar else f"portrait {args.image.name}"
    print(f"renderer: {detail}, providers {', '.join(engine.pipeline.providers)}; "
          f"{person} (scaled to {pipeline.max_side} px), {args.seconds:g} s of speech per session; "
          f"server and clients share this process")
    prepared = engine.prepare_enrolled(load_avatar(args.avatar)) if args.avatar else None
    print(f"{'sessions':>8} {'refused':>8} {'fps/session':>12} {'first frame':>12} {'p50 latency':>12} {'p95 latency':>12} "
          f"{'look-ahead':>11} {'dropped':>9} {'encode/frame':>13}")
    for count in args.sessions:
        server = AvatarServer(engine, None if prepared else media.read_image(args.image), config, prepared=prepared)
        with BackgroundServer(server) as background:
            results, refused = asyncio.run(run_sessions(background.url, samples, count))
        figures = [result.latency_figures() for result in results]
        fps = np.mean([f["fps"] for f in figures])
        dropped = sum(f["dropped"] for f in figures) / max(1, sum(f["frames"] for f in figures))
        print(f"{count:>8} {refused:>8} {fps:>12.1f} {1000 * np.mean([f['first_frame_s'] for f in figures]):>10.0f} ms "
              f"{np.mean([f['p50_ms'] for f in figures]):>9.0f} ms {np.mean([f['p95_ms'] for f in figures]):>9.0f} ms "
              f"{figures[0]['lookahead_ms']:>8.1f} ms {100 * dropped:>8.0f}% "
              f"{1000 * server.encode_seconds / max(server.encoded, 1):>10.1f} ms", flush=True)


if __name__ == "__main__":
    main()
