"""TensorRT plans: optimization profiles, the builder (TensorRT ≥ 10 Python API), ``trtexec`` lines.

Everything that touches ``tensorrt`` is in this module and imports it lazily: the profiles, file
names, cache keys and ``trtexec`` command lines are plain Python and run anywhere (``--dry-run``). The
builder and :func:`run_plan` need the ``tensorrt`` package and a GPU; TensorRT cannot be installed on
the development and CI machines of this project, so they are exercised only by the test marked
``tensorrt``, wherever ``import tensorrt`` works.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.manifest import Network

Shape = tuple[int, ...]
# Architectures a dry run lists when no GPU is present to ask (A100, A10/A40, L4/L40, H100/H200).
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0")


class PlanBuildError(RuntimeError):
    """TensorRT refused the network; the message lists the failing ONNX nodes or the reason."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: for every input, (min, opt, max) shapes including the batch."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class PlanSettings:
    precision: str = "fp32"
    workspace_mib: int = 4096
    builder_optimization_level: int = 3
    hardware_compatible: bool = False
    version_compatible: bool = False

    @classmethod
    def of(cls, net: Network, precision: str | None = None) -> PlanSettings:
        t = net.tensorrt
        return cls(
            precision=precision or net.precision,
            workspace_mib=t.workspace_mib,
            builder_optimization_level=t.builder_optimization_level,
            hardware_compatible=t.hardware_compatible,
            version_compatible=t.version_compatible,
        )


def profiles_for(net: Network) -> list[Profile]:
    """Profiles from the manifest: batch ``min_batch``/``opt_batch``/``max_batch_size`` (opt defaults to
    the largest preferred batch size) and each dynamic dimension's min/opt/max. With
    ``instances.profile_per_instance`` every instance gets an identical profile of its own."""
    b = net.batching
    opt_batch = b.opt_batch or (max(b.preferred_batch_sizes) if b.preferred_batch_sizes else b.max_batch_size)
    batch = (b.min_batch, min(opt_batch, b.max_batch_size), b.max_batch_size)
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in net.inputs:
        low = spec.min_shape or spec.static_shape
        mid = spec.static_shape
        high = spec.max_shape or spec.static_shape
        shapes[spec.name] = ((batch[0], *low), (batch[1], *mid), (batch[2], *high))
    count = net.instances.count if net.instances.profile_per_instance else 1
    return [Profile(shapes) for _ in range(count)]


def plan_filename(cc: str | None) -> str:
    """``model_sm90.plan`` for compute capability 9.0; ``model.plan`` for a hardware-compatible plan."""
    return f"model_sm{cc.replace('.', '')}.plan" if cc else "model.plan"


def plan_key(onnx_sha256: str, settings: PlanSettings, profiles: Sequence[Profile], trt_version: str, cc: str) -> str:
    """The engine cache key: a plan is rebuilt only when one of these changes."""
    parts = {
        "onnx": onnx_sha256,
        "settings": asdict(settings),
        "profiles": [p.shapes for p in profiles],
        "tensorrt": trt_version,
        "cc": cc,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    onnx_path: Path,
    plan_path: Path,
    net: Network,
    settings: PlanSettings,
    timing_cache: Path,
    calibration_cache: Path | None = None,
) -> list[str]:
    """The ``trtexec`` line that builds the same plan inside the NGC TensorRT container.

    trtexec builds one optimization profile per command: extra identical per-instance profiles are
    added only by :func:`build_plan`.
    """
    (profile, *_rest) = profiles_for(net)
    spec = {k: ",".join(f"{name}:{_dims(v[k])}" for name, v in profile.shapes.items()) for k in range(3)}
    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={spec[0]}",
        f"--optShapes={spec[1]}",
        f"--maxShapes={spec[2]}",
        f"--memPoolSize=workspace:{settings.workspace_mib}",
        f"--builderOptimizationLevel={settings.builder_optimization_level}",
        f"--timingCacheFile={timing_cache}",
        "--skipInference",
    ]
    if settings.precision == "fp16":
        cmd.append("--fp16")
    elif settings.precision == "int8":
        cmd += ["--int8", "--fp16"]
        if calibration_cache is not None:
            cmd.append(f"--calib={calibration_cache}")
    if settings.hardware_compatible:
        cmd.append("--hardwareCompatibilityLevel=ampere+")
    if settings.version_compatible:
        cmd.append("--versionCompatible")
    return cmd


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: str  # compute capability, "9.0"


def local_gpu() -> Gpu | None:
    """The first GPU of this machine, through PyTorch or ``nvidia-smi``; None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return Gpu(torch.cuda.get_device_name(0), f"{major}.{minor}")
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if out:
            name, cc = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
            return Gpu(name, cc)
    return None


def _parse_errors(parser: Any) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node_name = e.node_name() if hasattr(e, "node_name") else ""
        operator = e.node_operator() if hasattr(e, "node_operator") else ""
        lines.append(f"  node {e.node()} {node_name!r} ({operator}): {e.desc()}")
    return "\n".join(lines)


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    net: Network,
    settings: PlanSettings,
    timing_cache: Path,
    calibration: Sequence[dict[str, np.ndarray]] = (),
    calibration_cache: Path | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` on this machine's GPU; returns the plan's metadata."""
    import tensorrt as trt

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise PlanBuildError(f"{net.name}: TensorRT's ONNX parser rejected {onnx_path.name}:\n{_parse_errors(parser)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)

    profiles = profiles_for(net)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, mid, high) in p.shapes.items():
            profile.set_shape(name, low, mid, high)
        config.add_optimization_profile(profile)

    if settings.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if not calibration and not (calibration_cache and calibration_cache.is_file()):
            raise PlanBuildError(f"{net.name}: INT8 needs calibration samples or a calibration cache")
        config.int8_calibrator = _entropy_calibrator(trt, calibration, calibration_cache)
        batch = next(iter(calibration[0].values())).shape[0] if calibration else 1
        cal_profile = builder.create_optimization_profile()
        for name, (_low, mid, _high) in profiles[0].shapes.items():
            fixed = (batch, *mid[1:])
            cal_profile.set_shape(name, fixed, fixed, fixed)
        config.set_calibration_profile(cal_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    timing = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PlanBuildError(f"{net.name}: TensorRT could not build a plan (see the TensorRT log above)")
    plan_path.write_bytes(memoryview(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    gpu = local_gpu()
    return {
        "tensorrt": trt.__version__,
        "gpu": gpu.name if gpu else "",
        "compute_capability": gpu.cc if gpu else "",
        "flags": asdict(settings),
        "profiles": [p.shapes for p in profiles],
        "build_seconds": round(time.perf_counter() - start, 2),
        "plan": plan_path.name,
    }


def _entropy_calibrator(trt: Any, batches: Sequence[dict[str, np.ndarray]], cache: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding preprocessed sample batches; its cache is reused."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = list(batches)
            self.index = 0
            self.device_buffers: dict[str, torch.Tensor] = {}

        def get_batch_size(self) -> int:
            return next(iter(self.batches[0].values())).shape[0] if self.batches else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            self.device_buffers = {n: torch.from_numpy(np.ascontiguousarray(batch[n])).cuda() for n in names}
            return [int(self.device_buffers[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache and cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def run_plan(plan_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute a plan once on the GPU (TensorRT 10 tensor-address API); for the accuracy gate and tests."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise PlanBuildError(f"{plan_path}: TensorRT could not deserialize the plan")
    context = engine.create_execution_context()
    keep: dict[str, torch.Tensor] = {}
    for name, array in inputs.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        keep[name] = tensor
        context.set_input_shape(name, tuple(array.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs: dict[str, torch.Tensor] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise PlanBuildError(f"{plan_path}: execution failed")
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}
