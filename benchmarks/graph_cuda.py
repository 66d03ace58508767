"""The frame graph's torch module on a GPU (or any torch device): frames/s by batch size, for a host
whose onnxruntime has no CUDA provider (the lent H200's image holds torch with CUDA, onnxruntime
for CPU only, and none of our front-ends).

    python -m benchmarks.graph --save-inputs out/graph_inputs.npz     # here: real inputs and the ONNX graph's outputs
    python -m benchmarks.graph_cuda --inputs out/graph_inputs.npz [--device cuda] [--batches 1 8 32 64] [--graphs ...] [--out FILE.json]

For the warp and the diffusion graph, and the latter without the bank entry's path
(`avatar.render.frame_graph.FrameGraph`, the denoiser read back
from `assets/render.onnx` as `training.export_graph` does): the largest difference from the ONNX
graph's output on the saved inputs (levels of 255), then whole-batch calls timed after warm-up (CUDA
synchronised), the 8 saved jobs repeated to each batch size; the diffusion graph also with the
denoiser under fp16 autocast (the rest stays fp32: pixel coordinates). Printed: ms per call, frames/s
and the 25 fps streams that rate feeds. torch's kernels, not onnxruntime's: a stand-in for the ONNX
graph on CUDA until onnxruntime-gpu can be measured there.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

from avatar.config import PipelineConfig
from avatar.render.frame_graph import FrameGraph
from avatar.render.renderers import FRAME_DETAIL_TOLERANCE
from avatar.render.sampling import steps_from
from avatar.runtime import ASSETS
from benchmarks import write_rows

STREAM_FPS = 25.0


class Autocast(torch.nn.Module):
    """A module run under fp16 autocast on its device."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        with torch.autocast(args[0].device.type, dtype=torch.float16):
            return self.module(*args).float()


# "-fp16": the denoiser under fp16 autocast (GPU only); "diffusion_plain": without the bank entry's path
# (what a person without a bank runs), on the diffusion graph's saved inputs
GRAPHS = ("warp", "diffusion", "diffusion-fp16", "diffusion_plain", "diffusion_plain-fp16")


def input_kind(label: str) -> str:
    """The renderer whose saved inputs a graph of GRAPHS reads ("warp" or "diffusion")."""
    return label.split("-")[0].replace("diffusion_plain", "diffusion")


def make_graph(name: str) -> FrameGraph:
    """One of GRAPHS, with the shipped denoiser read back from `assets/render.onnx`."""
    from training.export_render import denoiser_from_onnx

    if name == "warp":
        return FrameGraph(128, None, detail_tolerance=FRAME_DETAIL_TOLERANCE).eval()
    config = PipelineConfig()
    denoiser = denoiser_from_onnx(ASSETS / "render.onnx")
    steps = config.steps or steps_from(config.diffusion_start, denoiser.config.steps)
    model = Autocast(denoiser) if name == "diffusion-fp16" else denoiser
    return FrameGraph(denoiser.config.crop_size, model, steps, config.diffusion_start, config.colour_match, FRAME_DETAIL_TOLERANCE,
                      retrieval=not name.startswith("diffusion_plain")).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=pathlib.Path, required=True, help="from `python -m benchmarks.graph --save-inputs`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--graphs", nargs="+", choices=GRAPHS,
                        help="default: all on a GPU, the first two on CPU (of those whose inputs the file holds)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    if not args.inputs.exists():
        print(f"error: {args.inputs}: no such file; make it with python -m benchmarks.graph --save-inputs {args.inputs}",
              file=sys.stderr)
        return 2
    saved = np.load(args.inputs)
    held = {name.split("/", 1)[0] for name in saved.files}  # the renderers whose inputs the file holds
    device = torch.device(args.device)
    labels = args.graphs or [label for label in (GRAPHS if device.type == "cuda" else GRAPHS[:2]) if input_kind(label) in held]
    missing = sorted({input_kind(label) for label in labels} - held)
    if missing or not labels:
        print(f"error: {args.inputs} holds no inputs for the {' and '.join(missing or ['warp', 'diffusion'])} graph; make it with "
              f"python -m benchmarks.graph --renderers warp diffusion --save-inputs {args.inputs}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'graph':>24} {'batch':>6} {'ms/call':>9} {'frames/s':>9} {'streams':>8}  max |Δ| against ONNX on CPU")
    rows = []
    for label in labels:
        graph, kind = make_graph(label), input_kind(label)
        names = [k.split("/", 1)[1] for k in saved.files if k.startswith(kind + "/") and "/output_" not in k]
        inputs = {k: torch.from_numpy(saved[f"{kind}/{k}"]).to(device) for k in names}
        graph.to(device)
        with torch.no_grad():
            pixels, _ = graph(inputs)
        difference = int(np.abs(pixels.cpu().numpy().astype(int) - saved[f"{kind}/output_pixels"].astype(int)).max())
        for size in args.batches:
            index = torch.arange(size, device=device) % len(saved[f"{kind}/patch"])
            batch = {k: v if k == "pattern" else v[index] for k, v in inputs.items()}
            with torch.no_grad():
                for _ in range(3):
                    graph(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                calls, start = 0, time.perf_counter()
                while calls < 5 or time.perf_counter() - start < args.seconds:
                    graph(batch)
                    calls += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / calls
            rows.append({"graph": label, "batch": size, "ms_per_call": 1000 * seconds, "frames_per_s": size / seconds,
                         "streams_25fps": size / seconds / STREAM_FPS, "max_levels_from_onnx": difference, "device": name})
            print(f"{label:>24} {size:>6} {1000 * seconds:>9.2f} {size / seconds:>9.0f} {size / seconds / STREAM_FPS:>8.1f}  "
                  f"{difference}", flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
