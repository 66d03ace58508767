"""The frame graph (`avatar/render/graph.py`, `frame_graph.py`): one ONNX call renders a batch from the
frames' regions to their finished regions. On CPU here: its parity with the per-frame path (within
stated tolerances, on real faces), batching across people, its spline against scipy's, the export."""

import cv2
import numpy as np
import pytest

from avatar import media
from avatar.config import PipelineConfig
from avatar.face import landmarks as lm
from avatar.face.video import align_video
from avatar.pipeline import AvatarPipeline
from avatar.render.base import FrameJob, RenderBatch
from avatar.runtime import ASSETS
from conftest import GRID_CLIP, LRS2_CLIP


def opening_jobs(pipeline, clip, count=6):
    """Jobs for the first frames of a real clip, the lower inner lip dropped further each frame
    (0-10 px at 128), and the person."""
    tracked = [t for t in align_video(list(media.iter_video_frames(clip))[:count]) if t.valid]
    crop_landmarks = np.stack([t.aligned.landmarks for t in tracked])
    identity = pipeline.prepare_frames([tracked[i].aligned.crop for i in pipeline.reference_frames(crop_landmarks)], crop_landmarks,
                                       [(tracked[0].image, tracked[0].frame_landmarks)])
    jobs = []
    for k, t in enumerate(tracked):
        mouth = identity.rest.copy()
        mouth[20:40, 1] += np.where(np.arange(20) > 10, 2.0 * k, 0.0)
        jobs.append(FrameJob(t.image, t.aligned.transform, t.aligned.landmarks, t.frame_landmarks,
                             mouth + (lm.mouth_anchor(t.aligned.landmarks) - identity.rest_anchor)))
    return jobs, identity


def differences(expected, got, jobs):
    """Per frame: (mean |Δ| in levels where the per-frame path repainted, its 99th percentile, the
    largest |Δ| where it did not)."""
    out = []
    for a, b, job in zip(expected, got, jobs):
        alpha = np.zeros(job.frame.shape[:2], np.float32)
        alpha[a.box] = a.alpha
        delta = np.abs(a.place(job.frame).astype(int) - b.place(job.frame).astype(int))
        inside = alpha > 0.01
        out.append((delta[inside].mean(), np.percentile(delta[inside], 99), delta[~inside].max()))
    return np.array(out)


@pytest.mark.parametrize("renderer", ["warp", "diffusion"])
def test_the_graph_renders_what_the_per_frame_path_renders(renderer):
    """Real GRID frames, the mouth opened step by step: the graph against the per-frame path at the
    same crop side (128). Stated tolerances: a mean under 1.5 levels where the face was repainted
    (measured 0.4-0.6 warp, 0.8-1.2 diffusion), 99% of pixels within 8 levels (warp: the moved jaw's
    and lips' edges land a fraction of a pixel apart; measured ≤ 4) or 12 (diffusion, ≤ 8), and the
    rest of the frame within a level. (Until 2026-12-01 the per-frame warp read its spline's grid 3 px
    off: means up to 2.5 and 99% within 38 then.)"""
    from avatar.render.graph import GraphRenderer
    from avatar.render.renderers import make_renderer

    config = PipelineConfig(renderer=renderer, warp_max_size=128, workers=1)
    pipeline = AvatarPipeline.from_pretrained(config=config)
    jobs, identity = opening_jobs(pipeline, GRID_CLIP)
    batch = RenderBatch(jobs, [identity] * len(jobs), range(len(jobs)))
    expected = make_renderer(config, ASSETS).render(batch)
    graph = GraphRenderer(ASSETS, config)
    got = graph.render(batch)
    found = differences(expected, got, jobs)
    assert (found[:, 0] < 1.5).all() and (found[:, 1] <= (8 if renderer == "warp" else 12)).all() and (found[:, 2] <= 1).all(), found
    # the mouth did move: the last frame differs from its input where repainted
    last = got[-1]
    assert np.abs(last.pixels.astype(int) - jobs[-1].frame[last.box]).max() > 40


def test_the_graph_closes_lips_over_an_open_mouth_as_the_per_frame_path_does():
    """LRS2 frames whose mouth is open (0.13-0.25 of its width) asked for lips that meet (inner gap
    0.5 % of the width) or nearly (3 %): where the lips' own colour fills the hole between them
    (`lips_meet`), the graph within the warp's tolerances above of the per-frame path, and between
    the lips within 7 levels."""
    from avatar.render.graph import GraphRenderer
    from avatar.render.renderers import make_renderer
    from avatar.render.warp import lips_meet, mouth_hole

    config = PipelineConfig(renderer="warp", warp_max_size=128, workers=1)
    pipeline = AvatarPipeline.from_pretrained(config=config)
    jobs, identity = opening_jobs(pipeline, LRS2_CLIP)
    widest = jobs[-1]  # the open mouth whose rows the hole would take (`dub` takes the footage's most open)
    identity.inner = pipeline.open_mouth(widest.frame, widest.transform, widest.crop_landmarks)
    closing = []
    for k, job in enumerate(jobs[2:]):
        mouth = identity.rest + (lm.mouth_anchor(job.crop_landmarks) - identity.rest_anchor)
        wanted = (0.005, 0.03)[k % 2] * lm.mouth_width(mouth)
        mouth[31:40, 1] -= lm.inner_gap(mouth) - wanted  # the lower inner lip raised to that gap
        closing.append(FrameJob(job.frame, job.transform, job.crop_landmarks, job.frame_landmarks, mouth))
        source = np.asarray(job.crop_landmarks, np.float64)[lm.MOUTH_AND_JAW, :2]
        assert lips_meet(mouth) > 0.4 and mouth_hole(source, mouth, identity.inner, 128) is not None
    batch = RenderBatch(closing, [identity] * len(closing), range(len(closing)))
    expected = make_renderer(config, ASSETS).render(batch)
    got = GraphRenderer(ASSETS, config).render(batch)
    found = differences(expected, got, closing)
    between = []  # the largest |Δ| between the lips (their inner polygon grown by 2 px, in frame pixels)
    for a, b, job in zip(expected, got, closing):
        inner = cv2.transform(job.mouth[None, 20:40].astype(np.float64), cv2.invertAffineTransform(job.transform))[0]
        region = cv2.dilate(cv2.fillPoly(np.zeros(job.frame.shape[:2], np.uint8), [np.round(inner).astype(np.int32)], 1), np.ones((5, 5), np.uint8))
        between.append(np.abs(a.place(job.frame).astype(int) - b.place(job.frame).astype(int))[region > 0].max())
    assert (found[:, 0] < 1.5).all() and (found[:, 1] <= 8).all() and (found[:, 2] <= 1).all(), found
    assert max(between) <= 7, between  # measured 3-5 (the graph filling with rows instead: 9-15)


def test_the_retrieval_graph_draws_the_persons_bank_entry_as_the_per_frame_path_does():
    """A person enrolled from a real GRID clip (a bank of their mouths), their frames opened step by
    step, each job with its entry of the Viterbi path: the retrieval graph against the per-frame
    retrieval renderer, with the warp graph's tolerances (measured: mean 0.4-0.6 levels, 99% within
    4), and nearer to it than the warp graph, which does not draw the entry."""
    import dataclasses

    from avatar.enroll import build_avatar, track_video
    from avatar.render.graph import GraphRenderer
    from avatar.render.renderers import make_renderer

    config = PipelineConfig(renderer="retrieval", warp_max_size=128, workers=1)
    pipeline = AvatarPipeline.from_pretrained(config=config)
    footage = track_video(pipeline, GRID_CLIP, progress=False)
    try:
        bank = build_avatar(pipeline, [footage], progress=False, adapt=False, idle=False, strict=False).identity.bank
    finally:
        footage.close()
    jobs, identity = opening_jobs(pipeline, GRID_CLIP)
    identity = dataclasses.replace(identity, bank=bank)
    path = bank.path(np.stack([job.mouth for job in jobs]))
    jobs = [dataclasses.replace(job, bank_index=int(entry)) for job, entry in zip(jobs, path)]
    batch = RenderBatch(jobs, [identity] * len(jobs), range(len(jobs)))
    expected = make_renderer(config, ASSETS).render(batch)
    found = differences(expected, GraphRenderer(ASSETS, config).render(batch), jobs)
    assert (found[:, 0] < 1.5).all() and (found[:, 1] <= 8).all() and (found[:, 2] <= 1).all(), found
    without = differences(expected, GraphRenderer(ASSETS, dataclasses.replace(config, renderer="warp")).render(batch), jobs)
    assert found[2:, 0].sum() < 0.8 * without[2:, 0].sum(), (found, without)  # the opened frames: the entry is drawn


def test_a_diffusion_batch_without_bank_entries_runs_the_graph_without_that_path():
    """A person without a mouth bank (real GRID frames): the diffusion renderer runs
    `frame_diffusion_plain.onnx` (the full graph is not called) and gets the full graph's pixels
    (within a level: the two exports round alike)."""
    from avatar.render.graph import GraphRenderer

    config = PipelineConfig(renderer="diffusion", workers=1)
    pipeline = AvatarPipeline.from_pretrained(config=config)
    jobs, identity = opening_jobs(pipeline, GRID_CLIP, 3)
    batch = RenderBatch(jobs, [identity] * len(jobs), range(len(jobs)))
    renderer = GraphRenderer(ASSETS, config)
    full = renderer.session

    class NotCalled:
        def run(self, **inputs):
            raise AssertionError("the graph with the entry's path ran for a batch without entries")

    renderer.session = NotCalled()
    plain = renderer.render(batch)
    renderer.session, renderer.plain = full, None
    whole = renderer.render(batch)
    for a, b in zip(plain, whole):
        assert a.box == b.box and np.abs(a.pixels.astype(int) - b.pixels).max() <= 1
        np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-5)


def test_one_call_renders_several_people_as_each_alone():
    """Two people at different frame sizes (GRID 360×288, LRS2 160×160) in one batch: each frame's
    region is what a batch of its own gives (the regions are padded to the batch's largest)."""
    from avatar.render.graph import GraphRenderer

    config = PipelineConfig(renderer="warp")
    pipeline = AvatarPipeline.from_pretrained(config=config)
    (grid_jobs, grid), (lrs_jobs, lrs) = opening_jobs(pipeline, GRID_CLIP, 3), opening_jobs(pipeline, LRS2_CLIP, 3)
    renderer = GraphRenderer(ASSETS, config)
    together = renderer.render(RenderBatch(grid_jobs + lrs_jobs, [grid] * 3 + [lrs] * 3, list(range(6))))
    alone = renderer.render(RenderBatch(grid_jobs, [grid] * 3, [0, 1, 2])) + renderer.render(RenderBatch(lrs_jobs, [lrs] * 3, [3, 4, 5]))
    for a, b in zip(together, alone):
        assert a.box == b.box
        assert np.abs(a.pixels.astype(int) - b.pixels).max() <= 1
        np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-5)


def test_the_spline_solved_on_the_host_is_scipys():
    """The graph's spline weights (a linear solve on the host, evaluated in the graph) give scipy's
    RBFInterpolator's values (as the per-frame path's `spline_at` does), duplicates dropped alike."""
    from scipy.interpolate import RBFInterpolator

    from avatar.render.graph import solve_splines
    from avatar.render.warp import SMOOTHING, spline_points

    rng = np.random.default_rng(3)
    target = rng.uniform(0, 128, (60, 2))
    target[10] = target[3]  # a duplicate
    source = target + rng.normal(0, 3, target.shape)
    points, values = spline_points(target, source)
    assert len(points) == 59
    short = spline_points(target[:40], source[:40])  # solved beside it in one call, padded with weight-0 points
    (points, _), (weights, short_weights), (affine, _) = (tuple(x) for x in solve_splines([(points, values), short]))
    assert np.abs(short_weights[len(short[0]):]).max() < 1e-12
    at = rng.uniform(0, 128, (200, 2))
    d2 = ((at[:, None] - points[None]) ** 2).sum(-1)
    ours = 0.5 * d2 * np.log(np.maximum(d2, 1e-300)) @ weights + np.c_[np.ones(len(at)), at] @ affine
    _, keep = np.unique(np.round(target, 2), axis=0, return_index=True)
    keep = np.sort(keep)
    scipys = RBFInterpolator(target[keep], source[keep] - target[keep], kernel="thin_plate_spline", smoothing=SMOOTHING)(at)
    np.testing.assert_allclose(ours, scipys, atol=1e-6)


def test_the_diffusion_graph_holds_the_shipped_denoiser_and_takes_its_weights_from_it(tmp_path):
    """The shipped diffusion graph carries no copy of the denoiser's large weights: made whole at load
    from render.onnx; without that file, one clear error."""
    import shutil

    import onnx

    from avatar.errors import AvatarError
    from avatar.render.graph import GraphRenderer, graph_model

    whole = onnx.load_from_string(graph_model(ASSETS / "frame_diffusion.onnx"))
    names = {w.name for w in whole.graph.initializer}
    shipped = {w.name for w in onnx.load(str(ASSETS / "frame_diffusion.onnx")).graph.initializer}
    assert len(names - shipped) >= 90 and all(n.startswith("frame.denoiser.") for n in names - shipped)
    shutil.copy(ASSETS / "frame_diffusion.onnx", tmp_path)
    with pytest.raises(AvatarError, match="render.onnx, which is missing"):
        GraphRenderer(tmp_path, PipelineConfig(renderer="diffusion"))
    with pytest.raises(AvatarError, match="made for diffusion start"):
        GraphRenderer(ASSETS, PipelineConfig(renderer="diffusion", diffusion_start=0.5))


def test_export_writes_a_graph_that_matches_torch(tmp_path):
    """`python -m training.export_graph --kind warp` exports and checks parity with torch itself."""
    from training import export_graph

    assert export_graph.main(["--out-dir", str(tmp_path), "--kind", "warp"]) == 0
    assert (tmp_path / "frame_warp.onnx").stat().st_size > 100_000


def test_a_dub_through_the_graph_is_watermarked_and_changes_only_the_lower_face(tmp_path):
    """`avatar dub` with `frame_graph`: the whole product path on 1.2 s of a real clip; the watermark
    is found again, and pixels far from the mouth are the input's."""
    from avatar import provenance
    from conftest import SPEECH_FLAC

    clip = media.read_video(GRID_CLIP, max_frames=40)
    source = tmp_path / "clip.mp4"
    media.write_video(source, clip.frames, clip.fps, clip.audio[: int(40 / clip.fps * 16000)], crf=12)
    speech = tmp_path / "speech.wav"
    media.write_audio(speech, media.read_audio(SPEECH_FLAC)[:25600])
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(frame_graph=True))
    out = tmp_path / "out.mp4"
    pipeline.dub(source, speech, out, progress=False)
    assert provenance.detect_watermark(out).found
    dubbed = media.read_video(out)
    top = slice(0, 100)  # above the nose in these frames
    assert np.abs(dubbed.frames[10][top].astype(int) - clip.frames[10][top]).mean() < 3


def test_the_torch_module_renders_what_the_onnx_graph_renders_on_real_inputs(tmp_path):
    """`benchmarks.graph --save-inputs` (the graph's inputs for real jobs and the ONNX outputs) and
    `benchmarks.graph_cuda` on them (the torch module, as a GPU host without onnxruntime-gpu runs it):
    within 2 levels of 255; a file without a graph's inputs runs the others, or refuses in one line."""
    import json

    from benchmarks import graph, graph_cuda

    inputs, figures = tmp_path / "inputs.npz", tmp_path / "figures.json"
    assert graph.main(["--renderers", "warp", "--batches", "1", "--seconds", "0", "--save-inputs", str(inputs)]) == 0
    assert graph_cuda.main(["--inputs", str(inputs), "--device", "cpu", "--graphs", "warp", "--batches", "2", "--seconds", "0",
                            "--out", str(figures)]) == 0
    rows = json.loads(figures.read_text())
    assert rows and all(row["max_levels_from_onnx"] <= 2 and row["frames_per_s"] > 0 for row in rows)
    # A file without a graph's inputs: by default the graphs it has inputs for; asked for another, one line and rc 2
    assert graph_cuda.main(["--inputs", str(inputs), "--device", "cpu", "--batches", "1", "--seconds", "0", "--out", str(figures)]) == 0
    assert {row["graph"] for row in json.loads(figures.read_text())} == {"warp"}
    assert graph_cuda.main(["--inputs", str(inputs), "--device", "cpu", "--graphs", "diffusion", "--batches", "1", "--seconds", "0"]) == 2
