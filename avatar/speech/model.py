"""Whisper's audio encoder as an nn.Module, for export only (`training.export_speech`); the engine
runs the ONNX export through `avatar.speech.encoder`. torch is imported here, so nothing under
`avatar/` imports this module at run time.

The architecture is OpenAI Whisper's (Radford et al. 2022): two convolutions (the second with
stride 2) over the 100 Hz log-mel, sinusoidal positions, pre-norm transformer blocks, a final
LayerNorm. `layers` keeps only the first blocks (the final LayerNorm is applied either way).
"""

from __future__ import annotations

import re
import typing

import torch
from torch import nn


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: (B, T, width)` → `(B, T, width)`."""
        b, t, w = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.mlp_norm(x))


class WhisperEncoder(nn.Module):
    """Log-mel `(B, 80, M) float32` (Whisper's normalisation, about [-1.5, 1.5], M even) →
    features `(B, M/2, width) float32` at 50 frames/s (frame k centred on mel frame 2k)."""

    def __init__(self, n_mels: int = 80, width: int = 384, heads: int = 6, layers: int = 4, positions: int = 1500):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(positions, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv1(mel))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    @classmethod
    def from_ctranslate2(cls, variables: typing.Mapping[str, "numpy.ndarray"], layers: typing.Optional[int] = None,
                         positions: typing.Optional[int] = None) -> "WhisperEncoder":
        """Build from the `encoder/...` variables of a CTranslate2 Whisper model (`training.export_speech.read_ctranslate2`)."""
        width = variables["encoder/conv1/weight"].shape[0]
        n_mels = variables["encoder/conv1/weight"].shape[1]
        available = 1 + max(int(k.split("/")[1][len("layer_"):]) for k in variables if re.match(r"encoder/layer_\d+/", k))
        table = variables["encoder/position_encodings/encodings"]
        model = cls(n_mels, width, int(variables["encoder/num_heads"]), layers or available, positions or table.shape[0])
        if len(model.blocks) > available:
            raise ValueError(f"the checkpoint has {available} encoder layers, asked for {layers}")

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(variables[name].astype("float32"))

        state = {"conv1.weight": tensor("encoder/conv1/weight"), "conv1.bias": tensor("encoder/conv1/bias"),
                 "conv2.weight": tensor("encoder/conv2/weight"), "conv2.bias": tensor("encoder/conv2/bias"),
                 "positions": tensor("encoder/position_encodings/encodings")[: model.positions.shape[0]],
                 "final_norm.weight": tensor("encoder/layer_norm/gamma"), "final_norm.bias": tensor("encoder/layer_norm/beta")}
        for i in range(len(model.blocks)):
            source = f"encoder/layer_{i}"
            for ours, theirs in (("attention_norm.weight", "self_attention/layer_norm/gamma"),
                                 ("attention_norm.bias", "self_attention/layer_norm/beta"),
                                 ("qkv.weight", "self_attention/linear_0/weight"), ("qkv.bias", "self_attention/linear_0/bias"),
                                 ("out.weight", "self_attention/linear_1/weight"), ("out.bias", "self_attention/linear_1/bias"),
                                 ("mlp_norm.weight", "ffn/layer_norm/gamma"), ("mlp_norm.bias", "ffn/layer_norm/beta"),
                                 ("mlp.0.weight", "ffn/linear_0/weight"), ("mlp.0.bias", "ffn/linear_0/bias"),
                                 ("mlp.2.weight", "ffn/linear_1/weight"), ("mlp.2.bias", "ffn/linear_1/bias")):
                state[f"blocks.{i}.{ours}"] = tensor(f"{source}/{theirs}")
        model.load_state_dict(state)
        return model.eval()
