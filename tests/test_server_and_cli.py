"""The launcher's failure messages, `imgpipe serve` start/stop, and the `remove-bg` / `build` commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imgpipe.samples import encode, sample_array
from imgpipe.server import (
    Ports,
    ServerError,
    TritonServer,
    explain_failure,
    free_ports,
    port_is_free,
    visible_gpus,
)
from tests.conftest import serve_banner

pytestmark = pytest.mark.server
IMGPIPE = [sys.executable, "-m", "imgpipe.cli"]


def test_a_taken_port_is_reported_before_starting(repository: Path) -> None:
    http, grpc, metrics = free_ports(3)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", grpc))
        blocker.listen()
        with pytest.raises(ServerError, match=f"grpc port {grpc} already in use"):
            TritonServer(repository, Ports(http, grpc, metrics)).start()


def test_a_model_that_fails_to_load_is_reported_with_tritons_reason(repository: Path, tmp_path: Path) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    (broken / "segmenter" / "1" / "model.onnx").write_bytes(b"definitely not an onnx file")
    server = TritonServer(broken, Ports(*free_ports(3)), startup_timeout_s=120)
    with pytest.raises(ServerError) as info:
        server.start()
    message = str(info.value)
    assert "model 'segmenter' failed to load" in message
    assert "onnx" in message.lower() or "protobuf" in message.lower()
    assert not server.is_running()


def test_explain_failure_quotes_load_and_port_errors() -> None:
    log = (
        "E1121 failed to load 'segmenter' version 1: Invalid argument: model input 'x' has no dims\n"
        "E1121 failed to start GRPC service: Unavailable - Socket '0.0.0.0:8001' already in use\n"
    )
    text = explain_failure(log)
    assert "model 'segmenter' failed to load: Invalid argument: model input 'x' has no dims" in text
    assert "failed to start GRPC service" in text


def test_serve_prints_endpoints_and_models_and_stops_on_sigterm(repository: Path) -> None:
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [*IMGPIPE, "serve", "-r", str(repository), "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.stdout is not None
    seen = serve_banner(proc, 180)
    output = "".join(seen)
    assert "tritonserver ready" in output, output
    assert f"127.0.0.1:{grpc}" in output and f"http://127.0.0.1:{http}" in output
    for model in ("remove_background", "segmenter", "bg_preprocess", "bg_postprocess"):
        assert model in output
    assert "READY" in output
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    assert all(port_is_free(p) for p in (http, grpc, metrics))  # the server released its ports


def test_remove_bg_command_writes_pngs_and_fails_on_bad_files(server: TritonServer, tmp_path: Path) -> None:
    inputs = []
    for name, fmt, suffix in (("astronaut", "JPEG", ".jpg"), ("coffee", "PNG", ".png"), ("chelsea", "WEBP", ".webp")):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(encode(sample_array(name), fmt))
        inputs.append(path)
    out = tmp_path / "out"
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        done = subprocess.run(
            [*IMGPIPE, "remove-bg", *map(str, inputs), "-o", str(out / protocol), "--url", url, "--protocol", protocol,
             "--concurrency", "3"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        for path in inputs:
            result = Image.open(out / protocol / f"{path.stem}.png")
            assert result.mode == "RGBA" and result.size == Image.open(path).size
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    done = subprocess.run(
        [*IMGPIPE, "remove-bg", str(bad), str(inputs[0]), "-o", str(out / "mixed"), "--url", server.grpc_url],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "not an image" in done.stderr
    assert (out / "mixed" / "astronaut.png").is_file()  # the good file still went through


def test_build_command_reports_manifest_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        '[networks.segmenter]\nsource = { kind = "reference", architecture = "segmenter" }\ninputs = []\n'
    )
    command = [*IMGPIPE, "build", "-m", str(manifest), "-r", str(tmp_path / "repo")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 1
    assert "networks.segmenter.outputs: required key is missing" in done.stderr


def test_an_installed_triton_is_used_where_the_wheel_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving image (NGC's tritonserver container) has /opt/tritonserver and no nvidia-pytriton wheel:
    `imgpipe serve` runs that server, with its own Python backend, and writes nothing beside the code (the
    image's root filesystem is read-only)."""
    from imgpipe.server import ServerError, TritonDistribution

    monkeypatch.setenv("IMGPIPE_TRITON_HOME", str(tmp_path / "nothing"))
    with pytest.raises(ServerError, match=r"no Triton server found: .*nothing/bin/tritonserver"):
        TritonDistribution.installed()
    home = tmp_path / "tritonserver"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "tritonserver").write_bytes(b"")
    monkeypatch.setenv("IMGPIPE_TRITON_HOME", str(home))
    dist = TritonDistribution.installed()
    assert dist.system and dist.binary == home / "bin" / "tritonserver" and dist.libs == home / "lib"
    cache = tmp_path / "read-only" / "cache"
    assert dist.prepare_backends(cache) == home / "backends" and not cache.exists()


def test_the_cuda_memory_pool_is_sized_for_each_visible_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the GPU hand-over between Python-backend steps: Triton's 64 MiB default pool is too small for a
    batch of 1024² tensors (a size per GPU, none on a machine without one)."""
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset"):
        (tmp_path / name).touch()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(tmp_path) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus(tmp_path) == [0]  # Triton numbers the visible devices from 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(tmp_path) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    flags = [a for a in TritonServer(tmp_path).command(tmp_path) if a.startswith("--cuda-memory-pool-byte-size")]
    assert flags == [f"--cuda-memory-pool-byte-size={g}:{1024 << 20}" for g in visible_gpus()]
