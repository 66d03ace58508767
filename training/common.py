"""Pieces every training and evaluation script shares: DDP set-up and teardown, atomic checkpoints,
weight averaging, report output."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import time
import typing

import torch
import torch.distributed as dist


def ddp_setup() -> typing.Tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def start_process(threads: int, seed: int) -> typing.Tuple[int, int, torch.device]:
    """Start a training process: DDP (when under torchrun), torch threads (0: default), per-rank seed."""
    rank, world, device = ddp_setup()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed + rank)
    return rank, world, device


def ddp_teardown(world: int) -> None:
    """End DDP cleanly. Call it after dropping every DDP wrapper: gloo work still referenced from
    Python at interpreter shutdown can abort the process (SIGABRT, "terminate called without an
    active exception")."""
    if world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def time_is_up(started: float, minutes: float, world: int, device: torch.device) -> bool:
    """Whether `minutes` (0: no limit) of wall time have passed since `started` (time.perf_counter()),
    as the main process sees it: every process gets the same answer, so they stop at the same step."""
    if minutes <= 0:
        return False
    up = time.perf_counter() - started > 60 * minutes
    if world > 1:
        flag = torch.tensor([float(up)], device=device)
        dist.broadcast(flag, 0)
        up = bool(flag.item())
    return up


def finish_training(world: int, writer, steps: int, seconds: float, out: pathlib.Path) -> None:
    """End DDP (after the caller has dropped its DDP wrapper), close the main process's log, say where the checkpoints went."""
    ddp_teardown(world)
    if writer is not None:
        writer.close()
        print(f"done: {steps} steps in {seconds:.0f} s; checkpoints in {out}")


def save_checkpoint(path: pathlib.Path, **state) -> None:
    """torch.save to a temporary name, then rename: a checkpoint is complete or absent."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def update_average(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of the trainable parameters: average ← decay·average + (1−decay)·model."""
    with torch.no_grad():
        for kept, trained in zip(average.parameters(), model.parameters()):
            kept.lerp_(trained, 1.0 - decay)


def log_training(writer, step: int, values: typing.Dict[str, "torch.Tensor | float"], steps_per_s: float) -> None:
    """A training step's scalars: to TensorBoard as `train/<name>` and printed on one line."""
    numbers = {name: float(value.detach() if isinstance(value, torch.Tensor) else value) for name, value in values.items()}
    for name, value in numbers.items():
        writer.add_scalar(f"train/{name}", value, step)
    print(f"step {step:6d} " + " ".join(f"{name} {value:.4f}" for name, value in numbers.items()) + f" ({steps_per_s:.2f} steps/s)",
          flush=True)


def emit_report(text: str, report: typing.Dict[str, typing.Any], json_path: typing.Optional[pathlib.Path]) -> None:
    """Print a report's table and, if asked, write the whole report as JSON."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps(report, indent=1))
        print(f"wrote {json_path}")


def training_arguments(prog: str, description: str, train_config: type, model_config: type, init_help: str,
                       argv: typing.Optional[typing.Sequence[str]] = None):
    """The command line every trainer shares: `--cache`, `--out`, `--resume`, `--init`, then the
    training config's options and the model config's (`--model.*`). Returns (args, train config,
    model config)."""
    import argparse

    from avatar.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--init", type=pathlib.Path, help=init_help)
    add_config_arguments(parser, train_config, "")
    add_config_arguments(parser, model_config, "model")
    args = parser.parse_args(argv)
    return args, config_from_args(args, train_config, ""), config_from_args(args, model_config, "model")


def accept_export(candidate: pathlib.Path, out: pathlib.Path, worst: float, limit: float) -> bool:
    """Move an exported model into place if ONNX and torch agree within `limit` (max abs
    difference `worst`); otherwise say so and leave `out` as it was."""
    import shutil
    import sys

    if worst > limit:
        print(f"error: ONNX and torch differ by {worst:.2e} (> {limit:g}); {out} left as it was", file=sys.stderr)
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(candidate), str(out))
    return True


def torch_copy(model: torch.nn.Module, path: pathlib.Path) -> None:
    """The compact copy committed beside an ONNX export, that later runs start from (`--init`):
    the fp16 state dict and the model's config (`model.config`, a dataclass)."""
    import dataclasses

    state = {"model": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
             "model_config": dataclasses.asdict(model.config)}
    torch.save(state, path)


FP16_MIN_ELEMENTS = 16384  # the smallest weight `store_weights_fp16` stores as float16


def store_weights_fp16(path: pathlib.Path, min_elements: int = FP16_MIN_ELEMENTS) -> int:
    """Rewrite an ONNX file so that its large float32 weights (initialisers of at least `min_elements`
    values; the small ones, like biases and the output layer, stay fp32 and keep parity) are stored as
    float16 and cast back to float32 when the graph loads: half the file, fp32 arithmetic
    (onnxruntime folds the casts once, at session start). Returns the number of weights converted."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    kept, casts, converted = [], [], 0
    for weight in graph.initializer:
        if weight.data_type == onnx.TensorProto.FLOAT and int(np.prod(weight.dims)) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float16), weight.name + "__fp16")
            kept.append(half)
            casts.append(onnx.helper.make_node("Cast", [half.name], [weight.name], to=onnx.TensorProto.FLOAT,
                                               name=weight.name + "__to_fp32"))
            converted += 1
        else:
            kept.append(weight)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return converted
