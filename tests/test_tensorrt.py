"""Everything around TensorRT runs here: profiles, cache keys, plan files, configs, trtexec lines.

The builder itself is exercised by the test marked ``tensorrt``: TensorRT cannot be installed on the
development and CI machines (only download stubs are on the package index), so it is skipped there.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgpipe.build import tensorrt_plan as trtp
from imgpipe.build.export import onnx_for
from imgpipe.build.repository import build_repository
from imgpipe.build.targets import BuildOptions, resolve_archs, tensorrt_model_spec
from imgpipe.build.triton_config import to_proto
from imgpipe.manifest import Manifest, parse_manifest
from tests.conftest import manifest_data


def _net(**changes: object):  # type: ignore[no-untyped-def]
    data = manifest_data()
    data["networks"]["segmenter"].update(changes)
    return parse_manifest(data).network("segmenter")


def test_profiles_follow_the_manifest() -> None:
    (profile,) = trtp.profiles_for(_net())
    assert profile.shapes == {"input": ((1, 3, 1024, 1024), (4, 3, 1024, 1024), (4, 3, 1024, 1024))}
    dynamic = _net(
        inputs=[{"name": "input", "dtype": "FP32", "shape": [3, -1, -1], "min_shape": [3, 256, 256],
                 "opt_shape": [3, 512, 512], "max_shape": [3, 1024, 1024]}],
        batching={"max_batch_size": 8, "preferred_batch_sizes": [2, 4], "min_batch": 1},
    )  # fmt: skip
    (p,) = trtp.profiles_for(dynamic)
    assert p.shapes["input"] == ((1, 3, 256, 256), (4, 3, 512, 512), (8, 3, 1024, 1024))
    per_instance = _net(instances={"count": 3, "kind": "gpu", "profile_per_instance": True})
    assert len(trtp.profiles_for(per_instance)) == 3


def test_plan_key_changes_with_each_ingredient() -> None:
    net = _net()
    settings = trtp.PlanSettings.of(net)
    profiles = trtp.profiles_for(net)
    base = trtp.plan_key("a" * 64, settings, profiles, "10.7.0", "9.0")
    assert base == trtp.plan_key("a" * 64, settings, profiles, "10.7.0", "9.0")
    variants = [
        trtp.plan_key("b" * 64, settings, profiles, "10.7.0", "9.0"),
        trtp.plan_key("a" * 64, dataclasses.replace(settings, precision="fp16"), profiles, "10.7.0", "9.0"),
        trtp.plan_key("a" * 64, settings, trtp.profiles_for(_net(batching={"max_batch_size": 8})), "10.7.0", "9.0"),
        trtp.plan_key("a" * 64, settings, profiles, "10.8.0", "9.0"),
        trtp.plan_key("a" * 64, settings, profiles, "10.7.0", "8.0"),
    ]
    assert len({base, *variants}) == 6


def test_trtexec_lines_carry_profiles_and_precision_flags(tmp_path: Path) -> None:
    net = _net()
    onnx, plan, cache = tmp_path / "m.onnx", tmp_path / "model_sm90.plan", tmp_path / "timing.cache"
    fp16 = trtp.trtexec_command(onnx, plan, net, trtp.PlanSettings.of(net, "fp16"), cache)
    assert fp16[:3] == ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}"]
    assert "--minShapes=input:1x3x1024x1024" in fp16 and "--optShapes=input:4x3x1024x1024" in fp16
    assert "--maxShapes=input:4x3x1024x1024" in fp16 and "--fp16" in fp16 and "--int8" not in fp16
    assert "--memPoolSize=workspace:4096" in fp16 and f"--timingCacheFile={cache}" in fp16
    calib = tmp_path / "seg.calib"
    int8 = trtp.trtexec_command(onnx, plan, net, trtp.PlanSettings.of(net, "int8"), cache, calib)
    assert "--int8" in int8 and f"--calib={calib}" in int8
    compat = dataclasses.replace(trtp.PlanSettings.of(net), hardware_compatible=True, version_compatible=True)
    line = trtp.trtexec_command(onnx, plan, net, compat, cache)
    assert "--hardwareCompatibilityLevel=ampere+" in line and "--versionCompatible" in line and "--fp16" not in line


def test_plan_config_lists_one_plan_per_architecture() -> None:
    net = _net(instances={"count": 2, "kind": "gpu", "gpus": [0], "profile_per_instance": True},
               tensorrt={"cuda_graphs": True})  # fmt: skip
    plans = {"8.0": trtp.plan_filename("8.0"), "9.0": trtp.plan_filename("9.0")}
    config = to_proto(tensorrt_model_spec(net, plans, profiles=2))
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"8.0": "model_sm80.plan", "9.0": "model_sm90.plan"}
    assert config.optimization.cuda.graphs
    assert [(g.count, list(g.profile), g.kind == g.KIND_GPU) for g in config.instance_group] == [
        (1, ["0"], True),
        (1, ["1"], True),
    ]
    compat = to_proto(tensorrt_model_spec(_net(), {"ampere+": "model.plan"}, profiles=1))
    assert compat.default_model_filename == "model.plan" and not compat.cc_model_filenames


def test_architectures_to_build() -> None:
    settings = trtp.PlanSettings()
    h100 = trtp.Gpu("NVIDIA H100", "9.0")
    assert resolve_archs((), h100, settings, dry_run=False) == ["9.0"]
    assert resolve_archs(("8.0", "9.0"), None, settings, dry_run=True) == ["8.0", "9.0"]
    assert resolve_archs((), None, settings, dry_run=True) == list(trtp.DEFAULT_ARCHS)
    assert resolve_archs(("8.0",), h100, dataclasses.replace(settings, hardware_compatible=True), False) == ["ampere+"]
    with pytest.raises(trtp.PlanBuildError, match="no GPU found"):
        resolve_archs((), None, settings, dry_run=False)


@pytest.mark.skipif(trtp.local_gpu() is not None, reason="checks the message on a machine without a GPU")
def test_building_plans_without_a_gpu_says_what_to_do(test_manifest: Manifest, tmp_path: Path) -> None:
    with pytest.raises(trtp.PlanBuildError, match=r"no GPU found.*--dry-run"):
        build_repository(test_manifest, tmp_path / "repo", BuildOptions(target="tensorrt"), models=["segmenter"])


def test_dry_run_prints_trtexec_lines_and_writes_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = {**os.environ, "COLUMNS": "400"}
    done = subprocess.run(
        [sys.executable, "-m", "imgpipe.cli", "build", "--target", "tensorrt", "--dry-run", "--precision", "fp16",
         "--gpu-arch", "8.0,9.0", "-r", str(repo), "--set", "networks.segmenter.source.width=4",
         "--models", "segmenter"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("trtexec ")]
    assert len(lines) == 2
    assert f"--saveEngine={repo}/segmenter/1/model_sm80.plan" in lines[0]
    assert f"--saveEngine={repo}/segmenter/1/model_sm90.plan" in lines[1]
    assert all("--fp16" in line and "--optShapes=input:4x3x1024x1024" in line for line in lines)
    assert "dry run" in done.stdout
    assert not repo.exists()


@pytest.mark.tensorrt
def test_plan_builds_loads_and_matches_onnx(test_manifest: Manifest, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be on these machines)")
    if trtp.local_gpu() is None:
        pytest.skip("no GPU")
    net = test_manifest.network("segmenter")
    export = onnx_for(test_manifest, net, cache_dir=tmp_path)
    plan = tmp_path / "model.plan"
    meta = trtp.build_plan(export.onnx_path, plan, net, trtp.PlanSettings.of(net, "fp16"), tmp_path / "timing.cache")
    assert plan.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    assert meta["compute_capability"] and meta["tensorrt"]
    x = np.random.default_rng(0).standard_normal((2, 3, 1024, 1024)).astype(np.float32)
    got = trtp.run_plan(plan, {"input": x})["logits"]
    import onnxruntime as ort

    (expected,) = ort.InferenceSession(str(export.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 0.05


class FakePlanBuilder:
    """A :class:`~imgpipe.build.targets.PlanBuilder` for one GPU architecture, without TensorRT: a "plan"
    is a file naming its architecture, and running it runs the ONNX with ONNX Runtime (or, with
    ``drift``, returns outputs shifted by that much)."""

    def __init__(self, cc: str, onnx_path: Path, drift: float = 0.0) -> None:
        self.cc, self.onnx_path, self.drift = cc, onnx_path, drift
        self.built: list[str] = []

    def tensorrt_version(self) -> str:
        return "10.7.0"

    def local_gpu(self) -> trtp.Gpu:
        return trtp.Gpu(f"fake GPU sm{self.cc.replace('.', '')}", self.cc)

    def build_plan(self, onnx_path, plan_path, net, settings, timing_cache, calibration=(), calib_cache=None):  # type: ignore[no-untyped-def]
        plan_path.write_bytes(f"plan for {self.cc}, {settings.precision}".encode())
        self.built.append(plan_path.name)
        return {"plan": plan_path.name, "gpu": self.local_gpu().name, "compute_capability": self.cc}

    def run_plan(self, plan_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from imgpipe.build.accuracy import onnx_runner

        assert plan_path.read_bytes().startswith(f"plan for {self.cc}".encode())
        return {k: v + self.drift for k, v in onnx_runner(self.onnx_path)(inputs).items()}


def test_plans_of_several_architectures_join_one_version(test_manifest: Manifest, tmp_path: Path) -> None:
    from imgpipe.build.accuracy import AccuracyError
    from imgpipe.build.versions import versions

    repo = tmp_path / "repo"
    onnx = onnx_for(test_manifest, test_manifest.network("segmenter")).onnx_path
    options = BuildOptions(target="tensorrt")

    def build(cc: str, opts: BuildOptions = options, drift: float = 0.0):  # type: ignore[no-untyped-def]
        builder = FakePlanBuilder(cc, onnx, drift)
        (result,) = build_repository(test_manifest, repo, opts, models=["segmenter"], plan_builder=builder)
        return result, builder

    a100, _ = build("8.0")
    h100, _ = build("9.0")  # a node of another architecture adds its plan to the same version
    again, builder = build("9.0")
    assert (a100.action, h100.action, again.action) == ("version 1", "version 1 (+9.0)", "unchanged")
    assert builder.built == []
    config = to_proto_of(repo)
    assert dict(config.cc_model_filenames) == {"8.0": "model_sm80.plan", "9.0": "model_sm90.plan"}
    assert config.platform == "tensorrt_plan"
    (version,) = versions(repo / "segmenter")
    assert set(version.metadata["plans"]) == {"8.0", "9.0"}
    assert all(p["gate"] and all(e["failures"] == [] for e in p["gate"]) for p in version.metadata["plans"].values())

    fp16, _ = build("9.0", BuildOptions(target="tensorrt", precision="fp16"))  # new settings: a new version
    assert fp16.action == "version 2"
    assert dict(to_proto_of(repo).cc_model_filenames) == {"9.0": "model_sm90.plan"}

    with pytest.raises(AccuracyError):  # a plan that drifts past the tolerance is discarded
        build("8.0", BuildOptions(target="tensorrt", precision="fp16"), drift=1.0)
    assert not (repo / "segmenter" / "2" / "model_sm80.plan").exists()
    assert [v.number for v in versions(repo / "segmenter")] == [1, 2]


def to_proto_of(repo: Path):  # type: ignore[no-untyped-def]
    from imgpipe.build.triton_config import parse

    return parse((repo / "segmenter" / "config.pbtxt").read_text())
