"""Held-out report for the renderer, next to baselines in the same run.

    python -m training.eval_render --cache cache --model assets/render.onnx [--teacher teacher.onnx] [--compare other.onnx]
                                   [--steps 1 2 4] [--frames 64] [--json report.json]

On frames of validation people (never seen in training), each target's lower face is repainted from
its masked frame, two references of the same clip (and, for a model with retrieved references,
those of a mouth bank of the clip's other frames nearest the target's lips) and the sketch of its
real landmarks, then composited into the crop. Compared with the real crop in the repainted region:
- the model in each of `--steps` (default: the model's own few-step count) and in `--many-steps`
  DDIM steps; with `--teacher`, the many-step model it was distilled from, in the model's steps, in
  `--many-steps` (the quality the few-step path is measured against) and from the warp; with
  `--compare`, another model (e.g. the shipped one a candidate would replace) in the same rows;
- the warp renderer (`avatar/render/warp.py`): the closed-mouth reference's lower face warped to the
  target's lips and jaw, the inside of the mouth from the open-mouth reference; with `--from-warp T`,
  the model also starts from that crop noised to time T (SDEdit-style) instead of from pure noise;
- baseline "reference mouth": the closed-mouth reference's lower face pasted in;
- baseline "nearest reference": the clip's frame (≥ 12 frames away) whose mouth landmarks are
  closest to the target's, its lower face pasted in.
Metrics: PSNR and SSIM of the repainted region, sharpness ratio (Laplacian variance there, output /
real; ≥ 0.8 is the target), mouth landmark error of the re-detected output vs the target landmarks
(% of inter-ocular distance), identity distance (dlib) to the references, and flicker (mean absolute
frame-to-frame change of the repainted region over consecutive frames, output / real).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import typing

import numpy as np

from avatar.config import AlignConfig
from avatar.errors import FaceError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner
from avatar.metrics import masked_psnr, sharpness
from avatar.render.condition import build_condition, composite
from avatar.render.runner import OnnxDenoiser
from avatar.render.sampling import steps_from
from avatar.render.warp import InnerMouth, render_warp
from training.common import emit_report
from training.render_data import REFERENCE_GAP, RenderClip, load_render_clips

BASELINES = {"warp": "warp renderer", "reference_mouth": "reference mouth pasted", "nearest_reference": "nearest reference pasted"}


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One learned row of the report: `renderer` sampled in `steps` DDIM steps, called `name` ("model", "teacher")."""

    name: str
    renderer: OnnxDenoiser
    steps: int
    start: float = 1.0  # below 1: start from the warp renderer's crop noised to this time

    @property
    def key(self) -> str:
        return f"{self.name}_{self.steps}" + (f"_warp{self.start:g}" if self.start < 1 else "")

    @property
    def label(self) -> str:
        steps = f"{self.name}, {self.steps} step" + ("s" if self.steps > 1 else "")
        return steps + (f" from warp t={self.start:g}" if self.start < 1 else "")


def _region_ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return float(structural_similarity(a[y0:y1, x0:x1], b[y0:y1, x0:x1], channel_axis=2, data_range=255))


def nearest_reference(clip: RenderClip, index: int) -> int:
    far = clip.usable & (np.abs(np.arange(clip.usable.size) - index) >= REFERENCE_GAP)
    pool = np.flatnonzero(far)
    mouth = clip.landmarks[:, lm.MOUTH_AND_JAW]
    distance = np.abs(mouth[pool] - mouth[index]).mean(axis=(1, 2))
    return int(pool[np.argmin(distance)])


def evaluate_render(models: typing.Sequence[ModelRow], clips: typing.Sequence[RenderClip], frames: int,
                    runs: int = 4, seed: int = 0) -> typing.Dict[str, typing.Any]:
    """Metrics per method (each model row, then the baselines) over `frames` targets, taken as `runs`
    runs of consecutive frames (for flicker). All models must share one crop size and reference
    count; models with retrieved references get them per frame from a bank of the run's clip, of
    frames at least REFERENCE_GAP from every frame of the run (`RenderClip.bank`, `retrieved`)."""
    from avatar.face.tracker import FaceTracker
    from avatar.identity import FaceEmbedder

    rng = np.random.default_rng(seed)
    size = models[0].renderer.config.crop_size
    if len({(m.renderer.config.crop_size, m.renderer.config.references) for m in models}) > 1:
        raise ValueError("the models differ in crop size or reference count; compare models that agree in both")
    methods = [m.key for m in models] + list(BASELINES)
    aligner = FaceAligner(AlignConfig(crop_size=size))
    tracker, embedder = FaceTracker(), FaceEmbedder()
    noise = rng.standard_normal((3, size, size)).astype(np.float32)  # shared across frames: temporal stability
    rows: typing.Dict[str, typing.List[typing.Dict[str, float]]] = {m: [] for m in methods}
    flicker: typing.Dict[str, typing.List[float]] = {m: [] for m in (*methods, "real")}
    per_run = max(2, frames // runs)
    for run in range(runs):
        clip = clips[run % len(clips)]
        usable = np.flatnonzero(clip.usable)
        start = int(rng.choice(usable[: max(1, len(usable) - per_run)]))
        indices = [i for i in range(start, start + per_run) if i < clip.usable.size and clip.usable[i]]
        references = clip.references(start, rng, models[0].renderer.config.references)
        ref_crops = [clip.crops[r] for r in references]
        ref_embeddings = [embedder.embed(c, clip.landmarks[r]) for c, r in zip(ref_crops, references)]
        bank = clip.bank(rng, indices)  # the run's mouth bank, for models with retrieved references
        previous: typing.Dict[str, np.ndarray] = {}
        mask = aligner.repaint_mask(*(clip.landmarks[i] for i in indices))
        region = mask > 0.5
        for index in indices:
            target = clip.crops[index]
            retrieved = clip.retrieved(index, rng, max(m.renderer.config.retrieved for m in models), bank)
            conditions = {k: build_condition(target, mask, ref_crops + [clip.crops[r] for r in retrieved[:k]],
                                             clip.landmarks[index][lm.MOUTH_AND_JAW])
                          for k in {m.renderer.config.retrieved for m in models}}
            target_mouth = clip.landmarks[index][lm.MOUTH_AND_JAW, :2]
            warped = render_warp(ref_crops[0], clip.landmarks[references[0]], target_mouth, mask,
                                 InnerMouth(ref_crops[1], clip.landmarks[references[1]][lm.MOUTH_AND_JAW, :2], size))
            warped = composite(warped, target, mask)
            outputs = {row.key: composite(row.renderer.render(conditions[row.renderer.config.retrieved], noise, row.steps, warped, row.start),
                                          target, mask)
                       for row in models}
            outputs.update({
                "warp": warped,
                "reference_mouth": composite(ref_crops[0], target, mask),
                "nearest_reference": composite(clip.crops[nearest_reference(clip, index)], target, mask),
            })
            iod = float(lm.interocular(clip.landmarks[index]))
            for method, output in outputs.items():
                try:
                    detected = tracker.select(output).landmarks
                    landmark_error = float(np.abs(detected[lm.MOUTH_AND_JAW, :2] - clip.landmarks[index][lm.MOUTH_AND_JAW]).mean() / iod * 100)
                except FaceError:  # a rendering without a detectable face counts as a large error
                    landmark_error = 100.0
                embedding = embedder.embed(output, clip.landmarks[index])
                rows[method].append({
                    "psnr": masked_psnr(output, target, region), "ssim": _region_ssim(output, target, region),
                    "sharpness_ratio": sharpness(output, region) / max(sharpness(target, region), 1e-9),
                    "landmark_error": landmark_error,
                    "identity_distance": float(min(np.linalg.norm(embedding - e) for e in ref_embeddings)),
                })
                if method in previous:
                    flicker[method].append(float(np.abs(output.astype(np.float32) - previous[method])[region].mean()))
                previous[method] = output.astype(np.float32)
            if "real" in previous:
                flicker["real"].append(float(np.abs(target.astype(np.float32) - previous["real"])[region].mean()))
            previous["real"] = target.astype(np.float32)
    real_flicker = float(np.mean(flicker["real"])) if flicker["real"] else float("nan")
    summary = {}
    for method in methods:
        values = rows[method]
        summary[method] = {key: float(np.mean([v[key] for v in values])) for key in values[0]}
        summary[method]["flicker_ratio"] = float(np.mean(flicker[method])) / real_flicker if flicker[method] else float("nan")
    return {"frames": len(rows[methods[0]]), "runs": runs, "labels": {**{m.key: m.label for m in models}, **BASELINES},
            "summary": summary}


def format_report(report: typing.Dict[str, typing.Any]) -> str:
    lines = [f"held-out: {report['frames']} frames in {report['runs']} runs of consecutive frames (people never seen in training)",
             f"{'':36s} {'PSNR dB':>8s} {'SSIM':>6s} {'sharp':>6s} {'lmk %IOD':>9s} {'identity':>9s} {'flicker':>8s}"]
    for method, name in report["labels"].items():
        s = report["summary"][method]
        lines.append(f"{name:36s} {s['psnr']:8.2f} {s['ssim']:6.3f} {s['sharpness_ratio']:6.2f} {s['landmark_error']:9.2f} "
                     f"{s['identity_distance']:9.3f} {s['flicker_ratio']:8.2f}")
    lines.append("sharp = Laplacian variance ratio output/real in the region (target ≥ 0.8); flicker = frame-to-frame change output/real")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval_render", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--model", type=pathlib.Path, required=True, help="ONNX denoiser (training.export_render)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--teacher", type=pathlib.Path, help="ONNX of the many-step model the --model was distilled from")
    parser.add_argument("--compare", type=pathlib.Path, help="ONNX of another model to report beside --model in the same steps "
                        "(e.g. the one it would replace)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="few-step counts (default: the model's)")
    parser.add_argument("--many-steps", type=int, default=25)
    parser.add_argument("--from-warp", type=float, nargs="*", default=[],
                        help="also start the model from the warp renderer's crop at these times (steps: time × the model's steps)")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    renderer = OnnxDenoiser(args.model)
    few = args.steps or [renderer.config.steps]
    models = [ModelRow("model", renderer, steps) for steps in (*few, args.many_steps)]
    models += [ModelRow("model", renderer, steps_from(start, renderer.config.steps), start) for start in args.from_warp]
    for role, path in (("teacher", args.teacher), ("compared", args.compare)):
        if path is None:
            continue
        other = OnnxDenoiser(path)
        if (other.config.crop_size, other.config.references) != (renderer.config.crop_size, renderer.config.references):
            print(f"error: {path} draws {other.config.crop_size}² crops from {other.config.references} references and {args.model} "
                  f"{renderer.config.crop_size}² from {renderer.config.references}; compare models that agree in both", file=sys.stderr)
            return 2
        counts = (max(few), args.many_steps) if role == "teacher" else (*few, args.many_steps)
        models += [ModelRow(role, other, steps) for steps in counts]
        models += [ModelRow(role, other, steps_from(start, renderer.config.steps), start) for start in args.from_warp]
    clips = load_render_clips(args.cache, "val", renderer.config.crop_size, kinds=("video",))
    if not clips:
        print(f"error: no validation clips in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    report = evaluate_render(models, clips, args.frames)
    emit_report(format_report(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
