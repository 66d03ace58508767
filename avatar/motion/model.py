"""The motion model (nn.Module). torch is needed only for training and export; the engine runs the
ONNX export through `avatar.motion.runner`."""

from __future__ import annotations

import torch
from torch import nn

from avatar.config import MotionConfig
from avatar.face import landmarks as lm

# Mouth and jaw points the model predicts (indices into the 478 mesh points), and the two lip corners
# (positions within that subset) whose distance is the model's unit of length.
POINTS = lm.MOUTH_AND_JAW
N_POINTS = len(POINTS)
CORNERS = (0, 10)  # LIPS_OUTER starts at the right corner (61); its 11th point is the left corner (291)


def mouth_width(rest: torch.Tensor) -> torch.Tensor:
    """`rest: (..., N_POINTS, 2)` → `(...)` distance between the lip corners."""
    return torch.linalg.vector_norm(rest[..., CORNERS[1], :] - rest[..., CORNERS[0], :], dim=-1)


class CausalConv(nn.Module):
    """Conv1d over time that sees only the present and the past (left padding)."""

    def __init__(self, channels: int, kernel: int, dropout: float):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(channels, channels, kernel)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: (B, C, T)` → `(B, C, T)`, residual."""
        y = self.conv(nn.functional.pad(x, (self.pad, 0)))
        return x + self.drop(self.act(y))


class MotionModel(nn.Module):
    """Mel windows + rest shape → mouth and jaw landmarks.

    forward(windows, rest):
        windows: `(B, T, W, 80) float32`, per-frame log-mel contexts in [-4, 4] (W = mel_window_frames).
        rest: `(B, N_POINTS, 2) float32`, the person's closed, relaxed mouth and jaw in crop pixels
            (any crop size), in `POINTS` order.
        returns `(B, T, N_POINTS, 2) float32`: predicted landmarks in the same pixels.

    The network predicts `n_components` coefficients of a fixed PCA basis of mouth/jaw offsets
    measured in units of the rest mouth width; the landmarks are rest + offsets × mouth width.
    """

    def __init__(self, config: MotionConfig = MotionConfig(), basis: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        c = config
        self.register_buffer("basis", basis.float() if basis is not None else torch.zeros(c.n_components, N_POINTS * 2))
        self.register_buffer("mean", mean.float() if mean is not None else torch.zeros(N_POINTS * 2))
        self.encoder = nn.Sequential(
            nn.Conv1d(80, c.hidden, 3, padding=1), nn.GELU(),
            nn.Conv1d(c.hidden, c.hidden, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(c.hidden, c.hidden, 3, stride=2, padding=1), nn.GELU(),
        )
        reduced = (c.mel_window_frames + 3) // 4
        self.project = nn.Sequential(nn.Flatten(), nn.Dropout(c.dropout), nn.Linear(c.hidden * reduced, c.hidden), nn.GELU())
        # Training-only auxiliary head: the viseme at each frame's time, from that frame's audio
        # embedding (pseudo-labels from a phone recogniser; see training/visemes.py). Not exported.
        self.viseme_head = nn.Linear(c.hidden, c.n_visemes)
        self.temporal = nn.Sequential(*[CausalConv(c.hidden, c.temporal_kernel, c.dropout) for _ in range(c.temporal_layers)])
        self.head = nn.Conv1d(c.hidden, c.n_components, 1)

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """`(B, T, W, 80)` → per-frame audio embeddings `(B, hidden, T)` (no temporal mixing yet)."""
        b, t, w, f = windows.shape
        x = self.encoder(windows.reshape(b * t, w, f).transpose(1, 2))  # (B*T, hidden, W/4)
        return self.project(x).reshape(b, t, -1).transpose(1, 2)

    def coefficients_from(self, embedding: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings `(B, hidden, T)` → PCA coefficients `(B, T, n_components)` (causal over T)."""
        return self.head(self.temporal(embedding)).transpose(1, 2)

    def viseme_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, hidden, T)` → `(B, T, n_visemes)` logits (training only)."""
        return self.viseme_head(embedding.transpose(1, 2))

    def coefficients(self, windows: torch.Tensor) -> torch.Tensor:
        """`(B, T, W, 80)` → PCA coefficients `(B, T, n_components)`."""
        return self.coefficients_from(self.embed(windows))

    def offsets(self, coefficients: torch.Tensor) -> torch.Tensor:
        """PCA coefficients `(B, T, C)` → offsets in mouth widths `(B, T, N_POINTS, 2)`."""
        flat = coefficients @ self.basis + self.mean
        return flat.reshape(*coefficients.shape[:-1], N_POINTS, 2)

    def forward(self, windows: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        offsets = self.offsets(self.coefficients(windows))
        width = mouth_width(rest)[:, None, None, None]
        return rest[:, None] + offsets * width
