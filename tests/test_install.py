"""A non-editable install serves the same repository, from any folder: no checkout path is needed.

A fresh venv gets the imgpipe wheel (built from this tree, `pip install` without `-e`); its third-party
packages come from the test environment through a ``.pth`` file (installing torch and the server again
would take minutes and is not what is tested). From an empty folder, `imgpipe build` uses the
manifest shipped in the package and `imgpipe serve` serves every pipeline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from imgpipe.clients.faces import detect_faces, swap_face
from imgpipe.clients.remove_background import remove_background
from imgpipe.clients.triton import TritonClient
from imgpipe.paths import CACHE_DIR, ROOT
from imgpipe.samples import encode, sample_array
from imgpipe.server import free_ports

pytestmark = pytest.mark.server


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_wheel_install_builds_and_serves_every_pipeline_from_another_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("IMGPIPE_ROOT", "PYTHONPATH", "VIRTUAL_ENV")}
    env["IMGPIPE_CACHE"] = str(CACHE_DIR)  # reuse exported ONNX files (keyed by content, safe to share)
    env["COLUMNS"] = "200"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
                .strip())  # fmt: skip
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], tmp_path, env)
    (wheel,) = wheels.glob("imgpipe-*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
         tmp_path, env)  # fmt: skip
    where = _run([str(python), "-c", "import imgpipe, imgpipe.paths as p; print(imgpipe.__file__); print(p.ROOT)"],
                 tmp_path / "wheels", env).split()  # fmt: skip
    assert where[0].startswith(str(site)) and where[1] == str(tmp_path / "wheels")  # installed copy, cwd as root

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imgpipe = str(venv / "bin" / "imgpipe")
    small = ["--set", "networks.segmenter.source.width=4", "--set", "networks.swapper.source.width=4"]
    _run([imgpipe, "build", *small], elsewhere, env)
    repo = elsewhere / "model_repository"
    assert {p.name for p in repo.iterdir() if p.is_dir()} >= {"remove_background", "detect_faces", "swap_face"}
    adapters = {p.read_text() for p in repo.glob("*/*/model.py")}
    assert len(adapters) == 1 and "load_step" in adapters.pop()  # one generic adapter, from the package

    http, grpc, metrics = free_ports(3)
    server = subprocess.Popen(
        [imgpipe, "serve", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        seen, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C stops the server" in line for line in seen):
            line = server.stdout.readline()
            if not line:
                break
            seen.append(line)
        assert any("Ctrl-C stops the server" in line for line in seen), "".join(seen)
        astronaut = encode(sample_array("astronaut"), "JPEG")
        with TritonClient(f"127.0.0.1:{grpc}", "grpc") as client:
            cutout = remove_background(client, astronaut)
            assert cutout[:8] == b"\x89PNG\r\n\x1a\n"
            (face,) = detect_faces(client, astronaut)
            assert face.score > 0.99
            swapped = swap_face(client, astronaut, encode(np.ascontiguousarray(sample_array("astronaut")), "PNG"))
            assert swapped.swapped == 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=90)
    assert server.returncode == 0
