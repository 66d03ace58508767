"""Throughput of the diffusion renderer's denoiser through onnxruntime, per provider and precision, at
batch 1, 8 and 32 (one denoiser call renders a frame on the default path: one step from the warp's draft).

    python -m benchmarks.renderer [--batches 1 8 32] [--seconds 3] [--model assets/render.onnx]

Rows: every provider onnxruntime offers here (TensorRT, CUDA, CPU), in fp32 and, on the GPU
providers, fp16 arithmetic (`OnnxSession(fp16=True)`). Calls go through IO binding as the renderer
makes them (the condition already on the device, the noisy crop copied in, the output copied back).
Printed: ms per call, frames/s, and the number of 25 fps streams one renderer could feed (frames/s ÷ 25).
fp16 rows also give the largest and mean |fp16 − fp32| of the model's output on real-range inputs,
and in 8-bit levels for the one-step clean crop. Providers that fail to start are listed with the reason.
"""

from __future__ import annotations

import argparse
import pathlib
import time
import typing

import numpy as np

from avatar.errors import AvatarError
from avatar.render.sampling import alpha_sigma
from avatar.runtime import PREFERRED_PROVIDERS, OnnxSession, asset_path, available_providers

STREAM_FPS = 25.0


def inputs(session: OnnxSession, batch: int, seed: int = 0) -> typing.Dict[str, np.ndarray]:
    """A draft noised to t = 0.25 (`x_t`), the time, and a condition in [-1, 1] (the default live call)."""
    shape = {i.name: i.shape for i in session.session.get_inputs()}["condition"]
    channels, size = int(shape[1]), int(shape[2])
    rng = np.random.default_rng(seed)
    return {"x_t": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            "t": np.full(batch, 0.25, np.float32),
            "condition": rng.uniform(-1, 1, (batch, channels, size, size)).astype(np.float32)}


def time_calls(session: OnnxSession, batch: int, seconds: float) -> float:
    """Mean seconds per IO-bound call after warm-up, over at least `seconds` and 5 calls."""
    feed = inputs(session, batch)
    condition = session.to_device(feed["condition"])
    for _ in range(3):
        session.run_bound(x_t=feed["x_t"], t=feed["t"], condition=condition)
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        session.run_bound(x_t=feed["x_t"], t=feed["t"], condition=condition)
        calls += 1
    return (time.perf_counter() - start) / calls


def fp16_error(full: OnnxSession, half: OnnxSession) -> typing.Tuple[float, float, float]:
    """Largest and mean |fp16 − fp32| of the output `v`, and the largest in 8-bit levels of the clean crop."""
    feed = inputs(full, 8, seed=1)
    v32, v16 = full.run(**feed)["v"], half.run(**feed)["v"]
    _, sigma = alpha_sigma(feed["t"][:, None, None, None])
    crop_levels = float(np.abs(sigma * (v16 - v32)).max() * 127.5)  # x0 = alpha x_t - sigma v
    return float(np.abs(v16 - v32).max()), float(np.abs(v16 - v32).mean()), crop_levels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=None, help="default: assets/render.onnx")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed run per row")
    args = parser.parse_args(argv)
    import onnxruntime

    model = args.model or asset_path("render.onnx")
    offered, available = onnxruntime.get_available_providers(), available_providers()
    print(f"onnxruntime {onnxruntime.__version__} on {onnxruntime.get_device()}; providers offered: {', '.join(offered)}; "
          f"model {model.name}")
    print(f"{'provider':<26} {'precision':<9} {'batch':>5} {'ms/call':>9} {'frames/s':>9} {'25 fps streams':>15}")
    for provider in PREFERRED_PROVIDERS:
        if provider not in available:
            if provider in offered:
                print(f"{provider:<26} offered, but its libraries do not load here (TensorRT not installed?)")
            continue
        sessions: typing.Dict[str, OnnxSession] = {}
        for precision in ("fp32", "fp16") if provider != "CPUExecutionProvider" else ("fp32",):
            try:
                session = OnnxSession(model, providers=[provider], fp16=precision == "fp16")
            except (AvatarError, RuntimeError) as exc:
                print(f"{provider:<26} {precision:<9} did not start: {str(exc).splitlines()[0][:150]}")
                continue
            if session.providers[0] != provider:
                print(f"{provider:<26} {precision:<9} did not start (onnxruntime fell back to {session.providers[0]})")
                continue
            sessions[precision] = session
            for batch in args.batches:
                seconds = time_calls(session, batch, args.seconds)
                print(f"{provider:<26} {precision:<9} {batch:>5} {1000 * seconds:>9.2f} {batch / seconds:>9.0f} "
                      f"{batch / seconds / STREAM_FPS:>15.1f}", flush=True)
        if len(sessions) == 2:
            worst, mean, levels = fp16_error(sessions["fp32"], sessions["fp16"])
            print(f"{'':<26} fp16 vs fp32 output: max {worst:.1e}, mean {mean:.1e}; clean crop max {levels:.2f} levels of 255")


if __name__ == "__main__":
    main()
