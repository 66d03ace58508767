"""Export a trained motion model to ONNX (dynamic batch and time), check parity, keep a compact torch copy.

    python -m training.export_motion --checkpoint runs/motion_live/last.pt --out runs/motion_live/network.onnx [--torch-copy runs/motion_live/network.pt]
    python -m training.export_motion --checkpoint assets/motion_live.pt --out assets/motion_live.onnx   # a shipped file again from its torch copy

Parity: torch vs onnxruntime on random features must agree within 1e-4 (1e-3 for a gated model, its large weights in float16).
The torch copy (fp16 state dict + configs) is what later training runs start from (`--init`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import typing

import numpy as np
import torch

from avatar.config import MotionConfig
from avatar.motion.model import N_POINTS, ClosureGated, LinearMotionModel, MotionBlend, MotionModel
from avatar.runtime import OnnxSession
from training.common import FP16_MIN_ELEMENTS, accept_export, store_weights_fp16, torch_copy

OPSET = 18


def load_model(checkpoint: pathlib.Path) -> torch.nn.Module:
    """A checkpoint or torch copy → its `MotionModel`, or the `MotionBlend` of it and the linear read-out
    when the copy holds one (`training.linear_motion --blend`), or the `ClosureGated` model when it
    holds a closure gate (`training.closure_gate`)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = MotionModel(MotionConfig(**state["model_config"]))
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    if "linear" in state:
        weight = state["linear"]["conv.weight"]
        linear = LinearMotionModel(weight.shape[1], weight.shape[2], model.config.causal)
        linear.load_state_dict({k: v.float() for k, v in state["linear"].items()})
        model = MotionBlend(model, linear)
    if "closure" in state:  # the model with its closure gate (training.closure_gate)
        weight = state["closure"]["conv.weight"]
        gated = ClosureGated(model, weight.shape[1], weight.shape[2], state["closure_threshold"], state.get("closure_full", 1.0))
        gated.conv.load_state_dict({k.removeprefix("conv."): v.float() for k, v in state["closure"].items()})
        return gated.eval()
    return model.eval()


def export(model: torch.nn.Module, out: pathlib.Path) -> None:
    """A `MotionModel`, `LinearMotionModel`, `MotionBlend` or `ClosureGated` → ONNX (dynamic batch, time
    and wanted frames: inputs `features (B, T, D)`, `rest (B, N_POINTS, 2)`, `frames (K,) int64`), with
    the metadata `MotionPredictor` reads from its `config` (features, causal, receptive field)."""
    c = model.config
    features = torch.zeros(2, 12, c.features)  # sizes > 1: the exporter specialises 0 and 1
    rest = torch.zeros(2, N_POINTS, 2)
    frames = torch.arange(3, 12)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_path = pathlib.Path(tmp) / out.name
        batch = torch.export.Dim("batch", min=1, max=1024)
        time = torch.export.Dim("time", min=1, max=1_000_000)
        wanted = torch.export.Dim("frames", min=1, max=1_000_000)
        torch.onnx.export(model, (features, rest, frames), str(tmp_path), input_names=["features", "rest", "frames"],
                          output_names=outputs(model), opset_version=OPSET,
                          dynamic_shapes={"features": {0: batch, 1: time}, "rest": {0: batch}, "frames": {0: wanted}},
                          dynamo=True, verbose=False)
        import onnx

        proto = onnx.load(str(tmp_path))
        metadata = {"features": c.features, "causal": c.causal, "temporal_kernel": c.temporal_kernel,
                    "temporal_layers": c.temporal_layers, "speech_encoder": "speech.onnx",
                    "points": "avatar.face.landmarks.MOUTH_AND_JAW", "units": "crop pixels (same as rest)"}
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp_path))
        tmp_path.replace(out)


def outputs(model: torch.nn.Module) -> typing.List[str]:
    """The ONNX outputs: the landmarks, and a blend's read-out beside them."""
    blend = model.network if isinstance(model, ClosureGated) else model
    return ["landmarks", "readout"] if isinstance(blend, MotionBlend) else ["landmarks"]


def parity(model: torch.nn.Module, onnx_path: pathlib.Path, features: np.ndarray, rest: np.ndarray,
           frames: np.ndarray) -> float:
    """Largest |ONNX − torch| over the model's outputs at `frames`."""
    session = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(features), torch.from_numpy(rest), torch.from_numpy(frames))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(features=features, rest=rest, frames=frames)
    return max(float(np.abs(got[name] - want.numpy()).max()) for name, want in zip(outputs(model), expected))


def export_checked(model: torch.nn.Module, out: pathlib.Path, limit: float) -> typing.Optional[float]:
    """Export `model` to `out` (`export`) only if ONNX and torch agree within `limit` on random inputs of
    several batch sizes and lengths; returns the largest difference, or None (said, `out` left as it was)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        candidate = pathlib.Path(tmp) / out.name
        export(model, candidate)
        for batch, length, first in ((1, 1, 0), (1, 57, 0), (3, 20, 0), (1, 9, 6), (2, 30, 29)):
            features = rng.standard_normal((batch, length, model.config.features)).astype(np.float32)
            rest = rng.uniform(40, 90, (batch, N_POINTS, 2)).astype(np.float32)
            worst = max(worst, parity(model, candidate, features, rest, np.arange(first, length)))
        return worst if accept_export(candidate, out, worst, limit) else None


def export_half_weights(model: torch.nn.Module, out: pathlib.Path, limit: float) -> typing.Optional[float]:
    """`export_checked` with the large weights (`FP16_MIN_ELEMENTS` and up) stored as float16 and computed
    in float32, as the shipped motion files are: the torch model's own weights are rounded alike first,
    so parity holds. Returns the largest difference, or None (said, `out` left as it was)."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.numel() >= FP16_MIN_ELEMENTS:
                weight.copy_(weight.half().float())
    worst = export_checked(model, out, limit)
    if worst is not None:
        store_weights_fp16(out)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save an fp16 torch copy here")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint)
    if args.torch_copy and not isinstance(model, MotionModel):
        print(f"error: {args.checkpoint} holds a blend or a closure gate: its torch copy is written by training.linear_motion "
              "or training.closure_gate", file=sys.stderr)
        return 2
    # A gated model is a shipped file's torch copy (training.closure_gate): exported as that file is.
    worst = export_half_weights(model, args.out, 1e-3) if isinstance(model, ClosureGated) else export_checked(model, args.out, 1e-4)
    if worst is None:
        return 1
    if args.torch_copy:
        torch_copy(model, args.torch_copy)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); max |onnx - torch| = {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
