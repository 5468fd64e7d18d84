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

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from imgpipe.ensembles import lab
from imgpipe.ensembles.step import BlsStep, Outputs, Pending
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import IntakeLimits, decode_images, encode_image
from imgpipe.pipelines.colorize import CONTRACT, Settings
from imgpipe.samples import encode

Decoded = tuple[torch.Tensor, "torch.Tensor | None"]  # RGB uint8 H×W×3, alpha uint8 H×W (None: no alpha)


# -- decoding with the alpha channel ------------------------------------------------------------


def decode(items: list[bytes], max_pixels: int | IntakeLimits, device: torch.device | str = "cpu") -> list[Decoded]:
    """Encoded images → (RGB ``H×W×3``, alpha ``H×W`` or None) uint8 tensors on ``device``, EXIF
    orientation applied: the shared image intake (:func:`imgpipe.imaging.decode_images` with ``alpha``:
    its limits and refusals, nvJPEG for JPEGs on a GPU), whose RGBA images (an alpha band or a
    transparency entry: RGBA, LA, PA, a palette's or a greyscale PNG's tRNS) are split here."""
    decoded = []
    for image in decode_images(items, max_pixels, device, alpha=True):
        if image.shape[-1] == 4:
            decoded.append((image[..., :3].contiguous(), image[..., 3].contiguous()))
        else:
            decoded.append((image, None))
    return decoded


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

    def warm_up(self) -> None:
        """nvJPEG, the Lab conversions and the resizes start here, not in the first request (that one took
        2.0 s on an H100 without this)."""
        super().warm_up()
        if self.device.type == "cuda":
            jpeg = encode(np.full((48, 64, 3), 90, dtype=np.uint8), "JPEG")
            ((rgb, _),) = decode([jpeg], IntakeLimits.of(self.settings), self.device)
            for size in {int(s) for s in self.networks}:
                network_input(rgb, size)
            colour(lightness(rgb), torch.zeros((2, 8, 8), device=self.device))
            torch.cuda.synchronize(self.device)

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
        images = decode(items, IntakeLimits.of(self.settings), self.device)
        refuse_jpeg_alpha(fmt, images)
        pixels = torch.stack([network_input(rgb, size) for rgb, _ in images])
        (ab,) = await self.run(str(size), pixels)
        encoding = self.settings.encoder_options(fmt)
        encoded = [
            self.encode(encode_image, with_alpha(colour(lightness(rgb), ab[i].to(self.device)), alpha), fmt, **encoding)
            for i, (rgb, alpha) in enumerate(images)
        ]
        return {"OUTPUT": Pending(encoded, (-1, 1))}
