"""Decode and encode images with Pillow, refusing bad input with a message that names the problem."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgpipe.errors import InvalidInputError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000

# Our own pixel limit is checked before decoding; Pillow's bomb check must not pre-empt it with a
# different message, so it is set well above any limit a manifest would use.
Image.MAX_IMAGE_PIXELS = None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP image → RGB ``uint8`` array ``H×W×3``, EXIF orientation applied.

    Raises :class:`InvalidInputError` for empty bytes, bytes that are not an accepted image, an
    image larger than ``max_pixels`` (checked from the header, before any pixel is decoded) and a
    truncated or corrupt file.
    """
    if not data:
        raise InvalidInputError("empty input: the image has no bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError(f"not an image: the {len(data)} bytes are not a JPEG, PNG or WebP image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"truncated or corrupt {image.format} image: {exc}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # Palette/greyscale/CMYK/alpha images become RGB; an alpha channel is dropped, the segmenter decides.
        image = (
            image.convert("RGBA").convert("RGB")
            if "A" in image.getbands() or image.mode == "P"
            else image.convert("RGB")
        )
    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 92) -> bytes:
    """``H×W×3`` uint8 → PNG or JPEG bytes."""
    if fmt == "png":
        return encode_png(array)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """``H×W`` (L), ``H×W×3`` (RGB) or ``H×W×4`` (RGBA) ``uint8`` → PNG bytes (fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
