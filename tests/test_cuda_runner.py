"""The CUDA runner (PyTorch) of the python target: module loading (reference rebuilt, ONNX interpreted),
precision, CUDA graphs per batch bucket, the config it gets and its CPU fallback. The CUDA cases are
skipped without a GPU (they ran on the H100/H200 machine); everything else runs here on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from imgpipe.build.accuracy import onnx_runner
from imgpipe.build.calibration import sample_batches
from imgpipe.build.repository import build_repository
from imgpipe.build.triton_config import parse
from imgpipe.ensembles.onnx_torch import OnnxModule, UnsupportedOnnxError
from imgpipe.ensembles.runners import TorchRunner, torch_module
from imgpipe.manifest import Manifest, ManifestError, parse_manifest
from tests.conftest import manifest_data

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
NETWORKS = (
    "segmenter", "pnet", "rnet", "onet", "recognizer",
    "swapper",
    "selfie_segmenter", "blazeface", "face_mesh",
    "colorizer", "face_regressor",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    manifest = parse_manifest(manifest_data(), tmp_path_factory.mktemp("m") / "manifest.toml")
    repo = tmp_path_factory.mktemp("repo")
    build_repository(manifest, repo, models=list(NETWORKS))
    return manifest, repo


def _reference(manifest: Manifest, name: str, batch: dict[str, np.ndarray], repo: Path) -> dict[str, np.ndarray]:
    return onnx_runner(repo / name / "1" / "model.onnx")(batch)


@pytest.mark.parametrize("name", NETWORKS)
def test_the_torch_module_computes_what_onnx_runtime_computes(built, name: str) -> None:  # type: ignore[no-untyped-def]
    manifest, repo = built
    net = manifest.network(name)
    spec = json.loads((repo / name / "1" / "torch.json").read_text())
    # Reference nets are rebuilt from their seed; ONNX files (and TFLite files, through their export) interpreted.
    assert spec["source"]["kind"] == ("reference" if net.source.kind == "reference" else "onnx")
    runner = TorchRunner.load(repo / name / "1", torch.device("cpu"), {})
    batch = sample_batches(manifest, net, limit=2)[0]
    got, want = runner.run_numpy(batch), _reference(manifest, name, batch, repo)
    for output in net.outputs:
        np.testing.assert_allclose(got[output.name], want[output.name], atol=1e-4, rtol=1e-4)


def test_the_python_target_config_runs_torch_on_gpus_and_loads_without_one(built) -> None:  # type: ignore[no-untyped-def]
    _manifest, repo = built
    config = parse((repo / "segmenter" / "config.pbtxt").read_text())
    assert config.instance_group[0].kind == config.instance_group[0].KIND_AUTO  # GPU where present, else CPU
    assert config.parameters["imgpipe.runner"].string_value == "torch"
    options = json.loads(config.parameters["imgpipe.runner_options"].string_value)
    assert options["buckets"] == [1, 2, 4] and options["channels_last"] is True


def test_cpu_instances_run_onnx_runtime(tmp_path: Path) -> None:
    data = manifest_data()
    data["networks"]["segmenter"]["instances"] = {"count": 1, "kind": "cpu"}
    repo = tmp_path / "repo"
    build_repository(parse_manifest(data, tmp_path / "m.toml"), repo, models=["segmenter"])
    config = parse((repo / "segmenter" / "config.pbtxt").read_text())
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.parameters["imgpipe.runner"].string_value == "onnxruntime"


def test_batch_buckets() -> None:
    data = manifest_data()
    assert parse_manifest(data).network("rnet").buckets() == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    data["networks"]["segmenter"]["torch"] = {"batch_buckets": [1, 3]}
    assert parse_manifest(data).network("segmenter").buckets() == (1, 3, 4)  # max_batch_size is always one
    data["networks"]["segmenter"]["torch"] = {"batch_buckets": [8]}
    with pytest.raises(ManifestError, match=r"torch\.batch_buckets: \[8\] exceed batching\.max_batch_size \(4\)"):
        parse_manifest(data)


def test_unsupported_operators_are_refused_naming_them(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Einsum", ["x"], ["y"], name="odd", equation="ij->ij")], "g", [x], [y])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(UnsupportedOnnxError, match=r"odd\.onnx: operator\(s\) Einsum not supported.*'odd'"):
        OnnxModule(path)


def test_interpreted_module_keeps_shape_arithmetic_on_the_host(built) -> None:  # type: ignore[no-untyped-def]
    _manifest, repo = built
    module = OnnxModule(repo / "pnet" / "1" / "model.onnx")
    assert all(t.device.type == "cpu" and not t.is_floating_point() for t in module._constants.values())
    assert {b.dtype for b in module.buffers()} == {torch.float32}
    assert {b.dtype for b in module.half().buffers()} == {torch.float16} and module.is_half


@CUDA
@pytest.mark.parametrize("name", NETWORKS)
def test_fp16_on_cuda_stays_within_the_gate(built, name: str) -> None:  # type: ignore[no-untyped-def]
    manifest, repo = built
    net = manifest.network(name)
    spec_path = repo / name / "1" / "torch.json"
    spec = json.loads(spec_path.read_text())
    module = torch_module(repo / name / "1", spec)
    runner = TorchRunner(module, {**spec, "precision": "fp16"}, torch.device("cuda"), {"channels_last": True})
    assert runner.dtype == torch.float16
    batch = sample_batches(manifest, net, limit=2)[0]
    got, want = runner.run_numpy(batch), _reference(manifest, name, batch, repo)
    for output in net.outputs:
        assert np.abs(got[output.name] - want[output.name]).max() <= net.tolerance.max_abs


@CUDA
def test_cuda_graphs_replay_what_eager_computes_for_every_batch_size(built) -> None:  # type: ignore[no-untyped-def]
    _manifest, repo = built
    version = repo / "recognizer" / "1"
    graphs = TorchRunner.load(version, torch.device("cuda"), {"cuda_graphs": True, "buckets": [1, 2, 4, 8]})
    eager = TorchRunner.load(version, torch.device("cuda"), {"cuda_graphs": False})
    assert sorted(graphs.graphs) == [1, 2, 4, 8] and not eager.graphs
    x = torch.randn(19, 3, 112, 112, device="cuda")  # 19 = 8 + 8 + 3: chunks and a padded bucket
    for count in (1, 3, 8, 19):
        (a,) = graphs.run([{"input": x[:count]}])
        (b,) = eager.run([{"input": x[:count]}])
        assert a["embedding"].shape == (count, 512)
        torch.testing.assert_close(a["embedding"], b["embedding"], atol=1e-4, rtol=1e-4)


@CUDA
def test_dynamic_spatial_networks_run_eagerly_with_graphs_asked(built) -> None:  # type: ignore[no-untyped-def]
    _manifest, repo = built
    runner = TorchRunner.load(repo / "pnet" / "1", torch.device("cuda"), {"cuda_graphs": True, "buckets": [1, 2]})
    assert not runner.graphs
    (out,) = runner.run([{"input_1": torch.zeros(1, 40, 30, 3, device="cuda")}])
    assert out["softmax"].shape[1:3] == (15, 10)


@CUDA
def test_the_runner_waits_for_inputs_still_queued_on_the_callers_stream(built) -> None:  # type: ignore[no-untyped-def]
    _manifest, repo = built
    runner = TorchRunner.load(repo / "recognizer" / "1", torch.device("cuda"), {"cuda_graphs": False})
    x = torch.randn(4, 3, 112, 112, device="cuda")
    (want,) = runner.run([{"input": x}])
    for _ in range(3):
        y = torch.zeros_like(x)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued on the caller's stream before y is written
        y.copy_(x)
        (got,) = runner.run([{"input": y}])  # reads y on the runner's stream: must wait for the copy
        torch.testing.assert_close(got["embedding"], want["embedding"], atol=1e-4, rtol=1e-4)
