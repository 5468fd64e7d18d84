"""CIE L*a*b* ↔ sRGB in torch, on CPU and CUDA tensors alike.

The formulas are scikit-image's ``rgb2lab`` / ``lab2rgb`` (D65, 2° observer), step for step: the sRGB
transfer curve with its linear segment (0.04045 / 12.92 in, 0.0031308 / 12.92 out), the sRGB → XYZ matrix
of the sRGB specification and its inverse, the reference white (0.95047, 1, 1.08883), and CIE's ``f(t)``
with its linear segment (0.008856 / 7.787 / 16/116; 0.2068966 on the way back). Like scikit-image,
:func:`lab_to_rgb` sets negative Z to 0 and clips the RGB result to [0, 1] (out-of-gamut colours).

RGB is sRGB in [0, 1], floating point; the channel axis is ``dim`` (``-1`` for ``…×3``, ``0`` for
``3×…``, ``1`` for ``N×3×H×W``). The arithmetic runs in the tensor's own dtype on its device; the
constants are made once per (device, dtype).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# sRGB specification (scikit-image's ``xyz_from_rgb``); its inverse is computed, as scikit-image does.
XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
D65_WHITE = (0.95047, 1.0, 1.08883)  # CIE XYZ of the D65 illuminant, 2° observer (scikit-image's)

_SRGB_KNEE = 0.04045  # encoded value below which the sRGB curve is linear
_LINEAR_KNEE = 0.0031308  # the same knee in linear light
_F_KNEE = 0.008856  # (6/29)³ as CIE rounds it: f(t) is linear below
_F_INVERSE_KNEE = 0.2068966  # 6/29: f⁻¹ is linear below


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(XYZ←RGB)ᵀ, (RGB←XYZ)ᵀ and the white point as tensors on ``device``."""
    return (
        torch.tensor(XYZ_FROM_RGB.T, dtype=dtype, device=device),
        torch.tensor(RGB_FROM_XYZ.T, dtype=dtype, device=device),
        torch.tensor(D65_WHITE, dtype=dtype, device=device),
    )


def _check(x: torch.Tensor, dim: int, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[dim] != 3:
        raise ValueError(f"{what}: expected 3 channels on axis {dim}, got shape {list(x.shape)}")


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer curve undone: encoded values in [0, 1] → linear light."""
    return torch.where(x > _SRGB_KNEE, ((x.clamp(min=_SRGB_KNEE) + 0.055) / 1.055) ** 2.4, x / 12.92)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear light → encoded sRGB (not clipped)."""
    return torch.where(x > _LINEAR_KNEE, 1.055 * x.clamp(min=_LINEAR_KNEE) ** (1 / 2.4) - 0.055, x * 12.92)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _F_KNEE, t.clamp(min=_F_KNEE) ** (1 / 3), 7.787 * t + 16.0 / 116.0)


def _f_inverse(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _F_INVERSE_KNEE, t**3, (t - 16.0 / 116.0) / 7.787)


def rgb_to_lab(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """sRGB in [0, 1] → L*a*b* (L in [0, 100]), channel axis ``dim`` in and out (scikit-image's ``rgb2lab``)."""
    _check(rgb, dim, "rgb_to_lab")
    xyz_from_rgb, _, white = _constants(rgb.device, rgb.dtype)
    xyz = srgb_to_linear(rgb.movedim(dim, -1)) @ xyz_from_rgb
    fx, fy, fz = _f(xyz / white).unbind(-1)
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)
    return lab.movedim(-1, dim)


def rgb_to_lightness(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L* alone (the channel axis ``dim`` removed): the L of :func:`rgb_to_lab`, without computing a*b*.
    The reference white's Y is 1, so L depends on the relative luminance Y only."""
    _check(rgb, dim, "rgb_to_lightness")
    xyz_from_rgb, _, _ = _constants(rgb.device, rgb.dtype)
    y = srgb_to_linear(rgb.movedim(dim, -1)) @ xyz_from_rgb[:, 1]
    return 116.0 * _f(y) - 16.0


@functools.lru_cache(maxsize=16)
def _linear_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The linear light of each 8-bit code value v/255 (computed in float64)."""
    return srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0).to(device=device, dtype=dtype)


def rgb8_to_lightness(rgb: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L* of 8-bit RGB (``uint8``, 0-255), channel axis ``dim`` removed: :func:`rgb_to_lightness` of
    ``rgb / 255``, the transfer curve read from a 256-entry table (faster on full-resolution images)."""
    if rgb.dtype != torch.uint8:
        raise TypeError(f"rgb8_to_lightness: expected a uint8 tensor, got {rgb.dtype}")
    if rgb.dim() == 0 or rgb.shape[dim] != 3:
        raise ValueError(f"rgb8_to_lightness: expected 3 channels on axis {dim}, got shape {list(rgb.shape)}")
    xyz_from_rgb, _, _ = _constants(rgb.device, dtype)
    y = _linear_table(rgb.device, dtype)[rgb.movedim(dim, -1).long()] @ xyz_from_rgb[:, 1]
    return 116.0 * _f(y) - 16.0


def lab_to_rgb(lab: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L*a*b* → sRGB clipped to [0, 1], channel axis ``dim`` in and out (scikit-image's ``lab2rgb``:
    negative Z is set to 0 before the XYZ → RGB step, as scikit-image does with a warning)."""
    _check(lab, dim, "lab_to_rgb")
    _, rgb_from_xyz, white = _constants(lab.device, lab.dtype)
    L, a, b = lab.movedim(dim, -1).unbind(-1)
    fy = (L + 16.0) / 116.0
    f = torch.stack((a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0.0)), dim=-1)
    rgb = linear_to_srgb((_f_inverse(f) * white) @ rgb_from_xyz).clamp_(0.0, 1.0)
    return rgb.movedim(-1, dim)
