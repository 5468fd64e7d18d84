"""Face alignment geometry: 5-point templates, the similarity fit, warping and paste-back.

Transforms are 2×3 matrices mapping image pixel coordinates to crop pixel coordinates (pixel centres
at integers, as OpenCV's ``warpAffine``). Warping and pasting run on torch tensors, so they work on
CPU and CUDA alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

# Five points normalised to the crop size: left eye, right eye, nose, left mouth, right mouth (DESIGN §4).
TEMPLATES: dict[str, np.ndarray] = {
    "arcface_112_v2": np.array(
        [
            [0.34191607, 0.46157411],
            [0.65653393, 0.45983393],
            [0.50022500, 0.64050536],
            [0.37097589, 0.82469196],
            [0.63151696, 0.82325089],
        ]
    ),
    "arcface_128": np.array(
        [
            [0.36167656, 0.40387734],
            [0.63696719, 0.40235469],
            [0.50019687, 0.56044219],
            [0.38710391, 0.72160547],
            [0.61507734, 0.72034453],
        ]
    ),
    "ffhq_512": np.array(
        [
            [0.37691676, 0.46864664],
            [0.62285697, 0.46912813],
            [0.50123859, 0.61331904],
            [0.39308822, 0.72541100],
            [0.61150205, 0.72490465],
        ]
    ),
}


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares 4-degree-of-freedom similarity (scale, rotation, translation) taking the
    points ``src`` [N,2] onto ``dst`` [N,2], as a 2×3 matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    n = len(src)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    a[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (p, q, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[p, -q, tx], [q, p, ty]])


def align_matrix(landmarks: np.ndarray, template: str, size: int) -> np.ndarray:
    return similarity_fit(landmarks, TEMPLATES[template] * size)


def invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def _sample(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of NCHW ``image`` at pixel coordinates ``coords`` [N,H,W,2] (x, y); zero outside."""
    height, width = image.shape[-2:]
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=coords.dtype, device=coords.device)
    grid = coords * scale - 1.0
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _grid(
    height: int, width: int, matrix: np.ndarray, x0: int = 0, y0: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """For each pixel (x0 + i, y0 + j) of a height×width window, ``matrix`` applied to it: [1,H,W,2]."""
    ys, xs = torch.meshgrid(
        torch.arange(y0, y0 + height, dtype=torch.float64, device=device),
        torch.arange(x0, x0 + width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    m = torch.as_tensor(matrix, dtype=torch.float64, device=device)
    u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return torch.stack([u, v], dim=-1).unsqueeze(0).to(torch.float32)


def warp(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """The size×size crop of CHW float ``image`` that ``matrix`` (image → crop) defines: CHW."""
    coords = _grid(size, size, invert(matrix), device=image.device)
    return _sample(image.unsqueeze(0), coords)[0]


def box_mask(size: int, blur: float = 0.3, device: torch.device | None = None) -> torch.Tensor:
    """A feathered box mask (FaceFusion's static box mask): ones with a zeroed border of
    ``blur·size/4`` pixels, Gaussian-blurred with σ = ``blur·size/8``; size×size in [0, 1]."""
    amount = int(size * 0.5 * blur)
    mask = torch.ones((1, 1, size, size), dtype=torch.float32, device=device)
    if amount <= 0:
        return mask[0, 0]
    border = max(amount // 2, 1)
    mask[..., :border, :] = 0
    mask[..., -border:, :] = 0
    mask[..., :, :border] = 0
    mask[..., :, -border:] = 0
    sigma = amount * 0.25
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    mask = F.conv2d(F.pad(mask, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    mask = F.conv2d(F.pad(mask, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return mask[0, 0].clamp(0, 1)


def paste_back(frame: torch.Tensor, crop: torch.Tensor, matrix: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
    """Blend ``crop`` (CHW, the aligned face) back into ``frame`` (CHW float) through the inverse of
    ``matrix``: ``frame·(1−m) + face·m`` inside the clipped bounding region of the warped crop."""
    size = crop.shape[-1]
    height, width = frame.shape[-2:]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
    projected = corners @ invert(matrix).T
    x0, y0 = (max(0, math.floor(v)) for v in projected.min(axis=0))
    x1 = min(width, math.ceil(projected[:, 0].max()) + 1)
    y1 = min(height, math.ceil(projected[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return frame
    coords = _grid(y1 - y0, x1 - x0, matrix, x0, y0, device=frame.device)
    face = _sample(crop.unsqueeze(0).to(frame.dtype), coords)[0]
    m = _sample(mask.view(1, 1, size, size).to(frame.dtype), coords)[0]
    out = frame.clone()
    region = out[:, y0:y1, x0:x1]
    out[:, y0:y1, x0:x1] = region * (1 - m) + face * m
    return out
