"""colorize: the Lab maths against scikit-image, DDColor's steps, the reference colorizer's cost, the
manifest checks, and the pipeline end to end on the real tritonserver over gRPC and HTTP."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from skimage import color

from imgpipe.build.networks import build_reference, count_flops
from imgpipe.build.networks import colorizer as reference
from imgpipe.clients.colorize import colorize, colorize_one
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.ensembles import colorize as steps
from imgpipe.ensembles import lab
from imgpipe.errors import InvalidInputError
from imgpipe.manifest import ManifestError, parse_manifest
from imgpipe.samples import SAMPLES, encode, sample_array
from tests.conftest import manifest_data

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
LAB_TOLERANCE = 1e-3


def _rgb(name: str) -> np.ndarray:
    array = sample_array(name)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def _lab_reference(lab_values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # scikit-image warns about the negative Z it clips
        warnings.simplefilter("ignore")
        return color.lab2rgb(lab_values)


# -- Lab ----------------------------------------------------------------------------------------


def _check_lab(device: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((1000, 3))
    want = color.rgb2lab(rgb)
    x = torch.from_numpy(rgb).float().to(device)
    got = lab.rgb_to_lab(x).cpu().double().numpy()
    assert np.abs(got - want).max() < LAB_TOLERANCE
    assert np.abs(lab.rgb_to_lightness(x).cpu().double().numpy() - want[:, 0]).max() < LAB_TOLERANCE
    back = lab.lab_to_rgb(torch.from_numpy(want).float().to(device)).cpu().double().numpy()
    assert np.abs(back - color.lab2rgb(want)).max() < LAB_TOLERANCE
    assert np.abs(lab.lab_to_rgb(lab.rgb_to_lab(x)).cpu().double().numpy() - rgb).max() < LAB_TOLERANCE  # round trip
    # Any Lab, also out of the sRGB gamut: negative Z set to 0 and RGB clipped, as scikit-image does.
    wild = np.stack([rng.uniform(0, 100, 1000), rng.uniform(-128, 127, 1000), rng.uniform(-128, 127, 1000)], -1)
    got = lab.lab_to_rgb(torch.from_numpy(wild).float().to(device)).cpu().double().numpy()
    assert np.abs(got - _lab_reference(wild)).max() < LAB_TOLERANCE
    # Channels first ([3, ...]), the layout of a CHW image.
    chw = torch.from_numpy(rgb.T.copy()).float().to(device)
    assert np.abs(lab.rgb_to_lab(chw, dim=0).cpu().double().numpy().T - want).max() < LAB_TOLERANCE


def test_lab_matches_scikit_image_on_1000_random_colours() -> None:
    _check_lab("cpu")


@pytest.mark.parametrize("name", list(SAMPLES))
def test_lab_matches_scikit_image_on_the_sample_photos(name: str) -> None:
    rgb = _rgb(name) / 255.0
    want = color.rgb2lab(rgb)
    chw = torch.from_numpy(rgb).float().permute(2, 0, 1)
    got = lab.rgb_to_lab(chw, dim=0)
    assert np.abs(got.permute(1, 2, 0).double().numpy() - want).max() < LAB_TOLERANCE
    back = lab.lab_to_rgb(torch.from_numpy(want).float()).double().numpy()
    assert np.abs(back - color.lab2rgb(want)).max() < LAB_TOLERANCE
    assert np.abs(lab.lab_to_rgb(got, dim=0).permute(1, 2, 0).double().numpy() - rgb).max() < LAB_TOLERANCE


def test_lab_refuses_what_is_not_three_float_channels() -> None:
    with pytest.raises(ValueError, match="expected 3 channels on axis -1"):
        lab.rgb_to_lab(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        lab.lab_to_rgb(torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected a uint8 tensor"):
        lab.rgb8_to_lightness(torch.zeros(4, 3))


@CUDA
def test_lab_and_the_steps_on_cuda() -> None:
    _check_lab("cuda")
    rgb = torch.from_numpy(_rgb("astronaut"))
    ab = torch.randn(2, 512, 512) * 20
    cpu = steps.colour(steps.lightness(rgb), ab)
    gpu = steps.colour(steps.lightness(rgb.cuda()), ab.cuda())
    assert gpu.is_cuda and (gpu.cpu().int() - cpu.int()).abs().max() <= 1
    assert (steps.network_input(rgb.cuda(), 256).cpu() - steps.network_input(rgb, 256)).abs().max() < 1e-4


# -- DDColor's steps ----------------------------------------------------------------------------


def _unclipped_lightness_error(rgb_out: np.ndarray, lightness: np.ndarray) -> tuple[float, float]:
    """(max |ΔL| where no channel of the output is clipped at 0 or 255, the share of such pixels)."""
    inside = (rgb_out > 0).all(-1) & (rgb_out < 255).all(-1)
    delta = np.abs(color.rgb2lab(rgb_out / 255.0)[..., 0] - lightness)
    return float(delta[inside].max()), float(inside.mean())


def test_network_input_is_the_grey_rgb_at_the_chosen_size() -> None:
    grey = torch.from_numpy(_rgb("camera"))  # R = G = B: the grey RGB is the image itself, resized
    x = steps.network_input(grey, 256)
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    resized = torch.nn.functional.interpolate(
        grey.permute(2, 0, 1)[None].float() / 255, size=(256, 256), mode="bilinear"
    )
    assert (x - resized[0]).abs().max() < 1e-3
    photo = torch.from_numpy(_rgb("coffee"))  # colour in: equal channels out, with the resized image's L
    x = steps.network_input(photo, 512)
    assert x.shape == (3, 512, 512) and (x.max(0).values - x.min(0).values).max() < 1e-3
    small = torch.nn.functional.interpolate(
        photo.permute(2, 0, 1)[None].float() / 255, size=(512, 512), mode="bilinear"
    )
    want = color.rgb2lab(small[0].permute(1, 2, 0).double().numpy())[..., 0]
    assert np.abs(lab.rgb_to_lightness(x, dim=0).double().numpy() - want).max() < 1e-2


def test_colour_keeps_the_full_resolution_lightness() -> None:
    rgb = _rgb("chelsea")  # 300×451, not square
    L = steps.lightness(torch.from_numpy(rgb))
    assert np.abs(L.double().numpy() - color.rgb2lab(rgb / 255.0)[..., 0]).max() < LAB_TOLERANCE
    grey = steps.colour(L, torch.zeros(2, 64, 64))  # no colour: the grey version of the image
    assert grey.shape == (300, 451, 3) and grey.dtype == torch.uint8
    assert np.abs(color.rgb2lab(grey.numpy() / 255.0)[..., 0] - L.numpy()).max() < 0.5
    ab = torch.from_numpy(np.random.default_rng(1).normal(0, 25, (2, 64, 64))).float()
    out = steps.colour(L, ab).numpy()
    error, share = _unclipped_lightness_error(out, L.numpy())
    assert error < 0.5 and share > 0.5, (error, share)


def test_decode_keeps_alpha_where_there_is_one() -> None:
    rgba = np.random.default_rng(3).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    la = Image.fromarray(rgba[..., :2].copy(), "LA")
    buffer = io.BytesIO()
    la.save(buffer, format="PNG")
    palette = io.BytesIO()
    Image.fromarray(rgba[..., :3]).convert("P").save(palette, format="PNG", transparency=0)
    items = [encode(rgba, "PNG"), buffer.getvalue(), encode(rgba[..., :3].copy(), "JPEG"), encode(rgba[..., 0].copy()),
             palette.getvalue(), encode(rgba, "WEBP")]  # fmt: skip
    decoded = steps.decode(items, 10_000)
    assert [tuple(rgb.shape) for rgb, _ in decoded] == [(30, 40, 3)] * 6
    assert [alpha is not None for _, alpha in decoded] == [True, True, False, False, True, True]
    assert np.array_equal(decoded[0][1].numpy(), rgba[..., 3]) and np.array_equal(decoded[0][0].numpy(), rgba[..., :3])
    assert np.array_equal(decoded[1][1].numpy(), rgba[..., 1])  # LA: grey as RGB, its alpha
    assert np.array_equal(decoded[1][0].numpy(), np.repeat(rgba[..., :1], 3, axis=2))
    with pytest.raises(InvalidInputError, match="FORMAT jpeg cannot hold the alpha channel"):
        steps.refuse_jpeg_alpha("jpeg", decoded)
    steps.refuse_jpeg_alpha("png", decoded)
    steps.refuse_jpeg_alpha("jpeg", decoded[2:4])
    for bad, message in ((b"", "empty input"), (b"GIF89a", "not an image"), (encode(rgba, "PNG")[:200], "truncated")):
        with pytest.raises(InvalidInputError, match=message):
            steps.decode([bad], 10_000)
    with pytest.raises(InvalidInputError, match="exceeds the limit of 1000"):
        steps.decode([encode(rgba, "PNG")], 1000)


# -- the reference network and the manifest -----------------------------------------------------


def test_reference_colorizer_has_ddcolor_tiny_cost_and_the_contract() -> None:
    with torch.device("meta"):  # the cost from the shapes alone: no weights, no arithmetic
        full = reference.build(64).eval()
        small = reference.build(8).eval()
        gflop = count_flops(full, torch.empty(1, 3, 512, 512)) / 1e9
        assert 180 < gflop < 195, gflop  # DDColor-T at 512²: 193 GFLOP
        assert count_flops(full, torch.empty(1, 3, 256, 256)) / 1e9 == pytest.approx(gflop / 4, rel=0.01)
        assert 2.8 < count_flops(small, torch.empty(1, 3, 512, 512)) / 1e9 < 3.1  # the default manifest's width
    net = build_reference("colorizer", 4, 0)
    with torch.inference_mode():
        for side in (256, 512, 96):  # fully convolutional
            ab = net(torch.rand(2, 3, side, side))
            assert ab.shape == (2, 2, side, side) and ab.abs().max() <= reference.AB_RANGE
        again = build_reference("colorizer", 4, 0)(torch.full((1, 3, 256, 256), 0.5))  # seeded
        assert torch.equal(net(torch.full((1, 3, 256, 256), 0.5)), again)


def test_manifest_checks_the_colorizer_contract_per_size(tmp_path: Path) -> None:
    data = manifest_data()
    data["pipelines"]["colorize"]["network_256"] = ""  # the 512-only network for both sizes: refused
    with pytest.raises(ManifestError, match=r"pipelines\.colorize\.network: 'colorizer' does not take SIZE 256"):
        parse_manifest(data, tmp_path / "m.toml")
    data["networks"]["colorizer"]["inputs"][0] |= {
        "shape": [3, -1, -1], "min_shape": [3, 256, 256], "opt_shape": [3, 512, 512], "max_shape": [3, 512, 512],
    }  # fmt: skip
    data["networks"]["colorizer"]["outputs"][0] |= {"shape": [2, -1, -1], "opt_shape": [2, 512, 512]}
    manifest = parse_manifest(data, tmp_path / "m.toml")  # one dynamic network serves both sizes
    assert manifest.pipelines["colorize"].networks_by_size() == {512: "colorizer", 256: "colorizer"}
    data = manifest_data()
    data["networks"]["colorizer_256"]["outputs"][0]["shape"] = [3, 256, 256]
    with pytest.raises(ManifestError, match=r"network_256: 'colorizer_256' .* output 'output' is FP32 \[3, 256, 256\]"):
        parse_manifest(data, tmp_path / "m.toml")


# -- end to end ---------------------------------------------------------------------------------


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def served_colour(repository: Path, test_manifest):  # type: ignore[no-untyped-def]
    """What the server must answer, computed outside it: DDColor's steps around the same ONNX files on
    ONNX Runtime."""
    settings = test_manifest.pipelines["colorize"]
    sessions = {
        size: ort.InferenceSession(str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for size, name in settings.networks_by_size().items()
    }

    def compute(rgb: np.ndarray, size: int = 512) -> np.ndarray:
        image = torch.from_numpy(rgb)
        session = sessions[size]
        (ab,) = session.run(None, {session.get_inputs()[0].name: steps.network_input(image, size)[None].numpy()})
        return steps.colour(steps.lightness(image), torch.from_numpy(ab[0])).numpy()

    return compute


@pytest.mark.server
def test_greyscale_photo_comes_back_in_colour_at_its_size_with_its_lightness(
    client: TritonClient, served_colour
) -> None:  # type: ignore[no-untyped-def]
    camera = sample_array("camera")  # greyscale, 512×512
    grey = np.repeat(camera[..., None], 3, axis=2)
    lightness = color.rgb2lab(grey / 255.0)[..., 0]
    for size in (512, 256):
        out = _decoded(colorize_one(client, encode(camera, "PNG"), size=size))
        assert (out.format, out.mode, out.size) == ("PNG", "RGB", (512, 512))
        rgb = np.asarray(out)
        assert np.abs(rgb.astype(int) - served_colour(grey, size)).max() <= 1  # DDColor's steps, exactly
        assert np.ptp(rgb.astype(int), axis=2).max() > 5  # colour, not grey
        error, share = _unclipped_lightness_error(rgb, lightness)
        assert error < 0.5 and share > 0.5, (size, error, share)


@pytest.mark.server
def test_rgb_and_rgba_inputs_of_several_sizes_in_one_request(client: TritonClient, served_colour) -> None:  # type: ignore[no-untyped-def]
    coffee = sample_array("coffee")  # 400×600 RGB
    rgba = np.dstack([_rgb("chelsea")[:100, :150], np.tile(np.arange(150, dtype=np.uint8), (100, 1))])
    rgb_out, rgba_out = (_decoded(r) for r in colorize(client, encode(coffee, "JPEG"), encode(rgba, "PNG")))
    assert (rgb_out.mode, rgb_out.size) == ("RGB", (600, 400))
    assert (rgba_out.mode, rgba_out.size) == ("RGBA", (150, 100))
    out = np.asarray(rgba_out)
    assert np.array_equal(out[..., 3], rgba[..., 3])  # the alpha, exactly
    assert np.abs(out[..., :3].astype(int) - served_colour(rgba[..., :3].copy())).max() <= 1
    webp = _decoded(colorize_one(client, encode(rgba, "PNG"), fmt="webp", size=256))
    assert (webp.format, webp.mode) == ("WEBP", "RGBA") and np.array_equal(np.asarray(webp)[..., 3], rgba[..., 3])
    jpeg = _decoded(colorize_one(client, encode(coffee, "PNG"), fmt="jpeg"))
    assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", (600, 400))


def _colorizer_inferences(server) -> int:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url) as stats:
        return sum(
            int(entry["inference_count"])
            for name in ("colorizer", "colorizer_256")
            for entry in stats.get_inference_statistics(name)["model_stats"]
        )


SMALL_RGBA = np.dstack([sample_array("astronaut")[:48, :64], np.full((48, 64), 200, np.uint8)])
BAD_REQUESTS = [
    ("empty", dict(image=b""), "empty input: the image has no bytes"),
    ("not an image", dict(image=b"this is not an image at all"), "not an image: the 27 bytes are not a JPEG, PNG"),
    ("format", dict(fmt="gif"), "unsupported FORMAT 'gif': expected one of png, webp, jpeg"),
    ("size", dict(size=128), "unsupported SIZE '128': expected one of 512, 256"),
    ("jpeg alpha", dict(image=encode(SMALL_RGBA, "PNG"), fmt="jpeg"), "FORMAT jpeg cannot hold the alpha channel"),
]


@pytest.mark.server
@pytest.mark.parametrize(("case", "kwargs", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_before_the_network_and_the_server_keeps_serving(
    client: TritonClient, server, case: str, kwargs: dict, message: str
) -> None:  # type: ignore[no-untyped-def]
    small = encode(sample_array("astronaut")[:48, :64], "JPEG")
    before = _colorizer_inferences(server)
    with pytest.raises(InferenceError) as info:
        colorize_one(client, **{"image": small, **kwargs})
    assert info.value.is_invalid_argument, (case, info.value.status)
    assert info.value.status == ("StatusCode.INVALID_ARGUMENT" if client.protocol == "grpc" else "400")
    assert message in info.value.message
    assert _colorizer_inferences(server) == before  # refused before the network ran
    assert _decoded(colorize_one(client, small, size=256)).size == (64, 48)  # the next request still succeeds


@pytest.mark.server
def test_colorize_command_writes_every_file(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = []
    for name, array, fmt in (
        ("camera", sample_array("camera")[:64, :80], "PNG"),
        ("cat", _rgb("chelsea")[:50], "JPEG"),
    ):
        files.append(tmp_path / f"{name}.{fmt.lower()}")
        files[-1].write_bytes(encode(array, fmt))
    command = [sys.executable, "-m", "imgpipe.cli", "colorize", *map(str, files), "--url", server.grpc_url]
    env = {**os.environ, "COLUMNS": "300"}
    out = tmp_path / "out"
    done = subprocess.run(
        [*command, "-o", str(out), "--size", "256", "--format", "webp"], capture_output=True, text=True, timeout=300,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["camera.webp", "cat.webp"]
    assert _decoded((out / "camera.webp").read_bytes()).size == (80, 64)
    done = subprocess.run([*command, "--size", "300"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "300 is not one of 512, 256" in done.stderr
