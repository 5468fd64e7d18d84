"""The TFLite importer against the TFLite interpreter (``ai-edge-litert``) on MediaPipe's real networks.

Each network is imported as a torch module and exported to ONNX through a manifest with
``kind = "tflite"`` (``onnx_for`` + ``check_onnx``); both are compared with the interpreter on real
photos, resized bilinearly to the network's input and scaled to the range MediaPipe's graphs feed it
(``*_cpu.binarypb``: selfie segmentation [0, 1], face detection [-1, 1], face landmark [0, 1]).

The interpreter lacks MediaPipe's custom ``Convolution2DTransposeBias`` (the selfie segmenter's last
convolution, followed only by ``LOGISTIC``). For that network the interpreter runs everything up to the
custom operator (the flatbuffer is patched in place: the custom operator becomes a RELU on its data
input that nothing reads, and the graph's output becomes that input), and the two remaining operators
are computed in float64 with a direct port of MediaPipe's reference loop (``transpose_conv_bias.cc``).

Tolerances, max abs per output (mean abs must stay under a tenth of it), against the interpreter
(XNNPACK, FP32) on astronaut, coffee, chelsea and camera; measured worst case in brackets, torch / ONNX:
selfie probabilities 5e-4 (7.7e-5 / 1.0e-4); face detection regressors, in pixels of the 128-px input,
1e-3 px (1.4e-4 / 1.5e-4) and score logits 1e-3 (2.1e-4 / 2.1e-4); face landmarks, in pixels of the
192-px crop (z alike), 1e-3 px (1.7e-4 / 1.5e-4) and the face-flag logit 2e-4 (5.7e-6 / 1.3e-5).
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.build.export import ExportError, check_onnx, export_key, file_sha256, onnx_for
from imgpipe.build.tflite_import import TFLiteImportError, import_tflite, operator_names
from imgpipe.manifest import Manifest, ManifestError, parse_manifest
from imgpipe.samples import sample_array

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (the TFLite interpreter)")
ort = pytest.importorskip("onnxruntime")
tflite = pytest.importorskip("tflite")

PHOTOS = ("astronaut", "coffee", "chelsea", "camera")


@dataclass(frozen=True)
class Net:
    name: str
    package_path: str  # a manifest `package:` path
    size: int
    value_range: tuple[float, float]
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, tuple[int, ...], float], ...]  # name, shape without batch, max abs tolerance


NETS = (
    Net(
        "selfie",
        "package:mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        256,
        (0.0, 1.0),
        ("input_1",),
        (("activation_10", (256, 256, 1), 5e-4),),
    ),
    Net(
        "face_detection",
        "package:mediapipe/modules/face_detection/face_detection_short_range.tflite",
        128,
        (-1.0, 1.0),
        ("input",),
        (("regressors", (896, 16), 1e-3), ("classificators", (896, 1), 1e-3)),
    ),
    Net(
        "face_landmark",
        "package:mediapipe/modules/face_landmark/face_landmark.tflite",
        192,
        (0.0, 1.0),
        ("input_1",),
        (("conv2d_21", (1, 1, 1404), 1e-3), ("conv2d_31", (1, 1, 1), 2e-4)),
    ),
)
NET_IDS = [n.name for n in NETS]


def package_file(package_path: str) -> Path:
    package, _, inner = package_path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {package} wheel (mediapipe==0.10.21, --no-deps) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def photo_batch(net: Net) -> np.ndarray:
    """The photos resized (bilinear) to the network's input and scaled to its range: N x S x S x 3 float32."""
    lo, hi = net.value_range
    batch = []
    for name in PHOTOS:
        image = sample_array(name)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        resized = Image.fromarray(image[..., :3]).resize((net.size, net.size), Image.BILINEAR)
        batch.append(np.asarray(resized, dtype=np.float32) / 255.0 * (hi - lo) + lo)
    return np.stack(batch).astype(np.float32)


# --- the reference: the TFLite interpreter (plus MediaPipe's transposed convolution, see the docstring) ---


def _without_transpose_conv_bias(data: bytes) -> tuple[bytes, int, int]:
    """Patch the flatbuffer so the interpreter stops before ``Convolution2DTransposeBias``.

    Returns the patched bytes, the custom operator's index and its data input's tensor index."""
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    relu = next(i for i, c in enumerate(codes) if max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) == 19)
    index = next(
        j for j in range(graph.OperatorsLength()) if codes[graph.Operators(j).OpcodeIndex()].CustomCode()
        == b"Convolution2DTransposeBias"
    )
    op = graph.Operators(index)
    feature = int(op.InputsAsNumpy()[0])
    patched = bytearray(data)
    opcode_field = op._tab.Offset(4)
    assert opcode_field, "the custom operator's opcode_index is stored"
    struct.pack_into("<I", patched, op._tab.Pos + opcode_field, relu)
    inputs = op._tab.Vector(op._tab.Offset(6))
    struct.pack_into("<I", patched, inputs - 4, 1)  # inputs: [data] only
    outputs = graph._tab.Vector(graph._tab.Offset(8))
    assert graph.OutputsLength() == 1
    struct.pack_into("<i", patched, outputs, feature)
    return bytes(patched), index, feature


def _mediapipe_transpose_conv_bias(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, options: bytes
) -> np.ndarray:
    """MediaPipe's ``TransposeConvBias`` reference loop in float64 (NHWC input, OHWI weights)."""
    padding, stride_w, stride_h = struct.unpack("<iii", options)
    n, in_h, in_w, _ = x.shape
    out_c, k_h, k_w, _ = weight.shape
    total_h = max(0, k_h - (in_h - 1) % stride_h - 1) if padding == 1 else 0
    total_w = max(0, k_w - (in_w - 1) % stride_w - 1) if padding == 1 else 0
    out_h, out_w = stride_h * (in_h - 1) + k_h - total_h, stride_w * (in_w - 1) + k_w - total_w
    pad_h, pad_w = total_h // 2, total_w // 2
    out = np.broadcast_to(bias.astype(np.float64), (n, out_h, out_w, out_c)).copy()
    x64 = x.astype(np.float64)
    for fy in range(k_h):
        for fx in range(k_w):
            contribution = np.einsum("nhwi,oi->nhwo", x64, weight[:, fy, fx, :].astype(np.float64))
            xs = np.arange(in_w) * stride_w - pad_w + fx
            keep_x = (xs >= 0) & (xs < out_w)
            for in_y in range(in_h):
                out_y = in_y * stride_h - pad_h + fy
                if 0 <= out_y < out_h:
                    out[:, out_y, xs[keep_x], :] += contribution[:, in_y, keep_x, :]
    return out


def interpreter_outputs(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    """The reference outputs for a batch (the interpreter runs one image at a time, as the file says)."""
    data = path.read_bytes()
    names = operator_names(path)
    tail: list[str] = []
    if "CUSTOM:Convolution2DTransposeBias" in names:
        data, index, _feature = _without_transpose_conv_bias(data)
        tail = names[index:]
        assert tail == ["CUSTOM:Convolution2DTransposeBias", "LOGISTIC"], tail
        model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
        op = model.Subgraphs(0).Operators(index)
        options = op.CustomOptionsAsNumpy().tobytes()
        tensors = [int(i) for i in op.InputsAsNumpy()]
        weight, bias = (_constant(model, t) for t in tensors[1:])
    interpreter = litert.Interpreter(model_content=data)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    results: list[list[np.ndarray]] = []
    for image in batch:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        outs = [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]
        if tail:
            logits = _mediapipe_transpose_conv_bias(outs[0], weight, bias, options)
            outs = [0.5 * (1.0 + np.tanh(0.5 * logits))]  # LOGISTIC, overflow-free
        results.append(outs)
    return [np.concatenate([r[k] for r in results]) for k in range(len(results[0]))]


def _constant(model, tensor_index: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A constant tensor's value, following a DEQUANTIZE of FP16 weights back to its FP16 buffer."""
    graph = model.Subgraphs(0)
    tensor = graph.Tensors(tensor_index)
    data = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if isinstance(data, np.ndarray) and data.size:
        dtype = {0: np.float32, 1: np.float16}[tensor.Type()]
        return np.frombuffer(data.tobytes(), dtype=dtype).reshape(tensor.ShapeAsNumpy()).astype(np.float32)
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        if int(op.OutputsAsNumpy()[0]) == tensor_index:
            return _constant(model, int(op.InputsAsNumpy()[0]))
    raise AssertionError(f"tensor {tensor_index} is neither constant nor dequantized")


# --- fixtures ------------------------------------------------------------------------------------------


def manifest_table(nets: tuple[Net, ...] = NETS) -> dict:
    networks = {}
    for net in nets:
        digest = file_sha256(package_file(net.package_path))
        networks[net.name] = {
            "source": {"kind": "tflite", "path": net.package_path, "sha256": digest},
            "inputs": [{"name": n, "dtype": "FP32", "shape": [net.size, net.size, 3]} for n in net.inputs],
            "outputs": [{"name": n, "dtype": "FP32", "shape": list(shape)} for n, shape, _ in net.outputs],
        }
    return {"networks": networks}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return parse_manifest(manifest_table(), tmp_path_factory.mktemp("tflite") / "manifest.toml")


@pytest.fixture(scope="module")
def exported(manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The manifest round trip: each network exported by ``onnx_for`` (which runs ``check_onnx``)."""
    cache = tmp_path_factory.mktemp("cache")
    paths = {}
    for name, net in manifest.networks.items():
        result = onnx_for(manifest, net, cache_dir=cache)
        assert result.exported
        check_onnx(result.onnx_path, net)
        again = onnx_for(manifest, net, cache_dir=cache)
        assert not again.exported and again.onnx_path == result.onnx_path  # cached by the export key
        paths[name] = result.onnx_path
    return paths


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    out = {}
    for net in NETS:
        batch = photo_batch(net)
        out[net.name] = (batch, interpreter_outputs(package_file(net.package_path), batch))
    return out


def report(label: str, net: Net, got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for (name, _shape, tol), g, w in zip(net.outputs, got, want, strict=True):
        assert g.shape[1:] == w.shape[1:] and g.shape[0] == w.shape[0], (name, g.shape, w.shape)
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        print(f"{label} {net.name}.{name}: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}")
        assert diff.max() <= tol, f"{label} {net.name}.{name}: max abs {diff.max():.3g} > {tol}"
        assert diff.mean() <= tol / 10, f"{label} {net.name}.{name}: mean abs {diff.mean():.3g} > {tol / 10}"


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS, ids=NET_IDS)
def test_operators_are_the_ones_the_importer_knows(net: Net) -> None:
    names = set(operator_names(package_file(net.package_path)))
    expected = {
        "selfie": {"ADD", "AVERAGE_POOL_2D", "CONV_2D", "CUSTOM:Convolution2DTransposeBias", "DEPTHWISE_CONV_2D",
                   "DEQUANTIZE", "HARD_SWISH", "LOGISTIC", "MUL", "RELU", "RESIZE_BILINEAR"},
        "face_detection": {"ADD", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "MAX_POOL_2D",
                           "PAD", "RELU", "RESHAPE"},
        "face_landmark": {"ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "MAX_POOL_2D", "PAD", "PRELU"},
    }  # fmt: skip
    assert names == expected[net.name]


@pytest.mark.parametrize("net", NETS, ids=NET_IDS)
def test_imported_module_matches_the_interpreter_on_photos(net: Net, references) -> None:  # type: ignore[no-untyped-def]
    batch, want = references[net.name]
    module = import_tflite(package_file(net.package_path))
    with torch.no_grad():
        got = module(torch.from_numpy(batch))  # the four photos as one batch of 4
    got = [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]
    want = [w.reshape(len(batch), *shape) for w, (_, shape, _) in zip(want, net.outputs, strict=True)]
    report("torch", net, [g.reshape(w.shape) for g, w in zip(got, want, strict=True)], want)


@pytest.mark.parametrize("net", NETS, ids=NET_IDS)
def test_exported_onnx_matches_the_interpreter_on_photos(net: Net, references, exported) -> None:  # type: ignore[no-untyped-def]
    batch, want = references[net.name]
    session = ort.InferenceSession(str(exported[net.name]), providers=["CPUExecutionProvider"])
    want = [w.reshape(len(batch), *shape) for w, (_, shape, _) in zip(want, net.outputs, strict=True)]
    one_by_one = [session.run(None, {net.inputs[0]: image[None]}) for image in batch]
    got = [np.concatenate([r[k] for r in one_by_one]) for k in range(len(net.outputs))]
    report("onnx", net, got, want)
    # A batch of 2 (the dynamic batch axis): the same as each image alone, and within tolerance.
    pair = session.run(None, {net.inputs[0]: batch[:2]})
    report("onnx batch 2", net, pair, [w[:2] for w in want])
    for k in range(len(net.outputs)):
        np.testing.assert_allclose(pair[k], got[k][:2], atol=1e-5, rtol=0)


def test_unsupported_operator_is_refused_with_its_name_and_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgpipe.build import tflite_import

    path = package_file(NETS[0].package_path)
    monkeypatch.setattr(
        tflite_import, "SUPPORTED_OPERATORS", tuple(o for o in tflite_import.SUPPORTED_OPERATORS if o != "HARD_SWISH")
    )
    with pytest.raises(TFLiteImportError, match=r"HARD_SWISH") as info:
        import_tflite(path)
    assert str(path) in str(info.value)


def test_unsupported_operator_fails_the_build_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from imgpipe.build import tflite_import

    manifest = parse_manifest(manifest_table(NETS[1:2]), tmp_path / "manifest.toml")
    monkeypatch.setattr(
        tflite_import, "SUPPORTED_OPERATORS", tuple(o for o in tflite_import.SUPPORTED_OPERATORS if o != "PAD")
    )
    with pytest.raises(ExportError, match=r"unsupported TFLite operator\(s\) PAD") as info:
        onnx_for(manifest, manifest.network("face_detection"), cache_dir=tmp_path)
    assert "face_detection_short_range.tflite" in str(info.value)


def test_a_file_that_is_not_tflite_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.tflite"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises(TFLiteImportError, match="not a TFLite flatbuffer"):
        import_tflite(bogus)


def test_tflite_source_checks_sha256_and_needs_a_path(tmp_path: Path) -> None:
    table = manifest_table(NETS[1:2])
    table["networks"]["face_detection"]["source"]["sha256"] = "0" * 64
    manifest = parse_manifest(table, tmp_path / "manifest.toml")
    with pytest.raises(ExportError, match=r"source\.sha256: face_detection_short_range\.tflite has sha256"):
        onnx_for(manifest, manifest.network("face_detection"), cache_dir=tmp_path)
    del table["networks"]["face_detection"]["source"]["path"]
    with pytest.raises(ManifestError, match=r"source\.path: required when kind = 'tflite'"):
        parse_manifest(table, tmp_path / "manifest.toml")


def test_export_key_holds_the_file_digest(manifest: Manifest) -> None:
    net = manifest.network("face_detection")
    assert export_key(net, "a" * 64) != export_key(net, "b" * 64)
    with pytest.raises(ExportError, match="needs the file's sha256"):
        export_key(net)
