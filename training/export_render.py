"""Export the renderer's denoiser to ONNX (dynamic batch), check parity (fp32 ≤ 1e-3), optionally fp16.

    python -m training.export_render --checkpoint runs/render/best.pt --out assets/render.onnx [--fp16] [--torch-copy assets/render.pt] [--steps 2]

The sampler loop stays in Python (`avatar.render.sampling`), calling the ONNX denoiser each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import typing

import numpy as np
import torch

from avatar.config import RenderConfig
from avatar.render.unet import Denoiser
from avatar.runtime import OnnxSession
from training.common import accept_export, store_weights_fp16, torch_copy

OPSET = 18


def load_denoiser(checkpoint: pathlib.Path) -> Denoiser:
    """The denoiser (fp32, eval mode) of a training checkpoint, of a torch copy (`assets/render.pt`)
    or of an exported `.onnx` (`denoiser_from_onnx`)."""
    if pathlib.Path(checkpoint).suffix == ".onnx":
        return denoiser_from_onnx(pathlib.Path(checkpoint))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = RenderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    model = Denoiser(config)
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    return model.eval()


def denoiser_from_onnx(path: pathlib.Path) -> torch.nn.Module:
    """The denoiser of an exported `render.onnx` as a torch module (fp32, eval mode), so that the graph
    holds exactly the shipped model (its torch copy `render.pt` is the teacher, not the student).

    Weights are read by name (`X` or its fp16 copy `X__fp16`); the exporter wrote each GroupNorm as
    InstanceNormalization → Reshape → Mul(weight) → Add(bias) with anonymous weights, which are taken
    in graph order for the GroupNorm modules in the order the forward pass calls them. Checked: the
    module's output equals onnxruntime's on the file (≤ 1e-3)."""
    import onnx
    from onnx import numpy_helper

    from avatar.render.runner import OnnxDenoiser

    proto = onnx.load(str(path))
    weights = {w.name: numpy_helper.to_array(w) for w in proto.graph.initializer}
    consumers: typing.Dict[str, typing.List[typing.Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    runner = OnnxDenoiser(path, threads=1, providers=["CPUExecutionProvider"])
    model = Denoiser(runner.config)
    norms_called: typing.List[str] = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [m.register_forward_hook(lambda module, *_: norms_called.append(names[module]))
             for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    c = runner.config
    example = (torch.zeros(1, 3, c.crop_size, c.crop_size), torch.zeros(1), torch.zeros(1, c.condition_channels, c.crop_size, c.crop_size))
    with torch.no_grad():
        model(*example)
    for hook in hooks:
        hook.remove()
    norm_weights = []
    for node in proto.graph.node:
        if node.op_type == "InstanceNormalization":
            reshape = consumers[node.output[0]][0]
            mul = consumers[reshape.output[0]][0]
            add = consumers[mul.output[0]][0]
            norm_weights.append((weights[mul.input[1]].reshape(-1), weights[add.input[1]].reshape(-1)))
    if len(norm_weights) != len(norms_called):
        raise SystemExit(f"error: {path}: {len(norm_weights)} group norms in the file, {len(norms_called)} in the model")
    state = {}
    for key in model.state_dict():
        if key in weights or key + "__fp16" in weights:
            state[key] = torch.from_numpy(weights.get(key, weights.get(key + "__fp16")).astype(np.float32))
    for name, (weight, bias) in zip(norms_called, norm_weights):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))
    model.load_state_dict(state)
    model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, c.crop_size, c.crop_size)).astype(np.float32)
    t = np.float32([0.25, 0.8])
    condition = rng.uniform(-1, 1, (2, c.condition_channels, c.crop_size, c.crop_size)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(condition)).numpy()
    worst = float(np.abs(ours - runner.denoise(x, t, condition)).max())
    if worst > 1e-3:
        raise SystemExit(f"error: the denoiser read back from {path} differs from it by {worst:.1e}")
    return model


def same_architecture(a: RenderConfig, b: RenderConfig) -> bool:
    """Whether weights fit both configs (the sampler's default step count does not matter)."""
    return dataclasses.replace(a, steps=0) == dataclasses.replace(b, steps=0)


def with_retrieved(model: Denoiser, config: RenderConfig) -> Denoiser:
    """`model` made into a `config` model that differs from its own only in `retrieved` (more
    retrieved references): the stem's weights for the new references' channels (between the
    references and the sketch) start at zero, so the new model computes exactly what `model` did
    until it learns to use them."""
    old = model.config
    if not same_architecture(dataclasses.replace(old, retrieved=config.retrieved), config) or config.retrieved < old.retrieved:
        raise ValueError(f"a model of {old} cannot become one of {config} by adding retrieved references")
    wider = Denoiser(config)
    state = model.state_dict()
    weight = state["stem.weight"]  # (out, 3 + condition channels, 3, 3)
    at = 3 + 3 + 1 + 3 * (old.references + old.retrieved)  # x_t, masked target, mask, references: the new ones go here
    extra = torch.zeros(weight.shape[0], 3 * (config.retrieved - old.retrieved), *weight.shape[2:], dtype=weight.dtype)
    state["stem.weight"] = torch.cat([weight[:, :at], extra, weight[:, at:]], dim=1)
    wider.load_state_dict(state)
    return wider


def export(model: Denoiser, out: pathlib.Path) -> None:
    c = model.config
    x = torch.zeros(2, 3, c.crop_size, c.crop_size)
    t = torch.full((2,), 0.5)
    condition = torch.zeros(2, c.condition_channels, c.crop_size, c.crop_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (x, t, condition), str(out), input_names=["x_t", "t", "condition"], output_names=["v"],
                      dynamic_shapes={"x_t": {0: batch}, "t": {0: batch}, "condition": {0: batch}},
                      opset_version=OPSET, dynamo=True, verbose=False)
    import onnx

    proto = onnx.load(str(out))
    for key, value in dataclasses.asdict(c).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(list(value) if isinstance(value, tuple) else value)
    onnx.save(proto, str(out))


def parity(model: Denoiser, onnx_path: pathlib.Path, batch: int = 2, seed: int = 0) -> float:
    c = model.config
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, c.crop_size, c.crop_size)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    condition = rng.uniform(-1, 1, (batch, c.condition_channels, c.crop_size, c.crop_size)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(condition)).numpy()
    got = OnnxSession(onnx_path, providers=["CPUExecutionProvider"]).run(x_t=x, t=t, condition=condition)["v"]
    return float(np.abs(got - expected).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_render", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/render.onnx"))
    parser.add_argument("--fp16", action="store_true", help="store the weights as fp16 (computed in fp32); parity must still hold")
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save an fp16 torch copy here (for training --init)")
    parser.add_argument("--steps", type=int, help="the few-step count stored with the model, the sampler's default (default: the checkpoint's)")
    args = parser.parse_args(argv)
    model = load_denoiser(args.checkpoint)
    if args.steps is not None:
        if args.steps < 1:
            print(f"error: --steps must be at least 1, not {args.steps}", file=sys.stderr)
            return 2
        model.config = dataclasses.replace(model.config, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = pathlib.Path(tmp) / args.out.name
        export(model, candidate)
        worst = max(parity(model, candidate, batch) for batch in (1, 3))
        fp32_worst = worst
        if args.fp16:
            store_weights_fp16(candidate)
            worst = max(parity(model, candidate, batch) for batch in (1, 3))
        if not accept_export(candidate, args.out, worst, 1e-3):
            return 1
    if args.torch_copy:
        torch_copy(model, args.torch_copy)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); max |onnx - torch| = {fp32_worst:.1e} in fp32"
          + (f", {worst:.1e} with fp16 weights" if args.fp16 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
