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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from imgpipe.errors import InvalidInputError
from imgpipe.manifest import QueuePolicy, pipeline_queue

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
# different message, so it is switched off (the intake's limits below are stricter).
Image.MAX_IMAGE_PIXELS = None
# A truncated file must fail, not decode with grey where the data stopped (Pillow's default, made explicit).
ImageFile.LOAD_TRUNCATED_IMAGES = False
# PNG text/ICC chunks decompressing past PngImagePlugin.MAX_TEXT_CHUNK (1 MiB, Pillow's default, kept) raise
# ValueError("Decompressed data too large ..."): refused below as metadata past the limit.

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112

# The intake's limits (per pipeline in the manifest: max_bytes, max_pixels, max_side, max_aspect).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SIDE = 16384
DEFAULT_MAX_ASPECT = 64.0
# How much of an exception's text (which may quote the caller's bytes) a message may carry.
_DETAIL_CHARS = 40
# Other formats callers send by mistake, named in the refusal (their magic numbers).
_OTHER_FORMATS = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
    (b"\0\0\0\x0cjP", "JPEG 2000"),
)


@dataclass(frozen=True)
class IntakeLimits:
    """What the image intake accepts, checked before any pixel is decoded: the encoded size in bytes,
    the pixel count, the longest side and the aspect ratio (longest side / shortest side)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT

    def __post_init__(self) -> None:
        for key in ("max_bytes", "max_pixels", "max_side"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"max_aspect: must be at least 1 (a square), got {self.max_aspect}")

    @classmethod
    def of(cls, settings: Any) -> IntakeLimits:
        """The limits of a pipeline's settings (fields it lacks keep the defaults)."""
        if settings is None:
            return cls()
        names = ("max_bytes", "max_pixels", "max_side", "max_aspect")
        return cls(**{n: getattr(settings, n) for n in names if getattr(settings, n, None) is not None})


def check_limits(settings: Any) -> None:
    """For a pipeline settings' ``__post_init__``: raise ``ManifestError`` when its intake limits are invalid."""
    try:
        IntakeLimits.of(settings)
    except ValueError as exc:
        from imgpipe.manifest import ManifestError

        raise ManifestError(str(exc)) from None


@dataclass(frozen=True)
class IntakeSettings:
    """A pipeline's front door as manifest keys, inherited by every pipeline's ``Settings`` (which call this
    ``__post_init__``): the intake limits (past one a request gets INVALID_ARG, before any pixel is decoded)
    and ``queue``, the bounded queue of the pipeline's own models (``[pipelines.<name>.queue]``: past
    ``max_queue_size`` waiting requests a caller gets UNAVAILABLE at once, before its image is decoded)."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    max_bytes: int = DEFAULT_MAX_BYTES  # the encoded size
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT  # longest side / shortest side
    queue: QueuePolicy = field(default_factory=pipeline_queue)

    def __post_init__(self) -> None:
        check_limits(self)


def _limits(max_pixels: int | IntakeLimits, limits: IntakeLimits | None) -> IntakeLimits:
    if limits is not None:
        return limits
    return max_pixels if isinstance(max_pixels, IntakeLimits) else IntakeLimits(max_pixels=max_pixels)


def _detail(exc: BaseException) -> str:
    """An exception's text for a caller's message: one line, ASCII, at most a few dozen characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _refusal(what: str, exc: BaseException) -> InvalidInputError:
    """The caller's sentence for a decoder's exception (Pillow's limits get their own words)."""
    if "Decompressed data too large" in str(exc):
        return InvalidInputError(
            f"{what}: a PNG text or ICC-profile chunk decompresses past the limit of "
            f"{PngImagePlugin.MAX_TEXT_CHUNK} bytes"
        )
    if isinstance(exc, Image.DecompressionBombError):
        return InvalidInputError(f"{what}: the image declares more pixels than accepted")
    return InvalidInputError(f"{what}: {_detail(exc)}")


# -- decoding ------------------------------------------------------------------------------------


def _open_checked(data: bytes, max_pixels: int | IntakeLimits, limits: IntakeLimits | None = None) -> Image.Image:
    """Pillow's header-only open with imgpipe's checks, all before any pixel is decoded: empty, over the
    byte limit, not an accepted image, a corrupt header, above the pixel limit, a side too long, an
    aspect ratio too extreme."""
    limits = _limits(max_pixels, limits)
    if not data:
        raise InvalidInputError("empty input: the image has no bytes")
    if len(data) > limits.max_bytes:
        raise InvalidInputError(f"image too large: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        other = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
        hint = f" ({other} is not accepted)" if other else ""
        raise InvalidInputError(
            f"not an image: the {len(data)} bytes are not a JPEG, PNG or WebP image{hint}"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # a header cut short or corrupt; Pillow's own limits (text chunks)
        raise _refusal(f"truncated or corrupt image header ({len(data)} bytes)", exc) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has no pixels: it declares {width}x{height}")
    if width * height > limits.max_pixels:
        raise InvalidInputError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise InvalidInputError(
            f"image too large: {width}x{height} has a side over the limit of {limits.max_side} pixels"
        )
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise InvalidInputError(
            f"image too elongated: {width}x{height} exceeds the aspect-ratio limit of {limits.max_aspect:g}:1"
        )
    return image


def _to_array(image: Image.Image, alpha: bool, fmt: str | None) -> np.ndarray:
    """A loaded, upright image → ``uint8`` ``H×W×3`` RGB, or ``H×W×4`` RGBA when ``alpha`` and it has alpha.

    16-bit greyscale (I;16, I) is scaled to 8 bits (v / 257, rounded), not clipped; CMYK and YCbCr go
    to RGB by Pillow's conversion (no colour management: ICC profiles are ignored); palette, LA and
    greyscale/RGB with a transparency entry become RGBA (or RGB without ``alpha``: the colour under
    transparent pixels as stored).
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        transparency = image.info.get("transparency")
        if alpha and isinstance(transparency, int):
            return np.dstack([rgb, np.where(values == transparency, 0, 255).astype(np.uint8)])
        return rgb
    if mode not in ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "RGBX"):
        raise InvalidInputError(f"unsupported pixel mode {mode!r} in the {fmt} image")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        return np.array(rgba if alpha else rgba.convert("RGB"), dtype=np.uint8)
    return np.array(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def decode_image(
    data: bytes,
    max_pixels: int | IntakeLimits = DEFAULT_MAX_PIXELS,
    *,
    limits: IntakeLimits | None = None,
    alpha: bool = False,
) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP image → RGB ``uint8`` array ``H×W×3``, EXIF orientation applied — the one
    image intake of every pipeline.

    With ``alpha``, an image with an alpha channel or a transparency entry comes back ``H×W×4`` (RGBA).
    Animated PNG and WebP: the first frame. Raises :class:`InvalidInputError`, a short sentence quoting
    at most a few dozen characters of anything the caller sent, for empty bytes, bytes over the limit,
    bytes that are not an accepted image, an image over the pixel, side or aspect-ratio limits (checked
    from the header, before any pixel is decoded), a truncated or corrupt file, PNG text/ICC chunks
    decompressing past Pillow's limit, corrupt EXIF metadata and unsupported pixel modes. ``limits``
    (:class:`IntakeLimits`) wins over ``max_pixels``.
    """
    image = _open_checked(data, max_pixels, limits)
    fmt = image.format
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _refusal(f"truncated or corrupt {fmt} image", exc) from None
    try:
        image = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise _refusal(f"corrupt EXIF metadata in the {fmt} image", exc) from None
    try:
        return _to_array(image, alpha, fmt)
    except (InvalidInputError, MemoryError):
        raise
    except Exception as exc:
        raise _refusal(f"corrupt {fmt} image", exc) from None


def decode_images(
    items: list[bytes],
    max_pixels: int | IntakeLimits = DEFAULT_MAX_PIXELS,
    device: torch.device | str = "cpu",
    *,
    limits: IntakeLimits | None = None,
    alpha: bool = False,
) -> list[torch.Tensor]:
    """Encoded images → RGB ``uint8`` tensors ``H×W×3`` on ``device``, EXIF orientation applied (with
    ``alpha``: ``H×W×4`` for images with alpha, as :func:`decode_image`). Each item is its own tensor:
    a batch is never padded to a common size.

    On a CUDA device with torchvision importable, the JPEGs are checked from their headers with Pillow
    (the same :class:`InvalidInputError` sentences as :func:`decode_image`) and decoded as one batch by
    nvJPEG; whatever nvJPEG is not given (CMYK, files without an end marker, i.e. truncated) or refuses
    is decoded by :func:`decode_image`, so a bad file gets Pillow's wording. Everything else — other
    formats, a CPU device, no torchvision — goes through :func:`decode_image` item by item.
    """
    import torch

    limits = _limits(max_pixels, limits)
    device = torch.device(device)
    decoded: list[torch.Tensor | None] = [None] * len(items)
    decode_jpeg = _nvjpeg() if device.type == "cuda" else None
    if decode_jpeg is not None:
        jpegs = {i: orientation for i, data in enumerate(items) if (orientation := _nvjpeg_candidate(data, limits))}
        if jpegs:
            for i, chw in zip(jpegs, _decode_jpegs(decode_jpeg, [items[i] for i in jpegs], device), strict=True):
                if chw is not None:
                    decoded[i] = orient(chw.permute(1, 2, 0), jpegs[i]).contiguous()
    return [
        image if image is not None else torch.from_numpy(decode_image(data, limits=limits, alpha=alpha)).to(device)
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


def _nvjpeg_candidate(data: bytes, limits: IntakeLimits) -> int:
    """For a JPEG nvJPEG may decode: its EXIF orientation (1-8; 1 = as stored); 0 for every other input.

    Raises the header errors of :func:`decode_image` (not an image, above the pixel limit) here, before
    any pixel is decoded. A JPEG without its end marker (a truncated file) and anything but 8-bit
    RGB/greyscale (CMYK, YCCK) is left to Pillow, which decodes it or names the problem.
    """
    if not data.startswith(_JPEG_MAGIC):
        return 0
    image = _open_checked(data, limits)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.rstrip(b"\0").endswith(_JPEG_END):
        return 0
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # corrupt EXIF: left to decode_image, which names the problem
        return 0
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
