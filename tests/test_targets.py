"""Targets, versions, rollback, the accuracy gate and serving knobs (issue: build system)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.build.accuracy import AccuracyError
from imgpipe.build.repository import build_repository, validate_repository
from imgpipe.build.targets import BuildOptions
from imgpipe.build.triton_config import parse
from imgpipe.build.versions import VersionError, rollback, served, versions
from imgpipe.manifest import Manifest, parse_manifest
from tests.conftest import manifest_data

IMGPIPE = [sys.executable, "-m", "imgpipe.cli"]
WIDTH4 = ["--set", "networks.segmenter.source.width=4"]


def _manifest(tmp_path: Path, **overrides: object) -> Manifest:
    """The test manifest with remove_background on the RMBG-2.0 / BiRefNet reference segmenter (the
    contract users' ONNX files follow), whose knobs these tests turn."""
    data = manifest_data()
    data["pipelines"]["remove_background"]["segmenter"] = "segmenter"
    for dotted, value in overrides.items():
        table = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return parse_manifest(data, tmp_path / "manifest.toml")


def _imgpipe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([*IMGPIPE, *args], capture_output=True, text=True, env=env, timeout=300)


def _config(repo: Path, model: str = "segmenter"):  # type: ignore[no-untyped-def]
    return parse((repo / model / "config.pbtxt").read_text())


def test_identical_build_writes_no_version_and_a_changed_setting_writes_the_next(
    test_manifest: Manifest, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    build_repository(test_manifest, repo, models=["segmenter"])
    again = build_repository(test_manifest, repo, models=["segmenter"])
    assert again[0].action == "unchanged"
    assert [v.number for v in versions(repo / "segmenter")] == [1]
    fp16 = build_repository(test_manifest, repo, BuildOptions(precision="fp16"), models=["segmenter"])
    assert fp16[0].action == "version 2"
    (v1, v2) = versions(repo / "segmenter")
    assert (v1.metadata["precision"], v2.metadata["precision"]) == ("fp32", "fp16")
    assert v1.metadata["onnx_sha256"] == v2.metadata["onnx_sha256"] and v1.metadata["key"] != v2.metadata["key"]
    assert served(repo / "segmenter") == [2]
    # A serving-only knob rewrites the config, never the artifact.
    delay = _manifest(tmp_path, networks__segmenter__batching__max_queue_delay_us=777)
    knob = build_repository(delay, repo, BuildOptions(precision="fp16"), models=["segmenter"])
    assert knob[0].action == "unchanged" and len(versions(repo / "segmenter")) == 2
    assert _config(repo).dynamic_batching.max_queue_delay_microseconds == 777


def test_rollback_pins_the_previous_version_until_a_new_build(test_manifest: Manifest, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_repository(test_manifest, repo, models=["segmenter"])
    with pytest.raises(VersionError, match="no version older than 1"):
        rollback(repo / "segmenter")
    build_repository(test_manifest, repo, BuildOptions(precision="fp16"), models=["segmenter"])
    assert rollback(repo / "segmenter") == 1
    assert served(repo / "segmenter") == [1]
    assert list(_config(repo).version_policy.specific.versions) == [1]
    build_repository(test_manifest, repo, BuildOptions(precision="fp16"), models=["segmenter"])  # unchanged
    assert served(repo / "segmenter") == [1], "an unchanged build keeps the rollback"
    build_repository(test_manifest, repo, BuildOptions(precision="int8"), models=["segmenter"])  # version 3
    assert served(repo / "segmenter") == [3]
    assert _config(repo).version_policy.latest.num_versions == 1
    with pytest.raises(VersionError, match="no version 9"):
        rollback(repo / "segmenter", to=9)
    build_repository(test_manifest, repo, BuildOptions(target="onnxruntime"), models=["segmenter"])
    with pytest.raises(VersionError, match="built for the python target"):
        rollback(repo / "segmenter")


def test_keep_versions_serves_the_latest_n(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, networks__segmenter__serving={"keep_versions": 2})
    repo = tmp_path / "repo"
    for precision in ("fp32", "fp16", "int8"):
        build_repository(manifest, repo, BuildOptions(precision=precision), models=["segmenter"])
    assert _config(repo).version_policy.latest.num_versions == 2
    assert served(repo / "segmenter") == [2, 3]


def test_gate_reports_real_fp16_error_and_a_drifting_build_is_discarded(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    loose = _manifest(tmp_path)
    (fp16,) = build_repository(loose, repo, BuildOptions(precision="fp16"), models=["segmenter"])
    error, torch_module = fp16.gate  # the ONNX Runtime artifact, then the CUDA runner's module (here on the CPU)
    assert torch_module.output == "logits (torch, cpu)" and torch_module.passed
    assert error.passed and 0 < error.max_abs < loose.network("segmenter").tolerance.max_abs
    assert error.psnr is not None and 40 < error.psnr < 200

    strict = _manifest(tmp_path, networks__segmenter__tolerance={"max_abs": error.max_abs / 10, "mean_abs": 1.0})
    with pytest.raises(AccuracyError, match=r"segmenter\.logits: max abs error .* > "):
        build_repository(strict, repo, BuildOptions(precision="int8"), models=["segmenter"])
    assert [v.number for v in versions(repo / "segmenter")] == [1], "the drifting version was removed"
    (again,) = (validate_repository(strict, repo)["segmenter"],)
    assert not again[0].passed and "max abs error" in again[0].failures[0]
    assert validate_repository(loose, repo)["segmenter"][0].passed


def test_validate_command_fails_when_tolerance_is_below_the_real_error(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    built = _imgpipe("build", "-r", repo, *WIDTH4, "--precision", "fp16", "--models", "segmenter")
    assert built.returncode == 0, built.stderr
    assert "accuracy gate" in built.stdout and "pass" in built.stdout
    ok = _imgpipe("validate", "-r", repo, *WIDTH4)
    assert ok.returncode == 0, ok.stderr
    assert "segmenter" in ok.stdout and "max abs" in ok.stdout
    tight = _imgpipe("validate", "-r", repo, *WIDTH4, "--set", "networks.segmenter.tolerance.max_abs=1e-7")
    assert tight.returncode == 1
    assert "FAIL" in tight.stdout and "outside tolerance: segmenter.logits" in tight.stderr
    listed = _imgpipe("versions", "segmenter", "-r", repo)
    assert listed.returncode == 0 and "fp16" in listed.stdout and "python" in listed.stdout


def test_onnxruntime_target_config(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, networks__segmenter__instances={"count": 2, "kind": "gpu", "gpus": [0, 1]})
    repo = tmp_path / "repo"
    build_repository(manifest, repo, BuildOptions(target="onnxruntime", precision="fp16"))
    config = _config(repo)
    assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    (group,) = config.instance_group
    assert group.kind == group.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    (acc,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_engine_cache_enable"] == "true"
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert (repo / "segmenter" / "1" / "model.onnx").is_file() and not (repo / "segmenter" / "1" / "model.py").exists()
    # the pipelines are the same on every target
    assert _config(repo, "remove_background").ensemble_scheduling.step[1].model_name == "segmenter"


def test_serving_knobs_reach_the_config(tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        networks__segmenter__batching__queue={
            "max_queue_size": 9,
            "timeout_action": "DELAY",
            "default_timeout_us": 5000,
            "allow_timeout_override": True,
        },
        networks__segmenter__instances={"count": 3, "kind": "cpu"},
        networks__segmenter__serving={"warmup": "sample", "response_cache": True, "keep_versions": 2},
    )
    repo = tmp_path / "repo"
    build_repository(manifest, repo)
    config = _config(repo)
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds, policy.allow_timeout_override) == (
        9,
        5000,
        True,
    )
    assert policy.timeout_action == policy.DELAY
    assert config.instance_group[0].count == 3
    assert config.response_cache.enable and config.version_policy.latest.num_versions == 2
    (warmup,) = config.model_warmup
    assert warmup.inputs["input"].input_data_file == "input"
    sample = repo / "segmenter" / "warmup" / "input"
    assert sample.stat().st_size == 3 * 1024 * 1024 * 4  # one preprocessed FP32 image


@pytest.mark.server
def test_server_loads_a_repository_with_every_knob_and_serves(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    from imgpipe.clients.remove_background import remove_background
    from imgpipe.clients.triton import TritonClient
    from imgpipe.server import Ports, TritonServer, free_ports

    manifest = _manifest(
        tmp_path,
        networks__segmenter__batching__queue={
            "max_queue_size": 16,
            "timeout_action": "DELAY",
            "default_timeout_us": 10**7,
        },
        networks__segmenter__instances={"count": 2, "kind": "cpu"},
        networks__segmenter__serving={"warmup": "sample", "response_cache": True, "keep_versions": 2},
    )
    repo = tmp_path / "repo"
    build_repository(manifest, repo, BuildOptions(precision="fp16"))
    with TritonServer(repo, Ports(*free_ports(3)), cache_mib=16) as server:
        states = {(m["name"], m.get("version")): m.get("state") for m in server.loaded_models()}
        assert states[("segmenter", "1")] == "READY"
        with TritonClient(server.grpc_url, "grpc") as client:
            first = remove_background(client, astronaut_jpeg)
            assert first[:8] == b"\x89PNG\r\n\x1a\n"
            stats = client.connection.get_inference_statistics("segmenter", as_json=True)["model_stats"][0]
            assert int(stats["inference_count"]) >= 1


@pytest.mark.server
def test_rollback_reaches_a_polling_server(test_manifest: Manifest, tmp_path: Path) -> None:
    import time

    import tritonclient.http as httpclient

    from imgpipe.server import Ports, TritonServer, free_ports

    repo = tmp_path / "repo"
    build_repository(test_manifest, repo)
    build_repository(test_manifest, repo, BuildOptions(precision="fp16"), models=["segmenter"])
    with TritonServer(repo, Ports(*free_ports(3)), poll_secs=1) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("segmenter", "2") and not client.is_model_ready("segmenter", "1")
        rollback(repo / "segmenter")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.is_model_ready("segmenter", "1"):
            time.sleep(0.5)
        assert client.is_model_ready("segmenter", "1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client.is_model_ready("segmenter", "2"):
            time.sleep(0.5)
        assert not client.is_model_ready("segmenter", "2")
        client.close()  # an open keep-alive connection would hold Triton's shutdown for its exit timeout


@pytest.mark.parametrize("name", ["colorizer", "face_regressor"])
def test_the_new_services_networks_build_in_int8_through_the_gate(tmp_path: Path, name: str) -> None:
    """The colorizer and the 3DMM regressor take INT8 (QDQ, calibrated on photos through their own
    preprocessing: DDColor's grey RGB, RGB /255) and pass their tolerance like every other network."""
    manifest = _manifest(tmp_path)
    net = manifest.network(name)
    assert net.calibration.preprocessing in ("ddcolor", "unit_chw")
    (built,) = build_repository(manifest, tmp_path / "repo", BuildOptions(precision="int8"), models=[name])
    error = built.gate[0]
    print(f"{name} int8: max abs {error.max_abs:.4g}, mean abs {error.mean_abs:.4g}, psnr {error.psnr}")
    assert error.passed and 0 < error.max_abs <= net.tolerance.max_abs  # quantised: not bit-exact, within the gate
