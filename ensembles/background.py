"""Background removal pre- and post-processing (RMBG-2.0 / BiRefNet contract, DESIGN §4).

Written against torch tensors so the same code runs on CPU (the local server, CI) and on CUDA (GPU
nodes): pass tensors that live on the device you want. Decoding (:func:`imgpipe.imaging.decode_images`:
nvJPEG on a GPU, else Pillow) and encoding (:func:`imgpipe.imaging.encode_image`, Pillow on the CPU)
happen at the two ends; everything between stays on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import ImageColor
from torch.nn import functional as F

from imgpipe.errors import InvalidInputError, quote
from imgpipe.pipelines.remove_background import CONTRACT, Settings

INPUT_SIZE = (1024, 1024)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Mode = Literal["rgba", "mask", "composite"]
Format = Literal["png", "webp", "jpeg"]


@dataclass(frozen=True)
class Options:
    """What the caller asked for: the RGBA cut-out, the mask alone, or a composite on a colour, and
    the encoding of the result."""

    mode: Mode = "rgba"
    background: tuple[int, int, int] = (255, 255, 255)
    format: Format = "png"


def parse_options(mode: str | None, background: str | None, fmt: str | None = None) -> Options:
    """Validate the request's option strings; unknown values, and JPEG for the RGBA cut-out (JPEG has
    no alpha channel), raise :class:`InvalidInputError`."""
    mode = CONTRACT.input("MODE").choose(mode)
    fmt = CONTRACT.input("FORMAT").choose(fmt)
    if fmt == "jpeg" and mode == "rgba":
        raise InvalidInputError(
            "FORMAT jpeg cannot hold the alpha channel of MODE rgba: "
            "ask for FORMAT png or webp, or MODE composite or mask for a JPEG"
        )
    colour: tuple[int, int, int] = (255, 255, 255)
    if background:
        try:
            colour = ImageColor.getrgb(background.strip())[:3]  # type: ignore[assignment]
        except ValueError:
            raise InvalidInputError(
                f"unsupported BACKGROUND {quote(background)}: expected a colour such as '#00ff00' or 'white'"
            ) from None
    return Options(mode=mode, background=colour, format=fmt)  # type: ignore[arg-type]


def encoder_options(options: Options, settings: Settings) -> dict[str, Any]:
    """Keyword arguments of :func:`imgpipe.imaging.encode_image` for the requested format, from the
    pipeline's settings. A WebP mask is always lossless: a mask is data, and lossless WebP at method 0
    was as fast as lossy WebP on one (encode_bench)."""
    if options.format == "png":
        return {"png_level": settings.png_compress_level}
    if options.format == "jpeg":
        return {"quality": settings.jpeg_quality}
    return {
        "lossless": settings.webp_lossless or options.mode == "mask",
        "quality": settings.webp_quality,
        "webp_method": settings.webp_method,
    }


# The segmenter's own preprocessing, named by the network's ``calibration.preprocessing`` in the manifest:
#   rmbg:   RMBG-2.0 / BiRefNet, 3×H×W (NCHW), RGB/255 normalised with ImageNet's mean and std;
#   selfie: MediaPipe's selfie segmenter, H×W×3 (NHWC), RGB in [0, 1] (selfie_segmentation_cpu.binarypb).
# Both stretch the image to the input (no letterbox), as rembg and MediaPipe do.
PREPROCESSING = ("rmbg", "selfie")


def input_size(preprocessing: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The network input's (height, width) from its shape without the batch dimension."""
    return tuple(shape[:2] if preprocessing == "selfie" else shape[-2:])  # type: ignore[return-value]


def preprocess(rgb: torch.Tensor, size: tuple[int, int] = INPUT_SIZE, preprocessing: str = "rmbg") -> torch.Tensor:
    """``H×W×3`` uint8 RGB → one network input: resize (bilinear, antialiased) to ``size``, /255, then
    ImageNet normalisation in NCHW (``rmbg``: 3×1024×1024 by default) or NHWC as is (``selfie``).

    The aspect ratio is not kept and the image is not divided by its own maximum (rembg's quirks).
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown segmenter preprocessing {preprocessing!r} (have: {', '.join(PREPROCESSING)})")
    x = rgb.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).div_(255.0)
    if preprocessing == "selfie":
        return x[0].permute(1, 2, 0).contiguous()
    mean, std = _imagenet(x.device)
    return ((x - mean) / std)[0]


@functools.lru_cache(maxsize=8)
def _imagenet(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as 1×3×1×1 float32 tensors on ``device``, made once per device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def _plane(mask: torch.Tensor) -> torch.Tensor:
    """A one-channel network output (1×h×w, h×w×1 or h×w) as 1×1×h×w float32."""
    if mask.dim() == 3:
        mask = mask[..., 0] if mask.shape[-1] == 1 and mask.shape[0] != 1 else mask[0]
    return mask.reshape(1, 1, *mask.shape[-2:]).to(torch.float32)


def mask_to_alpha(
    mask: torch.Tensor,
    height: int,
    width: int,
    activation: str,
    guide: torch.Tensor | None = None,
    radius: int = 2,
    eps: float = 1e-3,
) -> torch.Tensor:
    """The network's one-channel output (``1×h×w`` or ``h×w×1``) → ``H×W`` uint8 alpha at the original size.

    ``activation`` is the manifest's word for the output: "sigmoid" for logits (BiRefNet, the
    reference segmenter), "none" when already in [0, 1] (bria RMBG-2.0 ONNX, MediaPipe's selfie
    segmenter). With ``guide`` (the ``H×W×3`` uint8 image) the mask is upsampled edge-aware by
    :func:`guided_upsample`; without it, bilinearly.
    """
    m = _plane(mask)
    if activation == "sigmoid":
        m = torch.sigmoid(m)
    if guide is not None:
        m = guided_upsample(m.clamp(0, 1), guide[:height, :width], radius, eps)
    else:
        antialias = height < m.shape[-2] or width < m.shape[-1]
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)
    return (m[0, 0].clamp(0, 1) * 255.0).round_().to(torch.uint8)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)² window around each pixel of N×C×H×W ``x``, the window cut at the borders
    (the mean of the pixels that exist). Running sums: the cost does not grow with the radius."""

    def sums(t: torch.Tensor) -> torch.Tensor:
        k = 2 * radius + 1
        t = F.pad(t, (radius + 1, radius)).cumsum(-1)
        t = t[..., k:] - t[..., :-k]
        t = F.pad(t, (0, 0, radius + 1, radius)).cumsum(-2)
        return t[..., k:, :] - t[..., :-k, :]

    ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
    return sums(x) / sums(ones)


# The guided filter's working resolution, as a multiple of the mask's: the mask's uncertainty is about a
# mask pixel, so finer work buys nothing; the coefficients are then upsampled to the full image.
GUIDED_WORK_FACTOR = 4


def guided_upsample(mask: torch.Tensor, rgb: torch.Tensor, radius: int = 2, eps: float = 1e-3) -> torch.Tensor:
    """Edge-aware upsampling of a low-resolution 1×1×h×w mask in [0, 1] to the H×W×3 uint8 image ``rgb``:
    the fast colour guided filter (He, Sun & Tang, "Guided Image Filtering", TPAMI 2013; He & Sun, "Fast
    Guided Filter", 2015).

    The mask is modelled locally as a linear function of the image's colour, ``q = A·I + b``, fitted in
    every (2r+1)² window by ridge regression (``eps`` regularises flat regions: larger is smoother).
    The fit runs at ``GUIDED_WORK_FACTOR`` × the mask's resolution (capped at the image's), with ``radius``
    given in mask pixels; the averaged coefficients are upsampled bilinearly and applied to the full
    image, so the mask's edges follow the image's (hair, shoulders) instead of the blocky bilinear
    upsampling of a 256² mask. Torch ops on the tensors' device; the 3×3 systems are solved in closed
    form (adjugate), elementwise.
    """
    height, width = rgb.shape[:2]
    image = rgb.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
    factor = min(GUIDED_WORK_FACTOR, max(height / mask.shape[-2], width / mask.shape[-1]))
    factor = max(factor, 1.0)
    h = min(height, max(1, round(mask.shape[-2] * factor)))
    w = min(width, max(1, round(mask.shape[-1] * factor)))
    r = max(1, round(radius * factor))
    guide = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    p = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    mean_i = box_mean(guide, r)  # 1×3×h×w
    mean_p = box_mean(p, r)
    cov_ip = box_mean(guide * p, r) - mean_i * mean_p
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    products = torch.cat([guide[:, i : i + 1] * guide[:, j : j + 1] for i, j in pairs], 1)
    sxx, sxy, sxz, syy, syz, szz = (
        box_mean(products, r) - torch.cat([mean_i[:, i : i + 1] * mean_i[:, j : j + 1] for i, j in pairs], 1)
    ).unbind(1)
    sxx, syy, szz = sxx + eps, syy + eps, szz + eps
    # (Σ + εI)⁻¹ by its adjugate: symmetric, so six cofactors.
    c00, c01, c02 = syy * szz - syz * syz, sxz * syz - sxy * szz, sxy * syz - sxz * syy
    c11, c12, c22 = sxx * szz - sxz * sxz, sxy * sxz - sxx * syz, sxx * syy - sxy * sxy
    det = sxx * c00 + sxy * c01 + sxz * c02
    u, v, t = cov_ip.unbind(1)
    a = torch.stack([c00 * u + c01 * v + c02 * t, c01 * u + c11 * v + c12 * t, c02 * u + c12 * v + c22 * t], 1) / det
    b = mean_p - (a * mean_i).sum(1, keepdim=True)
    coefficients = F.interpolate(
        box_mean(torch.cat([a, b], 1), r), size=(height, width), mode="bilinear", align_corners=False
    )
    return ((coefficients[:, :3] * image).sum(1, keepdim=True) + coefficients[:, 3:]).clamp_(0, 1)


def compose(rgb: torch.Tensor, alpha: torch.Tensor, options: Options) -> torch.Tensor:
    """The image the caller asked for, as a uint8 tensor on ``rgb``'s device, ready for the encoder:
    ``H×W×4`` RGBA, ``H×W`` mask or ``H×W×3`` RGB composite."""
    if options.mode == "mask":
        return alpha
    if options.mode == "rgba":
        return torch.cat([rgb, alpha.unsqueeze(-1)], dim=-1)
    a = alpha.to(torch.float32).unsqueeze(-1) / 255.0
    bg = torch.tensor(options.background, dtype=torch.float32, device=rgb.device)
    out = rgb.to(torch.float32) * a + bg * (1.0 - a)
    return out.round_().clamp_(0, 255).to(torch.uint8)
