"""Media I/O: every common audio and video format, VFR, A/V-matched writing, atomic outputs, bad input."""

import csv
import fractions
import os

import av
import numpy as np
import pytest

from avatar import media
from avatar.errors import MediaError
from conftest import DATA, GRID_CLIP, LRS2_CLIP, SILENT_CLIP, SMALL_FACE_CLIP, SPEECH_FLAC, psnr


def manifest_rows(kind):
    with (DATA / "manifest.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["kind"] == kind]


# ------------------------------------------------------------------------------------ audio
REAL_AUDIO = [  # one of each format and rate found in ../shared/data/speech
    "speech/resemble-ai__Resemblyzer/19-198-0000.flac",  # flac 16 kHz
    "speech/FuxiVirtualHuman__styletalk/intro.wav",
    "speech/tencent-ailab__V-Express/aud.mp3",  # mp3
    "speech/ali-vilab__dreamtalk/acknowledgement_english.m4a",  # aac in m4a
]


def real_audio_files():
    rows = manifest_rows("speech")
    chosen = {r["file"] for r in rows if r["file"] in REAL_AUDIO}
    for rate in sorted({r["audio_hz"] for r in rows}):  # every sample rate present
        chosen.add(next(r["file"] for r in rows if r["audio_hz"] == rate and r["file"].endswith(".wav")))
    return sorted(chosen)


@pytest.mark.parametrize("file", real_audio_files())
def test_reads_real_speech_files_as_16k_mono(file):
    row = next(r for r in manifest_rows("speech") if r["file"] == file)
    y = media.read_audio(DATA / file, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size / 16000 - float(row["duration_s"])) < 0.1
    assert 0.01 < np.abs(y).max() <= 1.0 and np.sqrt(np.mean(y ** 2)) > 1e-3


def encode_audio(path, signal, rate, channels, codec, sample_format, container_format=None):
    """Write `signal` (N,) float in [-1, 1] to `path` with PyAV, duplicated (and varied) over channels."""
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        stream.format = sample_format
        planar = sample_format.endswith("p")
        data = np.stack([signal * (1.0 if c % 2 == 0 else 0.8) for c in range(channels)])
        if sample_format.startswith("s16"):
            data = (data * 32767).astype(np.int16)
        elif sample_format.startswith("s32"):
            data = (data * (2 ** 31 - 1)).astype(np.int32)
        elif sample_format.startswith("u8"):
            data = (data * 127 + 128).astype(np.uint8)
        else:
            data = data.astype(np.float32)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, data.shape[1], frame_size):
            piece = data[:, start : start + frame_size]
            array = piece if planar else piece.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=sample_format, layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def resample_reference(y16, rate):
    from scipy.signal import resample_poly

    g = np.gcd(16000, rate)
    return resample_poly(y16, rate // g, 16000 // g)


AUDIO_FORMATS = [  # (suffix, codec, sample format, container, rate, channels)
    ("wav", "pcm_u8", "u8", None, 8000, 1),  # 8-bit
    ("wav", "pcm_s16le", "s16", None, 16000, 2),  # 16-bit stereo
    ("wav", "pcm_s24le", "s32", None, 22050, 1),  # 24-bit
    ("wav", "pcm_s32le", "s32", None, 44100, 6),  # 32-bit, 5.1
    ("wav", "pcm_f32le", "flt", None, 48000, 2),  # float
    ("flac", "flac", "s16", None, 24000, 2),
    ("mp3", "libmp3lame", "fltp", None, 44100, 2),
    ("m4a", "aac", "fltp", "mp4", 48000, 1),
    ("ogg", "libopus", "flt", "ogg", 48000, 2),
    ("opus", "libopus", "flt", "ogg", 24000, 1),
]


@pytest.mark.parametrize("suffix,codec,sample_format,container,rate,channels", AUDIO_FORMATS)
def test_reads_every_audio_format_depth_rate_and_layout(tmp_path, speech_16k, suffix, codec, sample_format, container, rate, channels):
    source = speech_16k[: 16000 * 2] * 0.9
    path = tmp_path / f"speech_{rate}_{channels}.{suffix}"
    encode_audio(path, resample_reference(source, rate), rate, channels, codec, sample_format, container)
    y = media.read_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - source.size) < 0.08 * 16000  # codec padding/priming at most tens of ms
    # The same speech comes back (channels averaged: 0.9 of the mono level for even/odd mixes).
    n = min(y.size, source.size) - 4000
    best = max(np.corrcoef(y[lag : lag + n], source[2000 : 2000 + n])[0, 1] for lag in range(1500, 2500, 4))
    assert best > 0.97, f"{suffix}/{codec}: correlation {best:.3f}"


def test_audio_at_other_requested_rates():
    y = media.read_audio(SPEECH_FLAC, 24000)
    y16 = media.read_audio(SPEECH_FLAC, 16000)
    assert abs(y.size / 24000 - y16.size / 16000) < 0.01


# ------------------------------------------------------------------------------------ video
@pytest.fixture(scope="module")
def lrs2_clip():
    return media.read_video(LRS2_CLIP)


VIDEO_FORMATS = [  # (suffix, container, codec)
    ("mp4", "mp4", "libx264"), ("mov", "mov", "libx264"), ("mkv", "matroska", "libx265"),
    ("webm", "webm", "libvpx-vp9"), ("mpg", "mpeg", "mpeg1video"), ("avi", "avi", "mpeg4"), ("m4v", "mp4", "mpeg4"),
]


def encode_video(path, frames, fps, container, codec, pts=None):
    with av.open(str(path), "w", format=container) as out:
        rate = fractions.Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if pts is not None:
            stream.time_base = fractions.Fraction(1, 1000)
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = stream.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize("suffix,container,codec", VIDEO_FORMATS)
def test_reads_every_container_and_codec(tmp_path, lrs2_clip, suffix, container, codec):
    frames = lrs2_clip.frames[:30]
    path = tmp_path / f"clip.{suffix}"
    encode_video(path, frames, 25, container, codec)
    clip = media.read_video(path, with_audio=False)
    assert clip.frames.shape == frames.shape and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(25, rel=0.01)
    np.testing.assert_allclose(clip.timestamps, np.arange(30) / 25, atol=0.002)
    assert psnr(clip.frames, frames) > 28


def test_reads_variable_frame_rate_with_true_timestamps(tmp_path, lrs2_clip):
    durations_ms = np.array([40, 80, 40, 120, 40, 33, 47, 80] * 3)
    pts = np.concatenate([[0], np.cumsum(durations_ms)[:-1]])
    path = tmp_path / "vfr.mp4"
    encode_video(path, lrs2_clip.frames[: pts.size], 25, "mp4", "libx264", pts=pts)
    clip = media.read_video(path, with_audio=False)
    np.testing.assert_allclose(clip.timestamps, pts / 1000.0, atol=1e-3)
    # Resampling to a constant 25 fps shows each source frame for as long as it lasted.
    index = media.resample_timestamps(clip.timestamps, 25, duration=(pts[-1] + durations_ms[-1]) / 1000)
    assert index.size == round((pts[-1] + durations_ms[-1]) / 40) and (np.diff(index) >= 0).all()
    assert (np.bincount(index) >= 1).sum() >= 15


def test_reads_real_clips_mpeg1_and_hevc():
    grid = media.read_video(GRID_CLIP)
    assert grid.frames.shape == (75, 288, 360, 3) and grid.fps == 25 and grid.audio.size == pytest.approx(48000, abs=1000)
    info = media.probe(SMALL_FACE_CLIP)
    assert (info.width, info.height, info.video_codec) == (1080, 1920, "hevc")
    clip = media.read_video(SMALL_FACE_CLIP, max_frames=10)
    assert clip.frames.shape == (10, 1920, 1080, 3)


def test_frames_read_ahead_on_a_thread_are_the_same_frames_errors_and_all():
    """`read_ahead` gives a real clip's frames and timestamps exactly as the decoder does; an error of
    the source comes at its place; leaving early stops the producer and closes the source there."""
    import threading

    ahead = list(media.read_ahead(media.iter_video_frames(GRID_CLIP), depth=3))
    direct = list(media.iter_video_frames(GRID_CLIP))
    assert len(ahead) == len(direct) == 75
    assert [t for t, _ in ahead] == [t for t, _ in direct]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(ahead, direct))

    def failing():
        yield from range(5)
        raise MediaError("broken at 5")

    got = []
    with pytest.raises(MediaError, match="broken at 5"):
        for item in media.read_ahead(failing(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]

    closed_on = []

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed_on.append(threading.current_thread().name)

    stream = media.read_ahead(endless(), depth=4)
    assert [next(stream) for _ in range(10)] == list(range(10))
    stream.close()  # joins the producer: it has stopped and closed the source on its own thread
    assert closed_on == ["read-ahead"] and not any(t.name == "read-ahead" for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        next(media.read_ahead(range(3), depth=0))


@pytest.mark.parametrize("fps,audio_seconds", [(25, 3.0), (29.97, 2.0), (30, 4.5), (60, 1.0)])
def test_written_mp4_has_h264_aac_and_av_durations_within_a_frame(tmp_path, lrs2_clip, fps, audio_seconds):
    frames = lrs2_clip.frames[:75]  # 75 frames: 3 s at 25 fps, 2.5 s at 30 fps...
    audio = media.read_audio(SPEECH_FLAC, 16000)[: int(audio_seconds * 16000)]
    out = media.write_video(tmp_path / "out.mp4", frames, fps, audio, 16000)
    info = media.probe(out)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        video_s = float(container.streams.video[0].duration * container.streams.video[0].time_base)
        audio_s = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    assert abs(video_s - 75 / fps) < 1 / fps
    assert abs(audio_s - video_s) < 1 / fps
    back = media.read_video(out)
    assert back.frames.shape[0] == 75
    assert abs(back.audio.size / 16000 - 75 / fps) < 1 / fps


def bt601_rgb(yuv: np.ndarray) -> np.ndarray:
    """The standard's formula (BT.601, limited range) on an I420 picture `(3H/2, W) uint8`, its chroma
    repeated: `(H, W, 3) float64`, unrounded and unclipped."""
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    y = yuv[:h].astype(np.float64) - 16
    u, v = (np.repeat(np.repeat(plane.reshape(h // 2, w // 2), 2, 0), 2, 1).astype(np.float64) - 128
            for plane in (yuv[h:h + h // 4], yuv[h + h // 4:]))
    return np.stack([1.164 * y + 1.596 * v, 1.164 * y - 0.392 * u - 0.813 * v, 1.164 * y + 2.017 * u], -1)


def test_video_colours_are_read_and_written_without_a_shift(tmp_path):
    """Frames are read with the BT.601 formula's colours (on average within 0.1 level per channel; the
    fast path of libswscale that `to_ndarray("rgb24")` runs: 1.35 levels darker here) and written so
    that reading them back gives the same colours (H.264 at crf 0: within 0.2 level on average, 0.08
    measured; the libswscale round trip before: 1.1-1.3 levels darker)."""
    with av.open(str(GRID_CLIP)) as container:
        decoded = [frame for _, frame in zip(range(10), container.decode(video=0))]
    shifts = [np.abs((media.frame_rgb(f) - bt601_rgb(f.to_ndarray(format="yuv420p")).clip(0, 255)).mean(axis=(0, 1))).max()
              for f in decoded]
    assert max(shifts) < 0.1, shifts
    frames = np.stack([media.frame_rgb(f) for f in decoded])
    with media.VideoWriter(tmp_path / "same.mp4", 25, crf=0) as writer:
        for frame in frames:
            writer.write(frame)
    back = media.read_video(tmp_path / "same.mp4", with_audio=False).frames
    error = back.astype(np.int16) - frames
    assert np.abs(error.mean(axis=(0, 1, 2))).max() < 0.2 and np.abs(error).mean() < 0.2, (error.mean(axis=(0, 1, 2)), np.abs(error).mean())


def test_odd_frame_sizes_are_padded_for_yuv420p(tmp_path, lrs2_clip):
    frames = lrs2_clip.frames[:5, :159, :157]
    out = media.write_video(tmp_path / "odd.mp4", frames, 25)
    assert media.probe(out).width == 158 and media.probe(out).height == 160


def test_failed_write_leaves_nothing_and_never_replaces_the_target(tmp_path, lrs2_clip):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous result")
    with pytest.raises(ValueError):
        with media.VideoWriter(target, 25) as writer:
            writer.write(lrs2_clip.frames[0])
            writer.write(np.zeros((10, 10), np.uint8))  # wrong shape mid-way
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_output_refusals(tmp_path):
    with pytest.raises(MediaError, match="also an input"):
        media.check_output_path(LRS2_CLIP, [LRS2_CLIP])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(MediaError, match="folder"):
        media.check_output_path(blocker / "out.mp4")
    with pytest.raises(MediaError, match="is a folder"):
        media.check_output_path(tmp_path)


def test_written_files_have_normal_permissions(tmp_path):
    out = media.write_audio(tmp_path / "a.wav", np.zeros(1600, np.float32))
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 50000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(LRS2_CLIP.read_bytes()[:3000])
    cases = [
        (lambda: media.read_video(empty), "empty"),
        (lambda: media.read_audio(empty), "empty"),
        (lambda: media.read_video(corrupt), "cannot be read"),
        (lambda: media.read_audio(truncated), ""),
        (lambda: media.read_audio(SILENT_CLIP), "no audio track"),
        (lambda: media.read_video(tmp_path / "missing.mp4"), "no such file"),
        (lambda: media.read_video(SPEECH_FLAC), "no video stream"),
        (lambda: media.read_image(corrupt), "cannot be read as an image"),
    ]
    for call, words in cases:
        with pytest.raises(MediaError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and words in message and len(message) < 300


# ----------------------------------------------------------------------------------- images
def test_images_of_any_mode_come_back_as_rgb8(tmp_path):
    from PIL import Image

    from conftest import PORTRAIT

    base = Image.open(PORTRAIT).convert("RGB").resize((300, 375))
    variants = {
        "cmyk.jpg": base.convert("CMYK"),
        "grey16.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)),
        "alpha.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "grey.png": base.convert("L"),
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
        rgb = media.read_image(tmp_path / name)
        assert rgb.shape == (375, 300, 3) and rgb.dtype == np.uint8, name
        assert abs(float(rgb.mean()) - float(np.asarray(base).mean())) < 25, name


@pytest.mark.slow
def test_huge_images_are_downscaled_not_refused(tmp_path):
    from PIL import Image

    huge = Image.new("L", (12000, 12000), 128)
    huge.save(tmp_path / "huge.png")
    rgb = media.read_image(tmp_path / "huge.png")
    assert rgb.shape[0] * rgb.shape[1] <= media.MAX_IMAGE_PIXELS and rgb.shape[0] == rgb.shape[1] >= 6000


@pytest.mark.parametrize("rate", [16000, 44100, 22050, 48000])
def test_the_writer_resamples_audio_piece_by_piece_exactly_as_whole(rate):
    """`resampled_range` (what VideoWriter encodes, piece by piece, so a long input's audio is never
    held whole at 48 kHz) equals the whole signal resampled, at every piece boundary and at the end."""
    rng = np.random.default_rng(rate)
    audio = rng.standard_normal(rate * 2 + 13).astype(np.float32)
    whole = media._resample(audio, rate, media.OUTPUT_AUDIO_RATE)
    pieces = [media.resampled_range(audio, rate, media.OUTPUT_AUDIO_RATE, k, k + 1920) for k in range(0, whole.size + 1920, 1920)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_the_writer_cuts_frame_pieces_from_resampled_blocks_exactly(tmp_path, rate):
    """VideoWriter resamples a second at a time and cuts each frame's piece (1,920 samples at 25 fps,
    straddling block boundaries) from it: the same samples as the whole signal resampled, none past
    its end."""
    rng = np.random.default_rng(rate)
    audio = rng.standard_normal(rate * 2 + 13).astype(np.float32)
    whole = media._resample(audio, rate, media.OUTPUT_AUDIO_RATE)
    writer = media.VideoWriter(tmp_path / "out.mp4", 25.0, audio, rate)
    pieces = [writer._resampled(k, k + 1920) for k in range(0, whole.size + 3 * 1920, 1920)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_the_writer_resamples_audio_that_grows_as_it_comes(tmp_path):
    """A stream extends the writer's audio as it comes (`examples/pipecat_avatar.py`): each frame's
    piece, made when the audio reached just past it, is the same as the whole signal resampled; a
    block is kept only once its input is all there."""
    rate = 16000
    audio = np.random.default_rng(3).standard_normal(rate * 3 + 77).astype(np.float32)
    whole = media._resample(audio, rate, media.OUTPUT_AUDIO_RATE)
    writer = media.VideoWriter(tmp_path / "out.mp4", 25.0, np.zeros(0, np.float32), rate)
    pieces = []
    for k in range(0, whole.size, 1920):
        writer.audio = audio[: min(audio.size, (k + 1920) // 3 + 640)]  # a frame's audio and a little more
        pieces.append(writer._resampled(k, min(k + 1920, whole.size)))
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)
