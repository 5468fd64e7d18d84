"""The image intake (:func:`imgpipe.imaging.decode_image`), the one path every pipeline decodes through, on a
generated, seeded corpus of broken and unusual payloads (issue 12): each payload either decodes to a
correct RGB/RGBA ``uint8`` array or is refused with :class:`InvalidInputError`, a short sentence that
quotes at most a few dozen characters of the input. A bounded sample of the corpus is then sent to the
served pipelines: INVALID_ARG or success, never INTERNAL, and the server keeps serving."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from imgpipe.clients.colorize import colorize_one
from imgpipe.clients.faces import detect_faces
from imgpipe.clients.remove_background import remove_background
from imgpipe.clients.triton import InferenceError, TritonClient, bytes_tensor
from imgpipe.ensembles import colorize as colorize_steps
from imgpipe.ensembles.remove_background import pack, unpack
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import IntakeLimits, decode_image, decode_images
from imgpipe.manifest import ManifestError
from imgpipe.pipelines import colorize
from imgpipe.pipelines import detect_faces as detect_settings
from imgpipe.pipelines import remove_background as rb_settings

SEED = 12
MAX_MESSAGE = 300
MAX_ECHO = 40  # the longest run of the caller's input a message may quote

# -- building payloads -----------------------------------------------------------------------------


def _base(height: int = 48, width: int = 64, seed: int = SEED) -> np.ndarray:
    """A small RGB image with structure (gradients) and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.dstack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256]).astype(np.int64)
    return (image + rng.integers(-20, 21, image.shape)).clip(0, 255).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(
    width: int,
    height: int,
    depth: int,
    colour: int,
    raw: bytes,
    before: tuple[bytes, ...] = (),
    after: tuple[bytes, ...] = (),
) -> bytes:
    """A PNG from its parts: IHDR, chunks ``before`` IDAT, IDAT (``raw`` zlib-compressed), ``after``, IEND."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    body = b"".join(before) + _chunk(b"IDAT", zlib.compress(raw)) + b"".join(after)
    return b"\x89PNG\r\n\x1a\n" + header + body + _chunk(b"IEND", b"")


def _rows(array: np.ndarray) -> bytes:
    """PNG scanlines (filter 0) of a big-endian array ``H×W×…``."""
    return b"".join(b"\0" + row.tobytes() for row in array)


def _exif_jpeg(jpeg: bytes, tiff: bytes) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding ``tiff`` (a TIFF header and IFD) after its SOI."""
    segment = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


def _corrupt_exif(rng: random.Random) -> bytes:
    """A big-endian TIFF IFD whose first entry is Orientation 6, followed by random, mostly broken entries."""
    entries = [struct.pack(">HHII", 0x0112, 3, 1, 6 << 16)]
    for _ in range(rng.randint(2, 6)):
        tag = rng.choice([0x8769, 0x8825, 0x010F, 0x9286, 0x927C, 0xA005, rng.randint(0, 65535)])
        count = rng.choice([1, 2, 4, 100, 2**31 - 1, rng.randint(0, 2**32 - 1)])
        entries.append(struct.pack(">HHII", tag, rng.randint(0, 14), count, rng.randint(0, 2**32 - 1)))
    ifd = struct.pack(">H", len(entries)) + b"".join(entries) + struct.pack(">I", rng.choice([0, 8, 2**31]))
    return b"MM\0*" + struct.pack(">I", 8) + ifd + rng.randbytes(rng.randint(0, 40))


def _raising_exif(jpeg: bytes, rng: random.Random, count: int) -> list[bytes]:
    """``count`` JPEGs with an Orientation-6 EXIF whose IFD is corrupt, two thirds of them ones that make
    Pillow's own ``exif_transpose`` raise (found by a seeded search: about one random IFD in ten does)."""
    raising, other = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(raising) < count * 2 // 3 or len(other) < count - count * 2 // 3:
            data = _exif_jpeg(jpeg, _corrupt_exif(rng))
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                ImageOps.exif_transpose(image)
            except Exception:  # what the intake must turn into InvalidInputError
                raising.append(data)
            else:
                other.append(data)
    return raising[: count * 2 // 3] + other[: count - count * 2 // 3]


def _patch_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    at = jpeg.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height, width
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def _webp_canvas(width: int, height: int) -> bytes:
    """A VP8X WebP header declaring a ``width×height`` canvas and no image data."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


# Payloads with a known right answer: name → (bytes, check of decode_image(bytes, alpha=...) or None to
# require a refusal).
Check = Callable[[np.ndarray, bool], None]


def _exact(expected_rgb: np.ndarray, expected_alpha: np.ndarray | None = None, tolerance: int = 0) -> Check:
    def check(got: np.ndarray, alpha: bool) -> None:
        channels = 4 if alpha and expected_alpha is not None else 3
        assert got.shape == (*expected_rgb.shape[:2], channels) and got.dtype == np.uint8
        assert np.abs(got[..., :3].astype(int) - expected_rgb).max() <= tolerance
        if channels == 4:
            np.testing.assert_array_equal(got[..., 3], expected_alpha)

    return check


def special_cases() -> dict[str, tuple[bytes, Check | None]]:
    rng = np.random.default_rng(SEED)
    base = _base()
    cases: dict[str, tuple[bytes, Check | None]] = {}
    cases["empty"] = (b"", None)
    # 16-bit greyscale: scaled to 8 bits, not clipped to 255.
    grey16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    expected = ((grey16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    cases["grey16 (Pillow)"] = (_save(Image.fromarray(grey16), "PNG"), _exact(np.repeat(expected[..., None], 3, 2)))
    raw = _rows(grey16.astype(">u2"))
    trns = _chunk(b"tRNS", struct.pack(">H", int(grey16[0, 5])))
    alpha16 = np.where(grey16 == grey16[0, 5], 0, 255).astype(np.uint8)
    cases["grey16 + tRNS"] = (_png(64, 48, 16, 0, raw, (trns,)), _exact(np.repeat(expected[..., None], 3, 2), alpha16))
    rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    cases["rgb16"] = (_png(30, 20, 16, 2, _rows(rgb16.astype(">u2"))), _exact((rgb16 >> 8).astype(np.uint8), None, 1))
    # CMYK JPEG: pure cyan, magenta, yellow and black bands.
    cmyk = np.zeros((32, 48, 4), np.uint8)
    cmyk[:8, :, 0] = cmyk[8:16, :, 1] = cmyk[16:24, :, 2] = cmyk[24:, :, 3] = 255
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:8] = (0, 255, 255)
    rgb[8:16] = (255, 0, 255)
    rgb[16:24] = (255, 255, 0)
    cases["cmyk jpeg"] = (_save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), _exact(rgb, None, 12))
    # LA and palette + transparency: RGBA with alpha, RGB without.
    la = rng.integers(0, 256, (24, 40, 2), dtype=np.uint8)
    cases["LA png"] = (_save(Image.fromarray(la, "LA"), "PNG"), _exact(np.repeat(la[..., :1], 3, 2), la[..., 1]))
    palette = Image.fromarray(base).quantize(16)
    indices = np.asarray(palette)
    colours = np.asarray(palette.convert("RGB"))
    cases["P + tRNS png"] = (
        _save(palette, "PNG", transparency=0),
        _exact(colours, np.where(indices == 0, 0, 255).astype(np.uint8)),
    )
    grey = base[..., 0].copy()
    cases["L + tRNS png"] = (
        _save(Image.fromarray(grey), "PNG", transparency=int(grey[0, 0])),
        _exact(np.repeat(grey[..., None], 3, 2), np.where(grey == grey[0, 0], 0, 255).astype(np.uint8)),
    )
    cases["1-bit png"] = (
        _save(Image.fromarray(grey > 128), "PNG"),
        _exact(np.repeat(((grey > 128) * 255).astype(np.uint8)[..., None], 3, 2)),
    )
    # Animated: the first frame (WebP, APNG); GIF is not an accepted format.
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    first = np.asarray(frames[0])
    cases["animated webp"] = (
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50),
        _exact(first, None, 2),
    )
    cases["animated png"] = (
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        _exact(first),
    )
    cases["animated gif"] = (_save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50), None)
    # EXIF orientation 6, intact: rotated.
    tall = base[:, :20].copy()
    oriented = _save(Image.fromarray(tall), "PNG", exif=_orientation(6))
    cases["exif 6 png"] = (oriented, _exact(np.rot90(tall, -1)))
    # Declared dimensions past the limits (checked from the header: no pixel is allocated).
    line = b"\0" + b"\x80" * 100
    cases["png 40000000x1"] = (_png(40_000_000, 1, 8, 0, line), None)
    cases["png 1x40000000"] = (_png(1, 40_000_000, 8, 0, b"\0\x80" * 100), None)
    cases["png 8000x8000"] = (_png(8000, 8000, 8, 0, line), None)
    cases["png 16385x10"] = (_png(16385, 10, 8, 0, line), None)
    cases["png 6500x100 (aspect 65)"] = (_png(6500, 100, 8, 0, line), None)
    cases["png 0x0"] = (_png(0, 0, 8, 0, b""), None)
    cases["png 6000x6000 truncated IDAT"] = (_png(6000, 6000, 8, 0, line), None)
    jpeg = _save(Image.fromarray(base), "JPEG", quality=90)
    cases["jpeg 65500x65500"] = (_patch_jpeg_size(jpeg, 65500, 65500), None)
    cases["jpeg 60000x8"] = (_patch_jpeg_size(jpeg, 8, 60000), None)
    cases["webp canvas 2^24x1"] = (_webp_canvas(2**24, 1), None)
    cases["webp canvas 16384x16384"] = (_webp_canvas(16384, 16384), None)
    # PNG text and ICC chunks that decompress past Pillow's MAX_TEXT_CHUNK (1 MiB), before and after IDAT.
    png = _save(Image.fromarray(base), "PNG")
    bomb = zlib.compress(b"a" * 5_000_000, 9)
    for name, chunk in (
        ("zTXt", _chunk(b"zTXt", b"comment\0\0" + bomb)),
        ("iCCP", _chunk(b"iCCP", b"profile\0\0" + bomb)),
        ("iTXt", _chunk(b"iTXt", b"comment\0\x01\0\0\0" + bomb)),
    ):
        cases[f"giant {name} before IDAT"] = (png[:33] + chunk + png[33:], None)
        cases[f"giant {name} after IDAT"] = (png[:-12] + chunk + png[-12:], None)
    # Not images; other formats; the caller's text must not come back.
    cases["html"] = (b"<html><body>" + b"A" * 5000 + b"</body></html>", None)
    cases["long ascii with png magic"] = (b"\x89PNG\r\n\x1a\n" + b"B" * 3000, None)
    cases["bmp"] = (_save(Image.fromarray(base), "BMP"), None)
    cases["tiff"] = (_save(Image.fromarray(base), "TIFF"), None)
    return cases


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def corpus(seed: int = SEED) -> list[tuple[str, bytes]]:
    """≥ 300 seeded payloads: truncations, bit flips, corrupt EXIF, random bytes, and the special cases."""
    rng = random.Random(seed)
    base = Image.fromarray(_base())
    valid = {
        "jpeg": _save(base, "JPEG", quality=90),
        "progressive jpeg": _save(base, "JPEG", quality=90, progressive=True),
        "png": _save(base, "PNG"),
        "webp": _save(base, "WEBP", quality=80),
        "lossless webp": _save(base.convert("RGBA"), "WEBP", lossless=True),
    }
    payloads = [(name, data) for name, (data, _) in special_cases().items()]
    payloads += list(valid.items())
    for name, data in valid.items():
        # Truncations: inside the header (every byte of the first 40) and at random offsets after it.
        offsets = sorted(set(range(1, 40, 3)) | {rng.randrange(40, len(data)) for _ in range(20)})
        payloads += [(f"{name} cut at {n}", data[:n]) for n in offsets]
        for i in range(14):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            payloads.append((f"{name} bit flips {i}", bytes(flipped)))
    jpeg = valid["jpeg"]
    payloads += [(f"exif 6 corrupt IFD {i}", data) for i, data in enumerate(_raising_exif(jpeg, rng, 30))]
    for i in range(20):
        payloads.append((f"random {i}", rng.randbytes(rng.choice([1, 7, 64, 1000, 20000]))))
    for magic in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBPVP8 "):
        payloads += [
            (f"magic {magic[:4]!r} + random {i}", magic + rng.randbytes(rng.randint(0, 400))) for i in range(8)
        ]
    return payloads


CORPUS = corpus()
SPECIAL = special_cases()


def echoes(message: str, data: bytes, longest: int = MAX_ECHO) -> bool:
    """Whether ``message`` quotes more than ``longest`` consecutive characters of ``data``."""
    text = data.decode("latin-1")
    n = longest + 1
    return any(message[i : i + n] in text for i in range(len(message) - n + 1))


def _check_refusal(message: str, data: bytes) -> None:
    assert 0 < len(message) <= MAX_MESSAGE, message
    assert not echoes(message, data), message


# -- the intake function -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_the_corpus_is_large_and_exercises_pillows_failures() -> None:
    assert len(CORPUS) >= 300
    raising = 0
    for name, data in CORPUS:  # the corrupt-EXIF payloads make Pillow's exif_transpose itself raise
        if name.startswith("exif 6 corrupt"):
            try:
                ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            except Exception:  # that is the point
                raising += 1
    assert raising >= 20


@pytest.mark.filterwarnings("ignore")
def test_every_corpus_payload_decodes_correctly_or_is_refused_briefly() -> None:
    outcomes = {"decoded": 0, "refused": 0}
    for name, data in CORPUS:
        for alpha in (False, True):
            try:
                got = decode_image(data, alpha=alpha)
            except InvalidInputError as exc:
                _check_refusal(str(exc), data)
                outcomes["refused"] += 1
                continue
            outcomes["decoded"] += 1
            assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] in ((3, 4) if alpha else (3,)), name
            assert got.shape[0] >= 1 and got.shape[1] >= 1, name
    assert outcomes["decoded"] >= 40 and outcomes["refused"] >= 300, outcomes


@pytest.mark.parametrize("name", list(SPECIAL))
@pytest.mark.filterwarnings("ignore")
def test_special_cases_are_right(name: str) -> None:
    data, check = SPECIAL[name]
    for alpha in (False, True):
        if check is None:
            with pytest.raises(InvalidInputError) as info:
                decode_image(data, alpha=alpha)
            _check_refusal(str(info.value), data)
        else:
            check(decode_image(data, alpha=alpha), alpha)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("png 40000000x1", "side over the limit of 16384"),
        ("png 1x40000000", "side over the limit of 16384"),
        ("png 8000x8000", "exceeds the limit of 40000000"),
        ("png 6500x100 (aspect 65)", "aspect-ratio limit of 64:1"),
        ("png 0x0", "not an image"),
        ("png 6000x6000 truncated IDAT", "truncated or corrupt PNG image"),
        ("jpeg 65500x65500", "exceeds the limit"),
        ("giant zTXt before IDAT", "text or ICC-profile chunk decompresses past the limit"),
        ("giant iCCP before IDAT", "text or ICC-profile chunk decompresses past the limit"),
        ("giant zTXt after IDAT", "text or ICC-profile chunk decompresses past the limit"),
        ("animated gif", r"not an image: .* \(GIF is not accepted\)"),
        ("bmp", r"\(BMP is not accepted\)"),
        ("html", r"not an image: the \d+ bytes are not a JPEG, PNG or WebP image$"),
    ],
)
def test_refusals_name_the_problem(name: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_image(SPECIAL[name][0])


@pytest.mark.filterwarnings("ignore")
def test_corrupt_exif_is_refused_inside_the_intake() -> None:
    rng = random.Random(SEED)
    jpeg = _save(Image.fromarray(_base()), "JPEG")
    messages = set()
    for _ in range(200):
        data = _exif_jpeg(jpeg, _corrupt_exif(rng))
        try:
            got = decode_image(data)
        except InvalidInputError as exc:
            messages.add(str(exc).split(":")[0])
            _check_refusal(str(exc), data)
        else:
            assert got.shape in ((48, 64, 3), (64, 48, 3))  # orientation applied, or the tag unreadable
    assert "corrupt EXIF metadata in the JPEG image" in messages


def test_limits_are_configurable_and_checked_before_decoding() -> None:
    data = _save(Image.fromarray(_base(40, 200)), "PNG")  # 200x40: aspect 5
    assert decode_image(data, limits=IntakeLimits()).shape == (40, 200, 3)
    for limits, message in (
        (IntakeLimits(max_bytes=100), rf"image too large: {len(data)} bytes exceeds the limit of 100 bytes"),
        (IntakeLimits(max_pixels=7999), r"200x40 = 8000 pixels exceeds the limit of 7999"),
        (IntakeLimits(max_side=199), r"200x40 has a side over the limit of 199 pixels"),
        (IntakeLimits(max_aspect=4.5), r"200x40 exceeds the aspect-ratio limit of 4.5:1"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            decode_image(data, limits=limits)
    with pytest.raises(InvalidInputError, match="bytes exceeds the limit"):  # the byte limit: before opening
        decode_image(b"\0" * 101, limits=IntakeLimits(max_bytes=100))
    assert IntakeLimits.of(colorize.Settings(max_bytes=5, max_side=7, max_aspect=2)) == IntakeLimits(
        5, 40_000_000, 7, 2
    )


@pytest.mark.parametrize("settings", [rb_settings.Settings, colorize.Settings, detect_settings.Settings])
def test_settings_have_the_intake_limits_with_defaults(settings: type) -> None:
    defaults = settings()
    assert (defaults.max_bytes, defaults.max_pixels, defaults.max_side, defaults.max_aspect) == (
        64 * 1024 * 1024, 40_000_000, 16384, 64.0,
    )  # fmt: skip
    for bad in ({"max_aspect": 0.5}, {"max_side": 0}, {"max_bytes": -1}):
        with pytest.raises(ManifestError, match=next(iter(bad))):
            settings(**bad)


def test_decode_images_keeps_each_image_its_size_and_alpha_on_request() -> None:
    rgba = np.random.default_rng(SEED).integers(0, 256, (10, 30, 4), dtype=np.uint8)
    items = [_save(Image.fromarray(rgba), "PNG"), _save(Image.fromarray(_base(30, 10)), "JPEG")]
    plain = decode_images(items, device="cpu")
    assert [tuple(t.shape) for t in plain] == [(10, 30, 3), (30, 10, 3)]
    with_alpha = decode_images(items, device="cpu", alpha=True)
    assert [tuple(t.shape) for t in with_alpha] == [(10, 30, 4), (30, 10, 3)]
    np.testing.assert_array_equal(with_alpha[0].numpy(), rgba)
    (_, alpha), (_, none) = colorize_steps.decode(items, IntakeLimits(), "cpu")  # colorize: the same intake
    np.testing.assert_array_equal(alpha.numpy(), rgba[..., 3])
    assert none is None
    with pytest.raises(InvalidInputError, match="aspect-ratio limit"):
        colorize_steps.decode(items, IntakeLimits(max_aspect=2), "cpu")


def test_remove_background_packs_a_batch_without_padding_to_max_height_times_max_width() -> None:
    wide = torch.randint(0, 256, (1, 10000, 3), dtype=torch.uint8)
    tall = torch.randint(0, 256, (10000, 1, 3), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 4, 3), dtype=torch.uint8)
    original = pack([wide, tall, small])
    assert tuple(original.shape) == (3, 1, 10000, 3)  # not 3×10000×10000×3 (900 MB)
    for i, image in enumerate((wide, tall, small)):
        assert torch.equal(unpack(original[i], *image.shape[:2]), image)
    assert torch.equal(unpack(torch.arange(300).reshape(1, 10, 10, 3)[0].to(torch.uint8), 2, 5).reshape(-1, 3)[:3],
                       torch.arange(9).reshape(3, 3).to(torch.uint8))  # fmt: skip


# -- the served pipelines --------------------------------------------------------------------------------

SERVER_SAMPLE = 60


def _served_sample() -> list[tuple[str, bytes]]:
    """A bounded, seeded sample of the corpus, the special cases always in."""
    rng = random.Random(SEED + 1)
    specials = [(name, data) for name, (data, _) in SPECIAL.items()]
    rest = [item for item in CORPUS if item[0] not in SPECIAL]
    return specials + rng.sample(rest, SERVER_SAMPLE - len(specials))


PIPELINES: dict[str, Callable[[TritonClient, bytes], object]] = {
    "remove_background": lambda client, data: remove_background(client, data),
    "detect_faces": lambda client, data: detect_faces(client, data),
    "colorize": lambda client, data: colorize_one(client, data, size=256),
}


@pytest.mark.server
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_served_pipelines_answer_the_corpus_with_invalid_arg_or_success(client: TritonClient, pipeline: str) -> None:
    call = PIPELINES[pipeline]
    sample = _served_sample()
    assert len(sample) == SERVER_SAMPLE
    failures, refused = [], 0
    for name, data in sample:
        try:
            call(client, data)
        except InferenceError as exc:
            refused += 1
            if not exc.is_invalid_argument or len(exc.message) > MAX_MESSAGE or echoes(exc.message, data):
                failures.append(f"{name}: {exc.status} {exc.message[:300]}")
    assert not failures, failures
    assert refused >= SERVER_SAMPLE // 2
    good = _save(Image.fromarray(_base(96, 128)), "PNG")
    call(client, good)  # still serving


@pytest.mark.server
def test_remove_background_serves_a_batch_of_opposite_elongated_images(client: TritonClient) -> None:
    wide, tall = (_save(Image.fromarray(_base(h, w)), "PNG") for h, w in ((5, 300), (300, 5)))
    result = client.infer("remove_background", {"IMAGE": bytes_tensor(wide, tall)}, ["OUTPUT"])["OUTPUT"]
    sizes = [Image.open(io.BytesIO(bytes(r))).size for r in result.reshape(-1)]
    assert sizes == [(300, 5), (5, 300)]
    with pytest.raises(InferenceError, match="aspect-ratio limit") as info:
        client.infer(
            "remove_background", {"IMAGE": bytes_tensor(wide, _png(10000, 1, 8, 0, b"\0" * 10001))}, ["OUTPUT"]
        )
    assert info.value.is_invalid_argument
