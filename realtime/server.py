"""`avatar serve`: live avatars over WebRTC and over a WebSocket, and the browser page that uses them.

    avatar serve [--image PORTRAIT] [--host 127.0.0.1] [--port 8765] [--token SECRET]

An aiohttp server: HTTP GET `/` serves the browser page (`realtime/static/index.html`: microphone in,
avatar out, over WebRTC by default); `POST /offer` takes a WebRTC offer and answers with the avatar's
video and voice tracks (`realtime/webrtc.py`); `/ws` is the WebSocket protocol for simple clients
(`realtime/protocol.py`: JPEG or H.264 and PCM per message).

Authentication (both transports): `?token=` in the URL or `Authorization: Bearer` (HTTP 401
otherwise). Limits: at most `max_sessions` sessions of either kind (HTTP 503 beyond); admission control: at start the server measures
what a session costs on this machine (`Engine.calibrate`) and refuses a session that would overload
it (HTTP 503 with the measured reason; close 1013 if the load changed during the handshake); a
bounded latency: a frame whose audio reached the server more than `max_latency_s` before is not sent
(counted as `late_dropped`; frames the renderer cannot make in time are repeated earlier, by
`max_backlog_s`); messages up to `max_message_bytes` (close 1009),
a connection that sends nothing for `idle_timeout_s` is closed (1000, "idle timeout"), and each
client has a queue of `client_queue_frames` frames: a slow client loses its oldest frames (counted
in its stats) and never holds up the render loop or the other clients. When a client's audio stops,
its avatar idles (silence is fed: the mouth closes, the eyes blink).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import importlib.resources
import json
import os
import secrets
import threading
import time
import typing

import numpy as np

from avatar.config import RealtimeConfig
from avatar.errors import AvatarError
from realtime import protocol
from realtime.protocol import H264Encoder


@dataclasses.dataclass
class Client:
    session: typing.Any
    queue: typing.Optional[asyncio.Queue]  # the WebSocket's frames waiting to be sent (None: a WebRTC peer)
    start: typing.Optional[protocol.Start]  # the WebSocket's start message (None: a WebRTC peer)
    encoder: typing.Optional[H264Encoder] = None
    need_keyframe: bool = False  # set when frames were dropped from the queue (H.264 needs a fresh start)
    queue_dropped: int = 0
    late_dropped: int = 0  # frames not sent: their audio reached the server more than `max_latency_s` before
    last_jpeg: typing.Optional[typing.Tuple[np.ndarray, bytes]] = None  # (image, its JPEG): a repeated frame's picture is not encoded again
    encoding: typing.Optional[concurrent.futures.Future] = None  # the client's last frame on the encode pool
    encode_seconds: float = 0.0
    encoded: int = 0
    reported: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)
    latencies: typing.Deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=500))  # recent frames
    peer: typing.Any = None  # a WebRTC client's `realtime.webrtc.Peer`


class AvatarServer:
    """The server: one render thread for all sessions, a pool encoding their frames (each client's in
    order), one asyncio loop for the connections."""

    def __init__(self, engine, portrait: np.ndarray, config: RealtimeConfig = RealtimeConfig(), token: typing.Optional[str] = None,
                 prepared=None):
        """`portrait (H, W, 3) uint8`, or `prepared`: an avatar the engine prepared (`Engine.prepare_enrolled`)."""
        self.engine, self.config = engine, config
        self.token = token or secrets.token_urlsafe(16)
        self.avatar = prepared or engine.prepare(portrait)
        self.clients: typing.Dict[int, Client] = {}
        self.loop: typing.Optional[asyncio.AbstractEventLoop] = None
        self.stopping = threading.Event()
        self.page = importlib.resources.files("realtime").joinpath("static/index.html").read_text()
        # JPEG / H.264 for every stream, off the render thread: a pool sized to the host
        self.encoders = concurrent.futures.ThreadPoolExecutor(config.encode_workers or min(8, os.cpu_count() or 1),
                                                              thread_name_prefix="avatar-encode")
        self.encode_seconds, self.encoded = 0.0, 0  # all streams, since the start
        self.rejected = {"auth": 0, "busy": 0, "capacity": 0}
        # what a session costs here, measured once at start (about 2 s) when admission control needs it
        self.session_load = engine.calibrate(self.avatar) if config.admission and not engine.sessions else engine.session_load()

    # ------------------------------------------------------------------ render thread
    def _render_loop(self) -> None:
        while not self.stopping.is_set():
            now = self.engine.clock()
            for client in list(self.clients.values()):
                client.session.keep_alive(now)
            if self.engine.step(dispatch=self._dispatch) == 0:
                time.sleep(0.003)
            self._dispatch()
        self.encoders.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        """Every client's finished frames to the encode pool, after the client's previous ones."""
        for client in list(self.clients.values()):
            frames = client.session.pop_frames()
            if frames and client.peer is not None:  # WebRTC: aiortc's senders encode on the loop's executor
                self.loop.call_soon_threadsafe(client.peer.deliver, frames)
            elif frames:
                client.encoding = self.encoders.submit(self._encode, client, frames, client.encoding)

    def _encode(self, client: Client, frames: typing.List[typing.Any], previous: typing.Optional[concurrent.futures.Future]) -> None:
        """JPEG or H.264 for a client's frames, then their messages onto its queue (on the encode pool)."""
        import cv2

        if previous is not None:  # after the client's previous frames; a failure there does not stop these
            concurrent.futures.wait([previous])
        started = time.perf_counter()
        now = self.engine.clock()
        messages = []
        for frame in frames:
            if now - frame.ready_at > self.config.max_latency_s:  # too late to be worth sending: not encoded
                client.late_dropped += 1
                continue
            if client.encoder is not None:
                picture = client.encoder.encode(frame.image, keyframe=client.need_keyframe)
                client.need_keyframe = False
            elif client.last_jpeg is not None and client.last_jpeg[0] is frame.image:  # a repeated picture
                picture = client.last_jpeg[1]
            else:
                ok, jpeg = cv2.imencode(".jpg", frame.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
                picture = jpeg.tobytes()
                client.last_jpeg = (frame.image, picture)
            messages.append((protocol.Frame(frame.index, frame.pts, frame.repeated, picture, frame.audio).encode(), frame.ready_at))
        seconds = time.perf_counter() - started
        client.encode_seconds += seconds
        client.encoded += len(messages)
        self.encode_seconds += seconds
        self.encoded += len(messages)
        for message in messages:
            self.loop.call_soon_threadsafe(self._enqueue, client, message)

    def _enqueue(self, client: Client, message: typing.Tuple[bytes, float]) -> None:
        while client.queue.full():  # a slow client loses its oldest frames, nobody waits
            client.queue.get_nowait()
            client.queue_dropped += 1
            client.need_keyframe = True
        client.queue.put_nowait(message)

    # ------------------------------------------------------------------ connections
    def admission(self) -> typing.Optional[str]:
        """Why a new session would be refused by the measured load (`Engine.admission`), or None."""
        return self.engine.admission(self.config.max_load) if self.config.admission else None

    def _authorised(self, request) -> bool:
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer "):]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _gate(self, request):
        """The refusal for a new session (an aiohttp response: 401, 503 busy or at capacity), or None."""
        from aiohttp import web

        if not self._authorised(request):
            self.rejected["auth"] += 1
            return web.Response(status=401, text="a valid token is needed (?token= or Authorization: Bearer)\n")
        if len(self.clients) >= self.config.max_sessions:
            self.rejected["busy"] += 1
            return web.Response(status=503, text=f"the server is busy ({self.config.max_sessions} sessions); try again later\n")
        refused = self.admission()
        if refused:
            self.rejected["capacity"] += 1
            return web.Response(status=503, text=refused + "\n")
        return None

    async def _page(self, request):
        from aiohttp import web

        return web.Response(text=self.page, content_type="text/html")

    async def _websocket(self, request):
        """`/ws`: the WebSocket protocol (`realtime/protocol.py`)."""
        from aiohttp import web

        refused = self._gate(request)
        if refused is not None:
            return refused
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return web.Response(status=426, text="/ws speaks WebSocket only; connect with a WebSocket client (see realtime/client.py)\n")
        connection = web.WebSocketResponse(max_msg_size=self.config.max_message_bytes, compress=False)
        await connection.prepare(request)
        try:
            await self.handle(connection)
        except ConnectionResetError:  # the client went away mid-send
            pass
        return connection

    async def _offer(self, request):
        """`POST /offer`: a WebRTC session (`realtime/webrtc.py`) from the browser's SDP offer."""
        from aiohttp import web

        refused = self._gate(request)
        if refused is not None:
            return refused
        try:
            offer = protocol.parse_offer(await request.text())
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        from realtime.webrtc import Peer

        session = self.engine.open(self.avatar, 48000)
        client = Client(session, None, None)
        key = id(client)
        peer = Peer(session, client, self.config.fps, self.engine.clock, self.config.max_latency_s, self.config.client_queue_frames,
                    self.config.idle_timeout_s, lambda: self._stats(client), lambda: self.clients.pop(key, None))
        client.peer = peer
        self.clients[key] = client
        try:
            answer = await peer.answer(offer)
        except ValueError as exc:
            await peer.close()
            return web.Response(status=400, text=f"{exc}\n")
        height, width = self.avatar.portrait.shape[:2]
        reply = json.loads(protocol.ready(self.config.fps, width, height, "webrtc", session.lookahead_s * 1000, key))
        reply.update(type="answer", sdp=answer)
        return web.json_response(reply)

    async def _close_peers(self) -> None:
        for client in list(self.clients.values()):
            if client.peer is not None:
                await client.peer.close()

    async def _receive(self, connection) -> typing.Union[str, bytes]:
        """The next text or binary message; `asyncio.TimeoutError` after `idle_timeout_s` of nothing,
        `ConnectionResetError` once the connection is closing (a close, an error, a message over the limit:
        aiohttp has closed it with 1009 then)."""
        from aiohttp import WSMsgType

        message = await connection.receive(timeout=self.config.idle_timeout_s)
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            return message.data
        raise ConnectionResetError(f"the connection closed ({message.type.name})")

    async def handle(self, connection) -> None:
        """One WebSocket session on an aiohttp `WebSocketResponse`."""
        try:
            first = await self._receive(connection)
            start = protocol.Start.parse(first)
            refused = self.admission()  # again: others may have opened since this connection was admitted
            if refused:
                self.rejected["capacity"] += 1
                await connection.send_str(protocol.error(refused))
                await connection.close(code=1013, message=b"at capacity")
                return
            session = self.engine.open(self.avatar, start.sample_rate)
        except (ValueError, TypeError, AvatarError) as exc:
            await connection.send_str(protocol.error(str(exc)))
            await connection.close(code=1003, message=b"bad start message")
            return
        except (asyncio.TimeoutError, ConnectionResetError):
            return
        client = Client(session, asyncio.Queue(maxsize=self.config.client_queue_frames), start,
                        H264Encoder(self.config.fps) if start.video == "h264" else None)
        key = id(client)
        self.clients[key] = client
        height, width = self.avatar.portrait.shape[:2]
        await connection.send_str(protocol.ready(self.config.fps, width, height, start.video, session.lookahead_s * 1000, key))
        sender = asyncio.create_task(self._send(connection, client))
        try:
            while True:
                message = await self._receive(connection)
                if isinstance(message, bytes):
                    session.push(start.pcm(message))
                    continue
                request = protocol.parse_control(message)
                if request.get("type") == "stats":
                    await connection.send_str(json.dumps(self._stats(client)))
                elif request.get("type") == "client_stats":
                    client.reported = {k: v for k, v in request.items() if k != "type"}
        except asyncio.TimeoutError:
            await connection.close(code=1000, message=b"idle timeout")
        except (ValueError, AvatarError) as exc:
            await connection.send_str(protocol.error(str(exc)))
            await connection.close(code=1003, message=b"bad message")
        except ConnectionResetError:
            pass
        finally:
            sender.cancel()
            self.clients.pop(key, None)
            session.close()

    async def _send(self, connection, client: Client) -> None:
        last_stats = time.perf_counter()
        try:
            while True:
                try:
                    message, ready_at = await asyncio.wait_for(client.queue.get(), timeout=1.0)
                    late = self.engine.clock() - ready_at
                    if late > self.config.max_latency_s:  # the bound holds whatever the load: late frames are not sent
                        client.late_dropped += 1
                        client.need_keyframe = True
                    else:
                        client.latencies.append(late)
                        await connection.send_bytes(message)
                except asyncio.TimeoutError:
                    pass
                if time.perf_counter() - last_stats > 1.0:
                    last_stats = time.perf_counter()
                    await connection.send_str(json.dumps(self._stats(client)))
        except ConnectionResetError:
            return

    def _stats(self, client: Client) -> typing.Dict[str, typing.Any]:
        latencies = list(client.latencies)
        behind = list(client.peer.audio.behind) if client.peer is not None else []  # WebRTC: the voice's lag behind the pictures
        return {"type": "stats", **client.session.stats(), "queue_dropped": client.queue_dropped, "late_dropped": client.late_dropped,
                "latency_p50_ms": 1000 * float(np.median(latencies)) if latencies else None,
                "latency_p95_ms": 1000 * float(np.percentile(latencies, 95)) if latencies else None,
                "voice_behind_p95_ms": 1000 * float(np.percentile(behind, 95)) if behind else None,
                "encode_ms": 1000 * client.encode_seconds / client.encoded if client.encoded else None,
                "sessions": len(self.clients), "client": client.reported}

    def stats(self) -> typing.Dict[str, typing.Any]:
        """Every connected client's stats, and the refused connections."""
        return {"clients": [self._stats(c) for c in list(self.clients.values())], "rejected": dict(self.rejected)}

    async def serve(self, host: str, port: int, on_ready: typing.Optional[typing.Callable[[int], None]] = None) -> None:
        """Serve until `stopping` is set; `on_ready(port)` is called once listening (port 0: any free one)."""
        from aiohttp import web

        self.loop = asyncio.get_running_loop()
        renderer = threading.Thread(target=self._render_loop, name="avatar-render", daemon=True)
        renderer.start()
        app = web.Application(client_max_size=self.config.max_message_bytes)
        app.router.add_get("/", self._page)
        app.router.add_get("/index.html", self._page)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/offer", self._offer)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        try:
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            if on_ready is not None:
                on_ready(runner.addresses[0][1])
            while not self.stopping.is_set():
                await asyncio.sleep(0.1)
        finally:
            self.stopping.set()
            await self._close_peers()
            await runner.cleanup()
            renderer.join()


class BackgroundServer:
    """Run an AvatarServer in a thread (tests, benchmarks): `with BackgroundServer(...) as s: s.url`."""

    def __init__(self, server: AvatarServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host, self.port = server, host, port
        self.thread: typing.Optional[threading.Thread] = None

    def __enter__(self) -> "BackgroundServer":
        ready = threading.Event()

        def listening(port: int) -> None:
            self.port = port
            ready.set()

        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(self.host, self.port, listening)), daemon=True)
        self.thread.start()
        if not ready.wait(60):
            raise RuntimeError("the server did not start")
        return self

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws?token={self.server.token}"

    @property
    def page(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.server.token}"

    def __exit__(self, *exc) -> None:
        self.server.stopping.set()
        self.thread.join(30)


def run(image: typing.Optional[str], host: str, port: int, token: typing.Optional[str], config: RealtimeConfig, idle_config,
        avatar: typing.Optional[str] = None, face_config=None) -> int:
    """`avatar serve`: prepare the portrait (or load the enrolled avatar; `face_config`: which face, as
    `animate`'s), print the page's address, serve until Ctrl-C."""
    from avatar import media
    from avatar.enroll import load_avatar
    from avatar.runtime import asset_path
    from realtime.engine import Engine

    enrolled = load_avatar(avatar) if avatar else None
    engine = Engine(config=config, idle_config=idle_config, face_config=face_config)
    if enrolled is not None:
        server = AvatarServer(engine, None, config, token, prepared=engine.prepare_enrolled(enrolled))
    else:
        server = AvatarServer(engine, media.read_image(image or asset_path("samples/portrait.jpg")), config, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host

    def announce(bound: int) -> None:
        print(f"serving on ws://{shown}:{bound}/ws (token {server.token}); {engine.pipeline.config.renderer} renderer, "
              f"providers {', '.join(engine.pipeline.providers)}")
        if config.admission:
            fits = max(1, min(config.max_sessions, int(config.max_load / max(server.session_load, 1e-6))))
            print(f"measured: a session takes {100 * server.session_load:.0f}% of the renderer here; about {fits} at once "
                  f"(--max-load {config.max_load:g}), more are refused")
        print(f"browser page: http://{shown}:{bound}/?token={server.token}", flush=True)

    try:
        asyncio.run(server.serve(host, port, on_ready=announce))
    except KeyboardInterrupt:
        print("stopped")
    return 0
