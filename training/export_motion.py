"""Export a trained motion model to ONNX (dynamic batch and time), check parity, keep a compact torch copy.

    python -m training.export_motion --checkpoint runs/motion/best.pt --out assets/motion.onnx [--torch-copy assets/motion.pt]

Parity: torch vs onnxruntime on real held-out windows and on random ones must agree within 1e-4.
The torch copy (fp16 state dict + configs) is what later training runs start from (`--init`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

from avatar.config import MotionConfig
from avatar.motion.model import N_POINTS, MotionModel
from avatar.runtime import OnnxSession
from training.common import accept_export, torch_copy

OPSET = 18


def load_model(checkpoint: pathlib.Path) -> MotionModel:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = MotionModel(MotionConfig(**state["model_config"]))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state["model"].items()}, strict=False)
    if unexpected or any(not key.startswith("viseme_head.") for key in missing):  # that head is training-only
        raise RuntimeError(f"{checkpoint}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model.eval()


def export(model: MotionModel, out: pathlib.Path) -> None:
    c = model.config
    windows = torch.zeros(2, 12, c.mel_window_frames, 80)  # sizes > 1: the exporter specialises 0 and 1
    rest = torch.zeros(2, N_POINTS, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_path = pathlib.Path(tmp) / out.name
        batch = torch.export.Dim("batch", min=1, max=1024)
        time = torch.export.Dim("time", min=1, max=1_000_000)
        torch.onnx.export(model, (windows, rest), str(tmp_path), input_names=["windows", "rest"], output_names=["landmarks"],
                          dynamic_shapes={"windows": {0: batch, 1: time}, "rest": {0: batch}}, opset_version=OPSET,
                          dynamo=True, verbose=False)
        import onnx

        proto = onnx.load(str(tmp_path))
        metadata = {"mel_window_frames": c.mel_window_frames, "mel_window_offset": c.mel_window_offset,
                    "temporal_kernel": c.temporal_kernel, "temporal_layers": c.temporal_layers,
                    "points": "avatar.face.landmarks.MOUTH_AND_JAW", "units": "crop pixels (same as rest)"}
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp_path))
        tmp_path.replace(out)


def parity(model: MotionModel, onnx_path: pathlib.Path, windows: np.ndarray, rest: np.ndarray) -> float:
    session = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(windows), torch.from_numpy(rest)).numpy()
    got = session.run(windows=windows, rest=rest)["landmarks"]
    return float(np.abs(got - expected).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/motion.onnx"))
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save an fp16 torch copy here")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint)
    rng = np.random.default_rng(0)
    c = model.config
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        candidate = pathlib.Path(tmp) / args.out.name
        export(model, candidate)
        for batch, length in ((1, 1), (1, 57), (3, 20)):
            windows = rng.uniform(-4, 2, (batch, length, c.mel_window_frames, 80)).astype(np.float32)
            rest = (64 + rng.normal(0, 10, (batch, N_POINTS, 2))).astype(np.float32)
            worst = max(worst, parity(model, candidate, windows, rest))
        if not accept_export(candidate, args.out, worst, 1e-4):
            return 1
    if args.torch_copy:
        torch_copy(model, args.torch_copy)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); max |onnx - torch| = {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
