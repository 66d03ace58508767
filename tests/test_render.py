"""Renderer building blocks: denoiser shapes, the sampler's maths (an exact oracle), the conditioning,
ONNX parity with the sampler loop on onnxruntime, data sampling and DDP training on real crops."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar.config import AlignConfig, RenderConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, crop_template
from avatar.metrics import sharpness
from avatar.render.condition import build_condition, landmark_sketch
from avatar.render.sampling import alpha_sigma, sample_ddim
from avatar.render.unet import Denoiser
from conftest import REPO

SMALL = RenderConfig(crop_size=64, base_channels=16, channel_mults=(1, 2, 2), attention_levels=(2,), steps=3)


def test_denoiser_shapes():
    model = Denoiser(SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x, torch.tensor([0.1, 0.9]), torch.randn(2, SMALL.condition_channels, 64, 64))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("steps", [1, 2, 4, 25])
def test_ddim_recovers_the_clean_image_with_an_exact_denoiser(steps):
    """With the true v, DDIM lands on the clean image in any number of steps; the callback sees each."""
    rng = np.random.default_rng(steps)
    clean = rng.uniform(-0.9, 0.9, (2, 3, 8, 8)).astype(np.float32)

    def oracle(x, t, condition):
        alpha, sigma = alpha_sigma(t[:, None, None, None])
        eps = (x - alpha * clean) / np.maximum(sigma, 1e-8)
        return (alpha * eps - sigma * clean).astype(np.float32)

    seen = []
    out = sample_ddim(oracle, rng.standard_normal(clean.shape).astype(np.float32), np.zeros((2, 1, 8, 8), np.float32),
                      steps, callback=lambda i, n, x0: seen.append((i, n)))
    np.testing.assert_allclose(out, clean, atol=1e-5)
    assert seen == [(i, steps) for i in range(1, steps + 1)]


@pytest.mark.parametrize("start, steps", [(0.25, 1), (0.5, 2)])
def test_ddim_from_a_draft_starts_at_its_time_and_lands_on_the_clean_image(start, steps):
    """SDEdit-style: the draft is noised to `start`, the model is called at the times in [start, 0),
    and an exact denoiser still lands on the clean image; a start below 1 without a draft is an error."""
    rng = np.random.default_rng(3)
    clean = rng.uniform(-0.9, 0.9, (2, 3, 8, 8)).astype(np.float32)
    draft = np.clip(clean + rng.normal(0, 0.2, clean.shape), -1, 1).astype(np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    seen = []

    def oracle(x, t, condition):
        seen.append((float(t[0]), x.copy()))
        alpha, sigma = alpha_sigma(t[:, None, None, None])
        eps = (x - alpha * clean) / np.maximum(sigma, 1e-8)
        return (alpha * eps - sigma * clean).astype(np.float32)

    out = sample_ddim(oracle, noise, np.zeros((2, 1, 8, 8), np.float32), steps, init=draft, start=start)
    np.testing.assert_allclose(out, clean, atol=1e-5)
    np.testing.assert_allclose([t for t, _ in seen], np.linspace(start, 0, steps + 1)[:-1])
    alpha, sigma = alpha_sigma(start)
    np.testing.assert_allclose(seen[0][1], alpha * draft + sigma * noise, atol=1e-6)  # the draft, noised to `start`
    with pytest.raises(ValueError, match="draft"):
        sample_ddim(oracle, noise, np.zeros((2, 1, 8, 8), np.float32), steps, start=start)


def test_sketch_draws_the_mouth_where_the_points_are():
    rng = np.random.default_rng(0)
    points = np.stack([np.linspace(40, 88, 59), 80 + 8 * np.sin(np.linspace(0, 6.28, 59))], axis=1) + rng.normal(0, 0.2, (59, 2))
    sketch = landmark_sketch(points, 128)
    assert sketch.shape == (3, 128, 128) and sketch.max() <= 1 and sketch.min() >= 0
    lit = sketch.max(axis=0) > 0.3
    ys, xs = np.nonzero(lit)
    nearest = np.min(np.hypot(xs[:, None] - points[None, :, 0], ys[:, None] - points[None, :, 1]), axis=1)
    assert lit.sum() > 100 and np.percentile(nearest, 99) < 8  # lines between the points, nowhere else
    assert (sketch.reshape(3, -1).max(axis=1) > 0.5).all()  # outer lips, inner lips, jaw


def test_condition_hides_the_repainted_region():
    target = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[32:, 16:48] = 1.0
    condition = build_condition(target, mask, [target, target], np.full((59, 2), 32.0))
    assert condition.shape == (SMALL.condition_channels, 64, 64)
    assert (condition[:3, 40, 30] == 0).all() and (condition[:3, 5, 5] > 0.5).all()
    assert condition[3, 40, 30] == 1 and condition[3, 5, 5] == 0


def test_onnx_denoiser_parity_and_sampling_on_onnxruntime(tmp_path):
    from avatar.render.runner import OnnxDenoiser
    from training.export_render import export, parity
    from training.train_render import torch_model_fn

    torch.manual_seed(0)
    model = Denoiser(SMALL).eval()
    export(model, tmp_path / "render.onnx")
    assert parity(model, tmp_path / "render.onnx", batch=3) <= 1e-3
    renderer = OnnxDenoiser(tmp_path / "render.onnx")
    assert renderer.config == SMALL
    rng = np.random.default_rng(1)
    condition = rng.uniform(-1, 1, (2, SMALL.condition_channels, 64, 64)).astype(np.float32)
    noise = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    on_onnx = renderer.sample(condition, noise)  # IO binding: the condition is put on the device once
    on_torch = sample_ddim(torch_model_fn(model, torch.device("cpu")), noise, condition, SMALL.steps)
    np.testing.assert_allclose(on_onnx, on_torch, atol=1e-3)
    np.testing.assert_array_equal(on_onnx, renderer.sample(condition, noise, io_binding=False))  # the same numbers either way
    assert renderer.render(condition[0], noise[0]).shape == (64, 64, 3)


def test_half_precision_graph_of_the_shipped_renderer_computes_in_fp16_and_keeps_its_output():
    """The CUDA fp16 path: convolutions and matrix products in float16, the timestep embedding in
    float32, float32 in and out; onnxruntime's CPU provider runs the same graph, so parity is checked here."""
    import onnx
    import onnxruntime

    from avatar.runtime import OnnxSession, asset_path, half_precision_graph

    path = asset_path("render.onnx")
    half = onnx.shape_inference.infer_shapes(onnx.load_from_string(half_precision_graph(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.value_info, *half.graph.input, *half.graph.output]}
    types.update({w.name: w.data_type for w in half.graph.initializer})
    convs = [n for n in half.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert convs and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    trig = [n for n in half.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*half.graph.input, *half.graph.output])
    assert len({n.name for n in half.graph.node}) == len(half.graph.node)  # sessions refuse two nodes of one name

    full = OnnxSession(path, providers=["CPUExecutionProvider"])
    assert not OnnxSession(path, providers=["CPUExecutionProvider"], fp16=True).fp16  # no effect on CPU
    session = onnxruntime.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    size, channels = full.session.get_inputs()[2].shape[2], full.session.get_inputs()[2].shape[1]
    feed = {"x_t": rng.standard_normal((2, 3, size, size)).astype(np.float32), "t": np.array([0.25, 1.0], np.float32),
            "condition": rng.uniform(-1, 1, (2, channels, size, size)).astype(np.float32)}
    expected = full.run(**feed)["v"]
    got = session.run(None, feed)[0]
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() < 2e-2 and np.abs(got - expected).mean() < 2e-3
    assert np.abs(got - expected).max() > 0  # it is not the fp32 graph


def test_training_samples_from_real_crops(tiny_cache):
    from training.render_data import REFERENCE_GAP, RenderSampler, load_render_clips

    clips = load_render_clips(tiny_cache, "train", 128)
    assert clips and all(c.crops.shape[1:] == (128, 128, 3) for c in clips)
    sampler = RenderSampler(clips, RenderConfig(), seed=0)
    batch = sampler.batch(4)
    assert batch["clean"].shape == (4, 3, 128, 128) and batch["condition"].shape == (4, RenderConfig().condition_channels, 128, 128)
    assert -1 <= batch["clean"].min() and batch["clean"].max() <= 1
    clip = clips[0]
    index = int(np.flatnonzero(clip.usable)[len(clip.usable) // 2])
    refs = clip.references(index, np.random.default_rng(0), 2)
    assert all(abs(r - index) >= REFERENCE_GAP for r in refs)
    assert clip.gap[refs[0]] <= clip.gap[refs[1]]  # a closed, then an open mouth
    drafted = sampler.batch(3, draft_share=1.0)  # the warp renderer's draft of each target, for distillation
    assert drafted["has_draft"].all() and drafted["draft"].shape == drafted["clean"].shape
    outside, inside = drafted["mask"][:, 0] == 0, drafted["mask"][:, 0] > 0.9
    difference = np.abs(drafted["draft"] - drafted["clean"]).mean(axis=1)
    assert difference[outside].max() < 0.01 and difference[inside].mean() > 0.02  # the target outside, a warped mouth inside


def test_retrieved_references_are_the_clips_own_mouths_nearest_the_target(tiny_cache):
    """With `retrieved` references, a sample is conditioned on the references and then on frames of
    a mouth bank of the same clip (each at least REFERENCE_GAP away): the one whose lips lie nearest
    the target's and its nearest in shape, much nearer than the bank's average; in NO_BANK_SHARE of
    the samples (a person without a bank) the references repeat instead."""
    from avatar.render.retrieval import lip_shape
    from training.render_data import NO_BANK_SHARE, REFERENCE_GAP, RenderSampler, load_render_clips, make_sample

    config = RenderConfig(retrieved=4)
    clips = load_render_clips(tiny_cache, "train", 128)
    batch = RenderSampler(clips, config, seed=0).batch(2)
    assert batch["condition"].shape == (2, 3 + 1 + 3 * 6 + 3, 128, 128)
    clip, rng = clips[0], np.random.default_rng(0)
    shape = lambda frames: lip_shape(clip.landmarks[frames][..., lm.MOUTH_AND_JAW, :2])
    near, average = [], []
    for index in np.flatnonzero(clip.usable)[::7][:6]:
        bank = clip.bank(rng, [index])
        assert np.abs(bank - index).min() >= REFERENCE_GAP and clip.usable[bank].all()
        chosen = clip.retrieved(int(index), rng, 4, bank)
        assert len(chosen) == 4 and set(chosen) <= set(bank.tolist())
        distance = ((shape(bank) - shape(int(index))) ** 2).sum(-1).mean(-1)
        assert distance[list(bank).index(chosen[0])] == distance.min()  # the nearest entry first
        near.append(distance[[list(bank).index(c) for c in chosen]].mean())
        average.append(distance.mean())
    assert np.mean(near) < np.mean(average) / 2
    aligner = FaceAligner(AlignConfig(crop_size=128))
    repeated = 0
    for seed in range(40):
        condition = make_sample(clip, int(np.flatnonzero(clip.usable)[0]), np.random.default_rng(seed), config, aligner, False)[1]
        refs = condition[4:4 + 18].reshape(6, 3, 128, 128)
        repeated += bool(np.array_equal(refs[2], refs[0]) and np.array_equal(refs[3], refs[1]))
    assert 0.4 * NO_BANK_SHARE * 40 <= repeated <= 2 * NO_BANK_SHARE * 40


def test_a_model_given_retrieved_references_starts_as_the_model_it_was():
    """`with_retrieved` widens the stem with zero weights for the new references: the wider model's
    output, whatever those references hold, equals the old model's; a model of another shape is refused."""
    from training.export_render import with_retrieved

    torch.manual_seed(0)
    small = RenderConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,))
    old = Denoiser(small).eval()
    wider = with_retrieved(old, dataclasses.replace(small, retrieved=4)).eval()
    x, t = torch.randn(2, 3, 128, 128), torch.rand(2)
    condition = torch.randn(2, small.condition_channels, 128, 128)
    at = 3 + 1 + 3 * small.references
    extended = torch.cat([condition[:, :at], torch.randn(2, 12, 128, 128), condition[:, at:]], dim=1)
    with torch.no_grad():
        assert float((old(x, t, condition) - wider(x, t, extended)).abs().max()) < 1e-5
    with pytest.raises(ValueError):
        with_retrieved(old, dataclasses.replace(small, retrieved=4, base_channels=16))


def test_each_frame_is_conditioned_on_its_entry_and_the_entries_nearest_it():
    """The diffusion renderer's references for a frame: the person's own, then its bank entry and
    that entry's nearest in lip shape (the same for every frame with that entry); without a bank,
    the person's references again."""
    from avatar.render.base import Identity
    from avatar.render.renderers import frame_references
    from avatar.render.retrieval import MouthBank

    face = crop_template(256)
    mouths = np.stack([face[lm.MOUTH_AND_JAW, :2]] * 5)
    for k in range(5):  # entry k's lower lip lowered by 3k px
        mouths[k, 10:20, 1] += 3.0 * k
    crops = np.stack([np.full((256, 256, 3), 40 * k, np.uint8) for k in range(5)])
    own = [np.full((128, 128, 3), v, np.uint8) for v in (201, 202)]
    person = Identity(own, face[lm.MOUTH_AND_JAW, :2] / 2, np.zeros(2), [], bank=MouthBank(crops, mouths))
    references = frame_references(person, 2, 2, 3, 128)
    assert [int(r[0, 0, 0]) for r in references] == [201, 202, 80, 40, 120]  # entry 2, then 1 and 3 (equally near: the first)
    assert all(r.shape == (128, 128, 3) for r in references)
    plain = Identity(own, person.rest, person.rest_anchor, [])
    assert [int(r[0, 0, 0]) for r in frame_references(plain, None, 2, 3, 128)] == [201, 202, 201, 202, 201]
    assert len(frame_references(person, 2, 2, 0, 128)) == 2  # a model without retrieved references
    assert [int(r[0, 0, 0]) for r in frame_references(Identity(own[:1], person.rest, person.rest_anchor, []), None, 2, 1, 128)] == [201] * 3
    with pytest.raises(AvatarError, match="enroll again"):  # an avatar enrolled before they were kept
        frame_references(Identity([], person.rest, person.rest_anchor, []), None, 2, 4, 128)


@pytest.mark.slow
def test_render_training_runs_under_torchrun_with_two_gloo_processes(tiny_cache, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train_render", "--cache", str(tiny_cache), "--out", str(out), "--steps", "2", "--batch", "2",
               "--val-every", "2", "--val-samples", "2", "--threads", "1", "--model.base-channels", "8",
               "--model.channel-mults", "1", "2", "--model.attention-levels", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:3000] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "mouth-region PSNR" in result.stdout
    assert (out / "last.pt").exists() and list((out / "samples").glob("*.png"))


@pytest.mark.slow
def test_render_training_with_batch_workers_stops_at_its_time_limit_validated_and_saved(tiny_cache, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training.train_render", "--cache", str(tiny_cache), "--out", str(out), "--steps", "100000",
               "--batch", "2", "--workers", "2", "--minutes", "0.0001", "--val-every", "100000", "--val-samples", "2",
               "--threads", "1", "--model.base-channels", "8", "--model.channel-mults", "1", "2", "--model.attention-levels", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    done = [line for line in result.stdout.splitlines() if line.startswith("done:")]
    assert done and int(done[0].split()[1]) < 100, result.stdout[-2000:]  # stopped by the clock, not the step count
    assert "mouth-region PSNR" in result.stdout and (out / "last.pt").exists() and (out / "best.pt").exists()


@pytest.mark.slow
def test_few_step_distillation_runs_under_torchrun_and_moves_the_student(tiny_cache, tmp_path):
    from training.common import torch_copy
    from training.export_render import load_denoiser

    torch.manual_seed(0)
    teacher = Denoiser(RenderConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), steps=25))
    torch_copy(teacher, tmp_path / "teacher.pt")
    out = tmp_path / "distill"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.distill_render", "--cache", str(tiny_cache), "--teacher", str(tmp_path / "teacher.pt"),
               "--out", str(out), "--steps", "3", "--batch", "2", "--val-every", "3", "--val-samples", "2", "--threads", "1",
               "--adversarial-start", "1", "--model.steps", "2", "--draft-share", "0.5"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "student times [1.0, 0.5], from the warp's draft at [0.5]" in result.stdout
    assert "val step 3: region PSNR" in result.stdout and "sharpness" in result.stdout
    student = load_denoiser(out / "step000003.pt")
    assert student.config.steps == 2  # exported with the few-step count it was trained for
    initial = load_denoiser(tmp_path / "teacher.pt")
    moved = max(float((a - b).abs().max()) for a, b in zip(student.state_dict().values(), initial.state_dict().values()))
    assert moved > 0  # the losses reached the student


def test_missing_teacher_is_one_clear_line(tiny_cache, tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.distill_render", "--cache", str(tiny_cache), "--teacher",
                             str(tmp_path / "absent.pt"), "--out", str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot load the teacher") and "Traceback" not in result.stderr


def test_held_out_evaluation_reports_model_and_both_baselines(tiny_cache, tmp_path):
    from avatar.render.runner import OnnxDenoiser
    from training.eval_render import ModelRow, evaluate_render, format_report
    from training.export_render import export
    from training.render_data import load_render_clips

    torch.manual_seed(0)
    export(Denoiser(RenderConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), steps=2)).eval(), tmp_path / "r.onnx")
    clips = load_render_clips(tiny_cache, "val", 128, kinds=("video",))
    export(Denoiser(RenderConfig(retrieved=2, base_channels=8, channel_mults=(1, 2), attention_levels=(1,), steps=2)).eval(),
           tmp_path / "k.onnx")  # a model given retrieved references, beside one without
    renderer = OnnxDenoiser(tmp_path / "r.onnx")
    report = evaluate_render([ModelRow("model", renderer, 1), ModelRow("model", renderer, 2), ModelRow("teacher", renderer, 3),
                              ModelRow("compared", OnnxDenoiser(tmp_path / "k.onnx"), 1)], clips, frames=4, runs=2)
    text = format_report(report)
    for name in ("model, 1 step ", "model, 2 steps", "teacher, 3 steps", "compared, 1 step", "warp renderer", "reference mouth pasted",
                 "nearest reference pasted"):
        assert name in text
    assert report["frames"] == 4
    baseline = report["summary"]["nearest_reference"]
    assert baseline["psnr"] > 15 and 0 <= baseline["identity_distance"] < 0.6  # the same person's real mouth
    assert report["summary"]["model_2"]["psnr"] < baseline["psnr"]  # an untrained denoiser does not beat it
    warp = report["summary"]["warp"]
    assert warp["psnr"] > report["summary"]["model_2"]["psnr"] and warp["sharpness_ratio"] > 0.6


def test_colour_match_removes_a_cast_inside_the_mask_only(tiny_cache):
    import cv2

    from avatar.face.align import FaceAligner
    from avatar.render.condition import colour_match
    from training.cache import open_cache

    clip = open_cache(tiny_cache, kind="video")[0]
    crop, points = clip.crops()[30], clip.landmarks()[30]
    mask = FaceAligner().lower_face_mask(points)
    cast = np.clip(crop.astype(np.int16) + np.array([25, -10, -20]), 0, 255).astype(np.uint8)  # a renderer's tint
    region = mask > 0.5

    def lab_mean(image):
        return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)[region].mean(axis=0)

    before = np.linalg.norm(lab_mean(cast) - lab_mean(crop))
    fixed = colour_match(cast, crop, mask)
    after = np.linalg.norm(lab_mean(fixed) - lab_mean(crop))
    assert before > 10 and after < 1.5
    assert (fixed[~region] == cast[~region]).all()
    assert np.abs(fixed.astype(int) - crop.astype(int))[region].mean() < 4  # the real texture is kept


# ------------------------------------------------------------------------------ warp renderer
@pytest.fixture(scope="module")
def grid_frames():
    from avatar import media
    from avatar.config import AlignConfig
    from avatar.face.video import align_video
    from conftest import GRID_CLIP

    frames = [f.aligned for f in align_video(media.iter_video_frames(GRID_CLIP), align_config=AlignConfig(crop_size=256)) if f.valid]
    openings = np.array([lm.mouth_opening(f.landmarks) / lm.interocular(f.landmarks) for f in frames])
    return frames, openings


def _warp_to(source, target):
    from avatar.config import AlignConfig
    from avatar.face.align import FaceAligner
    from avatar.render.warp import InnerMouth, render_warp

    aligner = FaceAligner(AlignConfig(crop_size=256))
    mouth = target.landmarks[lm.MOUTH_AND_JAW, :2] - lm.mouth_anchor(target.landmarks) + lm.mouth_anchor(source.landmarks)
    mask = aligner.repaint_mask(source.landmarks, lm.with_mouth(source.landmarks, mouth))
    out = render_warp(source.crop, source.landmarks, mouth, mask, InnerMouth(target.crop, target.landmarks[lm.MOUTH_AND_JAW, :2], 256))
    alpha = mask[..., None]
    return np.clip(out * alpha + source.crop * (1 - alpha) + 0.5, 0, 255).astype(np.uint8), mask


def test_warp_to_its_own_mouth_changes_nothing(grid_frames):
    frames, _ = grid_frames
    out, mask = _warp_to(frames[10], frames[10])
    region = mask > 0.5
    assert np.abs(out.astype(np.float32) - frames[10].crop)[region].mean() < 1.5


def test_the_warps_map_is_scipys_spline_on_its_grid_and_linear_between(grid_frames):
    """`backward_map` samples where scipy's RBFInterpolator's thin-plate spline says (within 1e-4 px)
    on every coarse grid point of a real face's control points closing its open mouth (both warps, a
    256 crop), and midway between two grid points at the mean of their values (linear, not shifted);
    and on control points that nearly meet (0.3 px apart with 4 px between their values)."""
    from scipy.interpolate import RBFInterpolator

    from avatar.render import warp

    frames, openings = grid_frames
    source, target = frames[int(np.argmax(openings))], frames[int(np.argmin(openings))]
    mouth = target.landmarks[lm.MOUTH_AND_JAW, :2] - lm.mouth_anchor(target.landmarks) + lm.mouth_anchor(source.landmarks)
    mask = FaceAligner(AlignConfig(crop_size=256)).repaint_mask(source.landmarks, lm.with_mouth(source.landmarks, mouth))
    ys, xs = np.nonzero(mask > 0)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    step = warp.GRID_STEP  # the coarse grid's points, on multiples of its step: the spline's own values there
    grid = np.stack(np.meshgrid(np.arange(-(-box[0] // step) * step, box[2], step), np.arange(-(-box[1] // step) * step, box[3], step)), -1)
    at = (grid[..., 1] - box[1], grid[..., 0] - box[0])
    close = [warp.warp_points(source.landmarks[:, :2], mouth, mask)[0]]
    meeting = close[0][0].copy(), close[0][1].copy()
    meeting[0][1] = meeting[0][0] + (0.3, 0.05)
    meeting[1][1] = meeting[1][0] + (0.0, 4.0)
    for points, moved in warp.warp_points(source.landmarks[:, :2], mouth, mask) + [meeting]:
        sample_at = warp.backward_map(points, moved, 256, box)
        map_x, map_y = sample_at[..., 0], sample_at[..., 1]
        spline = RBFInterpolator(*warp.spline_points(points, moved), kernel="thin_plate_spline", smoothing=warp.SMOOTHING)
        expected = grid + spline(grid.reshape(-1, 2).astype(np.float64)).reshape(grid.shape)
        assert np.abs(map_x[at] - expected[..., 0]).max() < 1e-4 and np.abs(map_y[at] - expected[..., 1]).max() < 1e-4
        between = (at[0][:-1, :-1], at[1][:-1, :-1] + step // 2)  # halfway along x: the two neighbours' mean
        assert np.allclose(map_y[between], (map_y[at][:-1, :-1] + map_y[at][:-1, 1:]) / 2, atol=1e-3)


@pytest.mark.parametrize("direction", ["open", "close"])
def test_warp_opens_and_closes_a_real_mouth_and_stays_sharp(grid_frames, tracker, direction):
    """From the most closed frame to the most open one's mouth and back: the re-detected mouth
    follows the target, and the repainted region keeps the real frame's sharpness."""
    frames, openings = grid_frames
    closed, opened = int(np.argmin(openings)), int(np.argmax(openings))
    source, target = (frames[closed], frames[opened]) if direction == "open" else (frames[opened], frames[closed])
    out, mask = _warp_to(source, target)
    detected = tracker.select(out).landmarks
    got = lm.mouth_opening(detected) / lm.interocular(detected)
    want, start = openings[opened if direction == "open" else closed], openings[closed if direction == "open" else opened]
    assert abs(got - want) < 0.35 * abs(start - want), (got, want, start)
    region = mask > 0.5
    assert sharpness(out, region) > 0.8 * sharpness(target.crop, region)


def test_detail_comes_back_where_the_rendering_agrees_and_not_where_it_changed(grid_frames):
    import cv2

    from avatar.render.condition import transfer_detail

    original = grid_frames[0][5].crop
    rendered = cv2.GaussianBlur(original, (0, 0), 2.0)  # a smooth rendering of the same face
    rendered[150:200, 90:170] = (40, 20, 20)  # ... except a patch that really changed (say, an open mouth)
    alpha = np.ones(original.shape[:2], np.float32)
    out = transfer_detail(original, rendered, alpha, sigma=2.0)
    same = np.zeros(alpha.shape, bool)
    same[40:120, 40:210] = True
    error_before = np.abs(rendered.astype(np.float32) - original)[same].mean()
    error_after = np.abs(out.astype(np.float32) - original)[same].mean()
    assert error_after < 0.5 * error_before  # detail restored where the two agree
    assert np.abs(out.astype(np.float32) - rendered)[160:190, 100:160].max() < 3  # nothing ghosts into the change
    assert np.array_equal(transfer_detail(original, rendered, np.zeros_like(alpha), 2.0), rendered)
