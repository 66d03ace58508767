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

import contextlib
import logging
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
    """The ONNX model at `path` (or serialised, as bytes) re-written to compute in float16, its inputs
    and outputs still float32, by onnxruntime's own converter
    (`onnxruntime.transformers.float16.convert_float_to_float16`), with one exception: the nodes that
    compute from the timestep alone, up to and including Sin/Cos, stay float32 (their arguments reach
    1000, where float16 steps are 0.5 rad). Needs the `onnx` package (`gpu` extra)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise AvatarError(f"fp16 needs the onnx package ({exc}); install the `gpu` extra") from exc
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    nodes = list(proto.graph.node)
    producer = {output: node for node in nodes for output in node.output}
    region, stack = set(), [n for n in nodes if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if node.name not in region:
            region.add(node.name)
            stack.extend(producer[name] for name in node.input if name in producer)
    half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=sorted(region))
    # the converter leaves a float16 type on weights that the float32 region reads (kept float32 themselves)
    weights = {w.name for w in half.graph.initializer}
    kept = [v for v in half.graph.value_info if v.name not in weights]
    del half.graph.value_info[:]
    half.graph.value_info.extend(kept)
    return half.SerializeToString()


def weight_only_int8(path: typing.Union[str, os.PathLike], min_weights: int) -> bytes:
    """The model at `path` with each MatMul whose weight (a constant, once onnxruntime has folded the
    graph's constants) holds ≥ `min_weights` numbers as onnxruntime's `MatMulNBits`: weights in 8 bits
    (symmetric, a scale per 32 inputs of an output), arithmetic in int8 with each row's activations
    quantized by blocks of its own (accuracy level 4), so a row's numbers never depend on the other
    rows of a call. For weights read once per call (a stream's newest frame), 4× less memory to
    read. onnxruntime folds the constants first (the read-out's kernel reaches its MatMul through
    fp16 Casts and Transposes; `avatar.speech.live_graph.int8_graph` widens its plain fp16 Casts by
    hand, which keeps its quantized numbers as shipped). For the CPU provider; returns the serialised
    model (~0.5 s for the live motion model)."""
    import tempfile

    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC  # standard ops: constants folded
        options.optimized_model_filepath = f"{folder}/folded.onnx"
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(f"{folder}/folded.onnx")
    weights = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    for k, node in enumerate(matmuls):
        node.name = node.name or f"matmul_{k}"
    small = [node.name for node in matmuls if weights.get(node.input[1], 0) < min_weights]
    if len(small) == len(matmuls):
        raise AvatarError(f"{path}: no MatMul with a weight of {min_weights} numbers or more to store in 8 bits")
    with root_logger_untouched():  # the quantizer reports on the root logger
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=small)
        quantizer.process()
    return quantizer.model.model.SerializeToString()


@contextlib.contextmanager
def root_logger_untouched():
    """Within: the root logger says only errors; after: its level and handlers as before (a library's
    `logging.warning` gives the root logger a handler the application did not ask for)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


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
