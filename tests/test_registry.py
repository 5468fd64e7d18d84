"""The pipeline registry: contracts, a toy pipeline added through a manifest plugin alone (built and
served on the real server), inner-model INVALID_ARG through BLS, and the contract in the model config."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.build.repository import build_repository
from imgpipe.build.triton_config import parse
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.errors import InvalidInputError
from imgpipe.manifest import ManifestError, parse_manifest
from imgpipe.pipelines import registry
from imgpipe.pipelines.detect_faces import CONTRACT as DETECT
from imgpipe.pipelines.remove_background import CONTRACT as REMOVE_BG
from imgpipe.pipelines.swap_face import CONTRACT as SWAP
from imgpipe.samples import encode, sample_array
from imgpipe.server import Ports, TritonServer, free_ports
from tests.conftest import manifest_data

PLUGIN = Path(__file__).parent / "plugins" / "toy_invert.py"


def test_the_builtin_pipelines_are_registered_with_their_contracts() -> None:
    known = registry()
    assert {"remove_background", "detect_faces", "swap_face"} <= set(known)
    for name, pipeline in known.items():
        assert pipeline.name == name and pipeline.contract.model
    assert REMOVE_BG.input("MODE").optional and REMOVE_BG.input("MODE").choices == ("rgba", "mask", "composite")
    assert [o.name for o in DETECT.outputs] == ["BOXES", "SCORES", "LANDMARKS", "MESH"]
    assert [o.optional for o in DETECT.outputs] == [False, False, False, True]  # MESH: only when requested
    assert SWAP.param("format").choices == ("png", "jpeg")


def test_request_parameters_are_parsed_by_the_contract() -> None:
    parsed = DETECT.parse_parameters({"min_face_size": 40, "onet_threshold": "0.9"})
    assert parsed["min_face_size"] == 40 and parsed["onet_threshold"] == 0.9 and parsed["pnet_threshold"] == 0.6
    assert parsed["score_threshold"] is None
    for bad, message in (
        ({"min_face_size": 3}, "'min_face_size' must be within"),
        ({"pnet_threshold": 1.5}, "'pnet_threshold' must be within"),
        ({"rnet_threshold": "high"}, "'rnet_threshold' must be a number"),
        ({"scale_factor": float("nan")}, "'scale_factor' must be within"),
        ({"min_face_size": 20.7}, "'min_face_size' must be a whole number"),
        ({"min_face_size": True}, "'min_face_size' must be a number, got True"),
        ({"face_size": 20}, "unknown parameter 'face_size'"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            DETECT.parse_parameters(bad)
    assert SWAP.parse_parameters({"faces": "Largest"})["faces"] == "largest"
    assert SWAP.parse_parameters({"faces": "1"})["faces"] == 1
    assert SWAP.parse_parameters({}) == {"faces": "all", "format": "png"}
    with pytest.raises(InvalidInputError, match="'faces' must be all, largest or a face index"):
        SWAP.parse_parameters({"faces": "biggest"})
    with pytest.raises(InvalidInputError, match="'faces' must be a non-negative index"):
        SWAP.parse_parameters({"faces": "-1"})
    with pytest.raises(InvalidInputError, match="'format' must be png or jpeg"):
        SWAP.parse_parameters({"format": "gif"})


def test_manifest_refuses_unknown_pipelines_missing_networks_and_plugins(tmp_path: Path) -> None:
    data = manifest_data()
    data["pipelines"]["colorise"] = {}
    with pytest.raises(ManifestError, match=r"pipelines.colorise: unknown pipeline \(have: .*remove_background"):
        parse_manifest(data)
    data = manifest_data()
    del data["pipelines"]["detect_faces"]
    with pytest.raises(ManifestError, match=r"pipelines.swap_face: needs a \[pipelines.detect_faces\] table"):
        parse_manifest(data)
    data = manifest_data()
    data["pipelines"]["swap_face"]["mesh"] = "nope"
    with pytest.raises(ManifestError, match=r"pipelines\.swap_face\.mesh: 'nope' is not a network"):
        parse_manifest(data)
    data["pipelines"]["swap_face"].update(mesh="face_mesh", method="inswapper", swapper="nope")
    with pytest.raises(ManifestError, match=r"pipelines\.swap_face\.swapper: 'nope' is not a network"):
        parse_manifest(data)
    data = manifest_data()
    data["pipelines"]["detect_faces"]["instances"] = {"count": 0}
    with pytest.raises(ManifestError, match=r"pipelines\.detect_faces\.instances\.count: must be at least 1"):
        parse_manifest(data)
    data = manifest_data()
    data["plugins"] = ["missing_plugin.py"]
    with pytest.raises(ManifestError, match=r"plugins: cannot load 'missing_plugin\.py'"):
        parse_manifest(data, tmp_path / "manifest.toml")


def _toy_manifest(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The test manifest's segmenter and nothing else, plus the toy plugin and its pipeline."""
    data = manifest_data()
    data["networks"] = {"segmenter": data["networks"]["segmenter"]}
    data["plugins"] = [str(PLUGIN)]
    data["pipelines"] = {"invert": {"max_pixels": 1_000_000}}
    return parse_manifest(data, tmp_path / "manifest.toml")


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("toy")
    manifest = _toy_manifest(tmp)
    repo = tmp / "repo"
    built = {b.name: b for b in build_repository(manifest, repo)}
    assert {"segmenter", "invert", "invert_twice"} <= set(built)
    with TritonServer(repo, Ports(*free_ports(3)), log_path=tmp / "triton.log") as server:
        yield server


def test_toy_plugin_pipeline_builds_into_a_repository_of_build_outputs(tmp_path: Path) -> None:
    manifest = _toy_manifest(tmp_path)
    repo = tmp_path / "repo"
    build_repository(manifest, repo)
    config = parse((repo / "invert" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert config.parameters["imgpipe.step"].string_value == "toy_invert:Invert"
    assert config.parameters["imgpipe.python_path"].string_value == str(PLUGIN.parent)
    assert json.loads(config.parameters["imgpipe.settings"].string_value)["max_pixels"] == 1_000_000
    adapter = (repo / "invert" / "1" / "model.py").read_text()
    assert adapter == (repo / "invert_twice" / "1" / "model.py").read_text()  # one generic adapter
    assert "load_step" in adapter


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_toy_plugin_pipeline_serves(toy_server: TritonServer, protocol: str) -> None:
    image = sample_array("coffee")
    url = toy_server.grpc_url if protocol == "grpc" else toy_server.http_url
    with TritonClient(url, protocol) as client:  # type: ignore[arg-type]
        out = client.infer("invert", {"IMAGE": np.array([encode(image, "PNG")], dtype=object)}, ["IMAGE"])
        inverted = np.asarray(Image.open(io.BytesIO(bytes(out["IMAGE"][0]))))
        np.testing.assert_array_equal(inverted, 255 - image)
        twice = client.infer("invert_twice", {"IMAGE": np.array([encode(image, "PNG")], dtype=object)}, ["IMAGE"])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(bytes(twice["IMAGE"][0])))), image)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_inner_models_invalid_arg_reaches_the_caller_through_bls(toy_server: TritonServer, protocol: str) -> None:
    url = toy_server.grpc_url if protocol == "grpc" else toy_server.http_url
    with TritonClient(url, protocol) as client:  # type: ignore[arg-type]
        with pytest.raises(InferenceError, match="not an image") as info:
            client.infer("invert_twice", {"IMAGE": np.array([b"not an image at all"], dtype=object)}, ["IMAGE"])
        assert info.value.is_invalid_argument, info.value.status
        good = client.infer("invert_twice", {"IMAGE": np.array([encode(sample_array("camera"), "PNG")], dtype=object)},
                            ["IMAGE"])  # fmt: skip
        assert Image.open(io.BytesIO(bytes(good["IMAGE"][0]))).size == (512, 512)  # still serving


@pytest.mark.server
def test_the_contract_is_readable_from_the_model_config(toy_server: TritonServer) -> None:
    with TritonClient(toy_server.grpc_url, "grpc") as client:
        config = client.connection.get_model_config("invert", as_json=True)["config"]
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters["input.IMAGE"].startswith("BYTES [1]; required; encoded image")
    contract = json.loads(parameters["imgpipe.contract"])
    assert contract["model"] == "invert" and contract["outputs"][0]["name"] == "IMAGE"
