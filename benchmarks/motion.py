"""Motion model speed on ONE CPU core, as ratios to real time (> 1: faster than real time).

    python -m benchmarks.motion [--model assets/motion.onnx]

Offline: a whole clip's windows in one call. Streaming: 20 ms audio chunks through MotionStream
(mel front-end + model on the last frames' windows), the live path. Both use onnxruntime with one
intra-op thread.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from avatar import media
from avatar.motion.runner import MotionPredictor, POINTS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--audio", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1] / "assets/samples/speech.flac")
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args(argv)
    predictor = MotionPredictor(args.model, threads=1, providers=["CPUExecutionProvider"])
    samples = media.read_audio(args.audio, 16000)
    seconds = samples.size / 16000
    rest = np.full((len(POINTS), 2), 64.0, np.float32)
    rest[:, 0] += np.linspace(-12, 12, len(POINTS))
    windows = predictor.windows_for(samples, args.fps)
    predictor.predict(windows[:10], rest)  # warm-up
    start = time.perf_counter()
    mel_windows = predictor.windows_for(samples, args.fps)
    landmarks = predictor.predict(mel_windows, rest)
    offline = time.perf_counter() - start
    stream = predictor.stream(args.fps, rest)
    latencies = []
    start = time.perf_counter()
    for i in range(0, samples.size, 320):
        t0 = time.perf_counter()
        stream.push(samples[i : i + 320])
        latencies.append(time.perf_counter() - t0)
    stream.flush()
    streaming = time.perf_counter() - start
    print(f"motion model on 1 CPU thread, {seconds:.1f} s of speech, {len(landmarks)} frames at {args.fps:g} fps")
    print(f"{'offline (mel + model, one call)':40s} {seconds / offline:8.0f}x real time  ({1000 * offline / len(landmarks):.2f} ms/frame)")
    print(f"{'streaming, 20 ms chunks':40s} {seconds / streaming:8.0f}x real time  "
          f"(per chunk p50 {1000 * np.median(latencies):.2f} ms, p95 {1000 * np.percentile(latencies, 95):.2f} ms; "
          f"look-ahead {stream.lookahead_ms:.1f} ms)")


if __name__ == "__main__":
    main()
