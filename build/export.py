"""Turn a manifest network into a checked ONNX file, exporting only when something changed.

A reference architecture is exported with the dynamo exporter (``onnxscript``) at the manifest's
opset with a dynamic batch dimension. The export is keyed by a content hash of everything that can
change the graph (manifest entry, architecture source, torch and exporter versions), and cached under
``.cache/onnx/``; an unchanged network is never exported twice. A user ONNX file is verified against
its manifest ``sha256`` and checked the same way. A TFLite file (``kind = "tflite"``) is verified against
its ``sha256``, rebuilt as a torch module by :mod:`imgpipe.build.tflite_import` and exported like a
reference network; its export key holds the file's digest and the importer's source.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx.numpy_helper

from imgpipe.dtypes import onnx_type, torch_dtype
from imgpipe.manifest import Manifest, Network
from imgpipe.paths import CACHE_DIR

if TYPE_CHECKING:
    import torch

MAX_EXPORT_BATCH = 4096


class ExportError(RuntimeError):
    """The network could not be exported or its ONNX does not match the manifest."""


@dataclass(frozen=True)
class ExportResult:
    network: str
    onnx_path: Path
    sha256: str
    exported: bool  # False when the cached file was reused (or a user ONNX file was used as is)
    seconds: float = 0.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_key(net: Network, source_sha256: str = "") -> str:
    """Content hash of everything that determines the exported graph.

    A ``tflite`` network's graph comes from its file and the importer: ``source_sha256`` is the file's
    digest (required for that kind) and the importer's source code replaces the architecture's."""
    import onnxscript
    import torch

    if net.source.kind == "tflite":
        from imgpipe.build import tflite_import

        if not source_sha256:
            raise ExportError(f"{net.name}: the export key of a TFLite network needs the file's sha256")
        code = inspect.getsource(tflite_import)
    else:
        from imgpipe.build import networks

        arch_module = inspect.getmodule(networks.ARCHITECTURES[net.source.architecture])
        code = inspect.getsource(arch_module) if arch_module else ""
    parts = {
        "source": repr(net.source),
        "inputs": repr(net.inputs),
        "outputs": [(o.name, o.dtype, o.shape) for o in net.outputs],
        "opset": net.opset,
        "architecture_code": code,
        "exporter": inspect.getsource(export_reference),
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
    }
    if source_sha256:
        parts["source_sha256"] = source_sha256
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def export_reference(net: Network, target: Path, model: torch.nn.Module | None = None) -> None:
    """Export ``net``'s reference architecture to ``target`` (dynamic batch, the manifest's opset).

    ``model``: the module to export instead of the reference architecture (a TFLite network's imported
    module); it takes the manifest's inputs in order, batch first, and returns its outputs in order."""
    import torch

    from imgpipe.build.networks import build_reference

    # The exporter warns once per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if model is None:
        model = build_reference(net.source.architecture, net.source.width, net.source.seed)
    examples = tuple(
        torch.zeros(1, *spec.static_shape, dtype=torch_dtype(spec.dtype)) for spec in net.inputs
    )
    # The batch dimension is left open (not tied to max_batch_size), so serving knobs never re-export.
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    dynamic = tuple({0: batch} for _ in net.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            examples,
            input_names=[s.name for s in net.inputs],
            output_names=[s.name for s in net.outputs],
            opset_version=net.opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
        )
    _rename_clashing_values(program.model.graph)
    program.save(str(target), external_data=False)
    extras = model.onnx_initializers() if hasattr(model, "onnx_initializers") else {}
    if extras:  # e.g. the swapper's emap, which inswapper-contract consumers read as the last initializer
        graph = onnx.load(str(target))
        for name, value in extras.items():
            graph.graph.initializer.append(onnx.numpy_helper.from_array(value, name=name))
        onnx.save(graph, str(target))


def _rename_clashing_values(graph) -> None:  # type: ignore[no-untyped-def]
    """Give intermediate values that carry a graph input's or output's name a name of their own.

    The exporter names values after their aten op (``conv2d_21``); a manifest I/O name of the same form
    (TFLite graphs name their outputs so) would be declared twice and fail ``onnx.checker``'s SSA check."""
    reserved = {v.name: v for v in [*graph.inputs, *graph.outputs]}
    taken = {v.name for node in graph for v in node.outputs} | set(reserved)
    for node in graph:
        for value in node.outputs:
            if value.name in reserved and value is not reserved[value.name]:
                suffix = 1
                while f"{value.name}_{suffix}" in taken:
                    suffix += 1
                value.name = f"{value.name}_{suffix}"
                taken.add(value.name)


def check_onnx(path: Path, net: Network) -> None:
    """``onnx.checker`` and shape inference pass, and the graph's I/O matches the manifest."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{net.name}: {path.name} fails onnx.checker: {exc}") from None
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    graph_io = {v.name: v for v in [*inferred.graph.input, *inferred.graph.output]}
    for spec in [*net.inputs, *net.outputs]:
        value = graph_io.get(spec.name)
        if value is None:
            raise ExportError(
                f"{net.name}: the ONNX graph has no tensor {spec.name!r} (graph I/O: {', '.join(graph_io)})"
            )
        elem = value.type.tensor_type.elem_type
        if elem != onnx_type(spec.dtype):
            raise ExportError(
                f"{net.name}: {spec.name!r} is {onnx.TensorProto.DataType.Name(elem)} in the ONNX graph,"
                f" the manifest says {spec.dtype}"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim][1:]
        for got, want in zip(dims, spec.shape, strict=False):
            if got != -1 and want != -1 and got != want:
                raise ExportError(
                    f"{net.name}: {spec.name!r} has shape {dims} in the ONNX graph,"
                    f" the manifest says {list(spec.shape)}"
                )


def _verified_source_file(manifest: Manifest, net: Network) -> tuple[Path, str]:
    """The network's source file (``onnx`` or ``tflite`` kind) and its sha256, checked against the manifest."""
    path = manifest.resolve(net.source.path)
    if not path.is_file():
        raise ExportError(f"networks.{net.name}.source.path: {path} does not exist")
    digest = file_sha256(path)
    if net.source.sha256 and digest != net.source.sha256:
        raise ExportError(
            f"networks.{net.name}.source.sha256: {path.name} has sha256 {digest}, the manifest expects"
            f" {net.source.sha256}"
        )
    return path, digest


def _imported_tflite(net: Network, path: Path) -> torch.nn.Module:
    """The TFLite file as a torch module, its input/output count checked against the manifest."""
    from imgpipe.build.tflite_import import import_tflite

    module = import_tflite(path)  # TFLiteImportError names an unsupported operator and the file
    if len(module.input_names) != len(net.inputs) or len(module.output_names) != len(net.outputs):
        raise ExportError(
            f"networks.{net.name}: {path.name} has inputs {module.input_names} and outputs"
            f" {module.output_names} (in this order); the manifest lists {len(net.inputs)} input(s) and"
            f" {len(net.outputs)} output(s)"
        )
    return module


def onnx_for(manifest: Manifest, net: Network, cache_dir: Path = CACHE_DIR, force: bool = False) -> ExportResult:
    """The checked ONNX file of ``net``: exported (or reused from the cache) or the user's own file."""
    import time

    start = time.perf_counter()
    if net.source.kind == "onnx":
        path, digest = _verified_source_file(manifest, net)
        check_onnx(path, net)
        return ExportResult(net.name, path, digest, exported=False, seconds=time.perf_counter() - start)

    source_path, source_digest = _verified_source_file(manifest, net) if net.source.kind == "tflite" else (None, "")
    key = export_key(net, source_digest)
    cached = cache_dir / "onnx" / f"{net.name}-{key[:16]}.onnx"
    exported = False
    if force or not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        what = net.source.path if source_path is not None else net.source.architecture
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            staging = Path(tmp) / "model.onnx"
            try:
                model = _imported_tflite(net, source_path) if source_path is not None else None
                export_reference(net, staging, model)
            except Exception as exc:
                raise ExportError(f"{net.name}: export of {what!r} failed: {exc}") from exc
            check_onnx(staging, net)
            shutil.move(staging, cached)
        exported = True
    return ExportResult(net.name, cached, file_sha256(cached), exported, time.perf_counter() - start)
