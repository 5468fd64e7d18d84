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
    ],
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
    assert rgba.shape == (4, 4, 4) and (rgba[..., 3] == alpha.numpy()).all()
    assert background.compose(rgb, alpha, background.Options("mask")).shape == (4, 4)
    comp = background.compose(rgb, alpha, background.Options("composite", (0, 255, 0)))
    assert comp[0, 0].tolist() == [0, 255, 0] and comp[0, 1].tolist() == [200, 200, 200]


def test_options_are_validated() -> None:
    assert background.parse_options(None, None) == background.Options("rgba", (255, 255, 255))
    assert background.parse_options("Composite", "#102030").background == (16, 32, 48)
    with pytest.raises(InvalidInputError, match="unsupported MODE 'blur'"):
        background.parse_options("blur", None)
    with pytest.raises(InvalidInputError, match="unsupported BACKGROUND 'not-a-colour'"):
        background.parse_options("composite", "not-a-colour")


def test_encode_png_roundtrip() -> None:
    for array in (ASTRONAUT, ASTRONAUT[..., 0], np.dstack([ASTRONAUT, ASTRONAUT[..., 0]])):
        assert (np.asarray(Image.open(io.BytesIO(encode_png(array)))) == array).all()


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
