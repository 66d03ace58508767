"""Soak: the live server for many minutes with well-behaved and misbehaving clients mixed in.

    python -m benchmarks.soak [--minutes 10] [--sessions 1] [--image PORTRAIT]

`avatar serve` runs in its own process (its memory is measured alone, from /proc); this process
plays the clients over loopback:
- `--sessions` well-behaved sessions stream real speech at real-time pace for the whole run, each
  frame's latency measured as they see it (arrival minus the moment its audio had been sent);
- one misbehaving client after another, without pause: garbage first messages (a JSON array, a
  number, invalid JSON, binary, a bad sample rate), an oversized message, a silent session (sends
  nothing: closed by the idle timeout), a vanishing one (streams, then drops the TCP connection
  without a close), a wrong token;
- rapid reconnects: connect, start, hang up, ten times a second (most are refused: the server is
  at capacity).
Every minute: the server's RSS, the well-behaved sessions' frames, latency p50/p95 and repeated share,
and what the misbehaving clients got back (close codes, HTTP statuses). At the end, after all clients
have left, the server's RSS again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

from avatar import media

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
TOKEN = "soak"
IDLE_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 1 << 20


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Tally:
    """What happened, by minute: latencies and repeats of the well-behaved sessions, outcomes of the others."""

    def __init__(self, started: float):
        self.started = started
        self.latency = collections.defaultdict(list)
        self.repeated = collections.Counter()
        self.frames = collections.Counter()
        self.outcomes = collections.defaultdict(collections.Counter)

    def minute(self) -> int:
        return int((time.perf_counter() - self.started) // 60)

    def outcome(self, kind: str, what: str) -> None:
        self.outcomes[self.minute()][f"{kind}:{what}"] += 1


async def well_behaved(url: str, speech: np.ndarray, until: float, tally: Tally) -> None:
    from realtime.client import AvatarClient

    async with AvatarClient(url, 16000) as client:
        lookahead = client.ready["lookahead_ms"] / 1000

        async def collect():
            while True:
                frame = await client.frames.get()
                if frame is None:
                    return
                sent_by = started + frame.pts + lookahead
                if sent_by <= time.perf_counter():  # a frame of speech already sent (not one made after the end)
                    minute = int((sent_by - tally.started) // 60)
                    tally.latency[minute].append(frame.received_at - sent_by)
                    tally.frames[minute] += 1
                    tally.repeated[minute] += int(frame.repeated)

        collector = asyncio.create_task(collect())
        started, k, step = time.perf_counter(), 0, 320
        while time.perf_counter() < until:
            delay = started + k / 16000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            piece = np.take(speech, np.arange(k, k + step), mode="wrap")
            await client.send_audio(piece)
            k += step
        await asyncio.sleep(1.0)
        collector.cancel()


async def _closed_code(connection) -> str:
    import websockets

    try:
        while True:
            await asyncio.wait_for(connection.recv(), 30)
    except websockets.ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd else 'none'}"
    except asyncio.TimeoutError:
        return "still open after 30 s"


async def one_misbehaviour(kind: str, url: str, speech: np.ndarray) -> str:
    from websockets.asyncio.client import connect

    start = json.dumps({"type": "start", "sample_rate": 16000})
    target = url if kind != "wrong_token" else url.replace(f"token={TOKEN}", "token=wrong")
    async with connect(target, max_size=1 << 24, compression=None, open_timeout=30) as connection:
        if kind.startswith("garbage"):
            message = {"garbage_array": "[1, 2]", "garbage_number": "42", "garbage_json": "{not json",
                       "garbage_binary": b"\x00\x01\x02\x03", "garbage_rate": json.dumps({"type": "start", "sample_rate": "abc"})}[kind]
            await connection.send(message)
            return await _closed_code(connection)
        await connection.send(start)
        ready = json.loads(await connection.recv())
        if ready.get("type") != "ready":
            return "refused after the handshake" if "at capacity" in ready.get("message", "") else f"error {ready.get('message')}"
        if kind == "oversized":
            await connection.send(b"\x00" * (MAX_MESSAGE_BYTES + 4))
            return await _closed_code(connection)
        if kind == "silent":
            return await _closed_code(connection)  # the idle timeout closes it
        if kind == "vanishing":
            for k in range(0, 16000, 320):
                await connection.send(speech[k:k + 320].astype("<f4").tobytes())
                await asyncio.sleep(0.02)
            connection.transport.abort()  # gone without a close frame
            return "aborted"
    return "done"


async def misbehaving(url: str, speech: np.ndarray, until: float, tally: Tally) -> None:
    import websockets

    kinds = ["garbage_array", "garbage_number", "garbage_json", "garbage_binary", "garbage_rate", "oversized", "silent",
             "vanishing", "wrong_token"]
    turn = 0
    while time.perf_counter() < until:
        kind = kinds[turn % len(kinds)]
        turn += 1
        try:
            what = await one_misbehaviour(kind, url, speech)
        except websockets.InvalidStatus as exc:
            what = f"HTTP {exc.response.status_code}"
        except websockets.ConnectionClosed as exc:
            what = f"close {exc.rcvd.code if exc.rcvd else 'none'}"
        tally.outcome(kind, what)
        await asyncio.sleep(0.2)


async def reconnects(url: str, until: float, tally: Tally) -> None:
    import websockets
    from websockets.asyncio.client import connect

    while time.perf_counter() < until:
        try:
            async with connect(url, open_timeout=30) as connection:
                await connection.send(json.dumps({"type": "start", "sample_rate": 48000}))
                ready = json.loads(await connection.recv())
                tally.outcome("reconnect", ready.get("type", "?"))
        except websockets.InvalidStatus as exc:
            tally.outcome("reconnect", f"HTTP {exc.response.status_code}")
        except websockets.ConnectionClosed as exc:
            tally.outcome("reconnect", f"close {exc.rcvd.code if exc.rcvd else 'none'}")
        await asyncio.sleep(0.1)


async def monitor(pid: int, until: float, tally: Tally, memory: dict) -> None:
    while time.perf_counter() < until:
        memory.setdefault(tally.minute(), []).append(rss_mb(pid))
        await asyncio.sleep(5.0)


async def soak(url: str, pid: int, speech: np.ndarray, seconds: float, sessions: int, tally: Tally, memory: dict) -> None:
    until = tally.started + seconds
    good = [asyncio.create_task(well_behaved(url, speech, until, tally)) for _ in range(sessions)]
    await asyncio.sleep(2.0)  # the well-behaved sessions are in before the others come
    await asyncio.gather(*good, misbehaving(url, speech, until, tally), reconnects(url, until, tally), monitor(pid, until, tally, memory))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=1, help="well-behaved sessions streaming all along")
    parser.add_argument("--image", type=pathlib.Path, default=DATA / "faces/ageitgey__face_recognition/obama.jpg")
    parser.add_argument("--audio", type=pathlib.Path, default=DATA / "speech/kleinlee__DH_live/audio0.wav")
    args = parser.parse_args(argv)
    speech = media.read_audio(args.audio, 16000)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "avatar.cli", "serve", "--image", str(args.image), "--port", str(port),
                               "--token", TOKEN, "--idle-timeout-s", str(IDLE_TIMEOUT_S), "--max-message-bytes",
                               str(MAX_MESSAGE_BYTES)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("browser page" in line for line in lines):
            line = server.stdout.readline()
            if not line:
                raise SystemExit("the server did not start:\n" + "".join(lines))
            lines.append(line)
        print("".join(lines), end="")
        url = f"ws://127.0.0.1:{port}/ws?token={TOKEN}"
        before = rss_mb(server.pid)
        tally, memory = Tally(time.perf_counter()), {}
        asyncio.run(soak(url, server.pid, speech, args.minutes * 60, args.sessions, tally, memory))
        time.sleep(IDLE_TIMEOUT_S + 10)  # every client gone, idle sessions timed out
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    print(f"{args.sessions} well-behaved session(s) for {args.minutes:g} min; misbehaving clients and reconnects throughout; "
          f"server RSS before any client {before:.0f} MB")
    print(f"{'minute':>6} {'RSS MB (max)':>13} {'frames':>7} {'p50 ms':>7} {'p95 ms':>7} {'repeated':>9} {'misbehaving':>12} {'reconnects':>11}")
    for minute in sorted(m for m in memory if m < args.minutes):  # whole minutes (the last frames wait for silence)
        waits = np.array(tally.latency.get(minute, [np.nan])) * 1000
        frames = tally.frames[minute]
        outcomes = tally.outcomes[minute]
        reconnected = sum(v for k, v in outcomes.items() if k.startswith("reconnect:"))
        print(f"{minute:>6} {max(memory[minute]):>13.0f} {frames:>7} {np.nanmedian(waits):>7.0f} "
              f"{np.nanpercentile(waits, 95):>7.0f} {100 * tally.repeated[minute] / max(frames, 1):>8.1f}% "
              f"{sum(outcomes.values()) - reconnected:>12} {reconnected:>11}")
    total = collections.Counter()
    for outcomes in tally.outcomes.values():
        total.update(outcomes)
    print("what the misbehaving clients got: " + ", ".join(f"{k} ×{v}" for k, v in sorted(total.items())))
    steady = [max(v) for m, v in memory.items() if m >= 1]
    print(f"server RSS: before {before:.0f} MB; minute 1 {max(memory.get(1, [np.nan])):.0f} MB; last minute "
          f"{max(memory[max(memory)]):.0f} MB; largest after minute 1 {max(steady) if steady else float('nan'):.0f} MB; "
          f"after all clients left {after:.0f} MB")


if __name__ == "__main__":
    main()
