"""The denoiser: a compact UNet over the aligned crop, conditioned by channel concatenation and on
the diffusion time. torch is needed for training and export only; the engine runs the ONNX export."""

from __future__ import annotations

import math

import torch
from torch import nn

from avatar.config import RenderConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t: (B,)` in [0, 1] → `(B, dim)` sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (B, HW, HW)
        return x + self.out((v @ weights.transpose(1, 2)).reshape(b, c, h, w))


class Denoiser(nn.Module):
    """forward(x_t, t, condition) → v-prediction.

    x_t: `(B, 3, S, S) float32`, the noisy crop (clean crops are RGB in [-1, 1]).
    t: `(B,) float32` diffusion time in [0, 1] (0: clean, 1: pure noise).
    condition: `(B, condition_channels, S, S) float32` (see `avatar.render.condition`).
    returns `(B, 3, S, S) float32`: v = alpha·noise − sigma·x0.
    """

    def __init__(self, config: RenderConfig = RenderConfig()):
        super().__init__()
        self.config = c = config
        tdim = c.base_channels * 4
        self.time_mlp = nn.Sequential(nn.Linear(c.base_channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.stem = nn.Conv2d(3 + c.condition_channels, c.base_channels, 3, padding=1)
        widths = [c.base_channels * m for m in c.channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = []
        width = c.base_channels
        for level, out in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(c.blocks_per_level):
                blocks.append(ResBlock(width, out, tdim))
                width = out
            self.down.append(blocks)
            skips.append(width)
            self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1) if level < len(widths) - 1 else nn.Identity())
        self.mid1 = ResBlock(width, width, tdim)
        self.mid_attention = Attention(width)
        self.mid2 = ResBlock(width, width, tdim)
        self.up = nn.ModuleList()
        self.attention = nn.ModuleDict()
        for level in reversed(range(len(widths))):
            out = widths[level]
            self.up.append(ResBlock(width + skips[level], out, tdim))
            width = out
            if level in c.attention_levels:
                self.attention[str(level)] = Attention(out)
        self.out = nn.Sequential(_norm(width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.stem(torch.cat([x_t, condition], dim=1))
        skips = []
        for blocks, downsample in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            h = downsample(h)
        h = self.mid2(self.mid_attention(self.mid1(h, temb)), temb)
        for index, block in enumerate(self.up):
            level = len(self.up) - 1 - index
            if h.shape[-1] != skips[level].shape[-1]:
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips[level]], dim=1), temb)
            if str(level) in self.attention:
                h = self.attention[str(level)](h)
        return self.out(h)
