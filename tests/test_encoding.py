"""Encoding results (imgpipe.imaging.encode_image), remove_background's FORMAT option and encoder settings,
and the encoding benchmark; no server."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe import encode_bench
from imgpipe.ensembles import background
from imgpipe.imaging import encode_image
from imgpipe.manifest import Manifest, ManifestError, parse_manifest
from imgpipe.pipelines.registry import BuildContext
from imgpipe.pipelines.remove_background import CONTRACT, RemoveBackground, Settings
from imgpipe.samples import sample_array
from tests.conftest import manifest_data

RGB = sample_array("astronaut")
ALPHA = np.tile(np.linspace(1, 255, RGB.shape[1]).astype(np.uint8), (RGB.shape[0], 1))  # no pixel fully transparent
RGBA = np.dstack([RGB, ALPHA])


def _decode(data: bytes) -> tuple[str, str, np.ndarray]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.mode, np.asarray(image)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_png_is_exact_at_every_level(level: int) -> None:
    for array in (RGB, ALPHA, RGBA):
        fmt, _, pixels = _decode(encode_image(array, "png", png_level=level))
        assert fmt == "PNG"
        np.testing.assert_array_equal(pixels, array)
    assert len(encode_image(RGB, "png", png_level=0)) > len(encode_image(RGB, "png", png_level=9))


@pytest.mark.parametrize("method", [0, 4])
def test_lossless_webp_is_exact_and_stores_a_mask_as_grey_rgb(method: int) -> None:
    _, mode, pixels = _decode(encode_image(RGBA, "webp", lossless=True, webp_method=method))
    assert mode == "RGBA"
    np.testing.assert_array_equal(pixels, RGBA)  # exact: no pixel is fully transparent here
    _, mode, pixels = _decode(encode_image(ALPHA, "webp", lossless=True, webp_method=method))
    assert mode == "RGB"  # WebP has no greyscale
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], ALPHA)


def test_lossy_webp_keeps_alpha_exactly_and_colour_close() -> None:
    fmt, mode, pixels = _decode(encode_image(RGBA, "webp", quality=90, webp_method=0))
    assert (fmt, mode) == ("WEBP", "RGBA")
    np.testing.assert_array_equal(pixels[..., 3], ALPHA)
    assert np.abs(pixels[..., :3].astype(int) - RGB).mean() < 4
    assert len(encode_image(RGB, "webp", quality=50)) < len(encode_image(RGB, "webp", quality=95))


def test_jpeg_takes_rgb_and_grey_and_refuses_alpha() -> None:
    fmt, mode, pixels = _decode(encode_image(RGB, "jpeg", quality=90))
    assert (fmt, mode) == ("JPEG", "RGB") and np.abs(pixels.astype(int) - RGB).mean() < 4
    assert _decode(encode_image(ALPHA, "jpeg"))[1] == "L"
    with pytest.raises(ValueError, match="JPEG cannot hold an alpha channel"):
        encode_image(RGBA, "jpeg")
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        encode_image(RGB, "gif")


def test_a_tensor_is_brought_to_the_cpu_by_the_encoder() -> None:
    tensor = torch.from_numpy(RGBA)
    np.testing.assert_array_equal(_decode(encode_image(tensor, "png"))[2], RGBA)


# -- remove_background: FORMAT, encoder settings ----------------------------------------------------


def test_format_is_an_optional_input_of_the_contract() -> None:
    fmt = CONTRACT.input("FORMAT")
    assert fmt.optional and fmt.dtype == "BYTES" and fmt.choices == ("png", "webp", "jpeg") and fmt.default == "png"
    assert "one of png | webp | jpeg; default png" in CONTRACT.config_parameters()["input.FORMAT"]


def test_format_is_routed_to_both_steps(test_manifest: Manifest, tmp_path: Path) -> None:
    settings = test_manifest.pipelines["remove_background"]
    models = {m.name: m for m in RemoveBackground().models(BuildContext(test_manifest, tmp_path), settings)}
    for name in ("bg_preprocess", "bg_postprocess", "remove_background"):
        assert {t.name: t.optional for t in models[name].inputs}["FORMAT"] is True, name
    steps = {s.model_name: s for s in models["remove_background"].steps}
    assert steps["bg_preprocess"].input_map["FORMAT"] == "FORMAT"
    assert steps["bg_postprocess"].input_map["FORMAT"] == "FORMAT"


def test_encoder_options_follow_the_settings() -> None:
    settings = Settings(png_compress_level=3, jpeg_quality=80, webp_lossless=False, webp_quality=70, webp_method=2)
    options = background.encoder_options
    assert options(background.Options("rgba", format="png"), settings) == {"png_level": 3}
    assert options(background.Options("composite", format="jpeg"), settings) == {"quality": 80}
    lossy = {"lossless": False, "quality": 70, "webp_method": 2}
    assert options(background.Options("rgba", format="webp"), settings) == lossy
    assert options(background.Options("mask", format="webp"), settings) == {**lossy, "lossless": True}
    assert options(background.Options("rgba", format="webp"), Settings())["lossless"] is True  # the default


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("png_compress_level", 12, "pipelines.remove_background.png_compress_level: must be within 0..9, got 12"),
        ("png_compress_level", -1, "pipelines.remove_background.png_compress_level: must be within 0..9, got -1"),
        ("jpeg_quality", 0, "pipelines.remove_background.jpeg_quality: must be within 1..100, got 0"),
        ("webp_quality", 101, "pipelines.remove_background.webp_quality: must be within 1..100, got 101"),
        ("webp_method", 7, "pipelines.remove_background.webp_method: must be within 0..6, got 7"),
        ("webp_lossless", "yes", "pipelines.remove_background.webp_lossless: expected true or false, got 'yes'"),
    ],
)
def test_encoder_settings_are_validated_naming_the_key(key: str, value: object, message: str) -> None:
    data = manifest_data()
    data["pipelines"]["remove_background"][key] = value
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert str(info.value) == message


def test_encoder_settings_are_read_from_the_manifest() -> None:
    data = manifest_data()
    data["pipelines"]["remove_background"] |= {"png_compress_level": 6, "webp_lossless": False, "jpeg_quality": 75}
    settings = parse_manifest(data).pipelines["remove_background"]
    assert (settings.png_compress_level, settings.webp_lossless, settings.jpeg_quality) == (6, False, 75)


# -- the benchmark ------------------------------------------------------------------------------------


def test_bench_images_are_a_cutout_a_soft_mask_and_a_composite() -> None:
    images = encode_bench.bench_images(128, 96)
    assert images["rgba"].shape == (96, 128, 4) and images["mask"].shape == (96, 128)
    assert images["composite"].shape == (96, 128, 3)
    mask = images["mask"]
    assert (mask == 0).any() and (mask == 255).any()
    assert ((mask > 0) & (mask < 255)).sum() > 100  # soft edges, not a binary mask


def test_bench_measures_every_variant_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    variants = [v for v in encode_bench.VARIANTS if v.label in ("png level 1", "webp q90, method 0", "jpeg q90")]
    results = encode_bench.measure(encode_bench.bench_images(64, 48), variants, repeats=1)
    assert [(r.variant.fmt, r.kind) for r in results] == [
        ("png", "rgba"), ("png", "mask"), ("png", "composite"),
        ("webp", "rgba"), ("webp", "mask"), ("webp", "composite"),
        ("jpeg", "mask"), ("jpeg", "composite"),
    ]  # fmt: skip
    assert all(r.ms > 0 and r.size > 0 for r in results)
    assert all(math.isinf(r.psnr) for r in results if r.variant.fmt == "png")
    assert all(30 < r.psnr < math.inf for r in results if r.variant.fmt != "png")
    encode_bench.main(["--repeats", "1", "--width", "64", "--height", "48"])
    out = capsys.readouterr().out
    assert "png level 6" in out and "webp lossless, method 0" in out and "composite ms" in out
