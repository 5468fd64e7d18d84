"""Face alignment geometry: 5-point templates, the similarity fit, warping and paste-back.

Transforms are 2×3 matrices mapping image pixel coordinates to crop pixel coordinates (pixel centres
at integers, as OpenCV's ``warpAffine``), float64 torch tensors, ``[2, 3]`` for one face or
``[F, 2, 3]`` for several. Everything runs on torch tensors on the device of its input (CPU or CUDA
alike); the templates on a device and the feathered masks are made once and cached.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.nn import functional as F


def _constant(points: list[list[float]]) -> np.ndarray:
    array = np.array(points, dtype=np.float64)
    array.setflags(write=False)  # the cached tensors of template() are made from it
    return array


# Five points normalised to the crop size: left eye, right eye, nose, left mouth, right mouth (DESIGN §4).
TEMPLATES: dict[str, np.ndarray] = {
    "arcface_112_v2": _constant(
        [
            [0.34191607, 0.46157411],
            [0.65653393, 0.45983393],
            [0.50022500, 0.64050536],
            [0.37097589, 0.82469196],
            [0.63151696, 0.82325089],
        ]
    ),
    "arcface_128": _constant(
        [
            [0.36167656, 0.40387734],
            [0.63696719, 0.40235469],
            [0.50019687, 0.56044219],
            [0.38710391, 0.72160547],
            [0.61507734, 0.72034453],
        ]
    ),
    "ffhq_512": _constant(
        [
            [0.37691676, 0.46864664],
            [0.62285697, 0.46912813],
            [0.50123859, 0.61331904],
            [0.39308822, 0.72541100],
            [0.61150205, 0.72490465],
        ]
    ),
}


def _device(device: torch.device | str | None) -> torch.device:
    """A canonical device (``cuda`` → ``cuda:<current>``), so cache keys match tensors' devices."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def template(
    name: str, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The template ``name`` in pixels of a size×size crop, [5, 2] on ``device``. Cached: the same
    tensor object for the same arguments, so callers must not modify it in place."""
    _known(name)
    return _template(name, size, _device(device), dtype)


def _known(name: str) -> None:
    if name not in TEMPLATES:
        raise KeyError(f"unknown alignment template {name!r}: expected one of {', '.join(TEMPLATES)}")


@functools.lru_cache(maxsize=64)
def _template(name: str, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(TEMPLATES[name] * size, dtype=torch.float64).to(device=device, dtype=dtype)


def similarity_fit(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The least-squares 4-degree-of-freedom similarity (scale, rotation, translation) taking the
    points ``src`` [N,2] onto ``dst`` [N,2], as a 2×3 matrix; batched over faces for ``src``
    [F,N,2] (``dst`` [N,2] or [F,N,2]) → [F,2,3]. float64 on src's device.

    The model is u = p·x − q·y + tx, v = q·x + p·y + ty. Its normal equations have a closed form on
    centred points: the same solution as a general least-squares solver (``numpy.linalg.lstsq``),
    with no solver call, so it batches and runs on any device without a host synchronisation.
    """
    src = torch.as_tensor(src).to(torch.float64)
    dst = torch.as_tensor(dst).to(device=src.device, dtype=torch.float64)
    src_mean, dst_mean = src.mean(dim=-2, keepdim=True), dst.mean(dim=-2, keepdim=True)
    x, y = (src - src_mean).unbind(-1)
    u, v = (dst - dst_mean).unbind(-1)
    spread = (x * x + y * y).sum(-1)
    # All source points equal: no rotation or scale to be had; p = q = 0 keeps the result finite.
    spread = spread.clamp_min(torch.finfo(torch.float64).tiny)
    p = (x * u + y * v).sum(-1) / spread
    q = (x * v - y * u).sum(-1) / spread
    sx, sy = src_mean[..., 0, 0], src_mean[..., 0, 1]
    tx = dst_mean[..., 0, 0] - (p * sx - q * sy)
    ty = dst_mean[..., 0, 1] - (q * sx + p * sy)
    return torch.stack([torch.stack([p, -q, tx], -1), torch.stack([q, p, ty], -1)], -2)


def align_matrix(landmarks: torch.Tensor, template: str, size: int) -> torch.Tensor:
    """The image → crop similarity for 5 ``landmarks`` [5,2] (or [F,5,2]) and a template at ``size``:
    [2,3] (or [F,2,3]) float64 on the landmarks' device."""
    landmarks = torch.as_tensor(landmarks)
    _known(template)  # the argument's name shadows template(); its cached maker is called directly
    return similarity_fit(landmarks, _template(template, size, _device(landmarks.device), torch.float64))


def invert(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of affine 2×3 matrices [..., 2, 3] (closed form, batched)."""
    m = torch.as_tensor(matrix).to(torch.float64)
    a, b, tx = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    c, d, ty = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    itx = -(ia * tx + ib * ty)
    ity = -(ic * tx + id_ * ty)
    return torch.stack([torch.stack([ia, ib, itx], -1), torch.stack([ic, id_, ity], -1)], -2)


def _matrices(matrix: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(matrix).to(device=device, dtype=torch.float64)


def _sample(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of NCHW ``image`` at pixel coordinates ``coords`` [N,H,W,2] (x, y); zero outside."""
    height, width = image.shape[-2:]
    # Python scalars: the same float32 arithmetic as a [2] tensor of scales, without making one.
    gx = coords[..., 0] * (2.0 / max(width - 1, 1)) - 1.0
    gy = coords[..., 1] * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _grid(height: int, width: int, matrix: torch.Tensor, x0: int = 0, y0: int = 0) -> torch.Tensor:
    """For each pixel (x0 + i, y0 + j) of a height×width window, each of the ``matrix`` [F,2,3]
    applied to it: [F,H,W,2] float32 (computed in float64), on the matrices' device."""
    xs = torch.arange(x0, x0 + width, dtype=torch.float64, device=matrix.device)[None, None, :]
    ys = torch.arange(y0, y0 + height, dtype=torch.float64, device=matrix.device)[None, :, None]
    m = matrix[:, :, :, None, None]  # [F, 2, 3, 1, 1]: each coefficient broadcasts over the window
    u = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    v = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    return torch.stack([u, v], dim=-1).to(torch.float32)


def warp(image: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """The size×size crop of CHW float ``image`` that ``matrix`` (image → crop) defines: CHW for a
    [2,3] matrix; [F,C,size,size] for [F,2,3], all faces in one ``grid_sample``."""
    m = _matrices(matrix, image.device)
    coords = _grid(size, size, invert(m.reshape(-1, 2, 3)))
    crops = _sample(image.unsqueeze(0).expand(coords.shape[0], -1, -1, -1), coords)
    return crops if m.dim() == 3 else crops[0]


def box_mask(size: int, blur: float = 0.3, device: torch.device | str | None = None) -> torch.Tensor:
    """A feathered box mask (FaceFusion's static box mask): ones with a zeroed border of
    ``blur·size/4`` pixels, Gaussian-blurred with σ = ``blur·size/8``; size×size float32 in [0, 1].
    Cached: the same tensor object for the same arguments, so callers must not modify it in place."""
    return _box_mask(size, float(blur), _device(device))


@functools.lru_cache(maxsize=16)
def _box_mask(size: int, blur: float, device: torch.device) -> torch.Tensor:
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


def paste_back(frame: torch.Tensor, crop: torch.Tensor, matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend ``crop`` (CHW, the aligned face) back into ``frame`` (CHW float) through the inverse of
    ``matrix`` [2,3]: ``frame·(1−m) + face·m`` inside the clipped bounding region of the warped crop.
    Returns a new frame on the frame's device."""
    size = crop.shape[-1]
    height, width = frame.shape[-2:]
    m = _matrices(matrix, frame.device).reshape(1, 2, 3)
    # The region's bounds are needed on the host to slice: one read of the six numbers.
    (a, b, c), (d, e, f) = invert(m)[0].tolist()
    corners = ((0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1))
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(width, math.ceil(max(xs)) + 1), min(height, math.ceil(max(ys)) + 1)
    if x1 <= x0 or y1 <= y0:
        return frame
    coords = _grid(y1 - y0, x1 - x0, m, x0, y0)
    face = _sample(crop.unsqueeze(0).to(device=frame.device, dtype=frame.dtype), coords)[0]
    weight = _sample(mask.view(1, 1, size, size).to(device=frame.device, dtype=frame.dtype), coords)[0]
    out = frame.clone()
    region = out[:, y0:y1, x0:x1]
    out[:, y0:y1, x0:x1] = region * (1 - weight) + face * weight
    return out
