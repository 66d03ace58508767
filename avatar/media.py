"""Video, audio and image I/O through PyAV (its bundled ffmpeg) and OpenCV/Pillow for stills.

Reading: any common video (mp4/mov/mkv/webm/mpg/avi; H.264/HEVC/MPEG-1/MPEG-4/VP8/VP9; constant or
variable frame rate) as RGB frames with timestamps, plus its audio; any common audio (wav 8/16/24/32-bit
integer or float, flac, mp3, m4a/aac, ogg/opus; any channel count and rate) as float32 mono at a
requested rate.

Writing: mp4 with H.264 (yuv420p) video and AAC audio whose durations match within one frame. Files
are written to a temporary name in the target folder and renamed on success; an input is never
overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
import pathlib
import signal
import tempfile
import threading
import typing

import numpy as np

from avatar.errors import MediaError

PathLike = typing.Union[str, os.PathLike]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 40_000_000  # larger stills are downscaled on read (see read_image)
OUTPUT_AUDIO_RATE = 48000  # AAC frames of 1024 samples are 21 ms here: below one video frame


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What a media file holds. Durations in seconds; `fps` is the average frame rate."""

    path: str
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    n_frames: int = 0  # as declared by the container (0 when unknown)
    duration: float = 0.0
    audio_rate: int = 0
    audio_channels: int = 0
    video_codec: str = ""
    audio_codec: str = ""


@dataclasses.dataclass
class VideoClip:
    """Decoded video.

    frames: `(T, H, W, 3) uint8` RGB. timestamps: `(T,) float64` seconds from the first frame.
    fps: average frame rate. audio: `(N,) float32` mono in [-1, 1] at `sample_rate`, or None.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    audio: typing.Optional[np.ndarray]
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps if self.fps else 0.0


def _check_readable(path: PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise MediaError(f"{p}: is a folder, not a media file")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: the file is empty (0 bytes); give a real video or audio file")
    return p


def _open(path: PathLike):
    import av

    p = _check_readable(path)
    try:
        return av.open(str(p), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(f"{p}: cannot be read as media ({_short(exc)}); is the file complete and a video or audio file?") from exc


def _short(exc: BaseException) -> str:
    """The reason only: ffmpeg's errors repeat the file name, which our messages already start with."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


def probe(path: PathLike) -> MediaInfo:
    """Read the container header: streams, size, frame rate, duration."""
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        duration = float(container.duration / 1_000_000) if container.duration else 0.0
        info = dict(path=str(path), has_video=video is not None, has_audio=audio is not None, duration=duration)
        if video is not None:
            rate = video.average_rate or video.guessed_rate or video.base_rate
            info.update(
                width=video.codec_context.width, height=video.codec_context.height,
                fps=float(rate) if rate else 0.0, n_frames=int(video.frames or 0), video_codec=video.codec_context.name,
            )
        if audio is not None:
            info.update(audio_rate=int(audio.codec_context.sample_rate or 0),
                        audio_channels=int(audio.codec_context.channels or 0), audio_codec=audio.codec_context.name)
        return MediaInfo(**info)


# 8-bit 4:2:0 frames whose colours are BT.601 (FFmpeg's AVColorSpace unspecified, BT470BG, SMPTE170M: libswscale
# reads unspecified as BT.601 too) in the limited range (or unspecified): `frame_rgb` converts them with OpenCV
OPENCV_SPACES, OPENCV_RANGES = (2, 5, 6), (0, 1)


def frame_rgb(frame) -> np.ndarray:
    """A decoded `av.VideoFrame` as `(H, W, 3) uint8` RGB. Nearly every video (8-bit 4:2:0, BT.601 or
    unstated colours, limited range, even sides) through OpenCV's BT.601 conversion: the standard's
    formula to 0.01 levels on average, in a third of the time of libswscale's default (what
    `to_ndarray(format="rgb24")` runs), which came out 1.0-1.4 levels darker per channel on average
    (its fast fixed-point path), a shift every dubbed frame kept. Other frames through libswscale
    with accurate rounding and full chroma interpolation (within 0.05 levels on average)."""
    import cv2

    if (frame.format.name == "yuv420p" and frame.colorspace in OPENCV_SPACES and frame.color_range in OPENCV_RANGES
            and frame.width % 2 == 0 and frame.height % 2 == 0):
        return cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420)
    from av.video.reformatter import Interpolation

    return frame.to_ndarray(format="rgb24", interpolation=Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT)


def yuv420_frame(image: np.ndarray):
    """`(H, W, 3) uint8` RGB with even H and W → an `av.VideoFrame` in yuv420p (BT.601, limited range,
    OpenCV's conversion, which `frame_rgb` inverts to 0.01 levels; a quarter of the time of
    libswscale's), for the H.264 and VP8 encoders."""
    import av
    import cv2

    return av.VideoFrame.from_ndarray(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420), format="yuv420p")


def iter_video_frames(path: PathLike) -> typing.Iterator[typing.Tuple[float, np.ndarray]]:
    """Yield `(timestamp_s, frame (H, W, 3) uint8 RGB)` in presentation order, one at a time."""
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream; give a video file (or use it as audio)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first_pts = None
        last_t = -1.0
        n = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    t = last_t + (1.0 / float(stream.average_rate or 25))
                else:
                    if first_pts is None:
                        first_pts = frame.pts
                    t = float((frame.pts - first_pts) * stream.time_base)
                if t <= last_t:  # duplicated/out-of-order pts from a broken muxer: keep order strictly
                    t = last_t + 1e-6
                last_t = t
                n += 1
                yield t, frame_rgb(frame)
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: video decoding failed after {n} frames ({_short(exc)}); the file may be truncated") from exc
        if n == 0:
            raise MediaError(f"{path}: the video stream has no frames; give a video with at least one frame")


T = typing.TypeVar("T")


def read_ahead(items: typing.Iterable[T], depth: int = 8) -> typing.Iterator[T]:
    """`items` in order, made on a thread of their own up to `depth` ahead of the caller (a video
    decoded and converted to RGB while the caller tracks the frame before). An error of `items` is
    raised here, where the item would have come; closing this iterator early (or leaving it)
    stops the producer and closes `items` on its own thread."""
    import queue
    import threading

    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    ready: "queue.Queue[typing.Tuple[bool, typing.Any]]" = queue.Queue(depth)
    stop = threading.Event()

    def offer(entry) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer((True, item)):
                    return
            offer((False, None))
        except Exception as exc:  # raised on the consumer's side, where the item would have come
            offer((False, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            more, value = ready.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        producer.join()


def read_video(
    path: PathLike, with_audio: bool = True, sample_rate: int = 16000, max_frames: typing.Optional[int] = None,
) -> VideoClip:
    """Decode a whole video (frames, timestamps, average fps) and its audio (None when it has none)."""
    info = probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video stream; give a video file")
    frames, times = [], []
    for t, frame in iter_video_frames(path):
        frames.append(frame)
        times.append(t)
        if max_frames is not None and len(frames) >= max_frames:
            break
    timestamps = np.array(times, np.float64)
    fps = info.fps
    if len(times) > 1 and (fps <= 0 or max_frames is None):
        measured = (len(times) - 1) / max(timestamps[-1] - timestamps[0], 1e-9)
        fps = fps if fps > 0 and abs(measured - fps) / fps < 0.02 else measured
    audio = read_audio(path, sample_rate) if (with_audio and info.has_audio) else None
    return VideoClip(np.stack(frames), timestamps, float(fps or 25.0), audio, sample_rate)


def resample_timestamps(timestamps: np.ndarray, fps: float, duration: typing.Optional[float] = None) -> np.ndarray:
    """For a constant-rate grid at `fps`, the index of the source frame shown at each grid time.

    Use it to turn variable-frame-rate video into constant rate: `frames[resample_timestamps(ts, 25)]`.
    Returns `(T,) int64`, T = round(duration * fps) (duration defaults to the last timestamp + one frame).
    """
    timestamps = np.asarray(timestamps, np.float64)
    if duration is None:
        step = np.median(np.diff(timestamps)) if timestamps.size > 1 else 1.0 / fps
        duration = float(timestamps[-1] + step)
    n = max(1, int(round(duration * fps)))
    grid = np.arange(n) / fps
    index = np.searchsorted(timestamps, grid + 1e-6, side="right") - 1
    return np.clip(index, 0, timestamps.size - 1)


def read_audio(path: PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream of any file as `(N,) float32` mono in [-1, 1] at `sample_rate`.

    Channels are averaged; resampling uses ffmpeg's swresample.
    """
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio track; give a file with speech in it")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                frame.pts = None
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray()[0])
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: audio decoding failed ({_short(exc)}); the file may be truncated or corrupt") from exc
    if not chunks:
        raise MediaError(f"{path}: the audio track is empty (0 samples); give audio with sound in it")
    audio = np.concatenate(chunks).astype(np.float32)
    if audio.size == 0:
        raise MediaError(f"{path}: the audio track is empty (0 samples); give audio with sound in it")
    return np.clip(audio, -1.0, 1.0)


def read_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a still as `(H, W, 3) uint8` RGB, whatever its mode (CMYK, 16-bit, alpha, palette, grey).

    Alpha is composited on white; 16-bit is scaled to 8-bit; EXIF orientation is applied; images above
    `max_pixels` are downscaled (area) to fit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _check_readable(path)
    Image.MAX_IMAGE_PIXELS = None  # we downscale huge images ourselves instead of refusing them
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.width * im.height > max_pixels:
                scale = (max_pixels / (im.width * im.height)) ** 0.5
                im = im.reduce(max(1, int(1 / scale))) if scale < 0.5 else im
                if im.width * im.height > max_pixels:
                    scale = (max_pixels / (im.width * im.height)) ** 0.5
                    im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.Resampling.BOX)
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{p}: cannot be read as an image ({_short(exc)}); give a PNG or JPEG photo") from exc
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------------- writing
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")  # the container follows the output's extension
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}  # others (temporary names) are written as mp4


def check_output_path(output: PathLike, inputs: typing.Sequence[PathLike] = (),
                      extensions: typing.Optional[typing.Sequence[str]] = None) -> pathlib.Path:
    """Refuse outputs that would overwrite an input, a device, a pipe or anything but a regular file,
    that have an extension outside `extensions` (when given), or cannot be written; returns the path
    to write. A symlink is followed: the file it points to is replaced and the link stays. A missing
    folder is created (the CLI says so)."""
    out = pathlib.Path(output)
    if out.is_symlink():
        out = out.resolve()
    for source in inputs:
        if source is not None and pathlib.Path(source).exists() and out.exists() and os.path.samefile(out, source):
            raise MediaError(f"{out}: the output is also an input; choose another output path")
        if source is not None and out.resolve() == pathlib.Path(source).resolve():
            raise MediaError(f"{out}: the output is also an input; choose another output path")
    folder = out.parent if str(out.parent) else pathlib.Path(".")
    if out.is_dir():
        raise MediaError(f"{out}: is a folder; give a file name such as {out / 'out.mp4'}")
    if out.exists() and not out.is_file():
        raise MediaError(f"{out}: is not a regular file (a device, pipe or socket); give a file path to write to")
    if extensions is not None and out.suffix.lower() not in extensions:
        raise MediaError(f"{out}: the file name must end in {', '.join(extensions)} (the container follows the extension)")
    if folder.exists() and not folder.is_dir():
        raise MediaError(f"{folder}: is a file, not a folder; choose an output path in a writable folder")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MediaError(f"{folder}: cannot create the output folder ({exc.strerror}); choose a writable place") from exc
    if not os.access(folder, os.W_OK):
        raise MediaError(f"{folder}: the output folder is not writable; choose a writable place")
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(output: PathLike, inputs: typing.Sequence[PathLike] = ()) -> typing.Iterator[pathlib.Path]:
    """Yield a temporary path beside `output`; on success rename it over `output`, on failure delete it."""
    out = check_output_path(output, inputs)
    tmp: typing.Optional[pathlib.Path] = None
    # Signals wait while the file is made and named: an interrupt (SIGTERM raises KeyboardInterrupt in
    # the CLI) between the two would leave it behind.
    stopped = ({signal.SIGINT, signal.SIGTERM, signal.SIGHUP} if hasattr(signal, "pthread_sigmask")
               and threading.current_thread() is threading.main_thread() else set())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stopped) if stopped else None
    try:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".tmp{out.suffix}", dir=out.parent)
            tmp = pathlib.Path(tmp_name)
            os.close(fd)
        except OSError as exc:
            raise MediaError(f"{out.parent}: cannot write there ({exc.strerror}); choose a writable output folder") from exc
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, out)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


class VideoWriter:
    """Write an mp4 (H.264 yuv420p + AAC) frame by frame; use as a context manager.

    `audio`: `(N,) float32` mono at `sample_rate` for the whole clip (optional). At close the audio is
    trimmed or padded with silence to the video's duration, so the two match within one frame.
    Frames: `(H, W, 3) uint8` RGB, all the same size; odd sizes are padded by one edge pixel
    (yuv420p needs even dimensions). `pix_fmt="yuv444p"` keeps full colour resolution (used for the
    training cache; players other than ffmpeg-based ones may not show it). The file appears at
    `path` only when writing succeeded.
    """

    def __init__(
        self, path: PathLike, fps: float, audio: typing.Optional[np.ndarray] = None, sample_rate: int = 16000,
        crf: int = 18, preset: str = "medium", metadata: typing.Optional[typing.Dict[str, str]] = None,
        inputs: typing.Sequence[PathLike] = (), pix_fmt: str = "yuv420p",
        finish: typing.Optional[typing.Callable[[pathlib.Path], None]] = None,
    ):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = pathlib.Path(path)
        self.fps = fps
        self.audio = None if audio is None else np.asarray(audio, np.float32)
        self.sample_rate = sample_rate
        self.crf, self.preset, self.pix_fmt = crf, preset, pix_fmt
        self.finish = finish  # called with the complete temporary file before it is renamed to `path` (signing)
        self.metadata = metadata or {}
        self._inputs = inputs
        self._atomic = None
        self._container = None
        self._video = None
        self._audio_stream = None
        self._audio_written = 0
        self._block_index, self._block = -1, np.zeros(0, np.float32)
        self.n_frames = 0
        self._size: typing.Optional[typing.Tuple[int, int]] = None

    def __enter__(self) -> "VideoWriter":
        import av

        self._atomic = atomic_output(self.path, self._inputs)
        tmp = self._tmp = self._atomic.__enter__()
        self._container = av.open(str(tmp), mode="w", format=CONTAINERS.get(self.path.suffix.lower(), "mp4"))
        for key, value in self.metadata.items():
            self._container.metadata[key] = value
        rate = fractions.Fraction(self.fps).limit_denominator(1001)
        self._video = self._container.add_stream("libx264", rate=rate)
        self._video.pix_fmt = self.pix_fmt
        self._video.options = {"crf": str(self.crf), "preset": self.preset}
        if self.audio is not None:
            self._audio_stream = self._container.add_stream("aac", rate=OUTPUT_AUDIO_RATE)
            self._audio_stream.layout = "mono"
        return self

    def write(self, frame: np.ndarray) -> None:
        import av

        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        if self._size is None:
            h, w = frame.shape[:2]
            self._size = (h, w)
            self._video.width, self._video.height = w + (w % 2), h + (h % 2)
        if frame.shape[:2] != self._size:
            raise ValueError(f"all frames must be {self._size}, got {frame.shape[:2]}")
        h, w = self._size
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.pix_fmt == "yuv420p":
            video_frame = yuv420_frame(frame)
        else:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.n_frames
        for packet in self._video.encode(video_frame):
            self._container.mux(packet)
        self.n_frames += 1
        self._write_audio_until(self.n_frames / self.fps)

    def _write_audio_until(self, t: float, final: bool = False) -> None:
        import av

        if self._audio_stream is None:
            return
        end = int(round(t * OUTPUT_AUDIO_RATE))
        if end <= self._audio_written:
            return
        piece = self._resampled(self._audio_written, end)
        if piece.size < end - self._audio_written and final:
            piece = np.concatenate([piece, np.zeros(end - self._audio_written - piece.size, np.float32)])
        if piece.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(piece[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = OUTPUT_AUDIO_RATE
        frame.pts = self._audio_written
        self._audio_written += piece.size
        for packet in self._audio_stream.encode(frame):
            self._container.mux(packet)

    def _resampled(self, start: int, stop: int) -> np.ndarray:
        """The audio at the output rate, samples `start:stop` (fewer past its end), cut from blocks of
        AUDIO_BLOCK samples resampled once each (`resampled_range`: the whole signal's values); a
        frame's piece alone would design the resampling filter again at every frame. A caller may
        extend `audio` as it comes (a stream): a block that its input does not cover yet, filter
        reach included, is not kept, only the piece asked for is made."""
        pieces = []
        while start < stop:
            block = start // AUDIO_BLOCK
            if self._block_index != block:
                reach = (block + 1) * AUDIO_BLOCK * self.sample_rate // OUTPUT_AUDIO_RATE + RESAMPLE_MARGIN
                if self.audio.size < reach:  # the input may still grow: this piece alone
                    piece = resampled_range(self.audio, self.sample_rate, OUTPUT_AUDIO_RATE, start, stop)
                    if piece.size:
                        pieces.append(piece)
                    break
                self._block = resampled_range(self.audio, self.sample_rate, OUTPUT_AUDIO_RATE, block * AUDIO_BLOCK, (block + 1) * AUDIO_BLOCK)
                self._block_index = block
            piece = self._block[start - block * AUDIO_BLOCK: stop - block * AUDIO_BLOCK]
            if piece.size == 0:  # past the end of the audio
                break
            pieces.append(piece)
            start += piece.size
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.n_frames == 0:
                    raise MediaError(f"{self.path}: no frames were written; nothing to save")
                self._write_audio_until(self.n_frames / self.fps, final=True)
                for packet in self._video.encode(None):
                    self._container.mux(packet)
                if self._audio_stream is not None:
                    for packet in self._audio_stream.encode(None):
                        self._container.mux(packet)
        finally:
            self._container.close()
            if exc_type is None:
                try:
                    if self.finish is not None:
                        self.finish(self._tmp)
                except BaseException as failure:
                    self._atomic.__exit__(type(failure), failure, failure.__traceback__)
                    raise
                self._atomic.__exit__(None, None, None)
            else:
                self._atomic.__exit__(exc_type, exc, tb)


AUDIO_BLOCK = OUTPUT_AUDIO_RATE  # output samples a writer resamples at a time (1 s)
RESAMPLE_MARGIN = 256  # input samples beyond a piece that its resampling reads (the polyphase filter reaches ~10)


def resampled_range(audio: np.ndarray, rate_in: int, rate_out: int, start: int, stop: int) -> np.ndarray:
    """`_resample(audio, rate_in, rate_out)[start:stop]`, computed from the input around that piece
    only (a writer encodes a long input's audio piece by piece, never holding all of it at the
    output rate); equal to the whole-signal result (the filter's reach is within RESAMPLE_MARGIN)."""
    if rate_in == rate_out:
        return audio[start:stop].astype(np.float32)
    g = np.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    first = max(0, (start * down // up - RESAMPLE_MARGIN) // down * down)  # a multiple of `down`: the grids align
    last = min(audio.size, -(-stop * down // up) + RESAMPLE_MARGIN)
    if last <= first:
        return np.zeros(0, np.float32)
    piece = _resample(audio[first:last], rate_in, rate_out)
    offset = first * up // down
    if last < audio.size:  # the whole signal's length at the output rate decides where its end falls
        piece = piece[: max(0, stop - offset)]
    return piece[start - offset: stop - offset]


def _resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling of `(N,) float32` mono."""
    if rate_in == rate_out:
        return audio.astype(np.float32)
    from scipy.signal import resample_poly

    g = np.gcd(rate_in, rate_out)
    return resample_poly(audio.astype(np.float64), rate_out // g, rate_in // g).astype(np.float32)


def write_video(
    path: PathLike, frames: typing.Iterable[np.ndarray], fps: float, audio: typing.Optional[np.ndarray] = None,
    sample_rate: int = 16000, crf: int = 18, metadata: typing.Optional[typing.Dict[str, str]] = None,
    inputs: typing.Sequence[PathLike] = (),
) -> pathlib.Path:
    """Write frames (`(H, W, 3) uint8` RGB each) and optional mono audio to an mp4; returns the path."""
    with VideoWriter(path, fps, audio, sample_rate, crf=crf, metadata=metadata, inputs=inputs) as writer:
        for frame in frames:
            writer.write(frame)
    return pathlib.Path(path)


def write_audio(path: PathLike, audio: np.ndarray, sample_rate: int = 16000, inputs: typing.Sequence[PathLike] = ()) -> pathlib.Path:
    """Write `(N,) float32` mono as FLAC (`.flac`) or 16-bit WAV (`.wav`), atomically."""
    import av

    out = pathlib.Path(path)
    codec = {".flac": ("flac", "s16"), ".wav": ("pcm_s16le", "s16")}.get(out.suffix.lower())
    if codec is None:
        raise MediaError(f"{out}: write audio as .flac or .wav")
    pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767.0).round().astype(np.int16)
    with atomic_output(out, inputs) as tmp:
        with av.open(str(tmp), mode="w", format=out.suffix.lstrip(".").lower()) as container:
            stream = container.add_stream(codec[0], rate=sample_rate)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format=codec[1], layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = 0
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    return out
