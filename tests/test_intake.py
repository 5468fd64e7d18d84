"""The image intake (:func:`imgpipe.imaging.decode_image`), the one path every pipeline decodes through, on a
generated, seeded corpus of broken and unusual payloads (issue 12): each payload either decodes to a
correct RGB/RGBA ``uint8`` array or is refused with :class:`InvalidInputError`, a short sentence that
quotes at most a few dozen characters of the input. A bounded sample of the corpus is then sent to the
served pipelines: INVALID_ARG or success, never INTERNAL, and the server keeps serving. The corpus is built
in tests/fuzz.py (shared with the reliability suite)."""

from __future__ import annotations

import io
import random
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
from tests.fuzz import (
    MAX_MESSAGE,
    SEED,
    base_image,
    build_png,
    corrupt_exif,
    echoes,
    exif_jpeg,
    image_corpus,
    save,
    special_cases,
)

CORPUS = image_corpus()
SPECIAL = special_cases()


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
    jpeg = save(Image.fromarray(base_image()), "JPEG")
    messages = set()
    for _ in range(200):
        data = exif_jpeg(jpeg, corrupt_exif(rng))
        try:
            got = decode_image(data)
        except InvalidInputError as exc:
            messages.add(str(exc).split(":")[0])
            _check_refusal(str(exc), data)
        else:
            assert got.shape in ((48, 64, 3), (64, 48, 3))  # orientation applied, or the tag unreadable
    assert "corrupt EXIF metadata in the JPEG image" in messages


def test_limits_are_configurable_and_checked_before_decoding() -> None:
    data = save(Image.fromarray(base_image(40, 200)), "PNG")  # 200x40: aspect 5
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
    items = [save(Image.fromarray(rgba), "PNG"), save(Image.fromarray(base_image(30, 10)), "JPEG")]
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
    good = save(Image.fromarray(base_image(96, 128)), "PNG")
    call(client, good)  # still serving


@pytest.mark.server
def test_remove_background_serves_a_batch_of_opposite_elongated_images(client: TritonClient) -> None:
    wide, tall = (save(Image.fromarray(base_image(h, w)), "PNG") for h, w in ((5, 300), (300, 5)))
    result = client.infer("remove_background", {"IMAGE": bytes_tensor(wide, tall)}, ["OUTPUT"])["OUTPUT"]
    sizes = [Image.open(io.BytesIO(bytes(r))).size for r in result.reshape(-1)]
    assert sizes == [(300, 5), (5, 300)]
    with pytest.raises(InferenceError, match="aspect-ratio limit") as info:
        client.infer(
            "remove_background", {"IMAGE": bytes_tensor(wide, build_png(10000, 1, 8, 0, b"\0" * 10001))}, ["OUTPUT"]
        )
    assert info.value.is_invalid_argument
