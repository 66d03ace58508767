"""The per-frame work as one batched torch module (`FrameGraph`), exported to ONNX by
`training/export_graph.py` and run by `avatar.render.graph.GraphRenderer` through `OnnxSession`
(CPU, CUDA or TensorRT). torch is needed for the export only.

From the frame's face region to the finished region, for a batch of frames of any people:
1. the crop: the region sampled at the alignment transform (bicubic; where the crop shrinks the face,
   bilinear from the region averaged down by 2, 4 or 8 first, like the per-frame path's area averaging);
2. the mouth warp: the two thin-plate splines of `avatar.render.warp` evaluated as sampling grids
   (on every 4th crop pixel, linear in between, as `backward_map`), blended at the target's mouth line;
3. the inside of the mouth (`teeth_rows`, `cavity`): rows of the person's open mouth hung from the
   target's inner lips, the dark of the mouth between them (the lips' colour where they meet,
   `lips_meet`), a borrowed mouth brought to the photo's lips in CIELAB (`match_lighting`);
   retrieval only: the person's bank entry for the frame, moved and filled the same way, blended
   over the lips with its brightness matched (`MouthBank.draw`);
4. diffusion only: the condition, the draft noised to the start time and the denoiser's DDIM steps;
5. colour match (diffusion) and the watermark;
6. the feathered composite into the region at the frame's own resolution, with the frame's fine
   detail where it agrees with the rendering.

What stays on the host is small and does not grow with the face: polygon masks and curves at the
crop's side S, the splines' weights (a linear solve of about 100 unknowns), slicing the region out of
the frame and putting it back. `avatar/render/graph.py` prepares those inputs; its docstring lists
them with shapes. The tolerances against the per-frame path are tested (`tests/test_graph.py`).
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from avatar.render.warp import GRID_STEP, MEETING_SHADE
from avatar.render.sampling import alpha_sigma, clean_from_v, noise_from_v, noised, timesteps

LEVELS = 3  # mip-map levels (halvings) for crops that shrink the face
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
_XYZ_TO_RGB = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(torch.float32).tolist()


def _mix(values: torch.Tensor, matrix: typing.Sequence[typing.Sequence[float]],
         divide: typing.Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """`matrix (3, 3)` applied to the last axis of `values (..., 3)`, each output divided by `divide`
    (written out, so that the exporter keeps the numbers as scalars)."""
    channels = values.unbind(-1)
    return torch.stack([sum(w * c for w, c in zip(row, channels)) / d for row, d in zip(matrix, divide)], -1)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """`(..., 3)` RGB in [0, 255] → CIELAB `(..., 3)` (L 0-100; OpenCV's sRGB D65 conversion)."""
    c = (rgb / 255.0).clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).clamp(min=1e-8) ** 2.4)
    xyz = _mix(linear, _RGB_TO_XYZ, _WHITE)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-8) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    y = xyz[..., 1]
    lightness = torch.where(y > 0.008856, 116.0 * y.clamp(min=1e-8) ** (1.0 / 3.0) - 16.0, 903.3 * y)
    return torch.stack([lightness, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB `(..., 3)` → RGB `(..., 3)` in [0, 255] (clipped)."""
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (lightness + 16.0) / 116.0
    fx, fz = fy + a / 500.0, fy - b / 200.0
    cube = lambda f: torch.where(f ** 3 > 0.008856, f ** 3, (f - 16.0 / 116.0) / 7.787)
    y = torch.where(lightness > 7.9996, fy ** 3, lightness / 903.3)
    xyz = torch.stack([cube(fx) * _WHITE[0], y, cube(fz) * _WHITE[2]], -1)
    linear = _mix(xyz, _XYZ_TO_RGB).clamp(0.0, 1.0)
    c = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp(min=1e-8) ** (1.0 / 2.4) - 0.055)
    return (c * 255.0).clamp(0.0, 255.0)


def _normalised(x: torch.Tensor, y: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel-centre coordinates → grid_sample's [-1, 1] (align_corners=False), stacked `(..., 2)`."""
    return torch.stack([(2.0 * x + 1.0) / width - 1.0, (2.0 * y + 1.0) / height - 1.0], -1)


def _pixel_grid(size_y: int, size_x: int, like: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """`(Y, X)` float coordinates of every pixel centre: ys, xs."""
    ys = torch.arange(size_y, dtype=like.dtype)[:, None].expand(size_y, size_x)
    xs = torch.arange(size_x, dtype=like.dtype)[None, :].expand(size_y, size_x)
    return ys, xs


def _affine(matrix: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """Apply `(B, 2, 3)` affine matrices to `(Y, X)` coordinates → `(B, Y, X)` each."""
    m = matrix[:, :, :, None, None]
    return m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2], m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]


def sample(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str = "bicubic", padding: str = "border") -> torch.Tensor:
    """`image (B, C, H, W)` at pixel coordinates `x, y (B, Y, X)` → `(B, C, Y, X)`."""
    return F.grid_sample(image, _normalised(x, y, image.shape[-1], image.shape[-2]), mode=mode,
                         padding_mode=padding, align_corners=False)


def spline_shift(points: torch.Tensor, weights: torch.Tensor, affine: torch.Tensor, size: int) -> torch.Tensor:
    """A thin-plate spline's value at every crop pixel `(B, S, S, 2)`: evaluated at every GRID_STEP-th
    pixel and linearly interpolated in between (as `avatar.render.warp.backward_map`).

    points: `(B, N, 2)` control points (crop px; padding rows have zero weight), weights `(B, N, 2)`,
    affine `(B, 3, 2)`: the polynomial part (1, x, y)."""
    nodes = size // GRID_STEP + 1
    coarse = torch.arange(nodes, dtype=points.dtype) * GRID_STEP
    gy, gx = coarse[:, None].expand(nodes, nodes).reshape(-1), coarse[None, :].expand(nodes, nodes).reshape(-1)
    grid = torch.stack([gx, gy], -1)  # (G, 2)
    d2 = ((grid[None, :, None, :] - points[:, None, :, :]) ** 2).sum(-1)  # (B, G, N)
    kernel = 0.5 * d2 * torch.log(d2.clamp(min=1e-20))  # r² log r
    polynomial = torch.cat([torch.ones_like(grid[:, :1]), grid], -1)  # (G, 3)
    values = kernel @ weights + polynomial @ affine  # (B, G, 2)
    values = values.reshape(-1, nodes, nodes, 2).permute(0, 3, 1, 2)
    full = F.interpolate(values, size=(GRID_STEP * (nodes - 1) + 1,) * 2, mode="bilinear", align_corners=True)
    return full[:, :, :size, :size].permute(0, 2, 3, 1)


class FrameGraph(torch.nn.Module):
    """Steps 1-6 for a batch (see the module docstring). `denoiser`: the diffusion renderer's model
    (`avatar.render.unet.Denoiser`) and its sampling (`steps` DDIM steps from time `start`), or None
    for the warp renderer. `colour_match`: its strength (diffusion only). Inputs and outputs:
    `avatar.render.graph` (GRAPH_INPUTS)."""

    def __init__(self, size: int, denoiser: typing.Optional[torch.nn.Module] = None, steps: int = 1,
                 start: float = 0.25, colour_match: float = 0.8, detail_tolerance: float = 10.0, retrieval: bool = False):
        super().__init__()
        self.size, self.denoiser, self.steps, self.start = size, denoiser, steps, start
        self.colour_match, self.detail_tolerance, self.retrieval = colour_match, detail_tolerance, retrieval

    # 1.
    def crop(self, patch: torch.Tensor, patch_from_crop: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """`patch (B, 3, P, P)` float → the crop `(B, 3, S, S)` in [0, 255]: bicubic at level 0; where
        the crop shrinks the face, bilinear from the patch averaged over 2^level px (level 1-3, a
        mip-map, as the per-frame path's area averaging)."""
        ys, xs = _pixel_grid(self.size, self.size, patch)
        x, y = _affine(patch_from_crop, xs, ys)
        crop = sample(patch, x, y, "bicubic")
        shrunk = patch
        for k in range(1, LEVELS + 1):
            shrunk = F.avg_pool2d(shrunk, 2)
            f = 2.0 ** k
            smooth = sample(shrunk, (x + 0.5) / f - 0.5, (y + 0.5) / f - 0.5, "bilinear")
            crop = torch.where((level == k)[:, None, None, None], smooth, crop)
        return crop.clamp(0.0, 255.0).round()

    # 2.
    def warp(self, crop: torch.Tensor, splines: typing.Sequence[torch.Tensor], upper: torch.Tensor) -> torch.Tensor:
        """The two spline warps of `crop (B, 3, S, S)`, blended by `upper (B, S, S)` (1 above the
        target's mouth line). splines: upper points, weights, affine, then the lower ones."""
        ys, xs = _pixel_grid(self.size, self.size, crop)
        pieces = []
        for k in (0, 3):
            shift = spline_shift(splines[k], splines[k + 1], splines[k + 2], self.size)
            pieces.append(sample(crop, xs + shift[..., 0], ys + shift[..., 1], "bicubic").clamp(0.0, 255.0))
        above = upper[:, None]
        return pieces[0] * above + pieces[1] * (1.0 - above)

    # 3.
    def rows(self, mouth: torch.Tensor, columns: torch.Tensor, box: torch.Tensor, behind: torch.Tensor,
             lips_lab: torch.Tensor, mouth_lips_lab: torch.Tensor, borrowed: torch.Tensor, upper: bool) -> torch.Tensor:
        """`teeth_rows` for a batch: `mouth (B, 3, M, M)` an open mouth's pixels; `columns (B, 4, S)`
        per crop column: the mouth image's column u, the offsets to its upper-row and lower-row
        lines, and its mid-line; `box (B, S, S)` 1 where rows are composed; `behind (B, 3, S, S)`."""
        ys, xs = _pixel_grid(self.size, self.size, behind)
        u = columns[:, 0, None, :].expand(-1, self.size, -1)
        y_upper = ys + columns[:, 1, None, :]
        y_lower = ys + columns[:, 2, None, :]
        middle = columns[:, 3, None, :]
        upper_px, lower_px = sample(mouth, u, y_upper, "bilinear"), sample(mouth, u, y_lower, "bilinear")
        # a borrowed mouth, brought to these lips' lightness and chroma (`match_lighting`)
        gain = (lips_lab[:, 0] / mouth_lips_lab[:, 0].clamp(min=1.0)).clamp(0.7, 1.3)
        hypot = lambda lab: (lab[:, 1] ** 2 + lab[:, 2] ** 2).sqrt()
        chroma = (hypot(lips_lab) / hypot(mouth_lips_lab).clamp(min=1.0)).clamp(0.0, 1.2)
        scale = torch.stack([gain, chroma, chroma], -1)[:, None, None, :]

        def lit(pixels: torch.Tensor) -> torch.Tensor:
            relit = lab_to_srgb(srgb_to_lab(pixels.permute(0, 2, 3, 1)) * scale).permute(0, 3, 1, 2)
            return torch.where(borrowed[:, None, None, None] > 0.5, relit, pixels)

        upper_px, lower_px = lit(upper_px), lit(lower_px)
        upper_w = ((middle - y_upper + 0.5).clamp(0.0, 1.0) * box)[:, None]
        lower_w = ((y_lower - middle + 0.5).clamp(0.0, 1.0) * box)[:, None]
        out = behind * (1.0 - lower_w) + lower_px * lower_w
        return out * (1.0 - upper_w) + upper_px * upper_w if upper else out

    def inside(self, moved: torch.Tensor, inputs: typing.Dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """The draft with the inside of the mouth composed in (`render_warp`'s second half); `prefix`
        "entry_": where the bank entry's own opening leaves it (its hole and row boxes)."""
        band = inputs["lip_band"][:, None]
        lips = (moved * band).sum((2, 3)) / band.sum((2, 3)).clamp(min=1.0)  # (B, 3)
        lips_lab = srgb_to_lab(lips)
        ys = torch.arange(self.size, dtype=moved.dtype)[None, :, None]
        top, span = inputs["cavity"][:, 0, None, None], inputs["cavity"][:, 1, None, None]
        shade = ((ys - top) / span).clamp(0.0, 1.0)
        fill = lips[:, :, None, None] * (0.12 + 0.33 * shade ** 2)[:, None]  # (B, 3, S, S)
        fill = fill.expand(-1, -1, -1, self.size)
        fill = self.rows(inputs["lower_row"], inputs["lower_columns"], inputs[prefix + "lower_box"], fill, lips_lab,
                         srgb_to_lab(inputs["lower_lips"]), inputs["lower_borrowed"], upper=False)
        fill = self.rows(inputs["inner"], inputs["inner_columns"], inputs[prefix + "inner_box"], fill, lips_lab,
                         srgb_to_lab(inputs["inner_lips"]), inputs["inner_borrowed"], upper=True)
        meet = inputs["meet"][:, None, None, None]  # lips that meet: their own colour, not rows (`lips_meet`)
        fill = fill * (1.0 - meet) + lips[:, :, None, None] * (MEETING_SHADE * meet)
        hole = inputs[prefix + "hole"][:, None]
        return (moved * (1.0 - hole) + fill * hole + 0.5).floor().clamp(0.0, 255.0)

    def draw_entry(self, face: torch.Tensor, inputs: typing.Dict[str, torch.Tensor]) -> torch.Tensor:
        """`MouthBank.draw`: the bank entry `(B, 3, S, S)` moved from its mouth to the target's (its own
        splines), its inside composed as the frame's, blended over `face` in `entry_region` (0
        everywhere for a frame without an entry), its brightness per channel matched to the face's in
        the region's rim (0.05 < region < 0.6)."""
        splines = [inputs["entry_" + k] for k in ("upper_points", "upper_weights", "upper_affine",
                                                   "lower_points", "lower_weights", "lower_affine")]
        moved = (self.warp(inputs["entry"], splines, inputs["upper"]) + 0.5).floor().clamp(0.0, 255.0)
        drawn = self.inside(moved, inputs, "entry_")
        alpha = inputs["entry_region"][:, None]
        rim = ((alpha > 0.05) & (alpha < 0.6)).to(face.dtype)
        count = rim.sum((2, 3))
        ratio = ((face * rim).sum((2, 3)) / count.clamp(min=1.0) + 1.0) / ((drawn * rim).sum((2, 3)) / count.clamp(min=1.0) + 1.0)
        drawn = drawn * torch.where(count > 0, ratio, torch.ones_like(ratio))[:, :, None, None]
        return (face + (drawn - face) * alpha + 0.5).floor().clamp(0.0, 255.0)

    # 4.
    def denoise(self, crop: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor, references: torch.Tensor,
                sketch: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The denoiser's crop `(B, 3, S, S)` in [0, 255] (rounded), from the draft noised to `start`."""
        keep = 1.0 - (mask > 0.02).to(crop.dtype)[:, None]
        condition = torch.cat([(crop / 127.5 - 1.0) * keep, 1.0 - keep, references / 127.5 - 1.0, sketch], 1)
        times = [float(t) for t in timesteps(self.steps, self.start)]
        alpha, sigma = (float(value) for value in alpha_sigma(self.start))
        x = noised(draft / 127.5 - 1.0, noise, alpha, sigma)
        x0 = x
        for k in range(self.steps):  # sample_ddim's steps
            alpha, sigma = (float(value) for value in alpha_sigma(times[k]))
            v = self.denoiser(x, torch.full_like(x[:, 0, 0, 0], times[k]), condition)
            x0 = clean_from_v(x, v, alpha, sigma).clamp(-1.0, 1.0)
            alpha_next, sigma_next = (float(value) for value in alpha_sigma(times[k + 1]))
            x = noised(x0, noise_from_v(x, v, alpha, sigma), alpha_next, sigma_next)
        return ((x0 + 1.0) * 127.5 + 0.5).floor().clamp(0.0, 255.0)

    # 5.
    def match_colour(self, face: torch.Tensor, crop: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`colour_match`: per CIELAB channel, the face's pixels where mask > 0.5 get the crop's mean and
        spread there (strength `colour_match`)."""
        region = (mask > 0.5).to(face.dtype)[:, :, :, None]  # (B, S, S, 1)
        count = region.sum((1, 2)).clamp(min=1.0)
        lab_face, lab_crop = srgb_to_lab(face.permute(0, 2, 3, 1)), srgb_to_lab(crop.permute(0, 2, 3, 1))
        moments = []
        for lab in (lab_face, lab_crop):
            mean = (lab * region).sum((1, 2)) / count
            spread = (((lab - mean[:, None, None]) ** 2 * region).sum((1, 2)) / count).sqrt()
            moments.append((mean[:, None, None], spread[:, None, None]))
        (mean_f, spread_f), (mean_c, spread_c) = moments
        matched = (lab_face - mean_f) * (spread_c / spread_f.clamp(min=1e-3)) + mean_c
        adjusted = lab_to_srgb(lab_face + self.colour_match * (matched - lab_face))
        return torch.where(region > 0.5, (adjusted + 0.5).floor(), face.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # 6.
    def composite(self, patch: torch.Tensor, crop: torch.Tensor, face: torch.Tensor, mask: torch.Tensor,
                  crop_from_patch: torch.Tensor, detail: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        """The face `(B, 3, S, S)` blended into `patch (B, 3, P, P)` under the feathered mask, with the
        patch's fine detail (patch minus the crop brought back up) where crop and face agree."""
        ys, xs = _pixel_grid(patch.shape[-2], patch.shape[-1], patch)
        x, y = _affine(crop_from_patch, xs, ys)
        warped = sample(face, x, y, "bicubic").clamp(0.0, 255.0)
        alpha = sample(mask[:, None], x, y, "bilinear", "zeros")
        pixels = patch + alpha * (warped - patch)
        difference = (crop - face).abs().mean(1, keepdim=True)
        agree = torch.exp(-(difference / self.detail_tolerance) ** 2)
        padded = F.pad(agree, (1, 1, 1, 1), mode="replicate")
        taps = (0.27901, 0.44198, 0.27901)  # Gaussian, sigma 1 crop px
        size = agree.shape[-1]
        agree = sum(taps[i] * taps[j] * padded[:, :, i:i + size, j:j + size] for i in range(3) for j in range(3))
        coarse = sample(crop, x, y, "bilinear")
        weight = sample(agree, x, y, "bilinear") * alpha * detail[:, None, None, None]
        pixels = pixels + weight * (patch - coarse)
        return (pixels + 0.5).floor().clamp(0.0, 255.0), alpha[:, 0]

    def forward(self, inputs: typing.Dict[str, torch.Tensor]) -> typing.Tuple[torch.Tensor, torch.Tensor]:
        patch = inputs["patch"].permute(0, 3, 1, 2).to(torch.float32)
        crop = self.crop(patch, inputs["patch_from_crop"], inputs["level"])  # 1.
        splines = [inputs[k] for k in ("upper_points", "upper_weights", "upper_affine", "lower_points", "lower_weights", "lower_affine")]
        moved = (self.warp(crop, splines, inputs["upper"]) + 0.5).floor().clamp(0.0, 255.0)  # 2.
        face = self.inside(moved, inputs)  # 3.
        if self.retrieval:
            face = self.draw_entry(face, inputs)
        mask = inputs["mask"]
        if self.denoiser is not None:  # 4., 5.
            face = self.denoise(crop, face, mask, inputs["references"], inputs["sketch"], inputs["noise"])
            if self.colour_match > 0:
                face = self.match_colour(face, crop, mask)
        face = (face + inputs["watermark"][:, None, None, None] * inputs["pattern"][None, None] * mask[:, None] + 0.5).floor()
        pixels, alpha = self.composite(patch, crop, face.clamp(0.0, 255.0), mask, inputs["crop_from_patch"], inputs["detail"])  # 6.
        return pixels.permute(0, 2, 3, 1).to(torch.uint8), alpha
