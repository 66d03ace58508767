"""Batch throughput on this machine: `avatar batch` with 1 and 2 workers, each holding 1 job at a time
or 2 (the next job's decoding and face tracking beside the current one's rendering), against plain
sequential `avatar dub` processes, on the same jobs.

    python -m benchmarks.batch [--jobs 6] [--seconds 8] [--no-sequential]

Each job dubs a different real clip (`../shared/data/video/smeetrs__deep_avsr`, 160² faces) with
`--seconds` of real speech. Printed: wall time and audio-hours per hour for each way, and the
per-job real-time factors the results table records.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from avatar import media

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-sequential", dest="sequential", action="store_false", help="skip the sequential baseline")
    args = parser.parse_args(argv)
    clips = sorted((DATA / "video/smeetrs__deep_avsr").glob("*.mp4"))[: args.jobs]
    speech = media.read_audio(DATA / "speech/kleinlee__DH_live/audio0.wav")
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        rows = []
        for k, clip in enumerate(clips):
            audio = folder / f"speech{k}.wav"
            media.write_audio(audio, np.roll(np.resize(speech, int(args.seconds * 16000)), k * 8000))
            rows.append({"video": str(clip), "audio": str(audio), "output": f"job{k}.mp4"})
        with open(folder / "jobs.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["video", "audio", "output"])
            writer.writeheader()
            writer.writerows(rows)
        audio_s = len(rows) * args.seconds
        print(f"{len(rows)} jobs, {args.seconds:g} s of speech each ({audio_s:g} s in all), this machine's CPUs")
        print(f"{'way':>34} {'wall s':>8} {'audio h / h':>12}")
        if args.sequential:
            started = time.perf_counter()
            for row in rows:
                subprocess.run([sys.executable, "-m", "avatar.cli", "dub", "--video", row["video"], "--audio", row["audio"], "--output",
                                str(folder / "sequential" / row["output"]), "--quiet"], cwd=REPO, check=True, capture_output=True)
            wall = time.perf_counter() - started
            print(f"{'sequential avatar dub':>34} {wall:>8.1f} {audio_s / wall:>12.2f}", flush=True)
        for workers in (1, 2):
            for held in (1, 2):
                started = time.perf_counter()
                name = f"batch{workers}_{held}"
                result = subprocess.run([sys.executable, "-m", "avatar.cli", "batch", str(folder / "jobs.csv"), "--output-dir",
                                         str(folder / name), "--workers", str(workers), "--jobs-per-worker", str(held), "--quiet"],
                                        cwd=REPO, capture_output=True, text=True)
                wall = time.perf_counter() - started
                if result.returncode != 0:
                    raise SystemExit(result.stdout + result.stderr)
                with open(folder / name / "results.csv") as handle:
                    factors = [float(r["real_time_factor"]) for r in csv.DictReader(handle)]
                # results.csv's real-time factor is a job's own seconds per second of speech (< 1: faster than real time)
                print(f"{f'avatar batch, {workers} worker(s) × {held} job(s)':>34} {wall:>8.1f} {audio_s / wall:>12.2f}   "
                      f"(per job {1 / max(factors):.2f}-{1 / min(factors):.2f}× real time, real-time factor "
                      f"{min(factors):.2f}-{max(factors):.2f})", flush=True)

if __name__ == "__main__":
    main()
