"""The motion model (nn.Module). torch is needed only for training and export; the engine runs the
ONNX export through `avatar.motion.runner`."""

from __future__ import annotations

import typing

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


def lagged_conv(conv: nn.Conv1d, features: torch.Tensor, pad: typing.Tuple[int, int],
                frames: torch.Tensor | None = None) -> torch.Tensor:
    """`conv` (kernel L, no dilation) over `features (B, T, D)` with the end frames repeated `pad` times
    past the ends, computed at `frames (K,) int64` only (None: all) → `(B, K, out_channels)`: the L frames each
    output reads (indices clamped to the clip: the repeated ends) are gathered and multiplied with the
    kernel at once, so a stream that wants its newest frames pays for those alone."""
    lags = conv.kernel_size[0]
    if frames is None:
        frames = torch.arange(features.shape[1], device=features.device)
    reads = (frames[:, None] + torch.arange(lags, device=frames.device) - pad[0]).clamp(0, features.shape[1] - 1)
    stacked = features.index_select(1, reads.reshape(-1)).unflatten(1, (-1, lags)).flatten(2)  # (B, K, L·D), oldest first
    return stacked @ conv.weight.transpose(1, 2).flatten(1).T + conv.bias  # the kernel (out, D, L) in the same order


class TemporalBlock(nn.Module):
    """Dilated Conv1d over video frames, residual: causal (sees the present and the past only) or
    centred (as many frames ahead as behind)."""

    def __init__(self, channels: int, kernel: int, dilation: int, causal: bool, dropout: float):
        super().__init__()
        reach = (kernel - 1) * dilation
        self.pad = (reach, 0) if causal else (reach // 2, reach - reach // 2)
        self.conv = nn.Conv1d(channels, channels, kernel, dilation=dilation)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: (B, C, T)` → `(B, C, T)`."""
        return x + self.drop(self.act(self.conv(nn.functional.pad(x, self.pad, mode="replicate"))))


class MotionModel(nn.Module):
    """Speech-encoder features + rest shape → mouth and jaw landmarks.

    forward(features, rest):
        features: `(B, T, D) float32`, the speech encoder's features at each video frame's time
            (`avatar.speech.encoder.frame_features`; live or offline features, as `config.causal` says).
        rest: `(B, N_POINTS, 2) float32`, the person's closed, relaxed mouth and jaw in crop pixels
            (any crop size), in `POINTS` order.
        frames: `(K,) int64`, the frames whose landmarks are wanted (default: all); a stream gives its
            newest frames after the past ones they need (`config.receptive_frames`).
        returns `(B, K, N_POINTS, 2) float32`: predicted landmarks in the same pixels.

    Per frame the features are normalised and projected; dilated temporal convolutions (causal for
    the live model, centred for the offline one) mix neighbouring frames; the head predicts
    `n_components` coefficients of a fixed PCA basis of mouth/jaw offsets measured in units of the
    rest mouth width; the landmarks are rest + offsets × mouth width.
    """

    def __init__(self, config: MotionConfig = MotionConfig(), basis: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None):
        super().__init__()
        self.config = c = config
        self.register_buffer("basis", basis.float() if basis is not None else torch.zeros(c.n_components, N_POINTS * 2))
        self.register_buffer("mean", mean.float() if mean is not None else torch.zeros(N_POINTS * 2))
        self.project = nn.Sequential(nn.LayerNorm(c.features), nn.Dropout(c.input_dropout), nn.Linear(c.features, c.hidden), nn.GELU())
        self.temporal = nn.Sequential(*[TemporalBlock(c.hidden, c.temporal_kernel, 2 ** i, c.causal, c.dropout)
                                        for i in range(c.temporal_layers)])
        self.head = nn.Conv1d(c.hidden, c.n_components, 1)

    def coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, T, D)` → PCA coefficients `(B, T, n_components)`."""
        return self.head(self.temporal(self.project(features).transpose(1, 2))).transpose(1, 2)

    def offsets(self, coefficients: torch.Tensor) -> torch.Tensor:
        """PCA coefficients `(B, T, C)` → offsets in mouth widths `(B, T, N_POINTS, 2)`."""
        flat = coefficients @ self.basis + self.mean
        return flat.reshape(*coefficients.shape[:-1], N_POINTS, 2)

    def forward(self, features: torch.Tensor, rest: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        coefficients = self.coefficients(features)
        if frames is not None:
            coefficients = coefficients.index_select(1, frames)
        width = mouth_width(rest)[:, None, None, None]
        return rest[:, None] + self.offsets(coefficients) * width


class LinearMotionModel(nn.Module):
    """A motion model as a linear read-out (`training.linear_motion`): each frame's offsets (in rest
    mouth widths) are a linear function of its features and those of the `lags - 1` frames before
    (`causal`; else centred on it), the end frames repeated past the ends, and the landmarks are
    rest + offsets × mouth width.
    Same contract as `MotionModel`: forward(features `(B, T, D)`, rest `(B, N_POINTS, 2)`, frames `(K,)`
    or None) → `(B, K, N_POINTS, 2)`."""

    def __init__(self, features: int, lags: int = 5, causal: bool = True):
        super().__init__()
        self.features, self.lags = features, lags
        # its receptive field in MotionConfig's terms (what the ONNX metadata and the streams read)
        self.config = MotionConfig(features=features, temporal_kernel=lags, temporal_layers=1, causal=causal)
        self.pad = (lags - 1, 0) if causal else ((lags - 1) // 2, lags - 1 - (lags - 1) // 2)
        self.conv = nn.Conv1d(features, N_POINTS * 2, lags)

    @classmethod
    def from_ridge(cls, weights, x_mean, y_mean, causal: bool = True, lags: int = 5) -> "LinearMotionModel":
        """From a ridge fit on stacked frames (oldest lag first: the frame and the `lags - 1` before it, or
        centred on it): `weights (lags·D, N_POINTS·2)`, the stacked features' mean `(lags·D,)` and the
        offsets' mean `(N_POINTS·2,)`."""
        weights = torch.as_tensor(weights, dtype=torch.float64)
        x_mean, y_mean = torch.as_tensor(x_mean, dtype=torch.float64), torch.as_tensor(y_mean, dtype=torch.float64)
        model = cls(weights.shape[0] // lags, lags, causal)
        with torch.no_grad():
            model.conv.weight.copy_(weights.reshape(model.lags, model.features, -1).permute(2, 1, 0).float())
            model.conv.bias.copy_((y_mean - x_mean @ weights).float())
        return model

    def forward(self, features: torch.Tensor, rest: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        offsets = lagged_conv(self.conv, features, self.pad, frames)
        offsets = offsets.reshape(*offsets.shape[:-1], N_POINTS, 2)
        width = mouth_width(rest)[:, None, None, None]
        return rest[:, None] + offsets * width


class MotionBlend(nn.Module):
    """The network (`MotionModel`) and the linear read-out (`LinearMotionModel`) on the same features
    (`training.linear_motion --blend`), both given: forward(features, rest) → (the network's landmarks,
    the read-out's), each `(B, T, N_POINTS, 2)`. The runner weighs the read-out by voice activity
    (`avatar.motion.runner.MotionPredictor.predict`). `config`: the network's (its receptive field
    covers the read-out's frames)."""

    def __init__(self, network: MotionModel, linear: LinearMotionModel):
        super().__init__()
        if network.config.receptive_frames < linear.lags:
            raise ValueError(f"the network sees {network.config.receptive_frames} frames, the read-out {linear.lags}")
        self.network, self.linear, self.config = network, linear, network.config

    def forward(self, features: torch.Tensor, rest: torch.Tensor,
                frames: torch.Tensor | None = None) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        return self.network(features, rest, frames), self.linear(features, rest, frames)


def closure_pull(read, threshold: float, full: float):
    """How far a closure gate moves the mouth to rest (0 to 1) for its read-out `read` (a numpy array or
    a torch tensor, any shape): nothing up to `threshold`, all of the way from `full`, linear between."""
    return ((read - threshold) / (full - threshold)).clip(0.0, 1.0)


class ClosureGated(nn.Module):
    """A motion model whose mouth is pulled to the rest shape (closed lips, jaw up) where a linear
    read-out of the speech features says the real lips close (`training.closure_gate`: a ridge fit of
    "inner-lip gap < 3 % of the inter-ocular distance" on `lags` frames, centred on each one for an
    offline network, the frame and those before it for a live one): with p the read-out, the landmarks
    move `closure_pull(p, threshold, full)` of the way to rest (a ridge fit of a 0/1
    label seldom reads 1 even where the lips close, so `full` < 1 lets the lips meet). Same contract as the
    model it gates: forward(features `(B, T, D)`, rest `(B, N_POINTS, 2)`, frames `(K,)` or None) →
    `(B, K, N_POINTS, 2)`, or a
    `MotionBlend`'s pair, each gated (so the runner's blend of the two is gated too); `config`: the
    network's."""

    def __init__(self, network: nn.Module, features: int, lags: int = 5, threshold: float = 0.25, full: float = 1.0):
        super().__init__()
        if not full > threshold:
            raise ValueError(f"the gate's full pull ({full}) must come above its threshold ({threshold})")
        self.network, self.config, self.lags = network, network.config, lags
        self.threshold, self.full = float(threshold), float(full)
        self.pad = (lags - 1, 0) if network.config.causal else ((lags - 1) // 2, lags - 1 - (lags - 1) // 2)
        if network.config.causal and network.config.receptive_frames < lags:
            raise ValueError(f"the network sees {network.config.receptive_frames} frames, the gate {lags}")
        self.conv = nn.Conv1d(features, 1, lags)

    @classmethod
    def from_ridge(cls, network: nn.Module, weights, x_mean, y_mean, threshold: float, lags: int = 5,
                   full: float = 1.0) -> "ClosureGated":
        """From a ridge fit on `lags` stacked frames, oldest first: `weights (lags·D,)`, their mean
        `(lags·D,)`, the target's mean."""
        weights = torch.as_tensor(weights, dtype=torch.float64)
        x_mean = torch.as_tensor(x_mean, dtype=torch.float64)
        model = cls(network, weights.shape[0] // lags, lags, threshold, full)
        with torch.no_grad():
            model.conv.weight.copy_(weights.reshape(lags, -1, 1).permute(2, 1, 0).float())
            model.conv.bias.copy_(torch.tensor([float(y_mean) - float(x_mean @ weights)]).float())
        return model

    def closure(self, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, T, D)` → `(B, K)` at `frames (K,)` (default: all): the read-out (about 1 where the lips
        close, 0 where they are open)."""
        return lagged_conv(self.conv, features, self.pad, frames)[..., 0]

    def forward(self, features: torch.Tensor, rest: torch.Tensor, frames: torch.Tensor | None = None):
        out = self.network(features, rest, frames)
        gate = closure_pull(self.closure(features, frames), self.threshold, self.full)[..., None, None]
        if isinstance(out, tuple):
            return tuple(landmarks + gate * (rest[:, None] - landmarks) for landmarks in out)
        return out + gate * (rest[:, None] - out)
