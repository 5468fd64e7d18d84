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

from imgpipe.errors import InvalidInputError
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
                f"unsupported BACKGROUND {background!r}: expected a colour such as '#00ff00' or 'white'"
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


def preprocess(rgb: torch.Tensor, size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """``H×W×3`` uint8 RGB → ``3×1024×1024`` float32: resize (bilinear, antialiased), /255, ImageNet norm.

    The aspect ratio is not kept and the image is not divided by its own maximum (rembg's quirks).
    """
    x = rgb.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).div_(255.0)
    mean, std = _imagenet(x.device)
    return ((x - mean) / std)[0]


@functools.lru_cache(maxsize=8)
def _imagenet(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as 1×3×1×1 float32 tensors on ``device``, made once per device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def mask_to_alpha(mask: torch.Tensor, height: int, width: int, activation: str) -> torch.Tensor:
    """The network's ``1×h×w`` output → ``H×W`` uint8 alpha at the original size.

    ``activation`` is the manifest's word for the output: "sigmoid" for logits (BiRefNet, the
    reference segmenter), "none" when already in [0, 1] (bria RMBG-2.0 ONNX).
    """
    m = mask.reshape(1, 1, *mask.shape[-2:]).to(torch.float32)
    if activation == "sigmoid":
        m = torch.sigmoid(m)
    antialias = height < m.shape[-2] or width < m.shape[-1]
    m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)
    return (m[0, 0].clamp(0, 1) * 255.0).round_().to(torch.uint8)


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
