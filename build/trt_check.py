"""Parse-and-build check of exported graphs with TensorRT-RTX, on a machine without a GPU.

Full TensorRT cannot be installed on the development and CI machines (DESIGN §8), but TensorRT-RTX
(``tensorrt-rtx-cu12``, ``import tensorrt_rtx``) can: it ships NVIDIA's ONNX parser and a builder that
compiles ahead of time with no GPU present (CPU-only AOT is its default; no flag is needed). Its
runtime refuses Hopper and needs a GPU, so this module never runs an engine: it checks that every
exported graph parses and builds with the optimization profiles and workspace the ``tensorrt`` target
would use (:func:`imgpipe.build.tensorrt_plan.profiles_for`, ``networks.<name>.tensorrt.workspace_mib``).

TensorRT-RTX is strongly typed (every network it creates is ``STRONGLY_TYPED``): there are no FP16/INT8
builder flags and no calibrators; a precision is checked by building the graph converted to it
(:func:`imgpipe.build.onnx_precision.convert`). ``int8`` is accepted but onnxruntime's QDQ graphs are
refused by its parser (int32 bias ``DequantizeLinear``; RTX's INT8 is weight-only). Its builder
bounds the engine's activation memory by the workspace limit, so an oversized max profile fails here
as ``OutOfMemory`` (pnet's 4×2048×2048×3 needs about 1.45 GiB).

Results are cached per ONNX sha256, precision, profiles, workspace and TensorRT-RTX version under
``<cache_dir>/trt_check/``, one small JSON per key, so an unchanged network is not checked twice.
``tensorrt_rtx`` is imported lazily: this module imports without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imgpipe.build.tensorrt_plan import PlanBuildError, Profile, profiles_for
from imgpipe.manifest import Manifest, Network
from imgpipe.paths import CACHE_DIR

log = logging.getLogger(__name__)

DEFAULT_PRECISIONS = ("fp32", "fp16")
# Bump when the check itself changes what it accepts, so cached verdicts are not reused.
CHECK_SCHEMA = 1
# Logged by TensorRT-RTX after some API errors on a machine without a CUDA driver; not the cause of anything.
_NO_DRIVER_NOISE = "CUDA driver version is insufficient"


class TrtCheckError(PlanBuildError):
    """TensorRT-RTX's parser or builder refused a graph; the message names the network, file and errors."""


@dataclass(frozen=True)
class CheckResult:
    network: str
    precision: str
    ok: bool
    seconds: float  # spent by this call (about 0 when the verdict came from the cache)
    message: str  # "" when ok; otherwise the parser's errors or the build failure
    cached: bool = False
    engine_bytes: int = 0


def tensorrt_rtx_version() -> str | None:
    """The installed TensorRT-RTX version, or None when ``tensorrt_rtx`` cannot be imported."""
    try:
        import tensorrt_rtx as trt
    except ImportError:
        return None
    return str(trt.__version__)


def _logger(trt: Any) -> Any:
    """An ``ILogger`` that forwards to Python logging and keeps the errors for the failure message."""

    class CollectingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                if _NO_DRIVER_NOISE not in msg:
                    self.errors.append(msg)
                log.debug("TensorRT-RTX: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT-RTX warning: %s", msg)

    return CollectingLogger()


def _parser_errors(parser: Any) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        code = getattr(e.code(), "name", str(e.code()))
        desc = "\n  ".join(line for line in str(e.desc()).splitlines() if _NO_DRIVER_NOISE not in line)
        lines.append(f"  node {e.node()} {e.node_name()!r} ({e.node_operator()}): {code}: {desc} [{e.func()}]")
    return "\n".join(lines)


def _logged(errors: Sequence[str]) -> str:
    return "\n".join(f"  {m}" for m in errors) if errors else "  (TensorRT-RTX logged no error)"


def parse_and_build(
    onnx_path: Path,
    net: Network,
    profiles: Sequence[Profile] | None = None,
    workspace_mib: int | None = None,
    label: str | None = None,
) -> bytes:
    """Parse ``onnx_path`` with TensorRT-RTX's ONNX parser and build a serialized engine (never run).

    ``profiles`` default to the ``tensorrt`` target's (:func:`profiles_for`), ``workspace_mib`` to
    ``net.tensorrt.workspace_mib``; ``label`` names the file in messages (default: its name). Raises
    :class:`TrtCheckError` naming the network, the file and the parser's errors (node, operator,
    description) or the builder's.
    """
    import tensorrt_rtx as trt

    profiles = profiles_for(net) if profiles is None else profiles
    workspace = net.tensorrt.workspace_mib if workspace_mib is None else workspace_mib
    where = f"{net.name}: TensorRT-RTX {trt.__version__}"
    label = label or onnx_path.name
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # strongly typed: TensorRT-RTX's only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TrtCheckError(f"{where}: the ONNX parser rejected {label}:\n{_parser_errors(parser)}")

    graph_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace << 20)
    for index, p in enumerate(profiles):
        unknown = sorted(set(p.shapes) - set(graph_inputs))
        missing = sorted(set(graph_inputs) - set(p.shapes))
        if unknown or missing:
            raise TrtCheckError(
                f"{where}: optimization profile {index} does not match the inputs of {label}"
                f" (graph inputs: {', '.join(graph_inputs)}; unknown in the profile: {', '.join(unknown) or '-'};"
                f" missing from the profile: {', '.join(missing) or '-'})"
            )
        profile = builder.create_optimization_profile()
        for name, (low, mid, high) in p.shapes.items():
            profile.set_shape(name, low, mid, high)
        if config.add_optimization_profile(profile) < 0:
            shapes = "; ".join(f"{n}: min {lo} opt {mid} max {hi}" for n, (lo, mid, hi) in p.shapes.items())
            raise TrtCheckError(
                f"{where}: optimization profile {index} of {label} was refused ({shapes}):\n{_logged(logger.errors)}"
            )

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtCheckError(f"{where}: building {label} failed (workspace {workspace} MiB):\n{_logged(logger.errors)}")
    return bytes(memoryview(serialized))


def _cache_key(onnx_sha256: str, precision: str, net: Network, profiles: Sequence[Profile], version: str) -> str:
    parts: dict[str, Any] = {
        "schema": CHECK_SCHEMA,
        "onnx": onnx_sha256,  # the FP32 graph; the reduced-precision graph is derived from it
        "precision": precision,
        "profiles": [p.shapes for p in profiles],
        "workspace_mib": net.tensorrt.workspace_mib,
        "tensorrt_rtx": version,
    }
    if precision != "fp32":
        import onnx
        import onnxruntime

        parts["converter"] = [onnx.__version__, onnxruntime.__version__]
    if precision == "int8":
        parts["calibration"] = repr(net.calibration)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _check_one(
    manifest: Manifest, net: Network, precision: str, fp32_onnx: Path, onnx_sha256: str, cache: Path, version: str
) -> CheckResult:
    start = time.perf_counter()
    profiles = profiles_for(net)
    record = cache / f"{net.name}-{precision}-{_cache_key(onnx_sha256, precision, net, profiles, version)[:24]}.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            return CheckResult(
                net.name,
                precision,
                bool(saved["ok"]),
                time.perf_counter() - start,
                str(saved["message"]),
                cached=True,
                engine_bytes=int(saved["engine_bytes"]),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable TensorRT-RTX check record %s", record)

    from imgpipe.build.onnx_precision import convert

    ok, message, size = True, "", 0
    with tempfile.TemporaryDirectory(prefix="trt_check-") as tmp:
        onnx_path = fp32_onnx
        if precision != "fp32":
            onnx_path = Path(tmp) / f"{net.name}-{precision}.onnx"
            try:
                convert(fp32_onnx, onnx_path, precision, manifest, net)
            except Exception as exc:  # a converter failure is a result, not a reason to stop the check
                return CheckResult(
                    net.name,
                    precision,
                    False,
                    time.perf_counter() - start,
                    f"{net.name}: {precision} conversion: {exc}",
                )
        build_start = time.perf_counter()
        label = fp32_onnx.name if precision == "fp32" else f"{fp32_onnx.name} (converted to {precision})"
        try:
            size = len(parse_and_build(onnx_path, net, profiles, label=label))
        except TrtCheckError as exc:  # a verdict on this graph and profile: cached like a success
            ok, message = False, str(exc)
        except Exception as exc:  # anything else (bindings, environment) is reported but not cached
            return CheckResult(net.name, precision, False, time.perf_counter() - start, f"{net.name}: {label}: {exc!r}")
        build_seconds = time.perf_counter() - build_start

    cache.mkdir(parents=True, exist_ok=True)
    staging = record.with_suffix(f".{os.getpid()}.tmp")  # concurrent checks never share a staging file
    staging.write_text(
        json.dumps(
            {
                "network": net.name,
                "precision": precision,
                "ok": ok,
                "message": message,
                "engine_bytes": size,
                "build_seconds": round(build_seconds, 3),
                "onnx_sha256": onnx_sha256,
                "profiles": [p.shapes for p in profiles],
                "workspace_mib": net.tensorrt.workspace_mib,
                "tensorrt_rtx": version,
            },
            indent=1,
        )
    )
    staging.replace(record)
    return CheckResult(net.name, precision, ok, time.perf_counter() - start, message, engine_bytes=size)


def check_network(
    manifest: Manifest,
    net: Network,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    cache_dir: Path = CACHE_DIR,
) -> list[CheckResult]:
    """Parse and build ``net``'s ONNX once per precision; failures are results, never exceptions."""
    from imgpipe.build.export import ExportError, onnx_for

    precisions = tuple(precisions)
    version = tensorrt_rtx_version()
    if version is None:
        raise RuntimeError("tensorrt_rtx is not installed: pip install tensorrt-rtx-cu12==1.7.1.116")
    start = time.perf_counter()
    try:
        exported = onnx_for(manifest, net, cache_dir=cache_dir)
    except ExportError as exc:
        return [CheckResult(net.name, p, False, time.perf_counter() - start, str(exc)) for p in precisions]
    return [
        _check_one(manifest, net, p, exported.onnx_path, exported.sha256, cache_dir / "trt_check", version)
        for p in precisions
    ]


def check_manifest(
    manifest: Manifest,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    cache_dir: Path = CACHE_DIR,
    networks: Iterable[str] | None = None,
) -> list[CheckResult]:
    """:func:`check_network` for every network of the manifest (or the named ones), in manifest order."""
    precisions = tuple(precisions)
    wanted = None if networks is None else set(networks)
    results: list[CheckResult] = []
    for net in manifest.networks.values():
        if wanted is None or net.name in wanted:
            results += check_network(manifest, net, precisions, cache_dir)
    return results


def format_results(results: Sequence[CheckResult]) -> str:
    """A plain table, one line per (network, precision), failures followed by their message."""
    lines = []
    for r in results:
        verdict = "ok" if r.ok else "FAILED"
        extra = " (cached)" if r.cached else f" {r.seconds:.2f} s"
        lines.append(f"{r.network:<14} {r.precision:<5} {verdict}{extra}")
        if not r.ok:
            lines.append("  " + r.message.replace("\n", "\n  "))
    return "\n".join(lines)


def results_json(results: Sequence[CheckResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)
