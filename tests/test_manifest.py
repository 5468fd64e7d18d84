"""The manifest loads into typed objects, and every mistake names its dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.manifest import ManifestError, load_manifest, parse_manifest
from tests.conftest import manifest_data


def test_default_manifest_loads_with_the_segmenter_contract() -> None:
    manifest = load_manifest()
    seg = manifest.network("segmenter")
    assert seg.source.kind == "reference"
    assert seg.input().shape == (3, 1024, 1024) and seg.input().dtype == "FP32"
    assert seg.output().shape == (1, 1024, 1024) and seg.output().activation == "sigmoid"
    assert seg.batching.preferred_batch_sizes == (2, 4)
    assert seg.batching.queue is None  # networks get no queue policy (Triton 2.51's batcher stall)
    # remove_background serves MediaPipe's selfie segmenter (real weights) by default; "segmenter" is the
    # RMBG-2.0 / BiRefNet contract for users' files (and the benchmark's full-cost network).
    settings = manifest.pipelines["remove_background"]
    assert settings.segmenter == "selfie_segmenter" and settings.refine == "guided"
    selfie = manifest.network("selfie_segmenter")
    assert selfie.source.kind == "tflite" and selfie.calibration.preprocessing == "selfie"
    assert selfie.input().shape == (256, 256, 3) and selfie.output().activation == "none"


def _error(mutate) -> str:  # type: ignore[no-untyped-def]
    data = manifest_data()
    mutate(data)
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    return str(info.value)


def _seg(data: dict) -> dict:
    return data["networks"]["segmenter"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: _seg(d)["batching"].update(max_batch_sizee=4),
            "networks.segmenter.batching.max_batch_sizee: unknown key",
        ),
        (
            lambda d: _seg(d)["batching"].update(max_batch_size="four"),
            "networks.segmenter.batching.max_batch_size: expected an integer",
        ),
        (
            lambda d: _seg(d)["batching"].update(max_batch_size=True),
            "networks.segmenter.batching.max_batch_size: expected an integer",
        ),
        (
            lambda d: _seg(d)["batching"].update(preferred_batch_sizes=[2, 16]),
            "networks.segmenter.batching.preferred_batch_sizes: [16] outside",
        ),
        (
            lambda d: _seg(d)["inputs"][0].update(dtype="FLOAT"),
            "networks.segmenter.inputs[0].dtype: 'FLOAT' is not one of",
        ),
        (lambda d: _seg(d)["inputs"][0].pop("name"), "networks.segmenter.inputs[0].name: required key is missing"),
        (lambda d: _seg(d)["inputs"][0].update(shape=[3, -1, -1]), "networks.segmenter.inputs[0].opt_shape: required"),
        (
            lambda d: _seg(d)["outputs"][0].update(activation="softmax"),
            "networks.segmenter.outputs[0].activation: 'softmax'",
        ),
        (
            lambda d: _seg(d)["source"].update(kind="onnx"),
            "networks.segmenter.source.path: required when kind = 'onnx'",
        ),
        (lambda d: _seg(d)["source"].update(sha256="xyz"), "networks.segmenter.source.sha256: expected 64"),
        (lambda d: _seg(d)["instances"].update(kind="tpu"), "networks.segmenter.instances.kind: 'tpu' is not one of"),
        (lambda d: _seg(d).update(opset=13), "networks.segmenter.opset: must be 17 or newer"),
        (
            lambda d: d["pipelines"]["remove_background"].update(segmenter="nope"),
            "pipelines.remove_background.segmenter: 'nope'",
        ),
        (lambda d: d.update(extras={}), "extras: unknown top-level table"),
        (lambda d: d.update(networks={}), "networks: at least one network is required"),
    ],
)
def test_mistakes_name_the_key(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert expected in _error(mutate)


def test_unreadable_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "manifest.toml"
    bad.write_text("[networks.segmenter\n")
    with pytest.raises(ManifestError, match=r"manifest.toml: not valid TOML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "missing.toml")


def test_dynamic_dims_take_their_optimal_value() -> None:
    data = manifest_data()
    _seg(data)["inputs"][0].update(shape=[3, -1, -1], opt_shape=[3, 512, 640], min_shape=[3, 256, 256])
    spec = parse_manifest(data).network("segmenter").input()
    assert spec.static_shape == (3, 512, 640)


def test_fingerprint_changes_with_any_setting() -> None:
    a = parse_manifest(manifest_data()).network("segmenter")
    data = manifest_data()
    _seg(data)["batching"]["max_queue_delay_us"] = 1234
    b = parse_manifest(data).network("segmenter")
    assert a.fingerprint() == parse_manifest(manifest_data()).network("segmenter").fingerprint()
    assert a.fingerprint() != b.fingerprint()
