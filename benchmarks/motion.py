"""Speech → landmarks speed on ONE CPU core, as ratios to real time (> 1: faster than real time).

    python -m benchmarks.motion [--audio assets/samples/speech.flac] [--fps 25]

Offline (files): the speech encoder on the whole utterance + the offline motion model, one call
each. Live: 20 ms audio chunks through the live model's MotionStream (Whisper log-mel, the encoder
on its sliding windows, in int8 on the CPU, the causal motion model on the newest frames), the path
`serve` and `webcam` run. Everything uses onnxruntime with one intra-op thread.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from avatar import media
from avatar.motion.runner import POINTS, MotionPredictor
from avatar.speech.encoder import SpeechEncoder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1] / "assets/samples/speech.flac")
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args(argv)
    encoder = SpeechEncoder(threads=1, providers=["CPUExecutionProvider"])
    offline = MotionPredictor(threads=1, providers=["CPUExecutionProvider"], encoder=encoder)
    live = MotionPredictor(threads=1, providers=["CPUExecutionProvider"], encoder=encoder, live=True)
    samples = media.read_audio(args.audio, 16000)
    seconds = samples.size / 16000
    rest = np.full((len(POINTS), 2), 64.0, np.float32)
    rest[:, 0] += np.linspace(-12, 12, len(POINTS))
    offline.from_audio(samples[:16000], args.fps, rest)  # warm-up
    start = time.perf_counter()
    landmarks = offline.from_audio(samples, args.fps, rest)
    offline_s = time.perf_counter() - start
    stream = live.stream(args.fps, rest)
    latencies = []
    start = time.perf_counter()
    for i in range(0, samples.size, 320):
        t0 = time.perf_counter()
        stream.push(samples[i : i + 320])
        latencies.append(time.perf_counter() - t0)
    stream.flush()
    streaming = time.perf_counter() - start
    print(f"speech encoder + motion model on 1 CPU thread, {seconds:.1f} s of speech, {len(landmarks)} frames at {args.fps:g} fps")
    print(f"{'offline (files: encoder + model)':40s} {seconds / offline_s:8.0f}x real time  ({1000 * offline_s / len(landmarks):.2f} ms/frame)")
    print(f"{'live, 20 ms chunks':40s} {seconds / streaming:8.1f}x real time  "
          f"(per chunk p50 {1000 * np.median(latencies):.2f} ms, p95 {1000 * np.percentile(latencies, 95):.2f} ms; "
          f"look-ahead {stream.lookahead_ms:.1f} ms)")
    print(f"live windows: the encoder's blocks in {'int8' if encoder.live_int8 else 'float32'} (SpeechConfig.live_int8), "
          f"its convolutions carried from window to window")


if __name__ == "__main__":
    main()
