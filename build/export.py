"""Turn a manifest network into a checked ONNX file, exporting only when something changed.

A reference architecture is exported with the dynamo exporter (``onnxscript``) at the manifest's
opset with a dynamic batch dimension. The export is keyed by a content hash of everything that can
change the graph (manifest entry, architecture source, torch and exporter versions), and cached under
``.cache/onnx/``; an unchanged network is never exported twice. A user ONNX file is verified against
its manifest ``sha256`` and checked the same way.
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

import onnx
import onnx.numpy_helper

from imgpipe.dtypes import onnx_type, torch_dtype
from imgpipe.manifest import Manifest, Network
from imgpipe.paths import CACHE_DIR

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


def export_key(net: Network) -> str:
    """Content hash of everything that determines the exported graph."""
    import onnxscript
    import torch

    from imgpipe.build import networks

    arch_module = inspect.getmodule(networks.ARCHITECTURES[net.source.architecture])
    parts = {
        "source": repr(net.source),
        "inputs": repr(net.inputs),
        "outputs": [(o.name, o.dtype, o.shape) for o in net.outputs],
        "opset": net.opset,
        "architecture_code": inspect.getsource(arch_module) if arch_module else "",
        "exporter": inspect.getsource(export_reference),
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def export_reference(net: Network, target: Path) -> None:
    """Export ``net``'s reference architecture to ``target`` (dynamic batch, the manifest's opset)."""
    import torch

    from imgpipe.build.networks import build_reference

    # The exporter warns once per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
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
    program.save(str(target), external_data=False)
    extras = model.onnx_initializers() if hasattr(model, "onnx_initializers") else {}
    if extras:  # e.g. the swapper's emap, which inswapper-contract consumers read as the last initializer
        graph = onnx.load(str(target))
        for name, value in extras.items():
            graph.graph.initializer.append(onnx.numpy_helper.from_array(value, name=name))
        onnx.save(graph, str(target))


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


def onnx_for(manifest: Manifest, net: Network, cache_dir: Path = CACHE_DIR, force: bool = False) -> ExportResult:
    """The checked ONNX file of ``net``: exported (or reused from the cache) or the user's own file."""
    import time

    start = time.perf_counter()
    if net.source.kind == "onnx":
        path = manifest.resolve(net.source.path)
        if not path.is_file():
            raise ExportError(f"networks.{net.name}.source.path: {path} does not exist")
        digest = file_sha256(path)
        if net.source.sha256 and digest != net.source.sha256:
            raise ExportError(
                f"networks.{net.name}.source.sha256: {path.name} has sha256 {digest}, the manifest expects"
                f" {net.source.sha256}"
            )
        check_onnx(path, net)
        return ExportResult(net.name, path, digest, exported=False, seconds=time.perf_counter() - start)

    key = export_key(net)
    cached = cache_dir / "onnx" / f"{net.name}-{key[:16]}.onnx"
    exported = False
    if force or not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            staging = Path(tmp) / "model.onnx"
            try:
                export_reference(net, staging)
            except Exception as exc:
                raise ExportError(f"{net.name}: export of {net.source.architecture!r} failed: {exc}") from exc
            check_onnx(staging, net)
            shutil.move(staging, cached)
        exported = True
    return ExportResult(net.name, cached, file_sha256(cached), exported, time.perf_counter() - start)
