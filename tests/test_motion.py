"""Motion models: shapes, causality (live) and look-ahead (offline), ONNX parity, streaming = offline,
silence → closed mouth, training (DDP, resume), evaluation with baselines. The default models are the
committed assets/motion_live.onnx and assets/motion_offline.onnx."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar import media
from avatar.config import MotionConfig, SpeechConfig
from avatar.errors import AvatarError
from avatar.motion.model import N_POINTS, MotionModel
from avatar.motion.runner import MotionPredictor, rest_pose
from avatar.runtime import ASSETS
from avatar.speech.encoder import SpeechEncoder
from conftest import GRID_CLIP, REPO, feed_in_chunks
from avatar.face.landmarks import inner_gap as gap



@pytest.fixture(scope="module", params=["offline", "live"])
def predictor(request):
    return MotionPredictor(live=request.param == "live")


@pytest.fixture(scope="module")
def live_predictor():
    return MotionPredictor(live=True)


@pytest.fixture(scope="module")
def rest():
    """A real person's closed mouth: GRID-A (a held-out person) from the first, silent frames of a clip."""
    from avatar.face.video import align_video

    frames = [f for f, _ in zip(align_video(media.iter_video_frames(GRID_CLIP)), range(10))]
    return rest_pose(np.stack([f.aligned.landmarks for f in frames]))[0]


def test_model_shapes_and_rest_is_zero_motion():
    model = MotionModel(MotionConfig(), torch.randn(12, N_POINTS * 2) * 0.01, torch.zeros(N_POINTS * 2)).eval()
    features = torch.randn(2, 7, MotionConfig().features)
    rest = torch.rand(2, N_POINTS, 2) * 128
    out = model(features, rest)
    assert out.shape == (2, 7, N_POINTS, 2) and out.dtype == torch.float32
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert torch.allclose(model(features, rest), rest[:, None].expand(2, 7, N_POINTS, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_live_model_is_causal_and_offline_model_looks_ahead(causal):
    """Live: changing frame t's features changes no earlier frame (the encoder's look-ahead is all there
    is). Offline: frames up to `temporal_reach` before it change too: ≥ 250 ms of future at 25 fps."""
    torch.manual_seed(0)  # unseeded, a dead unit at the reach's edge could hide a frame's dependence
    config = MotionConfig(causal=causal)
    model = MotionModel(config, torch.randn(12, N_POINTS * 2) * 0.01).eval()
    features = torch.randn(1, 60, config.features)
    rest = torch.rand(1, N_POINTS, 2) * 128
    changed = features.clone()
    changed[:, 40] += 1.0
    with torch.no_grad():
        moved = (model(features, rest) != model(changed, rest)).any(dim=(0, 2, 3))
    first = int(torch.nonzero(moved)[0])
    if causal:
        assert first == 40
    else:
        assert first == 40 - config.temporal_reach and config.temporal_reach * 40 >= 250


def test_the_closure_gate_pulls_the_mouth_to_rest_where_its_read_out_says_closed():
    """`ClosureGated`: where the read-out is at or under the threshold the network's mouth is kept,
    at 1 the mouth is the rest shape, half way between at the half point; the read-out's weights are
    laid out as the fit's stacked frames (oldest first: a weight on the centre frame's feature reads
    that frame only)."""
    from avatar.motion.model import ClosureGated

    network = MotionModel(MotionConfig(causal=False), torch.randn(12, N_POINTS * 2) * 0.01).eval()
    features = torch.randn(1, 60, network.config.features)
    rest = torch.rand(1, N_POINTS, 2) * 128
    weights = np.zeros(5 * network.config.features)
    for level, share in ((0.25, 0.0), (0.625, 0.5), (1.0, 1.0), (-3.0, 0.0)):
        gated = ClosureGated.from_ridge(network, weights, np.zeros_like(weights), level, threshold=0.25).eval()
        with torch.no_grad():
            mouth, alone = gated(features, rest), network(features, rest)
        torch.testing.assert_close(mouth, alone + share * (rest[:, None] - alone))
    for level, share in ((0.25, 0.0), (0.375, 0.5), (0.5, 1.0), (0.9, 1.0)):  # fully at rest from `full` on
        gated = ClosureGated.from_ridge(network, weights, np.zeros_like(weights), level, threshold=0.25, full=0.5).eval()
        with torch.no_grad():
            mouth, alone = gated(features, rest), network(features, rest)
        torch.testing.assert_close(mouth, alone + share * (rest[:, None] - alone))
    with pytest.raises(ValueError, match="above its threshold"):
        ClosureGated(network, network.config.features, threshold=0.5, full=0.5)
    weights[2 * network.config.features] = 1.0  # the read-out: the centre frame's first feature
    gated = ClosureGated.from_ridge(network, weights, np.zeros_like(weights), 0.0, threshold=0.25).eval()
    changed = features.clone()
    changed[:, 40, 0] += 5.0
    with torch.no_grad():
        read = gated.closure(changed) - gated.closure(features)
    assert torch.nonzero(read[0].abs() > 1e-6).ravel().tolist() == [40]


def test_the_live_closure_gate_is_causal_and_gates_both_outputs_of_the_blend():
    """Over a live blend (network, read-out), the gate reads the frame and the 4 before it only, and
    pulls each of the pair towards rest by the same share (so the runner's voice-weighted mix of the
    two is gated alike)."""
    from avatar.motion.model import ClosureGated, LinearMotionModel, MotionBlend

    torch.manual_seed(0)
    network = MotionModel(MotionConfig(causal=True), torch.randn(12, N_POINTS * 2) * 0.01).eval()
    d = network.config.features
    blend = MotionBlend(network, LinearMotionModel.from_ridge(np.random.default_rng(0).normal(0, 1e-3, (5 * d, N_POINTS * 2)),
                                                             np.zeros(5 * d), np.zeros(N_POINTS * 2)))
    features = torch.randn(1, 60, d)
    rest = torch.rand(1, N_POINTS, 2) * 128
    weights = np.zeros(5 * d)
    weights[4 * d] = 1.0  # the newest frame's first feature
    weights[0] = 0.5  # and the oldest's (4 frames back)
    gated = ClosureGated.from_ridge(blend, weights, np.zeros_like(weights), 0.0, threshold=0.25).eval()
    changed = features.clone()
    changed[:, 40, 0] += 5.0
    with torch.no_grad():
        read = gated.closure(changed) - gated.closure(features)
        outputs, alone = gated(features, rest), blend(features, rest)
    assert torch.nonzero(read[0].abs() > 1e-6).ravel().tolist() == [40, 44]  # never an earlier frame
    share = ((gated.closure(features) - 0.25) / 0.75).clamp(0, 1).detach()[..., None, None]
    assert isinstance(outputs, tuple) and len(outputs) == 2
    for mouth, own in zip(outputs, alone):
        torch.testing.assert_close(mouth, own + share * (rest[:, None] - own))


@pytest.mark.parametrize("name", ["motion_live", "motion_offline"])
def test_onnx_export_parity(tmp_path, name):
    """The committed torch copy, exported here, matches onnxruntime within 1e-4; so does the shipped ONNX
    (the live one: the network and its linear read-out, weighed by voice activity)."""
    from training.export_motion import export, load_model, parity

    model = load_model(ASSETS / f"{name}.pt")
    export(model, tmp_path / f"{name}.onnx")
    rng = np.random.default_rng(0)
    for length, first in ((1, 0), (9, 0), (9, 6), (100, 0)):
        features = rng.normal(0, 1, (1, length, model.config.features)).astype(np.float32)
        rest = (64 + rng.normal(0, 8, (1, N_POINTS, 2))).astype(np.float32)
        assert parity(model, tmp_path / f"{name}.onnx", features, rest, np.arange(first, length)) <= 1e-4
    shipped = MotionPredictor(ASSETS / f"{name}.onnx")
    assert shipped.live == (name == "motion_live")
    with torch.no_grad():
        expected = model(torch.from_numpy(features), torch.from_numpy(rest))
    if isinstance(expected, tuple):  # the live blend: the network and its linear read-out, weighed by voice activity
        from avatar.motion.runner import READOUT_WEIGHT

        network, readout = (part.numpy()[0] for part in expected)
        voice = np.linspace(0, 1, len(network), dtype=np.float32)
        expected = network + READOUT_WEIGHT * voice[:, None, None] * (readout - network)
        assert np.abs(shipped.predict(features[0], rest[0], voice=voice) - expected).max() < 5e-3
        assert np.abs(shipped.predict(features[0], rest[0], voice=np.zeros(len(network))) - network).max() < 5e-3  # silence: the network
    else:
        expected = expected.numpy()[0]
        assert np.abs(shipped.predict(features[0], rest[0]) - expected).max() < 5e-3  # px: fp16 copy vs fp32 export


def test_a_model_computes_the_wanted_frames_alone_with_the_numbers_of_all_frames():
    """`frames`: the network, the linear read-out and the closure gate (causal and centred) give at
    the wanted frames what they give there when every frame is computed."""
    from avatar.motion.model import ClosureGated, LinearMotionModel, MotionBlend

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for causal in (True, False):
        network = MotionModel(MotionConfig(causal=causal), torch.randn(12, N_POINTS * 2) * 0.01).eval()
        d = network.config.features
        linear = LinearMotionModel.from_ridge(rng.normal(0, 1e-3, (5 * d, N_POINTS * 2)), rng.normal(0, 1, 5 * d),
                                              np.zeros(N_POINTS * 2), causal=causal)
        gated = ClosureGated.from_ridge(MotionBlend(network, linear), rng.normal(0, 1e-2, 5 * d), np.zeros(5 * d), 0.3,
                                        threshold=0.25).eval()
        features, rest = torch.randn(2, 30, d), torch.rand(2, N_POINTS, 2) * 128
        for frames in (torch.tensor([29]), torch.arange(23, 30), torch.tensor([0, 4, 17])):
            with torch.no_grad():
                for model in (network, linear, gated):
                    every, wanted = model(features, rest), model(features, rest, frames)
                    for all_frames, some in zip(every if isinstance(every, tuple) else (every,),
                                                wanted if isinstance(wanted, tuple) else (wanted,)):
                        assert some.shape == (2, len(frames), N_POINTS, 2)
                        torch.testing.assert_close(some, all_frames[:, frames], atol=1e-4, rtol=0)


def test_a_streams_newest_frames_are_the_last_frames_of_the_whole_prediction(predictor, rest):
    """`predict(..., newest=k)`: the shipped models (the live one computes those frames alone; a file
    without the `frames` input, as the offline one, computes them all and keeps the last), with their
    voice activity."""
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (12, predictor.config.features)).astype(np.float32)
    voice = rng.uniform(0, 1, 12).astype(np.float32)
    whole = predictor.predict(features, rest, voice=voice)
    for k in (1, 2, 5):
        np.testing.assert_allclose(predictor.predict(features, rest, voice=voice[-k:], newest=k), whole[-k:], atol=1e-4)
    if predictor.live:
        assert "frames" in predictor.session.input_names


def test_the_live_read_out_runs_in_8_bits_on_the_cpu_near_the_float_file_and_row_by_row(live_predictor, rest):
    """With `SpeechConfig.live_int8` the live model's read-out (its one MatMul of ≥ READOUT_INT8_MIN_WEIGHTS
    weights) is onnxruntime's MatMulNBits in 8 bits (`avatar.runtime.weight_only_int8`): landmarks near
    the float file's, the network's layers untouched, and a frame's numbers the same to the bit whether
    it is computed alone (a stream) or with the others (a whole file)."""
    import onnx

    from avatar.motion.runner import READOUT_INT8_MIN_WEIGHTS
    from avatar.runtime import weight_only_int8

    model = onnx.load_from_string(weight_only_int8(live_predictor.session.path, READOUT_INT8_MIN_WEIGHTS))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") >= 2  # the read-out; the network's and the gate's stay float
    float_predictor = MotionPredictor(live=True, encoder=SpeechEncoder(config=dataclasses.replace(SpeechConfig(), live_int8=False)))
    rng = np.random.default_rng(3)
    features = rng.normal(0, 1, (40, live_predictor.config.features)).astype(np.float32)
    int8, exact = live_predictor.predict(features, rest), float_predictor.predict(features, rest)
    assert 1e-4 < np.abs(int8 - exact).max() < 0.02  # pixels of the 128² crop; not the float file
    alone = np.concatenate([live_predictor.predict(features[:k + 1], rest, newest=1) for k in range(len(features))])
    np.testing.assert_array_equal(alone, int8)
    with pytest.raises(AvatarError, match="no MatMul"):
        weight_only_int8(live_predictor.session.path, 10 ** 9)


def test_streaming_equals_offline(live_predictor, rest):
    samples = media.read_audio(GRID_CLIP, 16000)
    for fps in (25, 29.97, 24):
        offline = live_predictor.from_audio(samples, fps, rest)
        indices, outputs = feed_in_chunks(live_predictor.stream(fps, rest), samples, np.random.default_rng(int(fps)))
        np.testing.assert_array_equal(indices, np.arange(len(offline)))
        np.testing.assert_allclose(outputs, offline, atol=1e-4)  # the encoder's batched windows: float rounding only
    assert live_predictor.stream(25, rest).lookahead_ms == pytest.approx(102.5)
    assert live_predictor.stream(30, rest).lookahead_ms == pytest.approx(115.833, abs=1e-3)  # frames between encoder frames
    assert live_predictor.stream(29.97, rest).lookahead_ms == pytest.approx(120.0, abs=0.01)  # 122.5 before the bound


@pytest.mark.parametrize("fps, frames, worst_among", [(25, range(20, 26), True), (30, range(20, 26), True),
                                                     (24, range(12, 16), True), (29.97, range(20, 23), False)])
def test_a_streamed_frame_comes_out_exactly_when_its_audio_has_arrived(live_predictor, rest, fps, frames, worst_among):
    """Each frame needs the live window of the encoder frame at or after the position it reads (its
    time, or the encoder frame before it where the one after would pass the look-ahead bound: frames
    13 at 24 fps and 21 at 29.97 fps): it is out with that window's last sample and not one sample
    before, and the worst frame waits `lookahead_ms`, at most 120 ms at any rate."""
    from avatar.speech.encoder import frame_positions

    samples = media.read_audio(GRID_CLIP, 16000)
    encoder = live_predictor.encoder
    moved = live_predictor.positions(fps, 100) != frame_positions(fps, 100)
    assert moved.any() == (fps in (24, 29.97)) and moved[list(frames)].any() == (fps in (24, 29.97))
    worst = 0.0
    for i in frames:
        position = float(live_predictor.positions(fps, 1, i)[0])  # in encoder frames
        needed = int(round(encoder.needed_ms(int(np.ceil(position - 1e-9))) * 16))
        stream = live_predictor.stream(fps, rest)
        got, _ = stream.push(samples[: needed - 1])
        assert i not in got
        got, _ = stream.push(samples[needed - 1 : needed])
        assert i in got
        worst = max(worst, needed / 16.0 - 1000.0 * i / fps)
    stated = live_predictor.stream(fps, rest).lookahead_ms
    if worst_among:
        assert worst == pytest.approx(stated, abs=0.07)  # these frames hold a rate's worst one
    assert worst <= stated + 1e-6 and stated <= 120


def test_the_offline_model_does_not_stream(rest):
    with pytest.raises(ValueError, match="live model"):
        MotionPredictor().stream(25, rest)


def test_silence_and_room_noise_give_a_closed_relaxed_mouth(predictor, rest):
    from training.speech_features import loop_with_crossfade

    iod_units = 32.1  # the template's inter-ocular distance in 128-crop pixels
    speech = media.read_audio(GRID_CLIP, 16000)
    talking = predictor.from_audio(speech, 25, rest)
    rng = np.random.default_rng(0)
    cases = {
        "digital silence": np.zeros(16000 * 2, np.float32),
        "room tone (real, GRID's lead-in)": loop_with_crossfade(media.read_audio(GRID_CLIP, 16000)[:6000], 16000 * 2),
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
    for words in ("model", "rest pose", "mismatched audio", "real opening, linear", "own mean mouth, held", "model at own place",
                  "opening r", "audio shift", "lowest error at shift"):
        assert words in result.stdout
    live = subprocess.run([sys.executable, "-m", "training.eval_motion", "--cache", str(tiny_cache), "--live"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert live.returncode == 0 and "live model" in live.stdout, live.stderr


def test_the_real_opening_row_places_lips_that_move_with_the_opening_alone_exactly(rest):
    from avatar.face import landmarks as lm
    from training.motion_data import MotionClip
    from training.motion_eval import opening_oracle

    width = float(lm.mouth_width(rest))
    direction = np.random.default_rng(0).normal(size=(N_POINTS, 2)) * 0.05
    direction[lm.MOUTH_UPPER_INNER] = (0.0, -0.5)  # the inner-lip gap grows as the opening
    direction[lm.MOUTH_LOWER_INNER] = (0.0, 0.5)
    clips = []
    for person, frequency in enumerate((3.0, 5.0)):
        opening = np.abs(np.sin(np.linspace(0, frequency, 60)))[:, None, None] * 0.2  # mouth widths
        offsets = opening * direction[None] + 0.03  # speaking mouths sit off the closed one as well
        mouth = (rest[None] + offsets * width).astype(np.float32)
        clips.append(MotionClip(f"clip{person}", f"person{person}", 25.0, {}, np.arange(60.0), mouth, np.zeros((60, 2)),
                                offsets, np.ones(60, bool), rest, width, 2 * width, np.ones(60)))
    oracle = opening_oracle(clips)
    opened = gap(clips[1].mouth) / width
    placed = (np.stack([opened, np.ones_like(opened)], 1) @ oracle).reshape(clips[1].offsets.shape)
    assert np.abs(placed - clips[1].offsets).max() < 1e-4


def test_a_broken_model_file_is_a_one_line_error(tmp_path):
    from avatar.errors import AvatarError

    broken = tmp_path / "motion.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(AvatarError, match="cannot load the model") as info:
        MotionPredictor(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(AvatarError, match="no such model file"):
        MotionPredictor(tmp_path / "missing.onnx")


def test_closure_measure_finds_the_bilabials_and_the_real_lips_closing():
    """GRID's "place white in j three please": two /p/, aligned where they are spoken; the real video's
    lips close for them, a mouth held open fails the measure, a closed one passes."""
    from avatar.face.video import align_video
    from avatar.face import landmarks as lm
    from training.closures import CLOSED_PCT_IOD, bilabial_spans, closure_rate
    from training.export_speech import grid_sentence

    clip = GRID_CLIP.with_name("pwij3p.mpg")
    spans = bilabial_spans(media.read_audio(clip, 16000), grid_sentence("pwij3p"))
    assert [p for p, _, _ in spans] == ["P", "P"]
    assert 0.3 < spans[0][1] < 0.6 and 1.5 < spans[1][1] < 1.9  # "place" after the lead-in, "please" at the end
    landmarks = np.stack([f.aligned.landmarks for f in align_video(media.iter_video_frames(clip))])
    gap_pct = lm.mouth_opening(landmarks) / lm.interocular(landmarks) * 100
    assert closure_rate(gap_pct, spans, 25.0) == (2, 2)
    assert closure_rate(np.full_like(gap_pct, 3 * CLOSED_PCT_IOD), spans, 25.0) == (0, 2)
    assert closure_rate(np.zeros_like(gap_pct), spans, 25.0) == (2, 2)


def test_a_live_model_made_for_one_row_per_frame_is_refused_in_one_line(tmp_path):
    """The live features hold each frame's row and the window's look-ahead rows (1,920 wide): a live
    model made before, reading 384, is refused with what to do, not a traceback."""
    from avatar.errors import AvatarError
    from training.export_motion import export

    network = MotionModel(MotionConfig(causal=True, features=384), torch.randn(12, N_POINTS * 2) * 0.01).eval()
    old = tmp_path / "motion_live.onnx"
    export(network, old)
    with pytest.raises(AvatarError, match="reads 384-wide features, but the speech encoder gives 1920") as info:
        MotionPredictor(old, live=True)
    assert "\n" not in str(info.value)


def test_closure_events_are_the_real_lips_short_closures_in_speech():
    """Runs of closed real lips count when short, bounded by open lips and near the voice; a
    prediction closes one when it closes on the run or a frame either side; false closures count
    clearly open voiced frames that a prediction closes."""
    from training.closures import CLOSED_PCT_IOD, closure_events, events_closed, false_closures

    fps, n = 25.0, 100
    real = np.full(n, 10.0)
    voice = np.ones(n)
    real[10:13] = 1.0  # a /p/: 3 frames, in speech
    real[30:31] = 2.0  # a /m/ of one frame
    real[50:70] = 0.5  # 0.8 s closed: a pause, not a consonant
    real[80:82] = 1.0  # closed, but no voice anywhere near
    voice[72:92] = 0.0
    real[97:] = 1.0  # closed up to the end: not bounded by open lips
    assert closure_events(real, voice, fps) == [(10, 12), (30, 30)]
    keep = np.ones(n, bool)
    keep[9] = False  # the frame before the /p/ untracked: the run is not known to be bounded
    assert closure_events(real, voice, fps, keep) == [(30, 30)]
    events = closure_events(real, voice, fps)
    predicted = np.full(n, 10.0)
    assert events_closed(predicted, events) == 0
    predicted[13] = CLOSED_PCT_IOD - 0.1  # a frame late: still counted
    assert events_closed(predicted, events) == 1
    predicted[32] = 0.0  # two frames late: not
    assert events_closed(predicted, events) == 1
    closed, counted = false_closures(predicted, real, voice)
    assert counted == int(((real >= 2 * CLOSED_PCT_IOD) & (voice >= 0.5)).sum())
    assert closed == 2  # frames 13 and 32, where the real lips are open
    assert false_closures(np.zeros(n), real, voice) == (counted, counted)


def test_the_mouth_comes_to_rest_after_the_speech_and_moves_again_when_it_returns(predictor, rest):
    """Both models: within `hold_after_s` + hangover + `ease_s` of the last word the mouth is exactly at rest
    (SilenceHold), and speech after the silence opens it again; with the hold off it is not forced."""
    from avatar.config import SilenceConfig

    speech = media.read_audio(GRID_CLIP, 16000)[8000:32000]  # 1.5 s of words
    audio = np.concatenate([speech, np.zeros(16000 * 2, np.float32), speech])
    out = predictor.from_audio(audio, 25, rest)
    settled = slice(int(25 * (1.5 + 0.12 + SilenceConfig().hold_after_s + SilenceConfig().ease_s)) + 1, int(25 * 3.5))
    np.testing.assert_allclose(out[settled], np.broadcast_to(rest, out[settled].shape), atol=1e-5)
    assert (gap(out[int(25 * 3.5):]) - gap(rest)).max() > 1.0  # talking again
    free = MotionPredictor(predictor.session.path, encoder=predictor.encoder, silence=SilenceConfig(enabled=False))
    assert np.abs(free.from_audio(audio, 25, rest)[settled] - rest).max() > 1e-3


def test_ridge_readout_baseline_on_the_cache(tiny_cache, capsys):
    """The linear baseline fits on the training clips and scores the held-out one: a finite r per λ."""
    from training import readout

    assert readout.main(["--cache", str(tiny_cache), "--live"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "opening r" in line]
    assert len(lines) == len(readout.LAMBDAS)
    assert all(-1.0 <= float(line.split("opening r ")[1].split(",")[0]) <= 1.0 for line in lines)


def test_closure_gate_training_writes_a_gated_model(tiny_cache, tmp_path):
    """`training.closure_gate` on a real cache: λ by leave-people-out AUC, an ONNX with the network's
    inputs and outputs whose mouths are the network's or pulled towards rest, and a torch copy that
    `load_model` reads back as the same gated model (whose network alone teaches the live model)."""
    from avatar.motion.model import ClosureGated
    from training import closure_gate
    from training.export_motion import load_model

    out, copy = tmp_path / "gated.onnx", tmp_path / "gated.pt"
    assert closure_gate.main(["--cache", str(tiny_cache), "--network", str(ASSETS / "motion_offline.pt"), "--out", str(out),
                              "--torch-copy", str(copy)]) == 0
    gated = load_model(copy)
    assert isinstance(gated, ClosureGated) and (gated.threshold, gated.full) == (closure_gate.THRESHOLD, closure_gate.FULL)
    rng = np.random.default_rng(1)
    features = rng.normal(0, 1, (1, 80, gated.config.features)).astype(np.float32)
    rest = (64 + rng.normal(0, 8, (1, N_POINTS, 2))).astype(np.float32)
    with torch.no_grad():
        alone = gated.network(torch.from_numpy(features), torch.from_numpy(rest)).numpy()[0]
    mouth = MotionPredictor(out).predict(features[0], rest[0])
    share = np.linalg.norm((mouth - alone).reshape(80, -1), axis=1) / np.linalg.norm((rest[0] - alone).reshape(80, -1), axis=1)
    assert np.all((share > -1e-3) & (share < 1 + 1e-3))  # kept, or moved towards rest, never past it
    from training.train_motion import teacher_offsets  # a gated copy teaches the live model with its network alone

    with torch.no_grad():
        taught = gated.network.offsets(gated.network.coefficients(torch.from_numpy(features)))[0].numpy()
    np.testing.assert_array_equal(teacher_offsets(str(copy))(features[0]), taught)
    state = torch.load(copy, weights_only=False)  # a second teacher: the head's weights halved
    state["model"]["head.weight"] = state["model"]["head.weight"] / 2
    torch.save(state, tmp_path / "second.pt")
    second = teacher_offsets(str(tmp_path / "second.pt"))(features[0])
    assert np.abs(second - taught).max() > 1e-3
    np.testing.assert_allclose(teacher_offsets(f"{copy},{tmp_path / 'second.pt'}")(features[0]), (taught + second) / 2, atol=1e-6)


def test_closure_gate_training_gates_the_live_blend(tiny_cache, tmp_path):
    """The live blend gated: causal read-out, both ONNX outputs (network, read-out) moved towards rest
    alike, the torch copy keeps the read-out and reads back as the same model; the live stream stays causal."""
    from avatar.motion.model import ClosureGated, MotionBlend
    from avatar.motion.runner import READOUT_WEIGHT
    from training import closure_gate
    from training.export_motion import load_model

    out, copy = tmp_path / "live.onnx", tmp_path / "live.pt"
    assert closure_gate.main(["--cache", str(tiny_cache), "--network", str(ASSETS / "motion_live.pt"), "--out", str(out),
                              "--torch-copy", str(copy)]) == 0
    gated = load_model(copy)
    assert isinstance(gated, ClosureGated) and isinstance(gated.network, MotionBlend)
    assert (gated.threshold, gated.full) == (closure_gate.LIVE_THRESHOLD, closure_gate.LIVE_FULL) and gated.config.causal
    rng = np.random.default_rng(2)
    features = rng.normal(0, 1, (1, 80, gated.config.features)).astype(np.float32)
    rest = (64 + rng.normal(0, 8, (1, N_POINTS, 2))).astype(np.float32)
    float_readout = SpeechEncoder(config=dataclasses.replace(SpeechConfig(), live_int8=False))  # torch's numbers, not 8 bits
    predictor = MotionPredictor(out, live=True, encoder=float_readout)
    assert predictor.has_readout
    with torch.no_grad():
        network, readout = (o.numpy()[0] for o in gated(torch.from_numpy(features), torch.from_numpy(rest)))
    np.testing.assert_allclose(predictor.predict(features[0], rest[0], voice=np.zeros(80)), network, atol=1e-3)
    np.testing.assert_allclose(predictor.predict(features[0], rest[0], voice=np.full(80, 1 / READOUT_WEIGHT)), readout, atol=1e-3)
    head = predictor.predict(features[0, :50], rest[0], voice=np.ones(50))
    np.testing.assert_allclose(predictor.predict(features[0], rest[0], voice=np.ones(80))[:50], head, atol=1e-4)  # causal


def test_person_folds_hold_each_person_out_once_and_never_fit_on_them():
    """The folds that choose an encoder layer or a ridge λ on the training people alone."""
    import types

    from training.readout import person_folds

    clips = [types.SimpleNamespace(person=p, clip_id=f"{p}{k}") for p in "abcdefg" for k in range(1 + (p in "bd"))]
    held_out = []
    for fit, held in person_folds(clips, 3):
        assert held and not {c.person for c in fit} & {c.person for c in held}
        assert len(fit) + len(held) == len(clips)
        held_out += [c.clip_id for c in held]
    assert sorted(held_out) == sorted(c.clip_id for c in clips)
    with pytest.raises(ValueError, match="cannot make"):
        list(person_folds(clips, 8))


@pytest.fixture(scope="module")
def offline_predictor():
    return MotionPredictor()


def _long_speech(seconds):
    from conftest import DATA

    speech = media.read_audio(DATA / "speech/kleinlee__DH_live/audio0.wav", 16000)
    return np.resize(speech, int(seconds * 16000) + 123)


def test_long_inputs_are_heard_a_window_at_a_time_with_the_same_numbers(offline_predictor, rest):
    """65 s of speech (three of the encoder's 30-s windows): the offline landmarks made a window at a
    time equal those from the whole input's features, with and without a person's adaptation, at 25
    and 29.97 fps (frames that fall between encoder frames), for frames past the speech and fewer."""
    from avatar import audio as audio_frontend
    from avatar.motion.adapt import MotionAdaptation
    from avatar.motion.runner import SilenceHold

    samples = _long_speech(65)
    rng = np.random.default_rng(0)
    width = 384 + 2 * N_POINTS
    adaptation = MotionAdaptation(rng.normal(0, 0.1, width), rng.normal(0, 0.01, 2 * N_POINTS),
                                  rng.normal(0, 0.001, (width, 2 * N_POINTS)), 1000.0, 500, 0.5, 0.4, *offline_predictor.models)
    whole = offline_predictor.encoder.features(samples)
    assert np.array_equal(whole, np.concatenate([rows for _, rows in offline_predictor.encoder.offline_chunks(samples)]))
    from avatar.speech.encoder import frame_features

    for fps, more, person in ((25.0, 0, None), (25.0, 0, adaptation), (29.97, 0, adaptation), (25.0, 40, None), (25.0, -40, adaptation)):
        n = audio_frontend.n_video_frames(samples.size, fps) + more  # more: frames past the speech (a dub that keeps its video)
        features = frame_features(whole, fps, n)
        vad = audio_frontend.voice_activity(samples, fps, n)
        expected = offline_predictor.predict(features, rest)
        if person is not None:
            expected = person.apply(features, expected, rest)
        expected = SilenceHold(fps, offline_predictor.silence).apply(expected, rest, vad)
        got = offline_predictor.from_audio(samples, fps, rest, n, adaptation=person)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4, (fps, more, np.abs(got - expected).max())
    # An adaptation fitted with another encoder or model reads features it was not made for: refused.
    from avatar.errors import AvatarError

    for stale in (dataclasses.replace(adaptation, speech_model="0" * 64), dataclasses.replace(adaptation, motion_model="")):
        with pytest.raises(AvatarError, match="enroll them again"):
            offline_predictor.from_audio(samples[:16000], 25.0, rest, adaptation=stale)


def test_the_memory_of_hearing_does_not_grow_with_the_length(offline_predictor, rest):
    """The speech prepared for a file: the peak of what numpy allocates while hearing 4 minutes is
    within a few MB of 1 minute's (the landmarks, 0.7 MB a minute, are all that grows); hearing the
    whole input at once held its log-mel (float64 copies) and features: 154 MB more for 4 minutes."""
    import tracemalloc

    peaks = {}
    for minutes in (1, 4):
        samples = _long_speech(60 * minutes)
        tracemalloc.start()
        offline_predictor.from_audio(samples, 25.0, rest)
        peaks[minutes] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    assert peaks[4] - peaks[1] < 2.1 + 3, peaks  # the landmarks of 3 more minutes, and slack


def test_ridge_sums_solve_the_ridge_fit_of_the_rows_they_sum():
    """`RidgeSums`: the union of two sets of rows, and a set weighted 2, give `fit`'s read-out of the
    rows stacked (the weighted set twice)."""
    from training.closure_gate import RidgeSums
    from training.linear_motion import fit

    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(1, 1, (40, 6)), rng.normal(-1, 2, (30, 6))
    y1, y2 = x1 @ rng.normal(0, 1, 6) + rng.normal(0, 0.1, 40), rng.uniform(0, 1, 30)
    for weight, rows, targets in ((1.0, np.r_[x1, x2], np.r_[y1, y2]), (2.0, np.r_[x1, x2, x2], np.r_[y1, y2, y2])):
        got = (RidgeSums.of(x1, y1) + RidgeSums.of(x2, y2, weight)).solve(3.0)
        want = fit(rows, targets, 3.0)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_the_live_gate_taught_on_speech_only_clips(tiny_cache, tmp_path):
    """`--teacher`: the live read-out is fitted on the videos' frames and on the speech-only clips'
    frames labelled by the offline model's closure read-out (a different read-out from the videos
    alone), the gate at the taught operating point, the teacher named in the copy; `--teacher-study`
    prints each weight's fold AUC and matched gate; an offline network or a cache without speech-only
    clips is one line."""
    import shutil

    from training import closure_gate
    from training.export_motion import load_model

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    arguments = ["--cache", str(cache), "--network", str(ASSETS / "motion_live.pt"), "--teacher", str(ASSETS / "motion_offline.pt")]
    assert closure_gate.main([*arguments, "--out", str(tmp_path / "x.onnx")]) == 2  # no speech-only clips yet
    assert not (tmp_path / "x.onnx").exists()
    (cache / "speech_only").mkdir(exist_ok=True)
    for clip in sorted((cache / "clips").iterdir()):  # the clips' own speech stands for speech-only clips
        with np.load(clip / "speech.npz") as data:
            np.savez(cache / "speech_only" / f"{clip.name}.npz", offline_0=data["offline_0"], live_0=data["live_0"])
    taught = tmp_path / "taught.pt"
    assert closure_gate.main([*arguments, "--out", str(tmp_path / "taught.onnx"), "--torch-copy", str(taught)]) == 0
    gated, state = load_model(taught), torch.load(taught, weights_only=False)
    assert (gated.threshold, gated.full) == (closure_gate.TAUGHT_THRESHOLD, closure_gate.TAUGHT_FULL)
    assert state["closure_teacher_weight"] == closure_gate.TEACHER_WEIGHT
    videos = closure_gate.RidgeSums.of(*closure_gate.design(closure_gate.load_motion_clips(cache, "train"), live=True))
    live_so, offline_so = closure_gate.speech_only_design(cache)
    teacher, bias = closure_gate.teacher_readout(ASSETS / "motion_offline.pt")
    taught_sums = videos + closure_gate.RidgeSums.of(live_so, offline_so @ teacher + bias, closure_gate.TEACHER_WEIGHT)
    def read_out(sums):  # the gate's kernel, as `ClosureGated.from_ridge` lays it out
        weights = sums.solve(state["closure_lambda"])[0]
        return torch.from_numpy(weights.reshape(5, -1, 1).transpose(2, 1, 0)).float()
    torch.testing.assert_close(gated.conv.weight, read_out(taught_sums), atol=1e-5, rtol=1e-4)
    assert (gated.conv.weight - read_out(videos)).abs().max() > 1e-4  # the teacher's frames change the read-out
    assert closure_gate.main(["--cache", str(cache), "--network", str(ASSETS / "motion_offline.pt"), "--teacher",
                              str(ASSETS / "motion_offline.pt"), "--out", str(tmp_path / "y.onnx")]) == 2
    lam = 3e4
    results = closure_gate.teacher_study(closure_gate.load_motion_clips(cache, "train"), cache, lam, weights=(0.0, 4.0), folds=2)
    assert set(results) == {0.0, 4.0} and all(0.0 <= r["auc"] <= 1.0 and len(r["folds"]) == 2 for r in results.values())
    assert all(r["gate"][0] <= r["gate"][1] for r in results.values())
