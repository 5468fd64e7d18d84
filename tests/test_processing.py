"""Decoding, the RMBG/BiRefNet pre/post-processing contract and the batch runner, without a server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch.nn import functional as F

from imgpipe.ensembles import background
from imgpipe.ensembles.runners import OnnxRuntimeRunner
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import decode_image, encode_png
from imgpipe.samples import encode, sample_array

ASTRONAUT = sample_array("astronaut")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decodes_the_accepted_formats_to_rgb(fmt: str) -> None:
    decoded = decode_image(encode(ASTRONAUT, fmt))
    assert decoded.shape == ASTRONAUT.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - ASTRONAUT).mean() < 6  # lossy formats stay close


def test_greyscale_and_alpha_become_rgb() -> None:
    grey = decode_image(encode(sample_array("camera"), "PNG"))
    assert grey.shape == (512, 512, 3) and (grey[..., 0] == grey[..., 2]).all()
    rgba = np.dstack([ASTRONAUT, np.full(ASTRONAUT.shape[:2], 128, np.uint8)])
    assert decode_image(encode(rgba, "PNG")).shape == (512, 512, 3)


def test_exif_orientation_is_applied() -> None:
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255  # white band at the top
    rotated = decode_image(encode(tall, "JPEG", exif_orientation=6))  # 6: rotate 90° clockwise to display
    assert rotated.shape == (20, 40, 3)
    assert rotated[:, -10:].mean() > 200 and rotated[:, :10].mean() < 50  # the top band is now on the right


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"GIF89a-not-accepted", "not an image"),
        (b"\x00" * 100, "not an image"),
        (encode(ASTRONAUT, "JPEG")[:3000], "truncated or corrupt JPEG image"),
        (encode(ASTRONAUT, "PNG")[:5000], "truncated or corrupt PNG image"),
        # Headers cut short (found by probing the server: Pillow raises plain OSError while opening these)
        (encode(ASTRONAUT, "PNG")[:20], "truncated or corrupt image header"),
        (encode(ASTRONAUT, "JPEG")[:6], "truncated or corrupt image header"),
        (encode(ASTRONAUT, "WEBP")[:16], "truncated or corrupt image header"),
    ],
    ids=["empty", "gif", "zeros", "jpeg-half", "png-half", "png-header", "jpeg-header", "webp-header"],
)
def test_bad_bytes_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_image(data)


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(
        InvalidInputError, match=r"image too large: 512x512 = 262144 pixels exceeds the limit of 100000"
    ):
        decode_image(encode(ASTRONAUT, "PNG"), max_pixels=100_000)


def test_preprocess_matches_an_independent_pillow_numpy_computation() -> None:
    got = background.preprocess(torch.from_numpy(ASTRONAUT)).numpy()
    resized = np.asarray(Image.fromarray(ASTRONAUT).resize((1024, 1024), Image.Resampling.BILINEAR), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((resized / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)
    assert got.shape == (3, 1024, 1024) and got.dtype == np.float32
    assert np.abs(got - expected).mean() < 0.01
    assert np.abs(got - expected).max() < 0.1


def test_preprocess_ignores_aspect_ratio_and_image_maximum() -> None:
    dark = np.full((300, 700, 3), 51, np.uint8)  # max is 51: rembg would stretch it to 1.0
    got = background.preprocess(torch.from_numpy(dark)).numpy()
    assert got.shape == (3, 1024, 1024)
    np.testing.assert_allclose(got[0], (0.2 - 0.485) / 0.229, atol=1e-5)


def test_mask_to_alpha_resizes_to_the_original_and_applies_the_activation() -> None:
    logits = torch.full((1, 1024, 1024), 20.0)
    logits[:, :, :512] = -20.0  # left half background
    alpha = background.mask_to_alpha(logits, 300, 200, "sigmoid")
    assert alpha.shape == (300, 200) and alpha.dtype == torch.uint8
    assert alpha[:, :90].max() == 0 and alpha[:, 110:].min() == 255
    probabilities = torch.full((1, 1024, 1024), 0.6)
    assert background.mask_to_alpha(probabilities, 10, 10, "none").unique().tolist() == [153]


def test_compose_modes() -> None:
    rgb = torch.full((4, 4, 3), 200, dtype=torch.uint8)
    alpha = torch.tensor([[0, 255, 0, 255]] * 4, dtype=torch.uint8)
    rgba = background.compose(rgb, alpha, background.Options("rgba"))
    assert isinstance(rgba, torch.Tensor) and rgba.device == rgb.device  # on the device up to the encoder
    assert rgba.shape == (4, 4, 4) and (rgba[..., 3] == alpha).all()
    assert background.compose(rgb, alpha, background.Options("mask")).shape == (4, 4)
    comp = background.compose(rgb, alpha, background.Options("composite", (0, 255, 0)))
    assert comp.dtype == torch.uint8 and comp[0, 0].tolist() == [0, 255, 0] and comp[0, 1].tolist() == [200] * 3


def test_options_are_validated() -> None:
    assert background.parse_options(None, None) == background.Options("rgba", (255, 255, 255), "png")
    assert background.parse_options("Composite", "#102030").background == (16, 32, 48)
    assert background.parse_options("mask", None, " WebP ").format == "webp"
    assert background.parse_options("composite", None, "jpeg").format == "jpeg"
    with pytest.raises(InvalidInputError, match="unsupported MODE 'blur'"):
        background.parse_options("blur", None)
    with pytest.raises(InvalidInputError, match="unsupported BACKGROUND 'not-a-colour'"):
        background.parse_options("composite", "not-a-colour")
    with pytest.raises(InvalidInputError, match="unsupported FORMAT 'gif': expected one of png, webp, jpeg"):
        background.parse_options("rgba", None, "gif")
    with pytest.raises(InvalidInputError, match="FORMAT jpeg cannot hold the alpha channel of MODE rgba"):
        background.parse_options(None, None, "jpeg")  # rgba is the default mode


def test_encode_png_roundtrip() -> None:
    for array in (ASTRONAUT, ASTRONAUT[..., 0], np.dstack([ASTRONAUT, ASTRONAUT[..., 0]])):
        assert (np.asarray(Image.open(io.BytesIO(encode_png(array)))) == array).all()


# -- decode_images: the batch decoder (CPU path here; nvJPEG where CUDA and torchvision exist) --------

JPEG_CASES = {
    "astronaut": encode(ASTRONAUT, "JPEG"),
    "coffee": encode(sample_array("coffee"), "JPEG"),
    "greyscale": encode(sample_array("camera"), "JPEG"),
}


def _progressive_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, progressive=True)
    return buffer.getvalue()


def _cmyk_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _oriented(orientation: int) -> bytes:
    """A wide 60×90 picture with distinct corners, stored with an EXIF orientation tag."""
    picture = np.zeros((60, 90, 3), np.uint8)
    picture[:20, :30] = (255, 0, 0)
    picture[:20, -30:] = (0, 255, 0)
    picture[-20:, :30] = (0, 0, 255)
    return encode(picture, "JPEG", exif_orientation=orientation)


def test_decode_images_on_the_cpu_is_decode_image_per_item(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgpipe import imaging

    monkeypatch.setattr(imaging, "_nvjpeg", lambda: pytest.fail("the CPU path must not look for torchvision"))
    items = [*JPEG_CASES.values(), encode(sample_array("chelsea"), "WEBP"), _oriented(6), _cmyk_jpeg(ASTRONAUT)]
    got = imaging.decode_images(items, device=torch.device("cpu"))
    assert len(got) == len(items)
    for tensor, data in zip(got, items, strict=True):
        assert tensor.dtype == torch.uint8 and tensor.device.type == "cpu" and tensor.shape[-1] == 3
        np.testing.assert_array_equal(tensor.numpy(), decode_image(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"\xff\xd8 not really a jpeg", "not an image"),
        (encode(ASTRONAUT, "JPEG")[:3000], "truncated or corrupt JPEG image"),
    ],
    ids=["empty", "jpeg magic only", "truncated jpeg"],
)
def test_decode_images_refuses_bad_items_with_decode_image_words(data: bytes, message: str) -> None:
    from imgpipe.imaging import decode_images

    with pytest.raises(InvalidInputError, match=message):
        decode_images([encode(ASTRONAUT, "PNG"), data], device="cpu")


def test_decode_images_checks_the_pixel_limit() -> None:
    from imgpipe.imaging import decode_images

    with pytest.raises(InvalidInputError, match=r"image too large: 512x512 = 262144 pixels exceeds the limit of 1000"):
        decode_images([encode(ASTRONAUT, "JPEG")], max_pixels=100_000, device="cpu")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation: int) -> None:
    from imgpipe.imaging import orient

    stored = np.array(Image.open(io.BytesIO(_oriented(orientation))).convert("RGB"))
    got = orient(torch.from_numpy(stored), orientation).numpy()
    np.testing.assert_array_equal(got, decode_image(_oriented(orientation)))


def test_which_jpegs_nvjpeg_is_given() -> None:
    """Header checks raise imgpipe's errors; truncated files, CMYK and other formats are left to Pillow."""
    from imgpipe.imaging import _nvjpeg_candidate

    assert _nvjpeg_candidate(JPEG_CASES["astronaut"], 10**8) == 1
    assert _nvjpeg_candidate(JPEG_CASES["greyscale"], 10**8) == 1
    assert _nvjpeg_candidate(_oriented(6), 10**8) == 6
    assert _nvjpeg_candidate(_progressive_jpeg(ASTRONAUT), 10**8) == 1
    assert _nvjpeg_candidate(_cmyk_jpeg(ASTRONAUT), 10**8) == 0
    assert _nvjpeg_candidate(JPEG_CASES["astronaut"][:3000], 10**8) == 0
    assert _nvjpeg_candidate(encode(ASTRONAUT, "PNG"), 10**8) == 0
    with pytest.raises(InvalidInputError, match="image too large: 512x512"):
        _nvjpeg_candidate(JPEG_CASES["astronaut"], 100_000)


def test_a_batch_nvjpeg_refuses_is_retried_item_by_item() -> None:
    from imgpipe.imaging import _decode_jpegs

    def fake_decode_jpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if any(t[-1] != 0xD9 for t in tensors):  # "refuses" a file that does not end with the marker
            raise RuntimeError("nvjpeg: bad file")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8, device=device) for _ in tensors]

    good = JPEG_CASES["astronaut"]
    got = _decode_jpegs(fake_decode_jpeg, [good, good + b"\x00junk", good], torch.device("cpu"))
    assert [g is None for g in got] == [False, True, False]


CUDA = torch.cuda.is_available()
try:
    import torchvision  # noqa: F401

    TORCHVISION = True
except (ImportError, OSError, RuntimeError):  # the CPU build of torch here has no (working) torchvision
    TORCHVISION = False


@pytest.mark.skipif(not (CUDA and TORCHVISION), reason="nvJPEG needs a CUDA device and torchvision")
def test_nvjpeg_matches_pillow_and_keeps_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgpipe import imaging

    nvjpeg_items: list[int] = []
    real = imaging._decode_jpegs

    def spy(decode_jpeg, items, device):  # type: ignore[no-untyped-def]
        nvjpeg_items.append(len(items))
        return real(decode_jpeg, items, device)

    monkeypatch.setattr(imaging, "_decode_jpegs", spy)
    cases = {
        **JPEG_CASES,
        "progressive": _progressive_jpeg(ASTRONAUT),
        "cmyk": _cmyk_jpeg(ASTRONAUT),  # Pillow's
        "png": encode(sample_array("coffee"), "PNG"),  # Pillow's
        **{f"exif {n}": _oriented(n) for n in range(1, 9)},
    }
    device = torch.device("cuda", 0)
    got = imaging.decode_images(list(cases.values()), device=device)
    assert nvjpeg_items == [len(cases) - 2]  # every RGB/greyscale JPEG in one nvJPEG batch
    errors = {}
    for (name, data), tensor in zip(cases.items(), got, strict=True):
        expected = decode_image(data)
        assert tensor.device == device and tensor.dtype == torch.uint8, name
        assert tuple(tensor.shape) == expected.shape, name  # EXIF orientation applied like Pillow
        error = np.abs(tensor.cpu().numpy().astype(int) - expected)
        errors[name] = (round(float(error.mean()), 3), float(np.percentile(error, 99)), int(error.max()))
    print("nvJPEG vs Pillow (mean, 99th percentile, max abs error):", errors)
    # Decoders differ by a few levels (IDCT, chroma upsampling). Measured on an H200 (torchvision 0.26):
    # photos mean ≤ 0.85, 99th percentile ≤ 9; CMYK and PNG went to Pillow (0).
    photos = [errors[name] for name in ("astronaut", "coffee", "greyscale", "progressive", "cmyk", "png")]
    assert all(mean < 1.0 and p99 <= 10 for mean, p99, _ in photos), errors
    # The orientation pictures are saturated blocks on black (chroma upsampling differs most there: mean
    # 1.3); turned like Pillow turns them, every orientation has exactly the error of the unturned one.
    assert errors["exif 1"][0] < 2 and all(errors[f"exif {n}"] == errors["exif 1"] for n in range(2, 9)), errors
    with pytest.raises(InvalidInputError, match=r"image too large: 512x512 = 262144 pixels exceeds the limit of 1000"):
        imaging.decode_images([JPEG_CASES["astronaut"]], max_pixels=100_000, device=device)
    with pytest.raises(InvalidInputError, match="truncated or corrupt JPEG image"):
        imaging.decode_images([JPEG_CASES["astronaut"][:3000]], device=device)


def _affine_onnx(path: Path, batch: int | str) -> None:
    """y = 2x + 1 over [batch, 3]: a model whose answer is known."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
    ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(nodes, "affine", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("batch", ["N", 1])
def test_runner_runs_requests_as_one_batch_and_splits_them_back(tmp_path: Path, batch: int | str) -> None:
    path = tmp_path / "affine.onnx"
    _affine_onnx(path, batch)
    runner = OnnxRuntimeRunner(str(path))
    calls = []
    original_run = runner.session.run
    runner.session = type(
        "Spy", (), {"run": lambda _s, names, feeds: calls.append(feeds["x"].shape[0]) or original_run(names, feeds)}
    )()
    requests = [{"x": torch.full((n, 3), float(n))} for n in (1, 3, 2)]
    outputs = runner.run(requests)
    assert [o["y"].shape[0] for o in outputs] == [1, 3, 2]
    for n, out in zip((1, 3, 2), outputs, strict=True):
        assert isinstance(out["y"], torch.Tensor) and out["y"].device == runner.device
        torch.testing.assert_close(out["y"], torch.full((n, 3), 2.0 * n + 1))
    assert calls == ([6] if batch == "N" else [1] * 6)  # one run for a dynamic batch, per item for batch 1
    # Requests of different shapes (pnet's pyramid levels) run as one batch per shape, answers in order.
    calls.clear()
    if batch == "N":
        mixed = runner.run([{"x": torch.ones(2, 3)}, {"x": torch.ones(1, 3)}])
        assert [o["y"].shape for o in mixed] == [(2, 3), (1, 3)] and calls == [3]


def test_box_mean_is_the_window_mean_cut_at_the_borders() -> None:
    x = torch.rand(2, 3, 17, 23, dtype=torch.float64)
    for radius in (1, 3, 12):
        k = 2 * radius + 1
        got = background.box_mean(x, radius)
        # A direct loop over a few pixels, including corners (windows cut by the border).
        for y, xx in ((0, 0), (8, 11), (16, 22), (3, 20)):
            window = x[..., max(0, y - radius) : y + radius + 1, max(0, xx - radius) : xx + radius + 1]
            torch.testing.assert_close(got[..., y, xx], window.mean(dim=(-2, -1)))
        pooled = F.avg_pool2d(x, k, stride=1, padding=radius, count_include_pad=False)
        torch.testing.assert_close(got, pooled)


def test_guided_upsample_keeps_flat_masks_and_snaps_edges_to_the_image() -> None:
    """A 16² mask whose edge is misplaced by a few pixels against a sharp vertical edge in a 128² image:
    the guided filter moves the edge onto the image's; bilinear upsampling keeps it where the mask said."""
    image = torch.zeros((128, 128, 3), dtype=torch.uint8)
    image[:, 64:] = torch.tensor([200, 180, 160], dtype=torch.uint8)  # object on the right from column 64
    mask = torch.zeros((1, 1, 16, 16))
    mask[..., 9:] = 1.0  # the low-resolution mask says column 72 (9 × 8)
    flat = background.guided_upsample(torch.full((1, 1, 16, 16), 0.7), image)
    torch.testing.assert_close(flat, torch.full((1, 1, 128, 128), 0.7), atol=1e-4, rtol=0)
    guided = background.guided_upsample(mask, image, radius=2, eps=1e-4)[0, 0]
    bilinear = F.interpolate(mask, size=(128, 128), mode="bilinear", align_corners=False)[0, 0]
    assert guided.shape == (128, 128)
    # The guided mask steps up exactly at the image's edge (column 63 → 64) and is zero before it; the
    # bilinear one is still zero there and ramps up around the coarse mask's column 72.
    jumps = guided[64, 1:] - guided[64, :-1]
    assert int(jumps.argmax()) == 63 and float(jumps[63]) > 0.3
    assert float(bilinear[64, 64] - bilinear[64, 63]) < 0.01
    assert guided[:, :64].max() < 0.02 and guided[:, 110:].min() > 0.9


def test_mask_to_alpha_reads_both_segmenter_layouts() -> None:
    nchw = torch.zeros((1, 8, 8))
    nhwc = torch.zeros((8, 8, 1))
    nchw[..., 4:] = nhwc[:, 4:] = 1.0
    a = background.mask_to_alpha(nchw, 16, 16, "none")
    b = background.mask_to_alpha(nhwc, 16, 16, "none")
    assert torch.equal(a, b) and a[:, :6].max() == 0 and a[:, 10:].min() == 255


def test_selfie_preprocessing_is_nhwc_in_the_unit_range() -> None:
    got = background.preprocess(torch.from_numpy(ASTRONAUT), (256, 256), "selfie")
    assert got.shape == (256, 256, 3) and 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    rmbg = background.preprocess(torch.from_numpy(ASTRONAUT), (256, 256), "rmbg")
    mean, std = torch.tensor(background.IMAGENET_MEAN), torch.tensor(background.IMAGENET_STD)
    torch.testing.assert_close(rmbg.permute(1, 2, 0) * std + mean, got, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown segmenter preprocessing 'nope'"):
        background.preprocess(torch.from_numpy(ASTRONAUT), (256, 256), "nope")
