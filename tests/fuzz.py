"""Seeded fuzz corpora of the reliability tests (issue 12).

Images (:func:`image_corpus`, :func:`special_cases`): broken and unusual payloads for the image intake —
truncations, bit flips, corrupt EXIF, decompression bombs, odd modes, extreme sizes — with the right answer
for the special cases (tests/test_intake.py).

Requests (:func:`request_corpus`): calls to the five public pipelines, generated from each pipeline's declared
contract (its image inputs, option inputs and request parameters with their choices and ranges): the image
corpus, mutated valid images, bad option inputs, bad request parameters and valid requests
(tests/test_reliability.py). Everything is drawn from one seeded ``random.Random``: a size and a seed name
the corpus.
"""

from __future__ import annotations

import functools
import io
import math
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from imgpipe.pipelines import registry
from imgpipe.pipelines.registry import IO, Param
from imgpipe.samples import encode, sample_array

SEED = 12
MAX_MESSAGE = 300
MAX_ECHO = 40  # the longest run of the caller's input a message may quote

# -- images ------------------------------------------------------------------------------------------


def base_image(height: int = 48, width: int = 64, seed: int = SEED) -> np.ndarray:
    """A small RGB image with structure (gradients) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.dstack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256]).astype(np.int64)
    return (image + rng.integers(-20, 21, image.shape)).clip(0, 255).astype(np.uint8)


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def build_png(
    width: int,
    height: int,
    depth: int,
    colour: int,
    raw: bytes,
    before: tuple[bytes, ...] = (),
    after: tuple[bytes, ...] = (),
) -> bytes:
    """A PNG from its parts: IHDR, chunks ``before`` IDAT, IDAT (``raw`` zlib-compressed), ``after``, IEND."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    body = b"".join(before) + png_chunk(b"IDAT", zlib.compress(raw)) + b"".join(after)
    return b"\x89PNG\r\n\x1a\n" + header + body + png_chunk(b"IEND", b"")


def png_rows(array: np.ndarray) -> bytes:
    """PNG scanlines (filter 0) of a big-endian array ``H×W×…``."""
    return b"".join(b"\0" + row.tobytes() for row in array)


def exif_jpeg(jpeg: bytes, tiff: bytes) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding ``tiff`` (a TIFF header and IFD) after its SOI."""
    segment = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


def corrupt_exif(rng: random.Random) -> bytes:
    """A big-endian TIFF IFD whose first entry is Orientation 6, followed by random, mostly broken entries."""
    entries = [struct.pack(">HHII", 0x0112, 3, 1, 6 << 16)]
    for _ in range(rng.randint(2, 6)):
        tag = rng.choice([0x8769, 0x8825, 0x010F, 0x9286, 0x927C, 0xA005, rng.randint(0, 65535)])
        count = rng.choice([1, 2, 4, 100, 2**31 - 1, rng.randint(0, 2**32 - 1)])
        entries.append(struct.pack(">HHII", tag, rng.randint(0, 14), count, rng.randint(0, 2**32 - 1)))
    ifd = struct.pack(">H", len(entries)) + b"".join(entries) + struct.pack(">I", rng.choice([0, 8, 2**31]))
    return b"MM\0*" + struct.pack(">I", 8) + ifd + rng.randbytes(rng.randint(0, 40))


def raising_exif(jpeg: bytes, rng: random.Random, count: int) -> list[bytes]:
    """``count`` JPEGs with an Orientation-6 EXIF whose IFD is corrupt, two thirds of them ones that make
    Pillow's own ``exif_transpose`` raise (found by a seeded search: about one random IFD in ten does)."""
    raising, other = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(raising) < count * 2 // 3 or len(other) < count - count * 2 // 3:
            data = exif_jpeg(jpeg, corrupt_exif(rng))
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                ImageOps.exif_transpose(image)
            except Exception:  # what the intake must turn into InvalidInputError
                raising.append(data)
            else:
                other.append(data)
    return raising[: count * 2 // 3] + other[: count - count * 2 // 3]


def patch_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    at = jpeg.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height, width
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def webp_canvas(width: int, height: int) -> bytes:
    """A VP8X WebP header declaring a ``width×height`` canvas and no image data."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


# Payloads with a known right answer: name → (bytes, check of decode_image(bytes, alpha=...) or None to
# require a refusal).
Check = Callable[[np.ndarray, bool], None]


def exact(expected_rgb: np.ndarray, expected_alpha: np.ndarray | None = None, tolerance: int = 0) -> Check:
    def check(got: np.ndarray, alpha: bool) -> None:
        channels = 4 if alpha and expected_alpha is not None else 3
        assert got.shape == (*expected_rgb.shape[:2], channels) and got.dtype == np.uint8
        assert np.abs(got[..., :3].astype(int) - expected_rgb).max() <= tolerance
        if channels == 4:
            np.testing.assert_array_equal(got[..., 3], expected_alpha)

    return check


def special_cases() -> dict[str, tuple[bytes, Check | None]]:
    rng = np.random.default_rng(SEED)
    base = base_image()
    cases: dict[str, tuple[bytes, Check | None]] = {}
    cases["empty"] = (b"", None)
    # 16-bit greyscale: scaled to 8 bits, not clipped to 255.
    grey16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    expected = ((grey16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    cases["grey16 (Pillow)"] = (save(Image.fromarray(grey16), "PNG"), exact(np.repeat(expected[..., None], 3, 2)))
    raw = png_rows(grey16.astype(">u2"))
    trns = png_chunk(b"tRNS", struct.pack(">H", int(grey16[0, 5])))
    alpha16 = np.where(grey16 == grey16[0, 5], 0, 255).astype(np.uint8)
    cases["grey16 + tRNS"] = (
        build_png(64, 48, 16, 0, raw, (trns,)),
        exact(np.repeat(expected[..., None], 3, 2), alpha16),
    )
    rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    cases["rgb16"] = (
        build_png(30, 20, 16, 2, png_rows(rgb16.astype(">u2"))),
        exact((rgb16 >> 8).astype(np.uint8), None, 1),
    )
    # CMYK JPEG: pure cyan, magenta, yellow and black bands.
    cmyk = np.zeros((32, 48, 4), np.uint8)
    cmyk[:8, :, 0] = cmyk[8:16, :, 1] = cmyk[16:24, :, 2] = cmyk[24:, :, 3] = 255
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:8] = (0, 255, 255)
    rgb[8:16] = (255, 0, 255)
    rgb[16:24] = (255, 255, 0)
    cases["cmyk jpeg"] = (save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), exact(rgb, None, 12))
    # LA and palette + transparency: RGBA with alpha, RGB without.
    la = rng.integers(0, 256, (24, 40, 2), dtype=np.uint8)
    cases["LA png"] = (save(Image.fromarray(la, "LA"), "PNG"), exact(np.repeat(la[..., :1], 3, 2), la[..., 1]))
    palette = Image.fromarray(base).quantize(16)
    indices = np.asarray(palette)
    colours = np.asarray(palette.convert("RGB"))
    cases["P + tRNS png"] = (
        save(palette, "PNG", transparency=0),
        exact(colours, np.where(indices == 0, 0, 255).astype(np.uint8)),
    )
    grey = base[..., 0].copy()
    cases["L + tRNS png"] = (
        save(Image.fromarray(grey), "PNG", transparency=int(grey[0, 0])),
        exact(np.repeat(grey[..., None], 3, 2), np.where(grey == grey[0, 0], 0, 255).astype(np.uint8)),
    )
    cases["1-bit png"] = (
        save(Image.fromarray(grey > 128), "PNG"),
        exact(np.repeat(((grey > 128) * 255).astype(np.uint8)[..., None], 3, 2)),
    )
    # Animated: the first frame (WebP, APNG); GIF is not an accepted format.
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    first = np.asarray(frames[0])
    cases["animated webp"] = (
        save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50),
        exact(first, None, 2),
    )
    cases["animated png"] = (
        save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        exact(first),
    )
    cases["animated gif"] = (save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50), None)
    # EXIF orientation 6, intact: rotated.
    tall = base[:, :20].copy()
    oriented = save(Image.fromarray(tall), "PNG", exif=orientation_exif(6))
    cases["exif 6 png"] = (oriented, exact(np.rot90(tall, -1)))
    # Declared dimensions past the limits (checked from the header: no pixel is allocated).
    line = b"\0" + b"\x80" * 100
    cases["png 40000000x1"] = (build_png(40_000_000, 1, 8, 0, line), None)
    cases["png 1x40000000"] = (build_png(1, 40_000_000, 8, 0, b"\0\x80" * 100), None)
    cases["png 8000x8000"] = (build_png(8000, 8000, 8, 0, line), None)
    cases["png 16385x10"] = (build_png(16385, 10, 8, 0, line), None)
    cases["png 6500x100 (aspect 65)"] = (build_png(6500, 100, 8, 0, line), None)
    cases["png 0x0"] = (build_png(0, 0, 8, 0, b""), None)
    cases["png 6000x6000 truncated IDAT"] = (build_png(6000, 6000, 8, 0, line), None)
    jpeg = save(Image.fromarray(base), "JPEG", quality=90)
    cases["jpeg 65500x65500"] = (patch_jpeg_size(jpeg, 65500, 65500), None)
    cases["jpeg 60000x8"] = (patch_jpeg_size(jpeg, 8, 60000), None)
    cases["webp canvas 2^24x1"] = (webp_canvas(2**24, 1), None)
    cases["webp canvas 16384x16384"] = (webp_canvas(16384, 16384), None)
    # PNG text and ICC chunks that decompress past Pillow's MAX_TEXT_CHUNK (1 MiB), before and after IDAT.
    png = save(Image.fromarray(base), "PNG")
    bomb = zlib.compress(b"a" * 5_000_000, 9)
    for name, chunk in (
        ("zTXt", png_chunk(b"zTXt", b"comment\0\0" + bomb)),
        ("iCCP", png_chunk(b"iCCP", b"profile\0\0" + bomb)),
        ("iTXt", png_chunk(b"iTXt", b"comment\0\x01\0\0\0" + bomb)),
    ):
        cases[f"giant {name} before IDAT"] = (png[:33] + chunk + png[33:], None)
        cases[f"giant {name} after IDAT"] = (png[:-12] + chunk + png[-12:], None)
    # Not images; other formats; the caller's text must not come back.
    cases["html"] = (b"<html><body>" + b"A" * 5000 + b"</body></html>", None)
    cases["long ascii with png magic"] = (b"\x89PNG\r\n\x1a\n" + b"B" * 3000, None)
    cases["bmp"] = (save(Image.fromarray(base), "BMP"), None)
    cases["tiff"] = (save(Image.fromarray(base), "TIFF"), None)
    return cases


def orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def valid_images() -> dict[str, bytes]:
    """The small valid images (48×64, no face) that the corpora truncate, flip and splice."""
    base = Image.fromarray(base_image())
    return {
        "jpeg": save(base, "JPEG", quality=90),
        "progressive jpeg": save(base, "JPEG", quality=90, progressive=True),
        "png": save(base, "PNG"),
        "webp": save(base, "WEBP", quality=80),
        "lossless webp": save(base.convert("RGBA"), "WEBP", lossless=True),
    }


def flip_bits(rng: random.Random, data: bytes, flips: int) -> bytes:
    """``data`` with ``flips`` random bits inverted."""
    flipped = bytearray(data)
    for _ in range(flips):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def image_corpus(seed: int = SEED) -> list[tuple[str, bytes]]:
    """≥ 300 seeded payloads: truncations, bit flips, corrupt EXIF, random bytes, and the special cases."""
    rng = random.Random(seed)
    valid = valid_images()
    payloads = [(name, data) for name, (data, _) in special_cases().items()]
    payloads += list(valid.items())
    for name, data in valid.items():
        # Truncations: inside the header (every byte of the first 40) and at random offsets after it.
        offsets = sorted(set(range(1, 40, 3)) | {rng.randrange(40, len(data)) for _ in range(20)})
        payloads += [(f"{name} cut at {n}", data[:n]) for n in offsets]
        payloads += [(f"{name} bit flips {i}", flip_bits(rng, data, rng.randint(1, 4))) for i in range(14)]
    jpeg = valid["jpeg"]
    payloads += [(f"exif 6 corrupt IFD {i}", data) for i, data in enumerate(raising_exif(jpeg, rng, 30))]
    for i in range(20):
        payloads.append((f"random {i}", rng.randbytes(rng.choice([1, 7, 64, 1000, 20000]))))
    for magic in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBPVP8 "):
        payloads += [
            (f"magic {magic[:4]!r} + random {i}", magic + rng.randbytes(rng.randint(0, 400))) for i in range(8)
        ]
    return payloads


def echoes(message: str, data: bytes | str, longest: int = MAX_ECHO) -> bool:
    """Whether ``message`` quotes more than ``longest`` consecutive characters of ``data`` (bytes read as
    Latin-1, one character per byte)."""
    text = data if isinstance(data, str) else data.decode("latin-1")
    n = longest + 1
    return any(message[i : i + n] in text for i in range(len(message) - n + 1))


# -- requests to the public pipelines ----------------------------------------------------------------------

PUBLIC = ("remove_background", "detect_faces", "swap_face", "colorize", "reconstruct_face")
# What a request varies, and how often (weights): an image of the image corpus; a mutated valid image; a bad
# option input; bad request parameters; a valid request.
KINDS = {"image": 30, "mutated": 30, "option": 15, "parameter": 15, "valid": 10}
# Triton's own request parameters are not fuzzed here: the clients refuse to send sequence_id, sequence_start,
# sequence_end, priority and binary_data_output, and a small ``timeout`` (the queue timeout, which pipelines let a
# caller shorten) is rightly answered UNAVAILABLE. A malformed ``timeout`` is in tests/test_reliability.py.

ParameterValue = str | int | float | bool


@dataclass(frozen=True)
class Surface:
    """What a caller of one public model controls, read from the pipeline's contract: the required BYTES
    inputs (images), the optional ones (option strings), the outputs and the request parameters."""

    model: str
    batched: bool
    images: tuple[str, ...]
    options: tuple[IO, ...]
    outputs: tuple[str, ...]
    optional_outputs: tuple[str, ...]
    parameters: tuple[Param, ...]

    def tensor(self, *items: bytes) -> np.ndarray:
        """One BYTES input holding ``items``: ``[n, 1]`` for a batched model, ``[n]`` otherwise."""
        return np.array([[i] for i in items] if self.batched else list(items), dtype=object)


@functools.cache
def surfaces() -> dict[str, Surface]:
    known = registry()
    found = {}
    for name in PUBLIC:
        contract = known[name].contract
        found[name] = Surface(
            model=contract.model,
            batched=contract.batched,
            images=tuple(i.name for i in contract.inputs if not i.optional),
            options=tuple(i for i in contract.inputs if i.optional),
            outputs=tuple(o.name for o in contract.outputs if not o.optional),
            optional_outputs=tuple(o.name for o in contract.outputs if o.optional),
            parameters=contract.parameters,
        )
    return found


@dataclass(frozen=True)
class FuzzRequest:
    """One generated request: ``name`` says what it is (pipeline, kind, what was done to it)."""

    name: str
    model: str
    kind: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    parameters: dict[str, ParameterValue] | None = None

    def sent(self) -> list[bytes | str]:
        """Everything the caller sent, as bytes and as text, for the echo check."""
        items: list[bytes | str] = []
        for tensor in self.inputs.values():
            for value in tensor.reshape(-1):
                items += [bytes(value), bytes(value).decode("utf-8", errors="replace")]
        for key, value in (self.parameters or {}).items():
            items += [key, str(value)]
        return items


@functools.cache
def face_image() -> bytes:
    """A small photo with one face (the astronaut, 128×128 JPEG): the face pipelines do their whole work on it."""
    return encode(np.asarray(Image.fromarray(sample_array("astronaut")).resize((128, 128))), "JPEG")


def mutate(rng: random.Random, data: bytes, other: bytes) -> tuple[str, bytes]:
    """A random mutation of a valid image ``data`` (``other``: a second image to splice in), and its name."""
    n = len(data)
    at, span = rng.randrange(n), rng.randint(1, 64)
    mutations: dict[str, Callable[[], bytes]] = {
        "bit flips": lambda: flip_bits(rng, data, rng.randint(1, 8)),
        "overwrite": lambda: data[:at] + rng.randbytes(span) + data[at + span :],
        "truncate": lambda: data[:at],
        "splice": lambda: data[:at] + other[rng.randrange(len(other)) :],
        "insert": lambda: data[:at] + rng.randbytes(span) + data[at:],
        "delete": lambda: data[:at] + data[at + span :],
        "repeat": lambda: data[:at] + data[at : at + span] * rng.randint(2, 200) + data[at:],
        "zero tail": lambda: data[:at] + bytes(n - at),
        "random bytes": lambda: rng.randbytes(rng.choice([1, 3, 12, 100, 4096, 65536])),
        "empty": lambda: b"",
    }
    how = rng.choice(list(mutations))
    return f"{how} at {at}", mutations[how]()


def bad_text(rng: random.Random) -> tuple[str, bytes]:
    """A bad option string: unknown, empty, huge (a 20,000-character BACKGROUND once overflowed the gRPC
    trailer), non-UTF-8, control characters, format strings."""
    size = rng.choice([41, 300, 5000, 20000])
    texts: dict[str, Callable[[], bytes]] = {
        "unknown": lambda: rng.choice([b"gif", b"tiff", b"rgb", b"alpha", b"1024", b"none", b"null", b"0", b"-1"]),
        "empty": lambda: b"",
        "blank": lambda: b" \t\n",
        f"{size} characters": lambda: rng.choice(b"xZ#9").to_bytes(1, "big") * size,
        f"{size} UTF-8 characters": lambda: ("é" * size).encode(),
        "non-UTF-8": lambda: b"\xff" + rng.randbytes(rng.choice([1, 40, 3000])),
        "NUL": lambda: rng.choice([b"png\0", b"\0" * 10, b"mask\0rgba"]),
        "format string": lambda: b"%s%n%x{0}{}${x}",
        "padded": lambda: b"png" + b" " * 5000 + b"x",
    }
    how = rng.choice(list(texts))
    return how, texts[how]()


def valid_option(rng: random.Random, option: IO) -> bytes:
    """A value the option accepts (case and surrounding blanks vary; they are ignored)."""
    if option.choices:
        value = rng.choice(option.choices)
    else:  # BACKGROUND: a colour
        value = rng.choice(["white", "#00ff00", "#0f0", "rgb(10, 20, 30)", "hsl(120, 50%, 50%)", "Red"])
    return rng.choice([value, value.upper(), f" {value} "]).encode()


def valid_parameter(rng: random.Random, param: Param) -> ParameterValue:
    if param.type == "string":
        return rng.choice([*param.choices, *(["0", "1"] if param.or_index else [])])
    low = param.low if param.low is not None else 0.0
    high = param.high if param.high is not None else low + 1.0
    if param.type == "int":
        return rng.randint(int(low), int(min(high, low + 100)))
    return round(rng.uniform(low, high), 3)


def bad_parameter(rng: random.Random, param: Param) -> ParameterValue:
    """A value of the wrong type, out of range, not a number, huge, or a near miss."""
    huge = rng.choice(["9", "x", "é"]) * rng.choice([300, 5000, 20000])
    common: list[ParameterValue] = ["", " ", "None", "nan", huge, True, False, "１２", "0x10", "1e400"]
    if param.type == "string":
        near = [c.upper() for c in param.choices] + [f"  {c}  " for c in param.choices]
        return rng.choice([*common, *near, "-1", "1.5", "99999999999", "all,largest", 3, -2, 1.5, math.nan])
    low = param.low if param.low is not None else 0.0
    high = param.high if param.high is not None else 1.0
    numbers: list[ParameterValue] = [math.nan, math.inf, -math.inf, low - 1, high + 1, high * 10, -1e308, 1e308]
    numbers += [2**63 - 1, -(2**63), "abc", f" {low} ", str(high), low + 0.5 if param.type == "int" else "0.5"]
    return rng.choice([*common, *numbers])


def unknown_parameter(rng: random.Random, surface: Surface) -> str:
    declared = {p.name for p in surface.parameters}
    names = ["foo", "MODE", "faces", "min_face_size", "Min_Face_Size", "format ", "", "é", "imgpipe.bls_caller"]
    names += ["imgpipe.internal_key", "x" * 300, "y" * 20000, "a.b.c", "\u202e"]
    return rng.choice([n for n in names if n not in declared])


def _inputs(
    surface: Surface, images: dict[str, bytes], options: dict[str, bytes], first: bytes | None = None
) -> dict[str, np.ndarray]:
    """The request's tensors; with ``first`` (a valid image) a batch of two, ``first`` before each image."""
    if first is None:
        return {name: surface.tensor(value) for name, value in (images | options).items()}
    pairs = {name: surface.tensor(first, data) for name, data in images.items()}
    return pairs | {name: surface.tensor(value, value) for name, value in options.items()}


def request_corpus(size: int, seed: int = SEED) -> list[FuzzRequest]:
    """``size`` requests, the five public pipelines in turn, kinds drawn by ``KINDS``' weights. Requests that
    run the face pipelines' whole work (seconds on a CPU) are capped at ``max(4, size // 250)`` per pipeline."""
    rng = random.Random(seed)
    images = image_corpus()
    valid = list(valid_images().values())
    small = valid[0]
    costly_left = {name: max(4, size // 250) for name in ("swap_face", "reconstruct_face")}
    corpus = []
    for index in range(size):
        surface = surfaces()[PUBLIC[index % len(PUBLIC)]]
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "option" and not surface.options:
            kind = "parameter"
        # Every image input gets the small valid image (no face: the face pipelines stop early), one gets
        # the image under test; option inputs and parameters are left out unless the kind varies them.
        slot = rng.choice(surface.images)
        chosen = dict.fromkeys(surface.images, small)
        options: dict[str, bytes] = {}
        parameters: dict[str, ParameterValue] = {}
        outputs = surface.outputs
        first = None
        if kind == "image":
            detail, chosen[slot] = rng.choice(images)
            if surface.batched and rng.random() < 0.2:
                first = rng.choice(valid)  # a batch of two: the valid image must not hide the bad one's refusal
                detail = f"batch of a valid image and {detail}"
        elif kind == "mutated":
            detail, chosen[slot] = mutate(rng, rng.choice(valid), rng.choice(valid))
        elif kind == "option":
            option = rng.choice(surface.options)
            how, options[option.name] = bad_text(rng)
            detail = f"{option.name} {how}"
            if rng.random() < 0.3:  # the other options valid; some combinations are refused (jpeg with alpha)
                options |= {o.name: valid_option(rng, o) for o in surface.options if o is not option}
                chosen[slot] = rng.choice(valid)
        elif kind == "parameter":
            for _ in range(rng.randint(1, 3)):
                if surface.parameters and rng.random() < 0.7:
                    param = rng.choice(surface.parameters)
                    parameters[param.name] = bad_parameter(rng, param)
                else:
                    parameters[unknown_parameter(rng, surface)] = rng.choice([1, 0.5, "x", True])
            detail = ", ".join(f"{k[:20]!r}={str(v)[:20]!r}" for k, v in parameters.items())
        else:
            chosen[slot] = rng.choice(valid)
            options = {o.name: valid_option(rng, o) for o in surface.options if rng.random() < 0.7}
            parameters = {p.name: valid_parameter(rng, p) for p in surface.parameters if rng.random() < 0.5}
            if surface.model in costly_left:  # faces to work on, within the cap; else one face at most
                costly = costly_left[surface.model] > 0 and rng.random() < 0.5
                costly_left[surface.model] -= costly
                if costly:
                    chosen = dict.fromkeys(surface.images, face_image())
                elif len(surface.images) > 1:
                    chosen[slot] = face_image()  # swap_face: a face in one image only, nothing to swap
            elif surface.model == "detect_faces":
                chosen[slot] = rng.choice([face_image(), chosen[slot]])
            if surface.optional_outputs and rng.random() < 0.3:
                outputs = outputs + surface.optional_outputs
            detail = "options " + ", ".join(f"{k}={v!r}" for k, v in {**options, **parameters}.items())
        corpus.append(
            FuzzRequest(
                name=f"#{index} {surface.model} {kind}: {detail[:80]}",
                model=surface.model,
                kind=kind,
                inputs=_inputs(surface, chosen, options, first),
                outputs=outputs,
                parameters=parameters or None,
            )
        )
    return corpus
