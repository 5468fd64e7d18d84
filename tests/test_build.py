"""ONNX export (checked, cached by content hash) and generated Triton configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imgpipe.build.export import ExportError, export_key, file_sha256, onnx_for
from imgpipe.build.networks import build_reference, count_flops
from imgpipe.build.repository import build_repository
from imgpipe.build.triton_config import parse
from imgpipe.manifest import Manifest, Source, parse_manifest
from tests.conftest import TEST_WIDTH, manifest_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def exported(test_manifest: Manifest, cache: Path):  # type: ignore[no-untyped-def]
    return onnx_for(test_manifest, test_manifest.network("segmenter"), cache_dir=cache)


def test_export_passes_checker_and_shape_inference_with_dynamic_batch(exported) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (inp,) = inferred.graph.input
    (out,) = inferred.graph.output
    assert [inp.name, out.name] == ["input", "logits"]
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 1024, 1024]
    assert isinstance(out_dims[0], str) and out_dims[1:] == [1, 1024, 1024]


def test_onnx_computes_what_the_pytorch_reference_computes(exported) -> None:  # type: ignore[no-untyped-def]
    torch_model = build_reference("segmenter", TEST_WIDTH, seed=0)
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = torch_model(x).numpy()
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})  # batch 2 through the dynamic batch dimension
    assert got.shape == (2, 1, 1024, 1024)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)


def test_unchanged_network_is_not_exported_again(test_manifest: Manifest, exported, cache: Path) -> None:  # type: ignore[no-untyped-def]
    assert exported.exported
    mtime = exported.onnx_path.stat().st_mtime_ns
    again = onnx_for(test_manifest, test_manifest.network("segmenter"), cache_dir=cache)
    assert not again.exported
    assert again.onnx_path == exported.onnx_path and again.onnx_path.stat().st_mtime_ns == mtime


def test_export_key_follows_the_manifest(test_manifest: Manifest) -> None:
    net = test_manifest.network("segmenter")
    reseeded = dataclasses.replace(net, source=dataclasses.replace(net.source, seed=7))
    assert export_key(net) == export_key(net)
    assert export_key(net) != export_key(reseeded)
    single = dataclasses.replace(net.batching, max_batch_size=1, preferred_batch_sizes=())
    rebatched = dataclasses.replace(net, batching=single)
    assert export_key(net) == export_key(rebatched)  # serving knobs never re-export


def test_full_width_segmenter_costs_hundreds_of_gflop() -> None:
    model = build_reference("segmenter", 64, seed=0)
    gflop = count_flops(model, torch.zeros(1, 3, 1024, 1024)) / 1e9
    assert 250 <= gflop <= 600, gflop  # ISNet @1024: 319 GFLOP (DESIGN §4)
    small = count_flops(build_reference("segmenter", TEST_WIDTH, seed=0), torch.zeros(1, 3, 1024, 1024)) / 1e9
    assert small < gflop / 50


def _onnx_manifest(tmp_path: Path, onnx_file: Path, sha256: str = "") -> Manifest:
    data = manifest_data()
    data["networks"]["segmenter"]["source"] = {
        "kind": "onnx",
        "path": onnx_file.name,
        **({"sha256": sha256} if sha256 else {}),
    }
    return parse_manifest(data, tmp_path / "manifest.toml")


def test_user_onnx_file_is_checked_against_sha256_and_io(tmp_path: Path, exported) -> None:  # type: ignore[no-untyped-def]
    user = tmp_path / "user.onnx"
    user.write_bytes(exported.onnx_path.read_bytes())
    manifest = _onnx_manifest(tmp_path, user, file_sha256(user))
    result = onnx_for(manifest, manifest.network("segmenter"), cache_dir=tmp_path)
    assert result.onnx_path == user.resolve() and not result.exported

    wrong_hash = _onnx_manifest(tmp_path, user, "0" * 64)
    with pytest.raises(ExportError, match=r"networks\.segmenter\.source\.sha256: user\.onnx has sha256"):
        onnx_for(wrong_hash, wrong_hash.network("segmenter"), cache_dir=tmp_path)

    data = manifest_data()
    data["networks"]["segmenter"]["source"] = {"kind": "onnx", "path": "user.onnx"}
    data["networks"]["segmenter"]["inputs"][0]["name"] = "input_image"
    renamed = parse_manifest(data, tmp_path / "manifest.toml")
    with pytest.raises(ExportError, match="the ONNX graph has no tensor 'input_image'"):
        onnx_for(renamed, renamed.network("segmenter"), cache_dir=tmp_path)

    missing = _onnx_manifest(tmp_path, tmp_path / "absent.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        onnx_for(missing, missing.network("segmenter"), cache_dir=tmp_path)


def test_reference_source_needs_a_known_architecture() -> None:
    with pytest.raises(ValueError, match="unknown reference architecture 'unet9'"):
        build_reference("unet9", 4, 0)
    assert Source(kind="reference", architecture="segmenter").width == 0


def test_repository_configs_parse_and_follow_the_manifest(repository: Path, test_manifest: Manifest) -> None:
    configs = {p.parent.name: parse(p.read_text()) for p in repository.glob("*/config.pbtxt")}
    networks = set(test_manifest.networks)
    assert set(configs) == networks | {
        "bg_preprocess",
        "bg_postprocess",
        "remove_background",
        "detect_faces",
        "swap_face",
        "colorize",
        "reconstruct_face",
    }
    seg = configs["segmenter"]
    net = test_manifest.network("segmenter")
    assert seg.backend == "python" and seg.max_batch_size == net.batching.max_batch_size
    assert list(seg.dynamic_batching.preferred_batch_size) == list(net.batching.preferred_batch_sizes)
    assert seg.dynamic_batching.max_queue_delay_microseconds == net.batching.max_queue_delay_us
    assert not seg.dynamic_batching.HasField("default_queue_policy") and net.batching.queue is None
    assert seg.instance_group[0].count == net.instances.count
    assert seg.model_warmup[0].inputs["input"].zero_data
    assert list(seg.model_warmup[0].inputs["input"].dims) == [3, 1024, 1024]
    ens = configs["remove_background"]
    assert ens.platform == "ensemble"
    served = test_manifest.pipelines["remove_background"].segmenter
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["bg_preprocess", served, "bg_postprocess"]
    steps = (served, "bg_preprocess", "bg_postprocess")
    assert ens.max_batch_size <= min(configs[name].max_batch_size for name in steps)
    assert {i.name: i.optional for i in ens.input} == {"IMAGE": False, "MODE": True, "BACKGROUND": True, "FORMAT": True}
    pre = configs["bg_preprocess"]
    settings = json.loads(pre.parameters["imgpipe.settings"].string_value)
    assert settings["max_pixels"] == test_manifest.pipelines["remove_background"].max_pixels
    assert pre.parameters["imgpipe.step"].string_value == "imgpipe.ensembles.remove_background:Preprocess"
    served_net = test_manifest.network(served)
    assert configs["bg_postprocess"].parameters["mask_activation"].string_value == served_net.output().activation
    assert pre.parameters["preprocessing"].string_value == served_net.calibration.preprocessing == "selfie"
    assert pre.parameters["input_size"].string_value == "256x256"
    # Steps on auto (GPU where there is one) take their inputs where the previous step left them.
    assert configs["bg_postprocess"].instance_group[0].kind == configs["bg_postprocess"].instance_group[0].KIND_AUTO
    assert configs["bg_postprocess"].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert seg.parameters["imgpipe.step"].string_value == "imgpipe.ensembles.network:NetworkStep"
    assert seg.parameters["imgpipe.runner"].string_value == "torch"  # GPU instances; CPU falls back to ORT
    assert (repository / "segmenter" / "1" / "model.onnx").is_file()
    adapters = {p.read_text() for p in repository.glob("*/*/model.py")}
    assert len(adapters) == 1  # one generic adapter for every Python-backend model
    assert {p.parts[-3] for p in repository.glob("*/*/model.py")} >= {"bg_preprocess", "segmenter", "swap_face"}
    assert (repository / "remove_background" / "1").is_dir()
    # Every model is build output: each folder says so to git.
    assert all((d / ".gitignore").read_text().endswith("*\n") for d in repository.iterdir() if d.is_dir())
    # The public contract is in the configs (a KServe client reading only the config learns it).
    assert "one of rgba | mask | composite" in ens.parameters["input.MODE"].string_value
    assert "x1, y1, x2, y2" in configs["detect_faces"].parameters["output.BOXES"].string_value
    assert "left eye" in configs["detect_faces"].parameters["output.LANDMARKS"].string_value
    assert "all | largest | an index" in configs["swap_face"].parameters["request_parameter.faces"].string_value
    assert "png | jpeg" in configs["swap_face"].parameters["request_parameter.format"].string_value
    assert "default 20" in configs["detect_faces"].parameters["request_parameter.min_face_size"].string_value


def test_encoding_gets_its_own_instance_count(tmp_path: Path) -> None:
    data = manifest_data()
    data["pipelines"] = {"remove_background": {**data["pipelines"]["remove_background"], "encode_instances": 3}}
    repo = tmp_path / "repo"
    build_repository(parse_manifest(data, tmp_path / "m.toml"), repo, models=["bg_preprocess", "bg_postprocess"])
    counts = {m: parse((repo / m / "config.pbtxt").read_text()).instance_group[0].count
              for m in ("bg_preprocess", "bg_postprocess")}  # fmt: skip
    assert counts == {"bg_preprocess": 1, "bg_postprocess": 3}


def test_second_build_changes_nothing(repository: Path, test_manifest: Manifest) -> None:
    before = {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}
    built = build_repository(test_manifest, repository)
    assert {b.action for b in built} == {"unchanged"}
    assert before == {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}
