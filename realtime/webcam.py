"""`avatar webcam`: microphone → live avatar → virtual camera (for video calls).

Needs the `realtime` extra (sounddevice for the microphone, pyvirtualcam for the camera), PortAudio,
and a virtual camera device: on Linux the v4l2loopback kernel module
(`sudo modprobe v4l2loopback exclusive_caps=1`). Whatever is missing is named in one line.
"""

from __future__ import annotations

import queue
import time
import typing

import numpy as np

from avatar.errors import AvatarError


def check_devices() -> None:
    """Raise AvatarError naming what is missing for the webcam avatar; return when all is there."""
    try:
        import sounddevice
    except ImportError as exc:
        raise AvatarError("the webcam avatar needs the `realtime` extra: pip install 'avatar-engine[realtime]'") from exc
    except OSError as exc:
        raise AvatarError(f"no PortAudio library for the microphone ({exc}); install it (Debian: apt install libportaudio2)") from exc
    try:
        import pyvirtualcam  # noqa: F401
    except ImportError as exc:
        raise AvatarError("the webcam avatar needs pyvirtualcam: pip install 'avatar-engine[realtime]'") from exc
    try:
        devices = sounddevice.query_devices()
    except sounddevice.PortAudioError as exc:
        raise AvatarError(f"cannot list audio devices ({exc})") from exc
    if not any(d.get("max_input_channels", 0) > 0 for d in devices):
        raise AvatarError("no microphone found; connect one (or check that this user may use audio devices)")


def run(image: typing.Optional[str], config, idle_config, seconds: typing.Optional[float] = None,
        avatar_path: typing.Optional[str] = None, face_config=None) -> int:
    from avatar.enroll import load_avatar

    enrolled = load_avatar(avatar_path) if avatar_path else None
    check_devices()
    import pyvirtualcam
    import sounddevice

    from avatar import media
    from avatar.runtime import asset_path
    from realtime.engine import Engine

    engine = Engine(config=config, idle_config=idle_config, face_config=face_config)
    if enrolled is not None:
        avatar = engine.prepare_enrolled(enrolled)
    else:
        avatar = engine.prepare(media.read_image(image or asset_path("samples/portrait.jpg")))
    height, width = avatar.portrait.shape[:2]
    rate = 16000
    session = engine.open(avatar, rate)
    chunks: "queue.Queue[np.ndarray]" = queue.Queue()
    try:
        camera = pyvirtualcam.Camera(width=width, height=height, fps=config.fps)
    except RuntimeError as exc:
        raise AvatarError(f"no virtual camera ({str(exc).splitlines()[0]}); on Linux: sudo modprobe v4l2loopback exclusive_caps=1") from exc
    print(f"virtual camera: {camera.device} {width}x{height} at {config.fps:g} fps; speak (Ctrl-C stops)", flush=True)
    stream = sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=320,
                                     callback=lambda data, frames, t, status: chunks.put(data[:, 0].copy()))
    started = time.perf_counter()
    with camera, stream:
        try:
            while seconds is None or time.perf_counter() - started < seconds:
                while not chunks.empty():
                    session.push(chunks.get_nowait())
                session.keep_alive()
                if engine.step() == 0:
                    time.sleep(0.003)
                for frame in session.pop_frames():
                    camera.send(frame.image)
        except KeyboardInterrupt:
            pass
    stats = session.stats()
    print(f"sent {stats['frames']} frames ({stats['dropped']} repeated to hold sync)")
    return 0
