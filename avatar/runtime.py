"""`OnnxSession`: one place that owns onnxruntime providers, threads, warm-up and named I/O.

Providers are taken in the order TensorRT → CUDA → CPU, as far as the installed onnxruntime offers
them (the `gpu` extra installs onnxruntime-gpu; the `cpu` extra plain onnxruntime, never both).
The same code runs on CPU in CI. `to_device` + `run_bound` use IO binding: an input that stays the
same over several calls (the renderer's condition over its sampling steps) is copied to the
provider's device once, and outputs are bound on that device. `fp16=True` computes in half
precision where the provider supports it (CUDA: the graph converted by `half_precision_graph`;
TensorRT: its fp16 mode); on CPU it has no effect.
"""

from __future__ import annotations

import os
import pathlib
import typing

import numpy as np

from avatar.errors import AvatarError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ASSETS = pathlib.Path(os.environ.get("AVATAR_ASSETS", pathlib.Path(__file__).resolve().parents[1] / "assets"))


def asset_path(name: str) -> pathlib.Path:
    """A default model file in `assets/` (override the folder with AVATAR_ASSETS)."""
    path = ASSETS / name
    if not path.exists():
        raise AvatarError(f"{path}: the default model file is missing; reinstall, or give a model path")
    return path


def available_providers() -> typing.List[str]:
    """The providers onnxruntime offers that can start here, in PREFERRED_PROVIDERS order.

    onnxruntime-gpu offers TensorRT whether or not TensorRT is installed (and then falls back with
    an error message at every session); its provider library loads only when TensorRT's do."""
    import ctypes

    import onnxruntime

    offered = onnxruntime.get_available_providers()
    usable = [p for p in PREFERRED_PROVIDERS if p in offered]
    if "TensorrtExecutionProvider" in usable:
        library = pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"
        try:
            ctypes.CDLL(str(library))
        except OSError:
            usable.remove("TensorrtExecutionProvider")
    return usable


def half_precision_graph(path: typing.Union[str, os.PathLike, bytes]) -> bytes:
    """The ONNX model at `path` (or serialised, as bytes) re-written to compute in float16, its inputs and outputs still float32.

    Weights stored as fp16 with a cast to fp32 (`training.common.store_weights_fp16`) stay fp16.
    The nodes that compute from the timestep alone, up to and including Sin/Cos, stay float32 (their
    arguments reach 1000, where float16 steps are 0.5 rad); so do Resize's scales. Every other float
    tensor becomes float16. Needs the `onnx` package (`gpu` extra).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise AvatarError(f"fp16 needs the onnx package ({exc}); install the `gpu` extra") from exc
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    graph = proto.graph
    all_nodes = list(graph.node)  # held, so that id() names each node for the whole pass
    producer = {output: node for node in all_nodes for output in node.output}
    # 1. The float32 region: Sin/Cos and everything they are computed from.
    region, stack = set(), [n for n in all_nodes if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if id(node) not in region:
            region.add(id(node))
            stack.extend(producer[name] for name in node.input if name in producer)
    kept_fp32 = {name for node in all_nodes if id(node) in region for name in node.input}
    kept_fp32 |= {node.input[2] for node in all_nodes if node.op_type == "Resize" and len(node.input) > 2}
    read_as_half = {name for node in all_nodes if id(node) not in region for k, name in enumerate(node.input)
                    if not (node.op_type == "Resize" and k == 2)}
    # 2. Weights: float16 (a float32 one that the region also reads gets a float16 twin).
    new_weights, renamed = [], {}
    for weight in graph.initializer:
        if weight.data_type not in (FLOAT, HALF) or (weight.data_type == HALF and weight.name not in kept_fp32):
            new_weights.append(weight)
            continue
        array = numpy_helper.to_array(weight)
        if weight.name not in kept_fp32:
            new_weights.append(numpy_helper.from_array(array.astype(np.float16), weight.name))
            continue
        new_weights.append(numpy_helper.from_array(array.astype(np.float32), weight.name))
        if weight.name in read_as_half:
            renamed[weight.name] = weight.name + "__fp16"
            new_weights.append(numpy_helper.from_array(array.astype(np.float16), renamed[weight.name]))
    # 3. Nodes: casts to float outside the region cast to half (the stored-fp16 weights' casts become
    #    no-ops that onnxruntime folds); the region's outputs are cast to half where the rest reads them.
    nodes, boundary = [], {}
    inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == FLOAT}
    for i in inputs:
        boundary[i] = i + "__fp16"
        nodes.append(onnx.helper.make_node("Cast", [i], [boundary[i]], to=HALF, name=i + "__to_fp16"))
    region_outputs = {o for node in all_nodes if id(node) in region for o in node.output}
    for node in all_nodes:
        if id(node) not in region:
            if node.op_type == "Cast" and node.attribute[0].i == FLOAT:
                node.attribute[0].i = HALF
            for k, name in enumerate(node.input):
                if name in region_outputs or name in inputs:
                    if name not in boundary:
                        boundary[name] = name + "__fp16"
                        nodes.append(onnx.helper.make_node("Cast", [name], [boundary[name]], to=HALF, name=name + "__to_fp16"))
                    node.input[k] = boundary[name]
                elif name in renamed and not (node.op_type == "Resize" and k == 2):
                    node.input[k] = renamed[name]
        nodes.append(node)
    # 4. Outputs back to float32.
    for output in graph.output:
        if output.type.tensor_type.elem_type == FLOAT:
            for node in nodes:
                node.output[:] = [o + "__fp16" if o == output.name else o for o in node.output]
            nodes.append(onnx.helper.make_node("Cast", [output.name + "__fp16"], [output.name], to=FLOAT, name=output.name + "__to_fp32"))
    del graph.initializer[:]
    graph.initializer.extend(new_weights)
    del graph.node[:]
    graph.node.extend(nodes)  # still in order: a new cast sits just before the first node that reads it
    del graph.value_info[:]  # the types changed; onnxruntime infers them again
    return proto.SerializeToString()


class OnnxSession:
    """An onnxruntime InferenceSession with named inputs and outputs.

    `run(**inputs)` → `{output name: array}`. `providers`: None picks the best available in
    PREFERRED_PROVIDERS order; `threads`: intra-op threads (0: onnxruntime's default); `fp16`: half
    precision arithmetic on CUDA/TensorRT (inputs and outputs stay float32). `self.fp16` says
    whether it is in effect. `model`: the serialised model to run, made from the file at `path`
    (which then only names it).
    """

    def __init__(self, path: typing.Union[str, os.PathLike], providers: typing.Optional[typing.Sequence[str]] = None,
                 threads: int = 0, fp16: bool = False, model: typing.Optional[bytes] = None):
        try:
            import onnxruntime
        except ImportError as exc:
            raise AvatarError("onnxruntime is not installed; install the `cpu` or the `gpu` extra") from exc
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise AvatarError(f"{self.path}: no such model file")
        available = available_providers()
        chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not chosen:
            raise AvatarError(f"none of the providers {list(providers or PREFERRED_PROVIDERS)} is available (have {available})")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        load_errors = tuple(getattr(ort_errors, name) for name in ("InvalidProtobuf", "InvalidGraph", "Fail", "NoSuchFile",
                                                                    "NotImplemented", "RuntimeException") if hasattr(ort_errors, name))
        self.fp16 = fp16 and chosen[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        source: typing.Union[str, bytes] = str(self.path) if model is None else model
        provider_options: typing.List[typing.Dict[str, str]] = [{} for _ in chosen]
        if self.fp16 and chosen[0] == "TensorrtExecutionProvider":
            provider_options[0] = {"trt_fp16_enable": "True"}
        if self.fp16 and "CUDAExecutionProvider" in chosen:
            # TensorRT may leave nodes to CUDA, which then runs the half-precision graph too.
            source = half_precision_graph(self.path if model is None else model)
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=chosen, provider_options=provider_options)
        except load_errors as exc:
            raise AvatarError(f"{self.path}: cannot load the model ({str(exc).splitlines()[0][:160]})") from exc
        self.device = "cuda" if self.session.get_providers()[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider") else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata: typing.Dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> typing.List[str]:
        return self.session.get_providers()

    def _check_inputs(self, inputs: typing.Mapping[str, typing.Any]) -> None:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"missing model inputs: {sorted(missing)}")

    def run(self, **inputs: np.ndarray) -> typing.Dict[str, np.ndarray]:
        self._check_inputs(inputs)
        outputs = self.session.run(self.output_names, {k: inputs[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs))

    def to_device(self, array: np.ndarray):
        """An onnxruntime OrtValue holding `array` on this session's device (for `run_bound`)."""
        import onnxruntime

        return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def run_bound(self, **inputs) -> typing.Dict[str, np.ndarray]:
        """`run` through IO binding: inputs are numpy arrays (copied in) or OrtValues from `to_device`
        (used where they are); outputs are bound on the device and returned as numpy arrays."""
        self._check_inputs(inputs)
        binding = self.session.io_binding()
        for name in self.input_names:
            value = inputs[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def warm_up(self, **inputs: np.ndarray) -> None:
        """Run once so that lazy initialisation (and provider graph building) is not paid by the first frame."""
        self.run(**inputs)
