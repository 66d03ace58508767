"""Run the renderer through onnxruntime: condition → a few deterministic DDIM steps → the crop.

    denoiser = OnnxDenoiser("assets/render.onnx")
    crop = denoiser.render(condition, noise)        # (S, S, 3) uint8 inside the mask, as sampled
"""

from __future__ import annotations

import ast
import os
import typing

import numpy as np

from avatar.config import RenderConfig
from avatar.render.condition import from_unit, to_unit
from avatar.render.sampling import Callback, sample_ddim
from avatar.runtime import OnnxSession


class OnnxDenoiser:
    """The ONNX denoiser with its sampler. `steps` defaults to the model's configured few-step count;
    `fp16`: half-precision arithmetic on CUDA/TensorRT (`OnnxSession`)."""

    def __init__(self, model_path: typing.Union[str, os.PathLike], threads: int = 0,
                 providers: typing.Optional[typing.Sequence[str]] = None, fp16: bool = False):
        self.session = OnnxSession(model_path, providers=providers, threads=threads, fp16=fp16)
        meta = self.session.metadata
        fields = {}
        for name in RenderConfig.__dataclass_fields__:
            if name in meta:
                value = ast.literal_eval(meta[name])
                fields[name] = tuple(value) if isinstance(value, list) else value
        self.config = RenderConfig(**fields)

    def denoise(self, x_t: np.ndarray, t: np.ndarray, condition: np.ndarray) -> np.ndarray:
        return self.session.run(x_t=x_t.astype(np.float32), t=t.astype(np.float32), condition=condition.astype(np.float32))["v"]

    def sample(self, condition: np.ndarray, noise: np.ndarray, steps: typing.Optional[int] = None,
               callback: typing.Optional[Callback] = None, io_binding: bool = True,
               init: typing.Optional[np.ndarray] = None, start: float = 1.0) -> np.ndarray:
        """`condition: (B, C, S, S)`, `noise: (B, 3, S, S)` → clean crops `(B, 3, S, S)` in [-1, 1].

        `init` and `start` < 1: begin from a draft `(B, 3, S, S)` in [-1, 1] (`sample_ddim`).
        With `io_binding`, the condition goes to the provider's device once for all the steps."""
        steps = steps or self.config.steps
        if not io_binding:
            return sample_ddim(self.denoise, noise, condition, steps, callback, init, start)
        on_device = self.session.to_device(np.asarray(condition, np.float32))

        def denoise(x_t: np.ndarray, t: np.ndarray, _condition: np.ndarray) -> np.ndarray:
            return self.session.run_bound(x_t=x_t.astype(np.float32), t=t.astype(np.float32), condition=on_device)["v"]

        return sample_ddim(denoise, noise, condition, steps, callback, init, start)

    def render(self, condition: np.ndarray, noise: np.ndarray, steps: typing.Optional[int] = None,
               draft: typing.Optional[np.ndarray] = None, start: float = 1.0) -> np.ndarray:
        """One crop: `condition (C, S, S)`, `noise (3, S, S)` [, a draft `(S, S, 3) uint8` to start
        from at time `start`] → `(S, S, 3) uint8`."""
        init = None if draft is None else to_unit(draft)[None]
        return from_unit(self.sample(condition[None], noise[None], steps, init=init, start=start)[0])
