"""What the renderer is conditioned on, built the same way in training and in the engine.

- the target crop with its lower face masked out (pose, background, upper face stay visible);
- the mask itself;
- `references` crops of the same person (appearance, teeth, beard), e.g. a closed and an open mouth;
- a sketch of the target lips (outer, inner) and jaw, drawn from the 59 `MOUTH_AND_JAW` points that
  the motion model outputs, one channel each (ControlNet-style structure input).
"""

from __future__ import annotations

import typing

import cv2
import numpy as np

from avatar.face import landmarks as lm

N_OUTER, N_INNER = len(lm.LIPS_OUTER), len(lm.LIPS_INNER)
CHANNEL_MEAN = np.full((1, 3), 1.0 / 3.0, np.float32)  # cv2.transform's matrix: the mean of three channels


def to_unit(image: np.ndarray) -> np.ndarray:
    """`(S, S, 3) uint8` → `(3, S, S) float32` in [-1, 1]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), np.float32) / 127.5 - 1.0


def from_unit(tensor: np.ndarray) -> np.ndarray:
    """`(3, S, S)` in [-1, 1] → `(S, S, 3) uint8`."""
    return np.clip((np.asarray(tensor).transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def landmark_sketch(mouth_points: np.ndarray, size: int) -> np.ndarray:
    """`(59, 2)` crop pixels in MOUTH_AND_JAW order → `(3, S, S) float32` in [0, 1]: outer lips, inner
    lips (closed contours) and jaw (open line), anti-aliased, about one pixel wide per 128 px."""
    points = np.asarray(mouth_points, np.float64)
    scale = 16  # 4 fractional bits for sub-pixel drawing
    thickness = max(1, round(size / 128))
    sketch = np.zeros((3, size, size), np.uint8)
    parts = [(points[:N_OUTER], True), (points[N_OUTER:N_OUTER + N_INNER], True), (points[N_OUTER + N_INNER:], False)]
    for channel, (contour, closed) in enumerate(parts):
        canvas = np.zeros((size, size), np.uint8)
        cv2.polylines(canvas, [np.round(contour * scale).astype(np.int32)], closed, 255, thickness, cv2.LINE_AA, shift=4)
        sketch[channel] = canvas
    return sketch.astype(np.float32) / 255.0


def build_condition(target: np.ndarray, mask: np.ndarray, references: typing.Sequence[np.ndarray],
                    mouth_points: np.ndarray) -> np.ndarray:
    """`target: (S, S, 3) uint8`, `mask: (S, S) float32` in [0, 1] (1: repaint), `references`: crops
    `(S, S, 3) uint8`, `mouth_points: (59, 2)` → condition `(3 + 1 + 3K + 3, S, S) float32`."""
    size = target.shape[0]
    keep = 1.0 - (np.asarray(mask, np.float32) > 0.02).astype(np.float32)  # hide every repainted pixel
    masked = to_unit(target) * keep[None]
    refs = [to_unit(r) for r in references]
    return np.concatenate([masked, (1.0 - keep)[None], *refs, landmark_sketch(mouth_points, size)], axis=0).astype(np.float32)


def composite(rendered: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rendered crop inside the (feathered) mask, the target outside: all `(S, S, 3) uint8`."""
    alpha = np.asarray(mask, np.float32)[..., None]
    return np.clip(rendered * alpha + target * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)


def colour_match(rendered: np.ndarray, original: np.ndarray, mask: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Match the rendered crop's colour to the original's inside the repainted region.

    Per CIELAB channel, the rendered pixels under the mask get the original region's mean and spread
    (`strength` in [0, 1] blends towards that), so a renderer's colour cast does not show as a patch
    once pasted back. rendered, original: `(S, S, 3) uint8` RGB; mask: `(S, S)` in [0, 1].
    Returns `(S, S, 3) uint8`; pixels outside the mask are the rendered ones, unchanged.
    """
    region = np.asarray(mask) > 0.5
    if not region.any():
        return rendered.copy()
    lab_rendered = cv2.cvtColor(rendered, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab_original = cv2.cvtColor(original, cv2.COLOR_RGB2LAB).astype(np.float32)
    src, ref = lab_rendered[region], lab_original[region]
    scale = ref.std(axis=0) / np.maximum(src.std(axis=0), 1e-3)
    matched = (lab_rendered - src.mean(axis=0)) * scale + ref.mean(axis=0)
    adjusted = lab_rendered + strength * (matched - lab_rendered)
    out = cv2.cvtColor(np.clip(adjusted + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return np.where(region[..., None], out, rendered)


def transfer_detail(original: np.ndarray, rendered: np.ndarray, alpha: np.ndarray, sigma: float,
                    tolerance: float = 10.0) -> np.ndarray:
    """Give a repainted region back the fine detail of the original frame where the two agree.

    The renderer works on a small crop, so a face larger than the crop comes back smoother than the
    frame around it. Where the original's coarse content (Gaussian blur at `sigma` px, about the
    crop's pixel size in the frame) matches the rendered one within `tolerance` luma levels, the
    original's detail (original minus its blur: skin texture, stubble) is added back; where the mouth
    really changed (teeth, lips, a moved jaw line), it is not, so nothing ghosts.
    original, rendered: `(H, W, 3) uint8` frames; alpha: `(H, W)` in [0, 1], the blend weight of the
    repainted region. Returns `(H, W, 3) uint8`, equal to `rendered` where alpha is 0.
    """
    x, y, w, h = cv2.boundingRect((np.asarray(alpha) > 1e-3).view(np.uint8))
    if w == 0 or sigma < 0.75:
        return rendered
    # OpenCV's own per-element operations throughout (a live large-face frame: 7.1 → 3.0 ms); within a
    # level of the float expression's rounding
    pad = int(3 * sigma) + 2
    y0, y1 = max(0, y - pad), min(alpha.shape[0], y + h + pad)
    x0, x1 = max(0, x - pad), min(alpha.shape[1], x + w + pad)
    o = original[y0:y1, x0:x1].astype(np.float32)
    r = rendered[y0:y1, x0:x1].astype(np.float32)
    coarse_o = cv2.GaussianBlur(o, (0, 0), sigma)
    coarse_r = cv2.GaussianBlur(r, (0, 0), sigma)
    difference = cv2.transform(cv2.absdiff(coarse_o, coarse_r), CHANNEL_MEAN)  # (h, w) mean over the channels
    agree = cv2.GaussianBlur(cv2.exp(cv2.multiply(difference, difference, scale=-1.0 / tolerance ** 2)), (0, 0), sigma)
    weight = cv2.multiply(agree, np.ascontiguousarray(alpha[y0:y1, x0:x1], np.float32))
    detail = cv2.multiply(cv2.subtract(o, coarse_o), cv2.merge([weight] * 3))
    out = rendered.copy()
    out[y0:y1, x0:x1] = cv2.add(r, detail, dtype=cv2.CV_8U)  # rounded and saturated to 0-255
    return out
