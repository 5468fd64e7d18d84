"""Decode and encode images, refusing bad input with a message that names the problem.

The one place imgpipe decodes and encodes pixels. Decoding: Pillow on the CPU (:func:`decode_image`), and
:func:`decode_images` for a step's batch on its device, which hands JPEGs to nvJPEG (``torchvision.io``)
when the device is a GPU and torchvision is importable. Encoding (:func:`encode_image`): Pillow on the
CPU, PNG, WebP or JPEG (no GPU encoder exists for PNG; ``python -m imgpipe.encode_bench`` measures them).

torch and torchvision are imported where they are used: the CPU build of torch has no torchvision, and
nothing that only decodes with Pillow needs torch.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgpipe.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000

OutputFormat = Literal["png", "webp", "jpeg"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "webp", "jpeg")
# libwebp's effort (0 fastest … 6 smallest). 4 is Pillow's default; see encode_bench for the figures.
WEBP_METHOD = 4
# Lossless WebP has a second effort knob (its "quality", 0-100); it is tied to the method as cwebp's
# lossless presets (-z 0 … 9) tie them, taking each method's lightest preset. At method 0 a larger
# effort costs up to 3.5× the time for under 1 % of size (encode_bench).
_LOSSLESS_EFFORT = {0: 0, 1: 20, 2: 25, 3: 30, 4: 50, 5: 90, 6: 100}

# Our own pixel limit is checked before decoding; Pillow's bomb check must not pre-empt it with a
# different message, so it is set well above any limit a manifest would use.
Image.MAX_IMAGE_PIXELS = None

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


# -- decoding ------------------------------------------------------------------------------------


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's header-only open with imgpipe's checks: empty, not an accepted image, above the pixel limit."""
    if not data:
        raise InvalidInputError("empty input: the image has no bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError(f"not an image: the {len(data)} bytes are not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header cut short or corrupt
        raise InvalidInputError(f"truncated or corrupt image header ({len(data)} bytes): {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP image → RGB ``uint8`` array ``H×W×3``, EXIF orientation applied.

    Raises :class:`InvalidInputError` for empty bytes, bytes that are not an accepted image, an
    image larger than ``max_pixels`` (checked from the header, before any pixel is decoded) and a
    truncated or corrupt file.
    """
    image = _open_checked(data, max_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"truncated or corrupt {image.format} image: {exc}") from None
    if image.mode != "RGB":
        # Palette/greyscale/CMYK/alpha images become RGB; an alpha channel is dropped, the segmenter decides.
        image = (
            image.convert("RGBA").convert("RGB")
            if "A" in image.getbands() or image.mode == "P"
            else image.convert("RGB")
        )
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def decode_images(
    items: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Encoded images → RGB ``uint8`` tensors ``H×W×3`` on ``device``, EXIF orientation applied.

    On a CUDA device with torchvision importable, the JPEGs are checked from their headers with Pillow
    (the same :class:`InvalidInputError` sentences as :func:`decode_image`) and decoded as one batch by
    nvJPEG; whatever nvJPEG is not given (CMYK, files without an end marker, i.e. truncated) or refuses
    is decoded by :func:`decode_image`, so a bad file gets Pillow's wording. Everything else — other
    formats, a CPU device, no torchvision — goes through :func:`decode_image` item by item.
    """
    import torch

    device = torch.device(device)
    decoded: list[torch.Tensor | None] = [None] * len(items)
    decode_jpeg = _nvjpeg() if device.type == "cuda" else None
    if decode_jpeg is not None:
        jpegs = {i: orientation for i, data in enumerate(items) if (orientation := _nvjpeg_candidate(data, max_pixels))}
        if jpegs:
            for i, chw in zip(jpegs, _decode_jpegs(decode_jpeg, [items[i] for i in jpegs], device), strict=True):
                if chw is not None:
                    decoded[i] = orient(chw.permute(1, 2, 0), jpegs[i]).contiguous()
    return [
        image if image is not None else torch.from_numpy(decode_image(data, max_pixels)).to(device)
        for image, data in zip(decoded, items, strict=True)
    ]


@functools.cache
def _nvjpeg() -> Any:
    """torchvision's ``decode_jpeg`` bound to RGB output, or None where torchvision is not importable."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, OSError, RuntimeError):  # absent (CPU build of torch), or built against another torch
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def _nvjpeg_candidate(data: bytes, max_pixels: int) -> int:
    """For a JPEG nvJPEG may decode: its EXIF orientation (1-8; 1 = as stored); 0 for every other input.

    Raises the header errors of :func:`decode_image` (not an image, above the pixel limit) here, before
    any pixel is decoded. A JPEG without its end marker (a truncated file) and anything but 8-bit
    RGB/greyscale (CMYK, YCCK) is left to Pillow, which decodes it or names the problem.
    """
    if not data.startswith(_JPEG_MAGIC):
        return 0
    image = _open_checked(data, max_pixels)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.rstrip(b"\0").endswith(_JPEG_END):
        return 0
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in _ORIENT else 1


def _decode_jpegs(decode_jpeg: Any, items: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG over ``items`` as one batch; when the batch fails, item by item (None where nvJPEG refuses).

    ``apply_exif_orientation`` is not passed: torchvision implements it on the CPU only and ignores it
    for CUDA, so :func:`orient` applies the orientation read from the header instead.
    """
    import torch

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in items]
    try:
        return list(decode_jpeg(tensors, device=device))
    except RuntimeError:
        pass
    results: list[torch.Tensor | None] = []
    for tensor in tensors:
        try:
            results.append(decode_jpeg([tensor], device=device)[0])
        except RuntimeError:
            results.append(None)
    return results


# EXIF orientation → the transform that displays the stored H×W×C pixels upright (PIL.ImageOps.exif_transpose).
_ORIENT: dict[int, Any] = {
    1: lambda x: x,
    2: lambda x: x.flip(1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(0, 1),  # ROTATE_180
    4: lambda x: x.flip(0),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(0, 1),  # TRANSPOSE
    6: lambda x: x.transpose(0, 1).flip(1),  # ROTATE_270: 90° clockwise
    7: lambda x: x.flip(0, 1).transpose(0, 1),  # TRANSVERSE
    8: lambda x: x.transpose(0, 1).flip(0),  # ROTATE_90: 90° counter-clockwise
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An ``H×W×C`` tensor stored with EXIF ``orientation`` → the upright image (a view, on its device)."""
    return _ORIENT.get(orientation, _ORIENT[1])(image)


# -- encoding ------------------------------------------------------------------------------------


def encode_image(
    image: np.ndarray | torch.Tensor,
    fmt: str = "png",
    *,
    png_level: int = 1,
    quality: int = 92,
    lossless: bool = False,
    webp_method: int = WEBP_METHOD,
) -> bytes:
    """``H×W`` (L), ``H×W×3`` (RGB) or ``H×W×4`` (RGBA) ``uint8`` → PNG, WebP or JPEG bytes.

    A tensor is brought to the CPU here (``.cpu().numpy()``): callers keep pixels on their device up
    to this call. ``png_level`` is zlib's level (0-9; Pillow's default 6 took 5× the time of 1 for
    14 % less size on a cut-out); ``quality`` is JPEG's and lossy WebP's (1-100); ``lossless`` selects
    lossless WebP and ``webp_method`` libwebp's effort (0-6) in both WebP modes.

    WebP has no greyscale: an ``H×W`` image is stored as RGB (R = G = B). WebP keeps alpha exactly in
    both modes (lossy WebP compresses only the colour), and, as libwebp does by default, it may change
    the colour under fully transparent pixels (invisible; it halves a lossless cut-out). JPEG has no
    alpha: an ``H×W×4`` image raises :class:`ValueError` (a pipeline refuses that combination before
    any work, as the caller's mistake).
    """
    array = np.ascontiguousarray(image.cpu().numpy() if hasattr(image, "cpu") else image)
    options: dict[str, Any]
    if fmt == "png":
        options = {"format": "PNG", "compress_level": png_level}
    elif fmt == "jpeg":
        if array.ndim == 3 and array.shape[2] == 4:
            raise ValueError("JPEG cannot hold an alpha channel: encode RGBA as PNG or WebP")
        options = {"format": "JPEG", "quality": quality}
    elif fmt == "webp":
        if webp_method not in _LOSSLESS_EFFORT:
            raise ValueError(f"webp_method must be within 0..6, got {webp_method}")
        effort = _LOSSLESS_EFFORT[webp_method] if lossless else quality
        options = {"format": "WEBP", "quality": effort, "lossless": lossless, "method": webp_method}
    else:
        raise ValueError(f"unknown image format {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, **options)
    return buffer.getvalue()


def encode_png(array: np.ndarray | torch.Tensor, compress_level: int = 1) -> bytes:
    """``H×W`` (L), ``H×W×3`` (RGB) or ``H×W×4`` (RGBA) ``uint8`` → PNG bytes (fast compression)."""
    return encode_image(array, "png", png_level=compress_level)
