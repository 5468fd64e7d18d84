"""The manifest: one TOML file declaring every network and pipeline, loaded into typed objects.

Each table maps onto a frozen dataclass below. Loading is strict: an unknown key, a missing key or a
value of the wrong type raises :class:`ManifestError` naming the dotted key, e.g.
``networks.segmenter.batching.max_batch_size: expected an integer, got 'four'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from imgpipe.dtypes import DTYPES
from imgpipe.paths import DEFAULT_MANIFEST

if sys.version_info >= (3, 11):
    import tomllib
else:  # the NGC tritonserver images run Python 3.10
    import tomli as tomllib


class ManifestError(ValueError):
    """A manifest problem; the message starts with the dotted key at fault."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a network. ``shape`` excludes the batch dimension; -1 is dynamic."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    # Shape ranges for dynamic dimensions (TensorRT optimization profiles, warmup): same rank as shape.
    min_shape: tuple[int, ...] = ()
    opt_shape: tuple[int, ...] = ()
    max_shape: tuple[int, ...] = ()
    # How an output becomes probabilities: "sigmoid" for logits, "none" when already in [0, 1].
    activation: Literal["none", "sigmoid"] = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ManifestError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for label in ("min_shape", "opt_shape", "max_shape"):
            value = getattr(self, label)
            if value and len(value) != len(self.shape):
                raise ManifestError(f"{label}: rank {len(value)} differs from shape's rank {len(self.shape)}")
        if -1 in self.shape and not self.opt_shape:
            raise ManifestError("opt_shape: required when shape has dynamic (-1) dimensions")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ManifestError(f"shape: dimensions must be positive or -1, got {list(self.shape)}")

    @property
    def static_shape(self) -> tuple[int, ...]:
        """The shape with dynamic dimensions replaced by their optimal value."""
        return tuple(o if d == -1 else d for d, o in zip(self.shape, self.opt_shape or self.shape, strict=True))


@dataclass(frozen=True)
class Source:
    """Where a network comes from: a reference PyTorch architecture, an ONNX file, or a TFLite file that
    ``imgpipe.build.tflite_import`` rebuilds as a torch module and exports like a reference network."""

    kind: Literal["reference", "onnx", "tflite"]
    architecture: str = ""
    width: int = 0
    seed: int = 0
    path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind == "reference" and not self.architecture:
            raise ManifestError("architecture: required when kind = 'reference'")
        if self.kind in ("onnx", "tflite") and not self.path:
            raise ManifestError(f"path: required when kind = {self.kind!r}")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ManifestError("sha256: expected 64 lowercase hex digits")


# A pipeline's entry model has a bounded queue with a timeout (issue 12): past ``max_queue_size`` waiting requests
# Triton answers UNAVAILABLE at once ("Exceeds maximum queue size") instead of letting the backlog grow, and a
# request that waited ``default_timeout_us`` in the queue is answered UNAVAILABLE instead of being run for a caller
# who has most likely given up. Networks and inner steps get no queue policy by default: in Triton 2.51 a
# dynamic batcher with any default_queue_policy often leaves a request in its queue until the batcher's 500 ms
# idle poll (measured: detect_faces on a 256² JPEG, policies on pnet/rnet/onet: median 1,092 ms; on the public
# model only: 169 ms; none: 139 ms). The work reaching them is bounded by the pipelines' queues; a manifest may
# still give a network a ``[networks.<name>.batching.queue]``.
NETWORK_QUEUE_SIZE = 256
PIPELINE_QUEUE_SIZE = 128  # above the load tests' and `imgpipe bench`'s highest concurrency (64)
QUEUE_TIMEOUT_US = 60_000_000


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``default_queue_policy``. Triton reads 0 as unbounded / no timeout; imgpipe refuses both.
    ``allow_timeout_override``: a request may ask for a shorter queue timeout (its ``timeout`` parameter)."""

    max_queue_size: int = NETWORK_QUEUE_SIZE
    timeout_action: Literal["REJECT", "DELAY"] = "REJECT"
    default_timeout_us: int = QUEUE_TIMEOUT_US
    allow_timeout_override: bool = False

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ManifestError(
                "max_queue_size: must be at least 1 (every queue is bounded; Triton reads 0 as unbounded)"
            )
        if self.default_timeout_us < 1:
            raise ManifestError("default_timeout_us: must be at least 1 (every queue has a timeout; 0 would be none)")


def pipeline_queue() -> QueuePolicy:
    """A pipeline's public model's queue: shallower than a network's, and callers may shorten the timeout."""
    return QueuePolicy(max_queue_size=PIPELINE_QUEUE_SIZE, allow_timeout_override=True)


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 4
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    # Batch range of the optimization profile (TensorRT); opt defaults to the largest preferred size.
    min_batch: int = 1
    opt_batch: int = 0
    queue: QueuePolicy | None = None  # no queue policy (see NETWORK_QUEUE_SIZE's comment)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ManifestError("max_batch_size: must be at least 1")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ManifestError(f"preferred_batch_sizes: {bad} outside 1..max_batch_size ({self.max_batch_size})")


@dataclass(frozen=True)
class Instances:
    """``kind``: ``cpu``; ``gpu`` (Triton refuses to load it on a machine without a GPU); ``auto`` (Triton
    places it on the GPUs where there are any, else on the CPU: one repository for both)."""

    count: int = 1
    kind: Literal["cpu", "gpu", "auto"] = "cpu"
    gpus: tuple[int, ...] = ()
    # TensorRT: give every instance its own optimization profile (one instance group per profile), so
    # concurrent execution contexts never share one.
    profile_per_instance: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ManifestError("count: must be at least 1")


@dataclass(frozen=True)
class Tolerance:
    """Accuracy gate: how far the built artifact may drift from the FP32 ONNX Runtime reference."""

    max_abs: float = 1e-3
    mean_abs: float = 1e-4
    min_psnr: float = 0.0  # dB, image outputs (rank >= 3) only; 0 disables


@dataclass(frozen=True)
class Calibration:
    """Sample inputs for INT8 calibration, the accuracy gate and ``sample`` warmup.

    ``images`` are scikit-image sample names (``astronaut``) or image paths relative to the manifest;
    ``preprocessing`` names the network's own preprocessing (see ``imgpipe.build.calibration``).
    """

    images: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "camera")
    preprocessing: str = "random"
    batch_size: int = 2


@dataclass(frozen=True)
class TensorRT:
    workspace_mib: int = 4096
    builder_optimization_level: int = 3
    hardware_compatible: bool = False  # AMPERE_PLUS: one plan for every Ampere-or-newer GPU
    version_compatible: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.builder_optimization_level <= 5:
            raise ManifestError("builder_optimization_level: must be within 0..5")


@dataclass(frozen=True)
class OnnxRuntime:
    """The ``onnxruntime`` target: optionally with ONNX Runtime's TensorRT execution provider."""

    tensorrt_accelerator: bool = False
    engine_cache_path: str = "/tmp/imgpipe-ort-trt-cache"


@dataclass(frozen=True)
class Torch:
    """The ``python`` target's CUDA runner (PyTorch on the instance's GPU; CPU instances use ONNX Runtime).

    ``cuda_graphs``: capture one CUDA graph per batch bucket at start-up and replay it (requests are
    padded to the next bucket); networks with dynamic spatial dimensions run eagerly. ``batch_buckets``:
    the captured batch sizes, () = powers of two up to ``max_batch_size`` (and it). ``channels_last``:
    NHWC memory layout for the convolutions (faster for FP16 on tensor cores)."""

    cuda_graphs: bool = False
    batch_buckets: tuple[int, ...] = ()
    channels_last: bool = True

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.batch_buckets):
            raise ManifestError(f"batch_buckets: must be positive, got {list(self.batch_buckets)}")


@dataclass(frozen=True)
class Serving:
    warmup: Literal["zero", "random", "sample", "none"] = "zero"
    response_cache: bool = False
    keep_versions: int = 1  # version_policy latest { num_versions }

    def __post_init__(self) -> None:
        if self.keep_versions < 1:
            raise ManifestError("keep_versions: must be at least 1")


@dataclass(frozen=True)
class Network:
    name: str
    source: Source
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    license: str = ""
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    opset: int = 18
    batching: Batching = field(default_factory=Batching)
    instances: Instances = field(default_factory=Instances)
    tolerance: Tolerance = field(default_factory=Tolerance)
    calibration: Calibration = field(default_factory=Calibration)
    tensorrt: TensorRT = field(default_factory=TensorRT)
    onnxruntime: OnnxRuntime = field(default_factory=OnnxRuntime)
    torch: Torch = field(default_factory=Torch)
    serving: Serving = field(default_factory=Serving)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ManifestError("inputs: at least one input is required")
        if not self.outputs:
            raise ManifestError("outputs: at least one output is required")
        if self.opset < 17:
            raise ManifestError("opset: must be 17 or newer")
        bad = [b for b in self.torch.batch_buckets if b > self.batching.max_batch_size]
        if bad:
            raise ManifestError(
                f"torch.batch_buckets: {bad} exceed batching.max_batch_size ({self.batching.max_batch_size})"
            )

    def buckets(self) -> tuple[int, ...]:
        """The CUDA-graph batch sizes: the manifest's, or powers of two up to max_batch_size (and it)."""
        if self.torch.batch_buckets:
            return tuple(sorted(set(self.torch.batch_buckets) | {self.batching.max_batch_size}))
        top = self.batching.max_batch_size
        return tuple(sorted({1 << i for i in range(top.bit_length()) if 1 << i <= top} | {top}))

    def input(self, index: int = 0) -> TensorSpec:
        return self.inputs[index]

    def output(self, index: int = 0) -> TensorSpec:
        return self.outputs[index]

    def fingerprint(self) -> str:
        """A hash of everything in this entry; any change to it changes the hash."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Networks by name; pipelines' settings by pipeline name (each pipeline's own dataclass, see
    :mod:`imgpipe.pipelines`); the plugins that registered extra pipelines, and their folders."""

    networks: dict[str, Network]
    pipelines: dict[str, Any]
    path: Path | None = None
    plugins: tuple[str, ...] = ()
    plugin_paths: tuple[Path, ...] = ()

    def network(self, name: str) -> Network:
        try:
            return self.networks[name]
        except KeyError:
            raise ManifestError(f"networks.{name}: no such network (have: {', '.join(self.networks)})") from None

    def resolve(self, relative: str) -> Path:
        """Paths in the manifest are relative to the manifest's folder; ``package:NAME/FILE`` is a file
        inside an installed Python package (found without importing it)."""
        if relative.startswith("package:"):
            import importlib.util

            package, _, inner = relative.removeprefix("package:").partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ManifestError(f"{relative}: the Python package {package!r} is not installed")
            return Path(next(iter(spec.submodule_search_locations))) / inner
        base = self.path.parent if self.path else Path.cwd()
        return (base / relative).resolve()


T = TypeVar("T")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint and convert it (lists to tuples, tables to dataclasses)."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ManifestError(f"{key}: expected a table, got {value!r}")
        return _build(hint, value, key)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ManifestError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item, *_rest) = get_args(hint)
        if not isinstance(value, list):
            raise ManifestError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _k, item = get_args(hint)
        if not isinstance(value, dict):
            raise ManifestError(f"{key}: expected a table, got {value!r}")
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if len(options) == 1:  # Optional[X]: present in the manifest means X
            return _convert(value, options[0], key)
        raise ManifestError(f"{key}: cannot be set in the manifest")
    expected = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}[hint]
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ManifestError(f"{key}: expected {expected}, got {value!r}")
    return value


def _build(cls: type[T], table: dict[str, Any], key: str, **given: Any) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ManifestError(f"{key}.{unknown[0]}: unknown key (expected one of {', '.join(fields)})")
    kwargs: dict[str, Any] = dict(given)
    for name, f in fields.items():
        if name in given:
            continue
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], f"{key}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{key}.{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ManifestError as exc:
        raise ManifestError(f"{key}.{exc}") from None


def from_table(cls: type[T], table: dict[str, Any], key: str) -> T:
    """Build the dataclass ``cls`` from a TOML/JSON table with the manifest's strict checks."""
    return _build(cls, table, key)


def _load_plugins(data: dict[str, Any], base: Path) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    from imgpipe.pipelines.registry import load_plugin

    plugins = data.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ManifestError(f"plugins: expected a list of module names or .py files, got {plugins!r}")
    folders = []
    for entry in plugins:
        try:
            folder = load_plugin(entry, base)
        except (ImportError, OSError) as exc:
            raise ManifestError(f"plugins: cannot load {entry!r}: {exc}") from None
        if folder is not None:
            folders.append(folder)
    return tuple(plugins), tuple(folders)


def parse_manifest(data: dict[str, Any], path: Path | None = None) -> Manifest:
    from imgpipe.pipelines.registry import registry

    unknown = sorted(set(data) - {"networks", "pipelines", "plugins"})
    if unknown:
        raise ManifestError(f"{unknown[0]}: unknown top-level table (expected networks, pipelines, plugins)")
    plugins, plugin_paths = _load_plugins(data, path.parent if path else Path.cwd())
    networks_table = data.get("networks")
    if not isinstance(networks_table, dict) or not networks_table:
        raise ManifestError("networks: at least one network is required")
    networks = {}
    for name, table in networks_table.items():
        if not isinstance(table, dict):
            raise ManifestError(f"networks.{name}: expected a table")
        networks[name] = _build(Network, table, f"networks.{name}", name=name)
    known = registry()
    pipelines_table = data.get("pipelines", {})
    if not isinstance(pipelines_table, dict):
        raise ManifestError("pipelines: expected a table of pipeline tables")
    pipelines: dict[str, Any] = {}
    for name, table in pipelines_table.items():
        if name not in known:
            raise ManifestError(f"pipelines.{name}: unknown pipeline (have: {', '.join(sorted(known))})")
        if not isinstance(table, dict):
            raise ManifestError(f"pipelines.{name}: expected a table")
        pipelines[name] = _build(known[name].settings, table, f"pipelines.{name}")
    manifest = Manifest(networks, pipelines, path, plugins, plugin_paths)
    for name, settings in pipelines.items():
        pipeline = known[name]
        for needed in pipeline.requires:
            if needed not in pipelines:
                raise ManifestError(f"pipelines.{name}: needs a [pipelines.{needed}] table as well")
        for key, network in pipeline.networks(settings).items():
            if network not in networks:
                raise ManifestError(f"pipelines.{name}.{key}: {network!r} is not a network in this manifest")
        pipeline.validate(manifest, settings)
    return manifest


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value in TOML syntax; bare words are strings) to a manifest dict."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ManifestError(
            f"--set {assignment!r}: expected KEY=VALUE, e.g. networks.segmenter.batching.max_batch_size=8"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    table = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = table.setdefault(part, {})
        if not isinstance(node, dict):
            raise ManifestError(f"{'.'.join(parts[: i + 1])}: is not a table, cannot set {key}")
        table = node
    table[parts[-1]] = value


def load_manifest(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Manifest:
    """Read and validate a manifest; ``overrides`` are ``KEY=VALUE`` assignments applied first."""
    path = Path(path or DEFAULT_MANIFEST)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_manifest(data, path.resolve())
