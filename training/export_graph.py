"""Export the frame graph (`avatar/render/frame_graph.py`) to ONNX: the warp renderer's and the
retrieval renderer's (no weights; the latter draws the person's bank entry) and the diffusion
renderer's (the shipped denoiser, whose weights it takes from `render.onnx` at load, drafting as the
retrieval renderer), and that one without the bank entry's path ("diffusion_plain": batches with no
entry to draw), for the pipeline's defaults (crop side, diffusion start, steps, colour match).
Checks parity with torch.

    python -m training.export_graph --out-dir assets [--render assets/render.onnx] [--kind warp|retrieval|diffusion|diffusion_plain|all]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import typing

import numpy as np
import torch

from avatar.config import PipelineConfig
from avatar.render.frame_graph import FrameGraph
from avatar.render.graph import GRAPH_FILES, graph_inputs, graph_model, has_entry
from avatar.render.renderers import FRAME_DETAIL_TOLERANCE
from avatar.render.sampling import steps_from
from avatar.runtime import OnnxSession
from training.common import accept_export, store_weights_fp16
from training.export_render import OPSET, denoiser_from_onnx

class Positional(torch.nn.Module):
    """The graph with its inputs as positional arguments in `names` order (for the exporter)."""

    def __init__(self, graph: FrameGraph, names: typing.Sequence[str]):
        super().__init__()
        self.frame, self.names = graph, tuple(names)  # not "graph": the exporter's modules have one

    def forward(self, *args):
        return self.frame(dict(zip(self.names, args)))


def example_inputs(size: int, references: int, batch: int = 2, seed: int = 0) -> typing.Dict[str, np.ndarray]:
    """Inputs of the graph's shapes and ranges (random; for export and parity), region side 176,
    splines of 90 points, open mouths of 100 and 72 px."""
    rng = np.random.default_rng(seed)
    side, points = 176, 90
    u = lambda *shape: rng.uniform(0, 1, shape).astype(np.float32)
    angle, scale = rng.uniform(-0.2, 0.2, batch), rng.uniform(0.6, 1.2, batch)
    crop_from_patch = np.stack([[[s * np.cos(a), -s * np.sin(a), 10.0], [s * np.sin(a), s * np.cos(a), 5.0]]
                                for a, s in zip(angle, scale)]).astype(np.float32)
    patch_from_crop = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2] for m in crop_from_patch]).astype(np.float32)
    out = {"patch": rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8),
           "patch_from_crop": patch_from_crop, "crop_from_patch": crop_from_patch,
           "level": rng.integers(0, 4, batch).astype(np.float32), "detail": np.ones(batch, np.float32),
           "mask": u(batch, size, size), "upper": u(batch, size, size),
           "hole": u(batch, size, size), "lip_band": (u(batch, size, size) > 0.5).astype(np.float32),
           "cavity": np.tile(np.float32([[60.0, 20.0]]), (batch, 1)), "meet": np.linspace(0, 1, batch).astype(np.float32),
           "watermark": np.full(batch, 2.0, np.float32), "pattern": rng.standard_normal((size, size)).astype(np.float32),
           "references": rng.uniform(0, 255, (batch, 3 * references, size, size)).astype(np.float32),
           "sketch": u(batch, 3, size, size), "noise": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
    out["entry"] = rng.uniform(0, 255, (batch, 3, size, size)).astype(np.float32)
    for name in ("entry_hole", "entry_inner_box", "entry_lower_box", "entry_region"):
        out[name] = (u(batch, size, size) > 0.3).astype(np.float32) * u(batch, size, size)
    for name in ("upper", "lower", "entry_upper", "entry_lower"):
        out[f"{name}_points"] = rng.uniform(0, size, (batch, points, 2)).astype(np.float32)
        out[f"{name}_weights"] = (rng.standard_normal((batch, points, 2)) * 1e-3).astype(np.float32)
        out[f"{name}_affine"] = np.tile(np.float32([[0.5, 0.5], [0.01, 0.0], [0.0, 0.01]]), (batch, 1, 1))
    for key, name, m in (("inner", "inner", 100), ("lower", "lower_row", 72)):
        out[name] = rng.uniform(0, 255, (batch, 3, m, m)).astype(np.float32)
        out[f"{key}_columns"] = np.stack([np.stack([rng.uniform(0, m, size), rng.uniform(-5, 5, size), rng.uniform(-5, 5, size),
                                                    np.full(size, m / 2)]) for _ in range(batch)]).astype(np.float32)
        out[f"{key}_box"] = (u(batch, size, size) > 0.3).astype(np.float32)
        out[f"{key}_lips"] = rng.uniform(60, 200, (batch, 3)).astype(np.float32)
        out[f"{key}_borrowed"] = np.float32([1.0, 0.0] * (batch // 2) + [1.0] * (batch % 2))
    return out


def reference_count(metadata: typing.Dict[str, str]) -> int:
    """The reference crops a diffusion graph takes per frame (the person's and the retrieved; 1 for the warp's, unused)."""
    return int(metadata.get("references", 1)) + int(metadata.get("retrieved", 0))


def export(graph: FrameGraph, out: pathlib.Path, names: typing.Sequence[str], metadata: typing.Dict[str, str]) -> None:
    """Write `graph` to `out` (dynamic batch, region side, spline points and mouth sizes)."""
    example = example_inputs(graph.size, reference_count(metadata))
    args = tuple(torch.from_numpy(example[name]) for name in names)
    dims = {"batch": torch.export.Dim("batch", min=1, max=1024), "side": torch.export.Dim("side", min=16, max=4096),
            "points": torch.export.Dim("points", min=4, max=1024), "inner": torch.export.Dim("inner", min=1, max=4096),
            "lower": torch.export.Dim("lower", min=1, max=4096)}
    shapes = []
    for name in names:
        axes = {} if name == "pattern" else {0: dims["batch"]}  # the watermark's pattern is the one input without a batch axis
        if name == "patch":
            axes.update({1: dims["side"], 2: dims["side"]})
        if name.endswith("_points") or name.endswith("_weights"):
            axes[1] = dims["points"]
        if name == "inner":
            axes.update({2: dims["inner"], 3: dims["inner"]})
        if name == "lower_row":
            axes.update({2: dims["lower"], 3: dims["lower"]})
        shapes.append(axes or None)
    torch.onnx.export(Positional(graph, names).eval(), args, str(out), input_names=list(names), output_names=["pixels", "alpha"],
                      dynamic_shapes=(tuple(shapes),), opset_version=OPSET, dynamo=True, verbose=False)
    import onnx

    proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))


def parity(graph: FrameGraph, path: pathlib.Path, names: typing.Sequence[str], references: int,
           share: pathlib.Path) -> typing.Tuple[int, float]:
    """(the largest |Δ| of the pixels in levels, of alpha) between ONNX (made whole as the engine
    loads it, with the weights of `share`) and torch, on another example."""
    import shutil

    example = example_inputs(graph.size, references, batch=3, seed=1)
    with torch.no_grad():
        pixels, alpha = graph({k: torch.from_numpy(v) for k, v in example.items()})
    if path.parent != share.parent and share.exists():
        shutil.copy(share, path.parent / share.name)
    got = OnnxSession(path, providers=["CPUExecutionProvider"], model=graph_model(path)).run(**{k: example[k] for k in names})
    return int(np.abs(got["pixels"].astype(int) - pixels.numpy().astype(int)).max()), float(np.abs(got["alpha"] - alpha.numpy()).max())


def share_weights(path: pathlib.Path, source: pathlib.Path, prefix: str) -> int:
    """Drop from the graph at `path` the weights that `source` holds with the same values (named
    without `prefix`); `avatar.render.graph.graph_model` puts them back at load. Returns their number."""
    import json

    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    theirs = {w.name: w for w in onnx.load(str(source)).graph.initializer}
    kept, shared = [], []
    for weight in proto.graph.initializer:
        other = theirs.get(weight.name[len(prefix):]) if weight.name.startswith(prefix) else None
        same = other is not None and other.data_type == weight.data_type and np.array_equal(
            numpy_helper.to_array(other), numpy_helper.to_array(weight))
        (shared if same else kept).append(weight)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for key, value in (("shared_from", source.name), ("shared_prefix", prefix), ("shared_weights", json.dumps([w.name for w in shared]))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return len(shared)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_graph", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("assets"))
    parser.add_argument("--render", type=pathlib.Path, default=pathlib.Path("assets/render.onnx"),
                        help="the shipped denoiser, whose weights the diffusion graph takes at load instead of holding them")
    parser.add_argument("--kind", choices=(*GRAPH_FILES, "all"), default="all")
    args = parser.parse_args(argv)
    config = PipelineConfig()
    for kind in (tuple(GRAPH_FILES) if args.kind == "all" else (args.kind,)):
        metadata = {"crop_size": "128", "kind": kind}
        if kind.startswith("diffusion"):
            denoiser = denoiser_from_onnx(args.render)
            steps = config.steps or steps_from(config.diffusion_start, denoiser.config.steps)
            graph = FrameGraph(denoiser.config.crop_size, denoiser, steps, config.diffusion_start, config.colour_match, FRAME_DETAIL_TOLERANCE,
                               retrieval=has_entry(kind))
            metadata.update(crop_size=str(denoiser.config.crop_size), references=str(denoiser.config.references),
                            retrieved=str(denoiser.config.retrieved),
                            start=str(config.diffusion_start), steps=str(steps), model_steps=str(denoiser.config.steps),
                            colour_match=str(config.colour_match))
        else:
            graph = FrameGraph(128, None, detail_tolerance=FRAME_DETAIL_TOLERANCE, retrieval=has_entry(kind))
        names = graph_inputs(kind)
        graph.eval()
        out = args.out_dir / GRAPH_FILES[kind]
        with tempfile.TemporaryDirectory() as tmp:
            candidate = pathlib.Path(tmp) / out.name
            export(graph, candidate, names, metadata)
            shared = 0
            if kind.startswith("diffusion"):
                store_weights_fp16(candidate)
                shared = share_weights(candidate, args.render, "frame.denoiser.")
            pixels, alpha = parity(graph, candidate, names, reference_count(metadata), args.render)
            # levels: rounding at a few places of the graph can land one level apart
            if not accept_export(candidate, out, float(pixels > 2 or alpha > 1e-3), 0.5):
                return 1
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB" + (f"; {shared} weights taken from {args.render.name} at load" if shared else "")
              + f"); max |onnx - torch|: {pixels} levels, alpha {alpha:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
