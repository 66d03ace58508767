"""A small Python client for `avatar serve` (protocol: `realtime/protocol.py`).

    python -m realtime.client --url "ws://127.0.0.1:8765/ws?token=..." --audio speech.wav --output out.mp4

streams a speech file at real-time pace (as a TTS service or a microphone would), collects the frames
that come back and writes them with their audio to an mp4, then prints the latency figures.

In code:

    async with AvatarClient(url, sample_rate=16000) as client:
        await client.send_audio(chunk)                  # float32 mono
        frame = await client.next_frame()               # ReceivedFrame: index, pts, repeated, picture, audio; .image()
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import typing

import numpy as np

from realtime.protocol import VIDEO_CODECS, Frame, H264Decoder, Start


@dataclasses.dataclass
class ReceivedFrame:
    index: int
    pts: float
    repeated: bool
    picture: bytes  # a JPEG, or an H.264 access unit
    audio: np.ndarray  # (n,) float32, 16 kHz
    received_at: float  # time.perf_counter()
    decoded: typing.Optional[np.ndarray] = None  # H.264 frames are decoded on arrival (in order)

    def image(self) -> typing.Optional[np.ndarray]:
        """The picture, `(H, W, 3) uint8` RGB (None: an H.264 frame that could not be decoded)."""
        if self.decoded is not None:
            return self.decoded
        import cv2

        return cv2.imdecode(np.frombuffer(self.picture, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


class AvatarClient:
    """One live session. `ready` holds the server's first message (fps, size, look-ahead), `stats`
    the server's latest stats, and `closed` the close code and reason once the server has hung up."""

    def __init__(self, url: str, sample_rate: int = 16000, fmt: str = "f32", max_size: int = 1 << 24, video: str = "jpeg"):
        self.url, self.max_size = url, max_size
        self.start = Start(sample_rate, fmt, video)
        self.decoder = H264Decoder() if video == "h264" else None
        self.ready: typing.Dict[str, typing.Any] = {}
        self.stats: typing.Dict[str, typing.Any] = {}
        self.frames: asyncio.Queue = asyncio.Queue()
        self.connection = None
        self._reader: typing.Optional[asyncio.Task] = None
        self.closed: typing.Optional[typing.Tuple[int, str]] = None

    async def __aenter__(self) -> "AvatarClient":
        from websockets.asyncio.client import connect

        import websockets

        from avatar.errors import AvatarError

        base = self.url.split("?")[0]
        try:
            self.connection = await connect(self.url, max_size=self.max_size, compression=None)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            said = (exc.response.body or b"").decode("utf-8", "replace").strip()  # the server's reason, one line
            why = {401: "the token was refused; give the one `avatar serve` printed (?token=...)",
                   503: said or "the server is busy; try again later",
                   404: "no avatar server at this path; the URL ends in /ws"}.get(status, f"HTTP {status}")
            raise AvatarError(f"{base}: {why}") from exc
        except websockets.InvalidHandshake as exc:
            raise AvatarError(f"{base}: not an avatar server ({exc})") from exc
        await self.connection.send(self.start.to_json())
        self.ready = json.loads(await self.connection.recv())
        if self.ready.get("type") != "ready":
            raise AvatarError(f"{base}: the server refused the session ({self.ready.get('message', self.ready)})")
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        import websockets

        try:
            async for message in self.connection:
                if isinstance(message, bytes):
                    frame = Frame.decode(message)
                    decoded = self.decoder.decode(frame.picture) if self.decoder is not None else None
                    await self.frames.put(ReceivedFrame(frame.index, frame.pts, frame.repeated, frame.picture, frame.audio,
                                                        time.perf_counter(), decoded))
                else:
                    data = json.loads(message)
                    if data.get("type") == "stats":
                        self.stats = data
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = (self.connection.close_code, self.connection.close_reason)
            await self.frames.put(None)

    async def send_audio(self, samples: np.ndarray) -> None:
        await self.connection.send(self.start.audio_message(samples))

    async def send_json(self, message: typing.Dict[str, typing.Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def next_frame(self, timeout: float = 10.0) -> typing.Optional[ReceivedFrame]:
        """The next frame, or None once the connection has closed."""
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def __aexit__(self, *exc) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.connection.close()


@dataclasses.dataclass
class StreamResult:
    """What `stream_file` got back: the frames, the server's `ready` message (fps, size, look-ahead)
    and its last stats, and the wall time (`time.perf_counter()`) the first sample was sent."""

    frames: typing.List[ReceivedFrame]
    ready: typing.Dict[str, typing.Any]
    stats: typing.Dict[str, typing.Any]
    started: float
    sent_s: float = float("inf")  # seconds of audio sent

    @property
    def speech_frames(self) -> typing.List[ReceivedFrame]:
        """The frames of the audio sent (those after it are the avatar idling on the silence the
        server adds, `silence_after_s` behind real time)."""
        return [f for f in self.frames if f.pts < self.sent_s]

    def latency_figures(self) -> typing.Dict[str, float]:
        """Audio → frame latency as the client sees it, over `speech_frames` whose look-ahead was sent:
        a frame's arrival minus the moment its audio (pts + the server's look-ahead) had been sent;
        first-frame latency from the first sample sent."""
        lookahead_s = self.ready["lookahead_ms"] / 1000.0
        frames = [f for f in self.speech_frames if f.pts + lookahead_s <= self.sent_s]
        if not frames:
            return {}
        waits = np.array([f.received_at - (self.started + f.pts + lookahead_s) for f in frames])
        span = frames[-1].received_at - frames[0].received_at
        return {"frames": len(frames), "dropped": int(sum(f.repeated for f in frames)),
                "first_frame_s": frames[0].received_at - self.started, "p50_ms": 1000 * float(np.median(waits)),
                "p95_ms": 1000 * float(np.percentile(waits, 95)), "fps": (len(frames) - 1) / span if span > 0 else 0.0,
                "lookahead_ms": 1000 * lookahead_s}


async def stream_file(url: str, samples: np.ndarray, sample_rate: int, chunk_s: float = 0.02, idle_s: float = 2.0,
                      video: str = "jpeg") -> StreamResult:
    """Send `samples` in `chunk_s` chunks at real-time pace; collect frames until every frame of that
    audio has come (a loaded server sends its last ones late), or none has come for `idle_s`."""
    frames: typing.List[ReceivedFrame] = []
    async with AvatarClient(url, sample_rate, video=video) as client:
        async def collect():
            while True:
                frame = await client.frames.get()
                if frame is None:
                    return
                frames.append(frame)

        collector = asyncio.create_task(collect())
        step = max(1, int(chunk_s * sample_rate))
        started = time.perf_counter()
        for k in range(0, samples.size, step):
            delay = started + k / sample_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.send_audio(samples[k:k + step])
        last = int(samples.size / sample_rate * client.ready["fps"]) - 1  # the last frame this audio makes
        count, last_arrival = len(frames), time.perf_counter()
        while not (frames and frames[-1].index >= last) and time.perf_counter() - last_arrival < idle_s:
            await asyncio.sleep(0.05)
            if len(frames) != count:
                count, last_arrival = len(frames), time.perf_counter()
        await client.send_json({"type": "stats"})
        await asyncio.sleep(0.2)
        collector.cancel()
        return StreamResult(frames, client.ready, client.stats, started, samples.size / sample_rate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realtime.client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://host:port/ws?token=...")
    parser.add_argument("--audio", required=True, help="speech to stream")
    parser.add_argument("--output", help="write what comes back to this mp4")
    parser.add_argument("--video", choices=VIDEO_CODECS, default=VIDEO_CODECS[0], help="how the server sends the frames")
    args = parser.parse_args(argv)
    from avatar import media
    from avatar.errors import AvatarError

    try:
        samples = media.read_audio(args.audio, 16000)
        if args.output:
            media.check_output_path(args.output, [args.audio])
        result = asyncio.run(stream_file(args.url, samples, 16000, video=args.video))
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot reach {args.url.split('?')[0]} ({exc.strerror or exc}); is `avatar serve` running?", file=sys.stderr)
        return 2
    print(json.dumps({"client": result.latency_figures(), "server": result.stats}, indent=1))
    frames = result.speech_frames
    images = [f.image() for f in frames]
    shown = [image for image in images if image is not None]
    if args.output and shown:
        audio = np.concatenate([f.audio for f in frames])
        media.write_video(args.output, (image if image is not None else shown[0] for image in images), result.ready["fps"], audio,
                          16000, inputs=[args.audio])
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
