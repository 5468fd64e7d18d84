"""On a GPU: the served pipelines run on it and give what the CPU gives.

One repository with everything on CPU instances (ONNX Runtime, pre/post on the CPU), one with the
default GPU placement (CUDA runner, pre/post on the GPU) in FP32, and one in FP16; the three serve at
once. FP32 on the GPU must match the CPU within the accuracy gate's tolerances, FP16 image outputs must
stay ≥ 40 dB PSNR against FP32. Skipped without CUDA (it ran on the H100/H200 machine).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.build.repository import build_repository
from imgpipe.build.targets import BuildOptions
from imgpipe.clients.colorize import colorize_one
from imgpipe.clients.faces import detect_faces, swap_face
from imgpipe.clients.reconstruct import reconstruct_face
from imgpipe.clients.remove_background import remove_background
from imgpipe.clients.triton import TritonClient
from imgpipe.manifest import parse_manifest
from imgpipe.samples import encode, sample_array
from imgpipe.server import Ports, TritonServer, free_ports
from tests.conftest import manifest_data

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]
SAMPLES = ("astronaut", "coffee", "chelsea", "camera", "hopper")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TritonClient]]:
    variants = {}
    cpu = manifest_data()
    for table in (*cpu["networks"].values(), *cpu["pipelines"].values()):
        table["instances"] = {**table.get("instances", {}), "kind": "cpu"}
    variants["cpu"] = (cpu, BuildOptions())
    variants["gpu"] = (manifest_data(), BuildOptions())
    variants["fp16"] = (manifest_data(), BuildOptions(precision="fp16"))
    with ExitStack() as stack:
        connected = {}
        for name, (data, options) in variants.items():
            tmp = tmp_path_factory.mktemp(name)
            repo = tmp / "repo"
            build_repository(parse_manifest(data, tmp / "manifest.toml"), repo, options)
            log = tmp / "triton.log"
            server = stack.enter_context(TritonServer(repo, Ports(*free_ports(3)), log_path=log))
            if name != "cpu":
                text = log.read_text()
                assert "(GPU device 0)" in text and "on the CPU instead" not in text, text[-3000:]
            connected[name] = stack.enter_context(TritonClient(server.grpc_url, "grpc"))
        yield connected


@pytest.mark.parametrize("sample", SAMPLES)
def test_masks_match_across_devices_and_precisions(clients: dict[str, TritonClient], sample: str) -> None:
    image = encode(sample_array(sample), "JPEG")
    masks = {name: _pixels(remove_background(c, image, mode="mask")) for name, c in clients.items()}
    error, psnr = np.abs(masks["gpu"].astype(int) - masks["cpu"]).max(), _psnr(masks["fp16"], masks["gpu"])
    across = _psnr(masks["gpu"], masks["cpu"])
    print(f"{sample}: mask GPU vs CPU max {error} ({across:.1f} dB), FP16 vs FP32 {psnr:.1f} dB")
    # The GPU decodes JPEG with nvJPEG (pixels differ by a level or two from Pillow's) and runs the net in
    # TF32; the guided filter follows the image, so single outline pixels move. Bound: the segmenter's
    # accuracy gate (max abs on the probabilities, in alpha levels) and 40 dB over the whole mask.
    manifest = parse_manifest(manifest_data())
    seg = manifest.network(manifest.pipelines["remove_background"].segmenter)
    assert error <= 255 * seg.tolerance.max_abs and across >= 40.0 and psnr >= 40.0


def test_faces_match_across_devices(clients: dict[str, TritonClient]) -> None:
    for sample in SAMPLES:
        image = encode(sample_array(sample), "PNG")
        found = {name: detect_faces(c, image, mesh=True) for name, c in clients.items()}
        # FP32 on the GPU: within a pixel of the CPU. FP16: MTCNN's box regression moves by a few pixels
        # (hopper: 6.7 px of a 175 px box on an H200), and the mesh with it: within 5 % of the face's size.
        for name, share in (("gpu", 0.0), ("fp16", 0.05)):
            assert len(found[name]) == len(found["cpu"]), (sample, name)
            for a, b in zip(found[name], found["cpu"], strict=True):
                bound = max(1.0, share * max(b.box[2:]))
                box_error = np.abs(np.array(a.box) - np.array(b.box)).max()
                mesh_error = np.abs(np.array(a.mesh) - np.array(b.mesh)).max()
                print(f"{sample} {name}: box vs CPU max {box_error:.3f} px, mesh {mesh_error:.3f} px")
                assert box_error <= bound and mesh_error <= bound
                assert abs(a.score - b.score) <= 1e-3


def test_swaps_match_across_devices(clients: dict[str, TritonClient]) -> None:
    source, target = encode(sample_array("hopper"), "PNG"), encode(sample_array("astronaut"), "PNG")
    out = {name: swap_face(c, source, target) for name, c in clients.items()}
    assert {r.swapped for r in out.values()} == {1}
    gpu, fp16 = _psnr(_pixels(out["gpu"].image), _pixels(out["cpu"].image)), _psnr(
        _pixels(out["fp16"].image), _pixels(out["gpu"].image)
    )
    print(f"swap PSNR: GPU vs CPU {gpu:.1f} dB, FP16 vs FP32 {fp16:.1f} dB")
    assert gpu >= 40.0 and fp16 >= 40.0



def test_colour_matches_across_devices(clients: dict[str, TritonClient]) -> None:
    for sample in ("camera", "astronaut"):
        image = encode(sample_array(sample), "PNG")
        out = {name: _pixels(colorize_one(c, image)) for name, c in clients.items()}
        gpu, fp16 = _psnr(out["gpu"], out["cpu"]), _psnr(out["fp16"], out["gpu"])
        print(f"colorize {sample}: GPU vs CPU {gpu:.1f} dB, FP16 vs FP32 {fp16:.1f} dB")
        assert out["gpu"].shape == out["cpu"].shape and gpu >= 40.0 and fp16 >= 40.0


def test_meshes_match_across_devices(clients: dict[str, TritonClient]) -> None:
    image = encode(sample_array("astronaut"), "PNG")
    out = {name: reconstruct_face(c, image, fmt="ply") for name, c in clients.items()}
    vertices = {name: _ply_vertices(r.faces[0].mesh) for name, r in out.items()}
    for name, bound in (("gpu", 1e-3), ("fp16", 5e-3)):  # metres: 1 mm (GPU, FP32), 5 mm (FP16)
        error = np.abs(vertices[name] - vertices["cpu"]).max()
        pose = np.abs(np.array(out[name].faces[0].pose) - np.array(out["cpu"].faces[0].pose)).max()
        print(f"reconstruct {name} vs CPU: vertices max {error * 1000:.3f} mm, pose max {pose:.3f} deg")
        assert error <= bound and pose <= 1.0
    for method in ("3dmm",):
        coefficients = {
            n: np.array(reconstruct_face(c, image, method=method).faces[0].coefficients) for n, c in clients.items()
        }
        error = np.abs(coefficients["gpu"] - coefficients["cpu"]).max()
        print(f"reconstruct {method} GPU vs CPU: coefficients max {error:.2e}")
        regressor = parse_manifest(manifest_data()).network("face_regressor")
        assert error <= regressor.tolerance.max_abs  # the accuracy gate's bound



def _ply_vertices(data: bytes) -> np.ndarray:
    from tests.test_reconstruct_face import parse_ply  # the tests' own reader (trimesh needs scipy, which
    # the GPU node builds for numpy 2 while Triton's backend needs numpy 1.26)

    vertex, _ = parse_ply(data)
    return np.stack([vertex["x"], vertex["y"], vertex["z"]], 1).astype(np.float64)
