"""`OnnxSession`: one place that owns onnxruntime providers, threads, warm-up and named I/O.

Providers are taken in the order TensorRT → CUDA → CPU, as far as the installed onnxruntime offers
them (the `gpu` extra installs onnxruntime-gpu; the `cpu` extra plain onnxruntime, never both).
The same code runs on CPU in CI. `to_device` + `run_bound` use IO binding: an input that stays the
same over several calls (the renderer's condition over its sampling steps) is copied to the
provider's device once, and outputs are bound on that device.
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


class OnnxSession:
    """An onnxruntime InferenceSession with named inputs and outputs.

    `run(**inputs)` → `{output name: array}`. `providers`: None picks the best available in
    PREFERRED_PROVIDERS order; `threads`: intra-op threads (0: onnxruntime's default).
    """

    def __init__(self, path: typing.Union[str, os.PathLike], providers: typing.Optional[typing.Sequence[str]] = None,
                 threads: int = 0):
        try:
            import onnxruntime
        except ImportError as exc:
            raise AvatarError("onnxruntime is not installed; install the `cpu` or the `gpu` extra") from exc
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise AvatarError(f"{self.path}: no such model file")
        available = onnxruntime.get_available_providers()
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
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=chosen)
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
