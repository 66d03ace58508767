"""Motion model: shapes, ONNX parity, streaming = offline, silence → closed mouth, training (DDP, resume),
evaluation with baselines. The default model is the committed assets/motion.onnx."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar import audio, media
from avatar.config import MotionConfig
from avatar.motion.model import N_POINTS, MotionModel
from avatar.motion.runner import MotionPredictor, rest_pose
from avatar.runtime import ASSETS
from conftest import GRID_CLIP, REPO, SPEECH_FLAC, feed_in_chunks
from avatar.face.landmarks import inner_gap as gap



@pytest.fixture(scope="module")
def predictor():
    return MotionPredictor()


@pytest.fixture(scope="module")
def rest():
    """A real person's closed mouth: GRID-A (a held-out person) from the first, silent frames of a clip."""
    from avatar.face.video import align_video

    frames = [f for f, _ in zip(align_video(media.iter_video_frames(GRID_CLIP)), range(10))]
    return rest_pose(np.stack([f.aligned.landmarks for f in frames]))[0]


def test_model_shapes_and_rest_is_zero_motion():
    model = MotionModel(MotionConfig(), torch.randn(12, N_POINTS * 2) * 0.01, torch.zeros(N_POINTS * 2)).eval()
    windows = torch.randn(2, 7, 32, 80)
    rest = torch.rand(2, N_POINTS, 2) * 128
    out = model(windows, rest)
    assert out.shape == (2, 7, N_POINTS, 2) and out.dtype == torch.float32
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert torch.allclose(model(windows, rest), rest[:, None].expand(2, 7, N_POINTS, 2))


def test_model_is_causal_over_frames():
    """Changing frame t's window changes no earlier frame's output: look-ahead is the mel context only."""
    model = MotionModel(MotionConfig(), torch.randn(12, N_POINTS * 2) * 0.01).eval()
    windows = torch.randn(1, 20, 32, 80)
    rest = torch.rand(1, N_POINTS, 2) * 128
    changed = windows.clone()
    changed[:, 12] += 1.0
    with torch.no_grad():
        a, b = model(windows, rest), model(changed, rest)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.equal(a[:, 12:], b[:, 12:])
    assert MotionConfig().mel_config().window_offset + MotionConfig().mel_window_frames - 1 == 7
    stream = audio.StreamingMelWindows(25, MotionConfig().mel_config())
    assert stream.lookahead_ms == pytest.approx(112.5) and stream.lookahead_ms <= 120


def test_onnx_export_parity(tmp_path):
    """The committed fp16 torch copy, exported here, matches onnxruntime within 1e-4; so does the shipped ONNX."""
    from training.export_motion import export, load_model, parity

    model = load_model(ASSETS / "motion.pt")
    export(model, tmp_path / "motion.onnx")
    rng = np.random.default_rng(0)
    for length in (1, 9, 100):
        windows = rng.uniform(-4, 2, (1, length, 32, 80)).astype(np.float32)
        rest = (64 + rng.normal(0, 8, (1, N_POINTS, 2))).astype(np.float32)
        assert parity(model, tmp_path / "motion.onnx", windows, rest) <= 1e-4
    shipped = MotionPredictor(ASSETS / "motion.onnx")
    with torch.no_grad():
        expected = model(torch.from_numpy(windows), torch.from_numpy(rest)).numpy()[0]
    assert np.abs(shipped.predict(windows[0], rest[0]) - expected).max() < 2e-3  # fp16 copy vs fp32 export


def test_streaming_equals_offline(predictor, rest):
    samples = media.read_audio(SPEECH_FLAC, 16000)[: 16000 * 4]
    for fps in (25, 29.97):
        offline = predictor.from_audio(samples, fps, rest)
        indices, outputs = feed_in_chunks(predictor.stream(fps, rest), samples, np.random.default_rng(int(fps)))
        np.testing.assert_array_equal(indices, np.arange(len(offline)))
        np.testing.assert_allclose(outputs, offline, atol=1e-4)
    assert predictor.stream(25, rest).lookahead_ms == pytest.approx(112.5)


def crossfade_loop(piece: np.ndarray, length: int, fade: int = 1600) -> np.ndarray:
    """Loop a short recording to `length` samples with 100 ms crossfades (no clicks at the seams)."""
    out = piece.copy()
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    while out.size < length:
        joined = out[-fade:] * (1 - ramp) + piece[:fade] * ramp
        out = np.concatenate([out[:-fade], joined, piece[fade:]])
    return out[:length]


def test_silence_and_room_noise_give_a_closed_relaxed_mouth(predictor, rest):
    iod_units = 32.1  # the template's inter-ocular distance in 128-crop pixels
    speech = media.read_audio(SPEECH_FLAC, 16000)[: 16000 * 3]
    talking = predictor.from_audio(speech, 25, rest)
    rng = np.random.default_rng(0)
    cases = {
        "digital silence": np.zeros(16000 * 2, np.float32),
        "room tone (real, GRID's lead-in)": crossfade_loop(media.read_audio(GRID_CLIP, 16000)[:6000], 16000 * 2),
        "white noise -55 dBFS": rng.normal(0, 10 ** (-55 / 20), 16000 * 2).astype(np.float32),
        "hum -45 dBFS": (10 ** (-45 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50 * np.arange(32000) / 16000)).astype(np.float32),
    }
    for name, signal in cases.items():
        out = predictor.from_audio(signal, 25, rest)[10:-10]  # away from the padded ends
        opening = gap(out) - gap(rest)
        motion = np.abs(out - rest).mean(axis=(1, 2)) / iod_units * 100
        assert opening.max() < 0.03 * iod_units, f"{name}: mouth opens by {opening.max():.2f} px"
        assert motion.mean() < 1.0, f"{name}: mean motion {motion.mean():.2f} %IOD"
        assert np.abs(np.diff(out, axis=0)).max() < 0.2, f"{name}: the mouth twitches"
    assert (gap(talking) - gap(rest)).max() > 0.1 * iod_units  # and speech does open it


@pytest.mark.slow
def test_training_runs_under_torchrun_with_two_gloo_processes_and_resumes(tiny_cache, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train_motion", "--cache", str(tiny_cache), "--out", str(out),
               "--steps", "4", "--batch", "4", "--val-every", "2", "--threads", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:3000] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "val step 4" in result.stdout
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 4 and (out / "best.pt").exists() and any((out / "tb").iterdir())
    resumed = subprocess.run([sys.executable, "-m", "training.train_motion", "--cache", str(tiny_cache), "--out", str(out),
                              "--steps", "6", "--batch", "4", "--val-every", "2", "--resume", "--threads", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "done: 2 steps" in resumed.stdout and "step      0" not in resumed.stdout  # continued at step 4
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 6


def test_eval_reports_model_and_baselines(tiny_cache):
    result = subprocess.run([sys.executable, "-m", "training.eval_motion", "--cache", str(tiny_cache)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for words in ("model", "rest pose", "mismatched audio", "opening r", "audio shift", "lowest error at shift"):
        assert words in result.stdout


def test_a_broken_model_file_is_a_one_line_error(tmp_path):
    from avatar.errors import AvatarError

    broken = tmp_path / "motion.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(AvatarError, match="cannot load the model") as info:
        MotionPredictor(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(AvatarError, match="no such model file"):
        MotionPredictor(tmp_path / "missing.onnx")
