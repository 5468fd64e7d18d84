"""TensorRT-RTX parse-and-build check of the exported graphs and their optimization profiles (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

# Not skipped when absent: `make install` installs tensorrt-rtx-cu12, and a missing check must fail CI.
import tensorrt_rtx  # noqa: F401
from onnx import TensorProto, helper

from imgpipe.build import trt_check
from imgpipe.build.export import file_sha256
from imgpipe.build.tensorrt_plan import Profile, profiles_for
from imgpipe.build.trt_check import TrtCheckError, check_manifest, check_network, parse_and_build
from imgpipe.manifest import Manifest, parse_manifest
from tests.conftest import manifest_data

NETWORKS = {
    "segmenter", "pnet", "rnet", "onet", "recognizer",
    "swapper",
    "selfie_segmenter", "blazeface", "face_mesh",
    "colorizer", "face_regressor",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: the reference networks are exported once (seconds each)."""
    return tmp_path_factory.mktemp("trt_check_cache")


def _pnet_manifest(tmp_path: Path, **changes: object) -> Manifest:
    """The tests' manifest with pnet's input (``min_shape``/``max_shape``) or ``tensorrt`` table changed."""
    data = manifest_data()
    pnet = data["networks"]["pnet"]
    pnet["inputs"][0].update({k: v for k, v in changes.items() if k.endswith("_shape")})
    if "workspace_mib" in changes:
        pnet["tensorrt"] = {"workspace_mib": changes["workspace_mib"]}
    return parse_manifest(data, tmp_path / "manifest.toml")


def test_every_network_parses_and_builds_in_fp32_and_fp16(test_manifest: Manifest, cache: Path) -> None:
    results = check_manifest(test_manifest, cache_dir=cache)
    failed = [f"{r.network}/{r.precision}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert {(r.network, r.precision) for r in results} == {
        (n, p) for n in test_manifest.networks for p in ("fp32", "fp16")
    }
    assert set(NETWORKS) <= set(test_manifest.networks)  # MediaPipe's imported TFLite networks among them
    assert all(r.engine_bytes > 0 and not r.cached for r in results)

    again = check_manifest(test_manifest, cache_dir=cache)  # unchanged: every verdict comes from the cache
    assert all(r.ok and r.cached for r in again)
    assert sum(r.seconds for r in again) < 1.0
    assert len(list((cache / "trt_check").glob("*.json"))) == len(results)


def test_the_default_manifest_parses_and_builds_in_fp32_and_fp16(default_manifest: Manifest, cache: Path) -> None:
    """What `make test` promises: every network of the shipped manifest, as the tensorrt target would
    build it (its profiles, FP32 and the FP16 variant)."""
    results = check_manifest(default_manifest, cache_dir=cache)
    failed = [f"{r.network}/{r.precision}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert {(r.network, r.precision) for r in results} == {
        (n, p) for n in default_manifest.networks for p in ("fp32", "fp16")
    }


def _unsupported_onnx(path: Path) -> None:
    """x -> Relu -> Unique -> y: valid ONNX (checker and strict shape inference pass), but TensorRT's
    parser has no importer for ``Unique`` (UNSUPPORTED_NODE)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unique"])
    nodes = [
        helper.make_node("Relu", ["x"], ["positive"], name="relu"),
        helper.make_node("Unique", ["positive"], ["y"], name="dedupe_values"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "unsupported", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def test_unsupported_operator_is_rejected_naming_the_node(tmp_path: Path) -> None:
    graph = tmp_path / "unique.onnx"
    _unsupported_onnx(graph)
    data = manifest_data()
    data["networks"]["dedupe"] = {
        "source": {"kind": "onnx", "path": graph.name, "sha256": file_sha256(graph)},
        "inputs": [{"name": "x", "dtype": "FP32", "shape": [8]}],
        "outputs": [{"name": "y", "dtype": "FP32", "shape": [8]}],
    }
    manifest = parse_manifest(data, tmp_path / "manifest.toml")
    net = manifest.network("dedupe")

    results = check_network(manifest, net, cache_dir=tmp_path / "cache")
    assert [(r.precision, r.ok) for r in results] == [("fp32", False), ("fp16", False)]
    for r in results:
        assert "dedupe: TensorRT-RTX" in r.message and "the ONNX parser rejected unique.onnx" in r.message
        assert "'dedupe_values' (Unique)" in r.message and "UNSUPPORTED_NODE" in r.message
    assert "converted to fp16" in results[1].message

    with pytest.raises(TrtCheckError, match=r"(?s)rejected unique\.onnx:.*node 1 'dedupe_values' \(Unique\)"):
        parse_and_build(graph, net)


def test_pnet_profile_comes_from_the_manifest_and_reaches_the_builder(tmp_path: Path) -> None:
    manifest = _pnet_manifest(tmp_path)
    pnet = manifest.network("pnet")
    (profile,) = profiles_for(pnet)
    assert profile.shapes == {"input_1": ((1, 12, 12, 3), (4, 360, 360, 3), (4, 2048, 2048, 3))}
    (fp32,) = check_network(manifest, pnet, ["fp32"], cache_dir=tmp_path / "cache")
    assert fp32.ok, fp32.message

    # TensorRT-RTX bounds activation memory by the workspace: the manifest's max (4x2048x2048x3) needs
    # about 1.45 GiB, so 1 GiB is refused, while the same workspace builds a max of 4x1024x1024x3.
    small = _pnet_manifest(tmp_path, workspace_mib=1024)
    (refused,) = check_network(small, small.network("pnet"), ["fp32"], cache_dir=tmp_path / "cache")
    assert not refused.ok and not refused.cached
    assert "building pnet.onnx failed (workspace 1024 MiB)" in refused.message and "OutOfMemory" in refused.message
    smaller = _pnet_manifest(tmp_path, workspace_mib=1024, max_shape=[1024, 1024, 3])
    (built,) = check_network(smaller, smaller.network("pnet"), ["fp32"], cache_dir=tmp_path / "cache")
    assert built.ok and not built.cached, built.message


def test_impossible_profile_is_refused(tmp_path: Path) -> None:
    manifest = _pnet_manifest(tmp_path, min_shape=[400, 400, 3])  # min above opt (360)
    (result,) = check_network(manifest, manifest.network("pnet"), ["fp32"], cache_dir=tmp_path / "cache")
    assert not result.ok
    assert "optimization profile 0 of pnet.onnx was refused" in result.message
    assert "input_1: min (1, 400, 400, 3) opt (4, 360, 360, 3) max (4, 2048, 2048, 3)" in result.message
    assert "MIN<=OPT<=MAX" in result.message

    pnet = manifest.network("pnet")
    path = manifest.resolve(pnet.source.path)
    wrong_name = Profile({"image": ((1, 12, 12, 3), (1, 12, 12, 3), (1, 12, 12, 3))})
    with pytest.raises(TrtCheckError, match="graph inputs: input_1; unknown in the profile: image"):
        parse_and_build(path, pnet, [wrong_name])


def test_module_imports_and_reports_without_tensorrt_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trt_check.tensorrt_rtx_version() == "1.7.1.116"
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # import tensorrt_rtx now raises ImportError
    assert trt_check.tensorrt_rtx_version() is None


def test_fp16_variant_reaches_tensorrt_rtx_as_half_precision(test_manifest: Manifest, cache: Path) -> None:
    """TensorRT-RTX has no FP16 builder flag: the converted graph's own types decide (strongly typed)."""
    import tensorrt_rtx as trt

    from imgpipe.build.export import onnx_for
    from imgpipe.build.onnx_precision import convert

    net = test_manifest.network("rnet")
    fp32 = onnx_for(test_manifest, net, cache_dir=cache).onnx_path
    fp16 = cache / "rnet-fp16.onnx"
    convert(fp32, fp16, "fp16", test_manifest, net)
    logger = trt.Logger(trt.Logger.ERROR)
    types = {}
    for path in (fp32, fp16):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert trt.OnnxParser(network, logger).parse_from_file(str(path))
        types[path] = {network.get_layer(i).get_output(0).dtype for i in range(network.num_layers)}
    assert trt.DataType.HALF not in types[fp32] and trt.DataType.HALF in types[fp16]
