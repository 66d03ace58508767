"""WebRTC for `avatar serve` (aiortc): the browser's microphone in, the avatar's video and voice out.

    POST /offer?token=...   {"type": "offer", "sdp": "..."}   →   {"type": "answer", "sdp": "...", "fps", "width", ...}

The offer must carry one audio track (the speech, sendrecv: the same m-line brings the avatar's
voice back) and may ask for video (recvonly). The server answers with two tracks made from the
engine's frames: video (VP8 or H.264, as negotiated) and audio (Opus: the speech the frames were
made from, at the rate it came in). A/V sync: frame `i` goes out with RTP time `i / fps` on the
video clock, and its own audio (`[pts, pts + 1/fps)` of the session's audio clock) with the matching
Opus time, in 20 ms packets sent from when the picture has gone out (`_VideoSent`), 20 ms apart, and
at once when already due: aiortc's RTCP sender reports map RTP time to the wall clock at sending, so
both streams then carry the same delays (render, encode, load) and browsers, which lip-sync by those
reports, keep picture and voice together. An optional data channel (any label) carries the page's
`client_stats` JSON in and the server's stats out, once for each message in.

Same token, session limit and admission control as the WebSocket (`realtime/server.py`); the
server closes a peer whose connection fails or that sends no audio for `idle_timeout_s`. No STUN or
TURN server is configured (nothing outside the host is contacted): the browser and the server must
reach each other directly (the same machine or network).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import json
import typing

import numpy as np

from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar import media

VIDEO_CLOCK = 90000  # RTP's video clock (Hz)
PACKET_S = 0.02  # audio goes out in 20 ms packets (one Opus frame each)
AUDIO_QUEUE = 500  # 10 s of packets waiting for the sender at most
AUDIO_WAITS_FOR_VIDEO_S = 0.5  # longest a frame's audio is held back for its picture to be sent


class _VideoSent:
    """Which frames' pictures have gone out (sent, or skipped as too late): the audio of a frame follows
    its picture, so that both senders' RTCP reports (which map RTP time to the wall clock at sending)
    carry the same delays, and browsers keep them in sync however long the encoding took."""

    def __init__(self):
        self.index = -1
        self.condition = asyncio.Condition()
        # (index, loop time) of the marks, in order; the audio lets go of those it has passed (40 s kept at most)
        self.marks: typing.Deque[typing.Tuple[int, float]] = collections.deque(maxlen=1000)

    async def mark(self, index: int) -> None:
        async with self.condition:
            if index > self.index:
                self.index = index
                self.marks.append((index, asyncio.get_running_loop().time()))
            self.condition.notify_all()

    async def wait(self, index: int) -> typing.Optional[float]:
        """Until frame `index`'s picture has gone out, or AUDIO_WAITS_FOR_VIDEO_S: the loop time it went out
        (or None: it had not). Frames are waited for in order (the marks before `index` are let go)."""
        try:
            async with self.condition:
                await asyncio.wait_for(self.condition.wait_for(lambda: self.index >= index), AUDIO_WAITS_FOR_VIDEO_S)
                while self.marks[0][0] < index:
                    self.marks.popleft()
                return self.marks[0][1]
        except asyncio.TimeoutError:
            return None


class _QueuedTrack(MediaStreamTrack):
    """A track whose frames are put on a queue by the server (`None` ends it)."""

    def __init__(self, limit: int):
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue(limit)
        self.dropped = 0  # frames the sender did not take in time (the oldest go first)

    def put(self, item) -> None:
        while self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)

    async def _next(self):
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        return item


class AvatarVideoTrack(_QueuedTrack):
    """The avatar's frames: `(image (H, W, 3) uint8 RGB, index, ready_at)` in, `av.VideoFrame` with RTP time
    `index / fps` out; a frame whose audio reached the server more than `max_latency_s` before is skipped."""

    kind = "video"

    def __init__(self, fps: float, limit: int, clock: typing.Callable[[], float], max_latency_s: float,
                 on_sent: typing.Callable[[typing.Optional[float]], None], sent: _VideoSent):
        super().__init__(limit)
        self.fps, self.clock, self.max_latency_s, self.on_sent, self.sent = fps, clock, max_latency_s, on_sent, sent
        self._previous: typing.Optional[int] = None

    async def recv(self):
        import av

        if self._previous is not None:  # the sender asks for a picture once it has sent the one before
            await self.sent.mark(self._previous)
        while True:
            image, index, ready_at = await self._next()
            late = self.clock() - ready_at
            if late <= self.max_latency_s:
                break
            self.on_sent(None)  # too late to be worth sending
            await self.sent.mark(index)
        self.on_sent(late)
        self._previous = index
        if image.shape[0] % 2 or image.shape[1] % 2:  # the encoder pads odd sides itself
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        else:  # in the encoder's format already (OpenCV's conversion, `media.yuv420_frame`)
            frame = media.yuv420_frame(image)
        frame.pts = round(index * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class AvatarAudioTrack(_QueuedTrack):
    """The frames' audio, in 20 ms packets: `(samples (n,) float32 at `rate`, its first sample's index, its frame's
    index)` in, `av.AudioFrame` s16 mono out, each after its frame's picture has gone out (when `sent` is given: the
    peer asked for video), paced 20 ms apart from then; a packet already due (the audio sender was held up) goes
    at once, so the voice does not fall behind the pictures. `behind`: how late recent packets went out after
    they were due (s; the RTP sender reports stamp each stream at sending, so this is how far the voice's
    timeline lags the pictures' for the browser's lip sync, which its own A/V offset as played cannot show)."""

    kind = "audio"

    def __init__(self, rate: int, sent: typing.Optional[_VideoSent]):
        super().__init__(AUDIO_QUEUE)
        self.rate, self.sent = rate, sent
        self._frame: typing.Optional[typing.Tuple[int, float, int]] = None  # (frame index, loop time, first sample) of its first packet
        self.behind: typing.Deque[float] = collections.deque(maxlen=500)
        self.sleep = asyncio.sleep

    async def recv(self):
        import av

        samples, first, index = await self._next()
        loop = asyncio.get_running_loop()
        picture_at = await self.sent.wait(index) if self.sent is not None else None
        if self._frame is None or self._frame[0] != index:  # a frame's first packet goes at once (with its picture)
            self._frame = (index, loop.time() if picture_at is None else picture_at, first)
        # its next ones 20 ms apart from when its picture went out, not in one burst (a burst grows the browser's
        # audio buffer); packets later than that go at once, so the voice does not fall behind the pictures
        due = self._frame[1] + (first - self._frame[2]) / self.rate
        if due > loop.time():
            await self.sleep(due - loop.time())
        self.behind.append(max(0.0, loop.time() - due))
        pcm = (np.clip(samples, -1, 1) * 32767).round().astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = first
        frame.time_base = fractions.Fraction(1, self.rate)
        return frame


class Peer:
    """One WebRTC session of the server: the peer connection, its engine session and its two tracks.

    `client` is the server's record of it (counters for the stats: `late_dropped`, `latencies`,
    `reported`); `stats()` gives the server's stats for the data channel; `on_closed()` runs once when the
    peer is closed."""

    def __init__(self, session, client, fps: float, clock: typing.Callable[[], float], max_latency_s: float,
                 queue_frames: int, idle_timeout_s: float, stats: typing.Callable[[], typing.Dict[str, typing.Any]],
                 on_closed: typing.Callable[[], None]):
        self.session, self.client, self.fps = session, client, fps
        self.idle_timeout_s, self.stats, self.on_closed = idle_timeout_s, stats, on_closed
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.sent = _VideoSent()
        self.video = AvatarVideoTrack(fps, queue_frames, clock, max_latency_s, self._sent, self.sent)
        self.audio = AvatarAudioTrack(session.sample_rate, None)
        self.closed = False
        self._tasks: typing.List[asyncio.Task] = []
        self._heard = asyncio.Event()

        @self.pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.ensure_future(self._hear(track)))

        @self.pc.on("datachannel")
        def on_datachannel(channel) -> None:
            @channel.on("message")
            def on_message(message) -> None:
                try:
                    report = json.loads(message)
                except (TypeError, ValueError):
                    return
                if isinstance(report, dict) and report.get("type") == "client_stats":
                    self.client.reported = {k: v for k, v in report.items() if k != "type"}
                    channel.send(json.dumps(self.stats()))

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

    def _sent(self, late: typing.Optional[float]) -> None:
        if late is None:
            self.client.late_dropped += 1
        else:
            self.client.latencies.append(late)

    async def answer(self, offer_sdp: str) -> str:
        """The SDP answer to the browser's offer; ValueError (one line) for an offer without audio."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except (ValueError, AssertionError, IndexError, KeyError, TypeError) as exc:  # aiortc's SDP parser
            raise ValueError(f"the offer's SDP could not be read ({exc or type(exc).__name__}); send "
                             "RTCPeerConnection.createOffer's description as it is") from exc
        kinds = [t.kind for t in self.pc.getTransceivers()]
        if "audio" not in kinds:
            raise ValueError("the offer has no audio track: send the speech (the microphone or a TTS track) as audio")
        self.pc.addTrack(self.audio)
        if "video" in kinds:
            self.pc.addTrack(self.video)
            self.audio.sent = self.sent  # the voice follows the pictures
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._tasks.append(asyncio.ensure_future(self._watch_first_audio()))
        return self.pc.localDescription.sdp

    async def _watch_first_audio(self) -> None:
        try:
            await asyncio.wait_for(self._heard.wait(), self.idle_timeout_s)
        except asyncio.TimeoutError:
            await self.close()

    async def _hear(self, track) -> None:
        """The browser's audio, decoded by aiortc (Opus → s16 at 48 kHz), into the engine session as float32 mono."""
        import av

        resampler = av.AudioResampler(format="flt", layout="mono", rate=self.session.sample_rate)
        try:
            while True:
                frame = await asyncio.wait_for(track.recv(), self.idle_timeout_s)
                self._heard.set()
                for mono in resampler.resample(frame):
                    self.session.push(mono.to_ndarray()[0].astype(np.float32))
        except (MediaStreamError, asyncio.TimeoutError):
            await self.close()

    def deliver(self, frames: typing.Sequence[typing.Any]) -> None:
        """Finished `OutputFrame`s of the session (on the event loop's thread): each frame's picture and its
        audio as pushed (the session's rate), in 20 ms packets."""
        if self.closed:
            return
        for frame in frames:
            self.video.put((frame.image, frame.index, frame.ready_at))
            rate = self.session.sample_rate
            first, packet = round(frame.pts * rate), round(PACKET_S * rate)
            for start in range(0, len(frame.source_audio), packet):
                self.audio.put((frame.source_audio[start:start + packet], first + start, frame.index))
        self.client.queue_dropped = self.video.dropped

    async def close(self) -> None:
        """Stop the tracks and the connection, close the engine session (once)."""
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for track in (self.video, self.audio):
            track.put(None)
        await self.pc.close()
        self.session.close()
        self.on_closed()
