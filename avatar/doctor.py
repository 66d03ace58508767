"""`avatar doctor`: is this install complete and working? Each check runs the real part (a model
inference, a face detection, an encode) and reports ok or what is wrong; any failure → exit 1."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import tempfile
import typing

import numpy as np

from avatar import __version__

PACKAGES = ("numpy", "onnxruntime", "onnxruntime-gpu", "mediapipe", "av", "opencv-python-headless", "opencv-contrib-python",
            "dlib", "face-recognition-models", "scipy", "Pillow", "torch")


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _run(name: str, check: typing.Callable[[], str]) -> Check:
    try:
        return Check(name, True, check())
    except Exception as exc:  # noqa: BLE001 -- a doctor reports every failure as one line, whatever it is
        return Check(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


def versions() -> typing.Dict[str, str]:
    found = {"python": platform.python_version(), "avatar": __version__}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _providers() -> str:
    import onnxruntime

    from avatar.runtime import available_providers

    usable = available_providers()
    if not usable:
        raise RuntimeError(f"no usable provider among {onnxruntime.get_available_providers()}")
    unusable = [p for p in onnxruntime.get_available_providers() if p not in usable and p != "AzureExecutionProvider"]
    return (f"{', '.join(usable)} (in the order used); device {onnxruntime.get_device()}"
            + (f"; offered but cannot start: {', '.join(unusable)}" if unusable else ""))


def _model(name: str) -> typing.Callable[[], str]:
    def check() -> str:
        from avatar.provenance import file_sha256
        from avatar.runtime import asset_path

        path = asset_path(name)
        digest = file_sha256(path)
        if name.startswith("speech"):
            from avatar.speech.encoder import SpeechEncoder

            encoder = SpeechEncoder(path)
            out = encoder.features(np.zeros(8000, np.float32))
            assert out.shape[0] == 25 and np.isfinite(out).all(), "bad output"
            live = encoder.features(np.zeros(8000, np.float32), live=True)  # the live graphs (int8 on the CPU) built and run
            assert live.shape == (25, encoder.live_width) and np.isfinite(live).all(), "bad live output"
        elif name.startswith("motion"):
            from avatar.motion.runner import POINTS, MotionPredictor

            predictor = MotionPredictor(path)
            out = predictor.from_audio(np.zeros(8000, np.float32), 25.0, np.zeros((len(POINTS), 2), np.float32))
            assert out.shape == (13, len(POINTS), 2) and np.isfinite(out).all(), "bad output"
        else:
            from avatar.render.runner import OnnxDenoiser

            renderer = OnnxDenoiser(path)
            c = renderer.config
            out = renderer.sample(np.zeros((1, c.condition_channels, c.crop_size, c.crop_size), np.float32),
                                  np.zeros((1, 3, c.crop_size, c.crop_size), np.float32), steps=1)
            assert np.isfinite(out).all(), "bad output"
        return f"{path} sha256:{digest[:16]}… {path.stat().st_size / 1e6:.1f} MB, runs"
    return check


def _face() -> str:
    from avatar import media
    from avatar.face.tracker import FaceTracker
    from avatar.runtime import asset_path

    portrait = media.read_image(asset_path("samples/portrait.jpg"))
    with FaceTracker() as tracker:
        face = tracker.select(portrait)
    return f"mediapipe face mesh: {face.landmarks.shape[0]} landmarks on the sample portrait"


def _embedding() -> str:
    from avatar.identity import FaceEmbedder

    FaceEmbedder()
    return "dlib face embedding loads (face-recognition-models)"


def _codecs() -> str:
    import av

    from avatar import media

    missing = [name for name, mode in (("libx264", "w"), ("aac", "w"), ("h264", "r")) if name not in av.codecs_available]
    if missing:
        raise RuntimeError(f"PyAV's ffmpeg lacks {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/check.mp4"
        frames = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(5)]
        media.write_video(path, frames, 25.0, np.zeros(3200, np.float32))
        back = media.read_video(path)
        assert back.frames.shape[0] == 5 and back.audio is not None, "round trip failed"
    return f"H.264 + AAC encode/decode round trip (ffmpeg {'.'.join(map(str, av.library_versions.get('libavcodec', ())))} libavcodec)"


def run_checks() -> typing.List[Check]:
    return [
        Check("versions", True, ", ".join(f"{k} {v}" for k, v in versions().items())),
        _run("onnxruntime providers", _providers),
        _run("speech encoder", _model("speech.onnx")),
        _run("motion model (files)", _model("motion_offline.onnx")),
        _run("motion model (live)", _model("motion_live.onnx")),
        _run("renderer model", _model("render.onnx")),
        _run("face front-end", _face),
        _run("identity embedding", _embedding),
        _run("media codecs", _codecs),
    ]
