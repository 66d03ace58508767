"""The live protocol of `avatar serve` (version 1, little-endian), shared by the server
(`realtime/server.py`) and the client (`realtime/client.py`): typed messages and their framing.

client → server
- text `{"type": "start", "sample_rate": 48000, "format": "f32" | "s16", "video": "jpeg" | "h264"}`:
  first message, once (`video` defaults to jpeg);
- binary: mono PCM in that format and rate, any chunk size (at most `max_message_bytes`);
- text `{"type": "ping"}` (keeps an otherwise silent connection open), `{"type": "stats"}`,
  `{"type": "client_stats", ...}` (the page reports what it received; logged in the server's stats).
server → client
- text `{"type": "ready", "protocol": 1, "fps", "width", "height", "lookahead_ms", "session"}`;
- binary, one per video frame: `b"AVF1"`, uint32 frame index, float64 pts (s, on the audio
  clock), uint8 repeated (1: the renderer was behind and this is the previous picture), uint32
  picture length, the picture, then the frame's audio as PCM16 mono 16 kHz (the rest of the
  message). The picture is a JPEG, or with `"video": "h264"` one H.264 access unit (Annex B,
  yuv420p, no B-frames, parameter sets in band; decode the messages in order; after frames were
  dropped for a slow client the next one is a key frame);
- text `{"type": "stats", ...}` about once a second; `{"type": "error", "message": ...}` before a close.

    start = Start.parse(text)                   # the server: a one-line ValueError for anything malformed
    Start(48000, "s16", "h264").to_json()       # the client
    Frame(index, pts, repeated, picture, audio).encode()   /   Frame.decode(message)
"""

from __future__ import annotations

import dataclasses
import json
import struct
import typing

import numpy as np

from avatar import media

PROTOCOL = 1
FRAME_MAGIC = b"AVF1"
FRAME_HEADER = struct.Struct("<4sIdBI")  # magic, index, pts, repeated, picture length
VIDEO_CODECS = ("jpeg", "h264")
AUDIO_FORMATS = ("f32", "s16")
START_HELP = '{"type": "start", "sample_rate": 8000-192000, "format": "f32"|"s16", "video": "jpeg"|"h264"}'


def _json_object(message: typing.Union[str, bytes], what: str) -> typing.Dict[str, typing.Any]:
    if not isinstance(message, str):
        raise ValueError(f"{what} must be a JSON text message, not binary")
    try:
        value = json.loads(message)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Start:
    """The first message of a session: the PCM it will send (`sample_rate` Hz, `format` f32 or s16)
    and how it wants the pictures (`video`: jpeg or h264)."""

    sample_rate: int = 16000
    format: str = "f32"
    video: str = "jpeg"

    @classmethod
    def parse(cls, message: typing.Union[str, bytes]) -> "Start":
        """→ Start; a one-line ValueError saying what a valid one looks like otherwise (the sample
        rate's range is the engine's to check)."""
        start = _json_object(message, "the first message")
        if start.get("type") != "start":
            raise ValueError(f"the first message must be {START_HELP}")
        fmt = start.get("format", "f32")
        if fmt not in AUDIO_FORMATS:
            raise ValueError(f"format must be f32 or s16, not {fmt!r}")
        video = start.get("video", "jpeg")
        if video not in VIDEO_CODECS:
            raise ValueError(f"video must be one of {', '.join(VIDEO_CODECS)}, not {video!r}")
        rate = start.get("sample_rate", 16000)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != int(rate):
            raise ValueError(f"sample_rate must be a whole number of Hz (8000-192000), not {rate!r}")
        return cls(int(rate), fmt, video)

    def to_json(self) -> str:
        return json.dumps({"type": "start", "sample_rate": self.sample_rate, "format": self.format, "video": self.video})

    def pcm(self, message: bytes) -> np.ndarray:
        """A binary audio message → `(n,) float32` in [-1, 1]; a ValueError when it is not whole samples."""
        dtype = "<f4" if self.format == "f32" else "<i2"
        if len(message) % np.dtype(dtype).itemsize:
            raise ValueError(f"binary audio must be whole {self.format} samples")
        samples = np.frombuffer(message, dtype).astype(np.float32)
        return samples / 32768.0 if self.format == "s16" else samples

    def audio_message(self, samples: np.ndarray) -> bytes:
        """`(n,)` float audio in [-1, 1] → the binary message in this session's format."""
        samples = np.asarray(samples, np.float32)
        if self.format == "f32":
            return samples.astype("<f4").tobytes()
        return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


@dataclasses.dataclass
class Frame:
    """One video frame: `index` in the session, `pts` seconds on its audio clock, `repeated` (the
    renderer was behind: the previous picture again), `picture` (a JPEG or an H.264 access unit),
    `audio` `(n,) float32` 16 kHz of [pts, pts + 1/fps)."""

    index: int
    pts: float
    repeated: bool
    picture: bytes
    audio: np.ndarray

    def encode(self) -> bytes:
        pcm = (np.clip(self.audio, -1, 1) * 32767).round().astype("<i2").tobytes()
        return FRAME_HEADER.pack(FRAME_MAGIC, self.index, self.pts, int(self.repeated), len(self.picture)) + self.picture + pcm

    @classmethod
    def decode(cls, message: bytes) -> "Frame":
        magic, index, pts, repeated, length = FRAME_HEADER.unpack_from(message)
        if magic != FRAME_MAGIC:
            raise ValueError("not a frame message")
        start = FRAME_HEADER.size
        picture = bytes(message[start:start + length])
        audio = np.frombuffer(message[start + length:], "<i2").astype(np.float32) / 32767.0
        return cls(index, pts, bool(repeated), picture, audio)


def ready(fps: float, width: int, height: int, video: str, lookahead_ms: float, session: int) -> str:
    """The server's answer to a valid start."""
    return json.dumps({"type": "ready", "protocol": PROTOCOL, "fps": fps, "width": width, "height": height, "video": video,
                       "lookahead_ms": lookahead_ms, "session": session})


def error(message: str) -> str:
    """A one-line error, sent before the server closes."""
    return json.dumps({"type": "error", "message": message})


def parse_control(message: str) -> typing.Dict[str, typing.Any]:
    """A control message during a session: a JSON object whose "type" is "stats" or "client_stats"."""
    request = _json_object(message, "a control message")
    if request.get("type") not in ("stats", "client_stats"):
        raise ValueError(f'a control message\'s "type" must be "stats" or "client_stats", not {request.get("type")!r}')
    return request


def parse_offer(body: str) -> str:
    """`POST /offer`'s body, `{"type": "offer", "sdp": "v=0..."}` → the SDP; a one-line ValueError otherwise."""
    offer = _json_object(body, "the offer")
    if offer.get("type", "offer") != "offer" or not isinstance(offer.get("sdp"), str) or not offer["sdp"].startswith("v=0"):
        raise ValueError('the offer must be {"type": "offer", "sdp": "v=0..."} (RTCPeerConnection.createOffer\'s description)')
    return offer["sdp"]


class H264Encoder:
    """One H.264 stream (libx264, ultrafast, zero latency: one access unit out per frame in)."""

    def __init__(self, fps: float, crf: int = 23):
        self.fps, self.crf = fps, crf
        self.context = None
        self.count = 0

    def encode(self, image: np.ndarray, keyframe: bool = False) -> bytes:
        """`(H, W, 3) uint8` RGB → the access unit's bytes (odd sizes are padded by an edge pixel)."""
        import fractions

        import av

        h, w = image.shape[:2]
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.context is None:
            self.context = av.CodecContext.create("libx264", "w")
            self.context.width, self.context.height = image.shape[1], image.shape[0]
            self.context.pix_fmt = "yuv420p"
            self.context.time_base = fractions.Fraction(1, round(self.fps))
            self.context.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(self.crf)}
        frame = media.yuv420_frame(image)
        frame.pts = self.count
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        self.count += 1
        return b"".join(bytes(packet) for packet in self.context.encode(frame))


class H264Decoder:
    """The client side: one access unit in, the picture out (no frame of delay)."""

    def __init__(self):
        import av

        self.context = av.CodecContext.create("h264", "r")

    def decode(self, access_unit: bytes) -> typing.Optional[np.ndarray]:
        """→ `(H, W, 3) uint8` RGB, or None when the unit cannot be shown (a reference was dropped)."""
        import av

        try:
            frames = self.context.decode(av.Packet(access_unit))
        except av.error.FFmpegError:
            return None
        return media.frame_rgb(frames[-1]) if frames else None
