"""The ``colorize`` BLS model (declared in :mod:`imgpipe.pipelines.colorize`): DDColor's inference steps.

``IMAGE`` bytes (+ ``FORMAT``, ``SIZE``, validated before anything is decoded) → decoded on the
instance's device (alpha kept where the image has one) → per image the full-resolution L and the grey
RGB at S×S (:func:`network_input`) → the colorizer network of that SIZE, all images of the request as one
batch → ab resized to each image's size, joined with its L, Lab → RGB (:func:`colour`), the alpha put
back → encoded on the CPU. The pixel steps are torch functions that run on CPU and CUDA tensors alike;
the Lab maths is :mod:`imgpipe.ensembles.lab` (scikit-image's formulas).

DDColor's reference script (``inference/colorization_pipeline.py``) resizes with OpenCV's bilinear
``cv2.resize`` (no antialiasing) on the way in, as here, and upsamples ab with ``F.interpolate``'s
default, nearest-neighbour; FaceFusion upsamples ab bilinearly (``cv2.resize``), as here.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F

from imgpipe.ensembles import lab
from imgpipe.ensembles.step import BlsStep, Outputs
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import ACCEPTED_FORMATS, decode_images, encode_image
from imgpipe.pipelines.colorize import CONTRACT, Settings

_JPEG_MAGIC = b"\xff\xd8"

Decoded = tuple[torch.Tensor, "torch.Tensor | None"]  # RGB uint8 H×W×3, alpha uint8 H×W (None: no alpha)


# -- decoding with the alpha channel ------------------------------------------------------------


def _has_alpha(image: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA) or a transparency entry (a palette's or a greyscale PNG's tRNS)."""
    return "A" in image.getbands() or "transparency" in image.info


def _with_alpha(data: bytes, max_pixels: int) -> Image.Image | None:
    """The opened (header-only) image when it carries alpha; None for everything else — JPEGs, images
    without alpha, and bytes that are not a valid image, which :func:`imgpipe.imaging.decode_images`
    refuses with its own sentences."""
    if data.startswith(_JPEG_MAGIC):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None
    width, height = image.size
    if width * height > max_pixels or not _has_alpha(image):
        return None
    return image


def decode(items: list[bytes], max_pixels: int, device: torch.device | str = "cpu") -> list[Decoded]:
    """Encoded images → (RGB ``H×W×3``, alpha ``H×W`` or None) uint8 tensors on ``device``, EXIF
    orientation applied. Images without alpha (all JPEGs) go through
    :func:`imgpipe.imaging.decode_images` (nvJPEG on a GPU), which also refuses bad bytes with its
    sentences; images with alpha are decoded once by Pillow as RGBA and split."""
    decoded: list[Decoded | None] = [None] * len(items)
    plain = []
    for i, data in enumerate(items):
        image = _with_alpha(data, max_pixels)
        if image is None:
            plain.append(i)
            continue
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidInputError(f"truncated or corrupt {image.format} image: {exc}") from None
        rgba = torch.from_numpy(np.array(image.convert("RGBA"), dtype=np.uint8)).to(device)
        decoded[i] = (rgba[..., :3].contiguous(), rgba[..., 3].contiguous())
    for i, rgb in zip(plain, decode_images([items[i] for i in plain], max_pixels, device), strict=True):
        decoded[i] = (rgb, None)
    return decoded  # type: ignore[return-value]


# -- DDColor's steps ----------------------------------------------------------------------------


def _unit(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``H×W×3`` → float32 ``1×3×H×W`` in [0, 1] (image / 255)."""
    return rgb.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """The full-resolution L (``H×W`` float32, 0-100) of uint8 ``H×W×3`` RGB: image/255 → Lab → L."""
    return lab.rgb8_to_lightness(rgb)


def network_input(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """The colorizer's input ``3×S×S`` float32 (the "grey RGB" in [0, 1]) from uint8 ``H×W×3`` RGB:
    image/255 resized to S×S (bilinear, no antialiasing, as DDColor's ``cv2.resize``), its L with
    a = b = 0, Lab → RGB."""
    x = F.interpolate(_unit(rgb), size=(size, size), mode="bilinear", align_corners=False)
    L = lab.rgb_to_lightness(x, dim=1)
    grey = torch.stack((L, torch.zeros_like(L), torch.zeros_like(L)), dim=1)
    return lab.lab_to_rgb(grey, dim=1)[0]


def colour(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """The colour image, uint8 ``H×W×3``, from the full-resolution L (``H×W``) and the network's ab
    (``2×s×s``, Lab units): ab resized to H×W (bilinear), joined with L, Lab → RGB (clipped), ×255."""
    height, width = L.shape
    ab = F.interpolate(ab.unsqueeze(0).to(torch.float32), size=(height, width), mode="bilinear", align_corners=False)
    rgb = lab.lab_to_rgb(torch.cat((L.reshape(1, 1, height, width), ab), dim=1), dim=1)[0]
    return (rgb * 255.0).round_().to(torch.uint8).permute(1, 2, 0)


def with_alpha(rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """``H×W×3`` RGB, or ``H×W×4`` RGBA with ``alpha`` put back unchanged."""
    return rgb if alpha is None else torch.cat((rgb, alpha.unsqueeze(-1)), dim=-1)


def refuse_jpeg_alpha(fmt: str, images: list[Decoded]) -> None:
    """JPEG has no alpha channel: an input with one cannot come back as JPEG (the caller's mistake)."""
    if fmt == "jpeg" and any(alpha is not None for _, alpha in images):
        raise InvalidInputError(
            "FORMAT jpeg cannot hold the alpha channel of this image: ask for FORMAT png or webp"
            " (colorize keeps the input's alpha unchanged)"
        )


# -- the BLS model ------------------------------------------------------------------------------


class Colorize(BlsStep):
    """Roles: ``"512"`` and ``"256"``, the network of each SIZE (written by the build)."""

    settings_type = Settings

    def options(self, request: Any) -> tuple[str, int]:
        """(FORMAT, SIZE) of the request, defaults filled in; an unknown value is the caller's mistake."""
        fmt = CONTRACT.input("FORMAT").choose(self.optional_string(request, "FORMAT"))
        size = int(CONTRACT.input("SIZE").choose(self.optional_string(request, "SIZE")))
        return fmt, size

    async def handle_async(self, request: Any) -> Outputs:
        fmt, size = self.options(request)  # before any decoding or network work
        items = self.bytes_items(request, "IMAGE")
        if not items:
            raise InvalidInputError("input 'IMAGE' holds no image")
        images = decode(items, self.settings.max_pixels, self.device)
        refuse_jpeg_alpha(fmt, images)
        pixels = torch.stack([network_input(rgb, size) for rgb, _ in images])
        (ab,) = await self.run(str(size), pixels)
        encoding = self.settings.encoder_options(fmt)
        encoded = [
            encode_image(with_alpha(colour(lightness(rgb), ab[i].to(self.device)), alpha), fmt, **encoding)
            for i, (rgb, alpha) in enumerate(images)
        ]
        return {"OUTPUT": np.array(encoded, dtype=object).reshape(-1, 1)}
