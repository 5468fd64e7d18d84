"""Targets (DESIGN §3): the one place that decides how a network is emitted for Triton.

``python``      :class:`PythonTarget`: the ONNX (at the requested precision) served by the generic
                Python-backend adapter around a :class:`~imgpipe.ensembles.runners.Runner`
``onnxruntime`` :class:`OnnxRuntimeTarget`: the ONNX for Triton's ONNX Runtime backend, optionally with
                its TensorRT accelerator
``tensorrt``    :class:`TensorRTTarget`: one ``model_smXY.plan`` per GPU architecture,
                ``cc_model_filenames`` in the config; the plan builder is passed in (a
                :class:`PlanBuilder`), so merging plans across architectures is testable without TensorRT

A build writes a new version folder only when the artifact's cache key changed (ONNX hash, target,
precision and build settings; for plans also the TensorRT version and compute capability). Serving
knobs that only touch ``config.pbtxt`` (batching, instances, warmup, ...) rewrite the config alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from imgpipe.build import tensorrt_plan as trtp
from imgpipe.build.accuracy import AccuracyError, OutputError, gate, onnx_runner
from imgpipe.build.calibration import sample_batches
from imgpipe.build.export import ExportResult
from imgpipe.build.files import write_bytes_if_changed, write_if_changed
from imgpipe.build.onnx_precision import convert
from imgpipe.build.triton_config import Accelerator, ModelSpec, instance_groups, network_model, render
from imgpipe.build.versions import discard, latest, new_version_dir, pinned_policy, write_metadata
from imgpipe.guard import VISIBILITY_PARAM
from imgpipe.manifest import Instances, Manifest, Network
from imgpipe.pipelines.registry import model_visibility

TargetName = Literal["python", "onnxruntime", "tensorrt"]
TARGETS: tuple[str, ...] = ("python", "onnxruntime", "tensorrt")
Report = Callable[[str], None]
ADAPTER = "adapters/model.py"  # the generic Python-backend adapter, package data of imgpipe.ensembles


def adapter_source() -> str:
    return resources.files("imgpipe.ensembles").joinpath(ADAPTER).read_text(encoding="utf-8")


@dataclass(frozen=True)
class BuildOptions:
    target: TargetName = "python"
    precision: str | None = None  # overrides every network's manifest precision
    gpu_archs: tuple[str, ...] = ()  # empty: "auto", this machine's GPU
    dry_run: bool = False
    gate: bool = True


@dataclass(frozen=True)
class NetworkBuild:
    name: str
    action: str  # "unchanged", "version N", "dry run", ...
    version: int | None
    seconds: float
    gate: tuple[OutputError, ...] = ()
    commands: tuple[str, ...] = ()  # dry run: trtexec lines
    notes: tuple[str, ...] = field(default_factory=tuple)


def _key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_warmup_samples(manifest: Manifest, net: Network, model_dir: Path) -> None:
    """``sample`` warmup: the first preprocessed sample of each input, raw, in ``<model>/warmup/``."""
    if net.serving.warmup != "sample":
        return
    (batch, *_rest) = sample_batches(manifest, net, limit=1)
    for name, value in batch.items():  # unchanged files keep their mtime: a polling server stays quiet
        write_bytes_if_changed(model_dir / "warmup" / name, np.ascontiguousarray(value[:1]).tobytes())


def _finish_config(spec: ModelSpec, model_dir: Path, new_version: bool, manifest: Manifest) -> bool:
    """Write the config, keeping a rollback's pinned versions unless this build made a new version, with
    who may call the network (:mod:`imgpipe.guard`; the ``python`` target's runner checks it)."""
    visibility = model_visibility(manifest).get(spec.name, "internal")
    fields: dict[str, object] = {"parameters": {**spec.parameters, VISIBILITY_PARAM: visibility}}
    pinned = [] if new_version else pinned_policy(model_dir)
    if pinned:
        fields["version_policy_specific"] = tuple(pinned)
    return write_if_changed(model_dir / "config.pbtxt", render(dataclasses.replace(spec, **fields)))


class PlanBuilder(Protocol):
    """What the ``tensorrt`` target needs from TensorRT (:mod:`imgpipe.build.tensorrt_plan` is the real
    one; tests pass a fake to exercise versions and multi-architecture merging without a GPU)."""

    def tensorrt_version(self) -> str | None: ...
    def local_gpu(self) -> trtp.Gpu | None: ...
    def build_plan(
        self,
        onnx_path: Path,
        plan_path: Path,
        net: Network,
        settings: trtp.PlanSettings,
        timing_cache: Path,
        calibration: Sequence[dict[str, np.ndarray]] = (),
        calib_cache: Path | None = None,
    ) -> dict[str, Any]: ...
    def run_plan(self, plan_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TensorRTPlanBuilder:
    """The real :class:`PlanBuilder`: TensorRT's Python API (imported lazily, only where it is used)."""

    tensorrt_version = staticmethod(trtp.tensorrt_version)
    local_gpu = staticmethod(trtp.local_gpu)
    build_plan = staticmethod(trtp.build_plan)
    run_plan = staticmethod(trtp.run_plan)


class Target(ABC):
    """How a network becomes a Triton model: its artifact, version folder and config."""

    name: ClassVar[str]

    @abstractmethod
    def build(
        self,
        manifest: Manifest,
        net: Network,
        export: ExportResult,
        model_dir: Path,
        options: BuildOptions,
        report: Report,
        cache_dir: Path,
    ) -> NetworkBuild:
        """Write a new version when the artifact's cache key changed, and the config."""

    @abstractmethod
    def candidate(self, version_dir: Path, metadata: dict[str, Any]) -> Callable[[dict], dict]:
        """A runner over one batch of numpy inputs for the artifact in ``version_dir`` (the gate)."""


class OnnxTarget(Target):
    """Targets whose artifact is an ONNX file (at the build's precision) in the version folder."""

    def model_spec(self, net: Network, precision: str) -> ModelSpec:
        raise NotImplementedError

    def write_artifacts(self, net: Network, export: ExportResult, precision: str, version_dir: Path) -> None:
        """Files beside ``model.onnx`` that the target's backend needs."""

    def extra_gates(
        self, manifest: Manifest, net: Network, export: ExportResult, version_dir: Path, report: Report
    ) -> tuple[OutputError, ...]:
        """Further candidates of the same artifact to hold to the tolerance (e.g. another runner)."""
        return ()

    def candidate(self, version_dir: Path, metadata: dict[str, Any]) -> Callable[[dict], dict]:
        return onnx_runner(version_dir / "model.onnx")

    def build(
        self,
        manifest: Manifest,
        net: Network,
        export: ExportResult,
        model_dir: Path,
        options: BuildOptions,
        report: Report,
        cache_dir: Path,
    ) -> NetworkBuild:
        start = time.perf_counter()
        precision = options.precision or net.precision
        key = _key(
            {
                "onnx": export.sha256,
                "target": self.name,
                "precision": precision,
                "calibration": net.calibration if precision == "int8" else None,
            }
        )
        newest = latest(model_dir)
        gate_errors: tuple[OutputError, ...] = ()
        if newest and newest.metadata.get("key") == key:
            version, action = newest.number, "unchanged"
        elif options.dry_run:
            version, action = None, "would write a new version"
        else:
            version_dir = new_version_dir(model_dir)
            try:
                report(f"{net.name}: writing version {version_dir.name} ({self.name}, {precision})")
                convert(export.onnx_path, version_dir / "model.onnx", precision, manifest, net)
                self.write_artifacts(net, export, precision, version_dir)
                if options.gate:
                    report(f"{net.name}: accuracy gate")
                    candidate = self.candidate(version_dir, {})
                    gate_errors = tuple(gate(manifest, net, export.onnx_path, candidate))
                    gate_errors += self.extra_gates(manifest, net, export, version_dir, report)
                    if not all(e.passed for e in gate_errors):
                        raise AccuracyError(list(gate_errors))
            except BaseException:
                discard(version_dir)  # a failed or drifting build never becomes a served version
                raise
            write_metadata(
                version_dir,
                {
                    "key": key,
                    "target": self.name,
                    "precision": precision,
                    "onnx_sha256": export.sha256,
                    "source": repr(net.source),
                    "build_seconds": round(time.perf_counter() - start, 2),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "gate": [e.__dict__ for e in gate_errors],
                },
            )
            version, action = int(version_dir.name), f"version {version_dir.name}"
        if not options.dry_run:
            _write_warmup_samples(manifest, net, model_dir)
            self.write_config(net, precision, model_dir, action.startswith("version"), manifest)
        return NetworkBuild(net.name, action, version, time.perf_counter() - start, gate_errors)

    def write_config(
        self, net: Network, precision: str, model_dir: Path, new_version: bool, manifest: Manifest
    ) -> None:
        _finish_config(self.model_spec(net, precision), model_dir, new_version, manifest)


class PythonTarget(OnnxTarget):
    """The network served by the Python backend: the generic adapter around a runner. CPU instances run
    ``model.onnx`` with ONNX Runtime; GPU instances run it in PyTorch (:class:`TorchRunner`: the
    reference architecture rebuilt, or the ONNX interpreted) and, where a GPU instance finds no GPU, fall
    back to ONNX Runtime with a log line. A manifest ``gpu`` kind is rendered ``KIND_AUTO`` here, so the
    same repository loads on machines with and without GPUs."""

    name = "python"

    def model_spec(self, net: Network, precision: str) -> ModelSpec:
        from imgpipe.ensembles.network import NetworkStep
        from imgpipe.pipelines.registry import step_name

        kind = "cpu" if net.instances.kind == "cpu" else "auto"
        instances = Instances(count=net.instances.count, kind=kind, gpus=net.instances.gpus if kind != "cpu" else ())
        options = {"cuda_graphs": net.torch.cuda_graphs, "channels_last": net.torch.channels_last,
                   "buckets": list(net.buckets())}  # fmt: skip
        parameters = {
            "imgpipe.step": step_name(NetworkStep),
            "imgpipe.runner": "onnxruntime" if kind == "cpu" else "torch",
            "imgpipe.model_file": "model.onnx",
            "imgpipe.runner_options": json.dumps(options, sort_keys=True),
        }
        if kind != "cpu":
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"  # GPU tensors from the previous step stay there
        # Triton checks fixed dimensions; the step checks dynamic ones against the manifest's min_shape
        # (max_shape is the TensorRT profile's; here the pipelines' max_pixels bounds the sizes).
        ranges = {spec.name: {"min": list(spec.min_shape or [1 if d == -1 else d for d in spec.shape])}
                  for spec in net.inputs if -1 in spec.shape}  # fmt: skip
        if ranges:
            parameters["imgpipe.shape_ranges"] = json.dumps(ranges, sort_keys=True)
        return network_model(net, backend="python", parameters=parameters, instance_groups=instance_groups(instances))

    def write_artifacts(self, net: Network, export: ExportResult, precision: str, version_dir: Path) -> None:
        from imgpipe.ensembles.runners import TORCH_SPEC

        write_if_changed(version_dir / "model.py", adapter_source())
        spec: dict[str, Any] = {
            "precision": precision,
            "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in net.inputs],
            "outputs": [o.name for o in net.outputs],
        }
        if net.source.kind == "reference":
            spec["source"] = {"kind": "reference", "architecture": net.source.architecture,
                              "width": net.source.width, "seed": net.source.seed}  # fmt: skip
        else:  # the CUDA runner interprets the FP32 graph and casts it itself
            spec["source"], spec["onnx"] = {"kind": "onnx"}, "model.onnx" if precision == "fp32" else "source.onnx"
            if precision != "fp32":
                write_bytes_if_changed(version_dir / "source.onnx", export.onnx_path.read_bytes())
        write_if_changed(version_dir / TORCH_SPEC, json.dumps(spec, indent=1, sort_keys=True))

    def extra_gates(
        self, manifest: Manifest, net: Network, export: ExportResult, version_dir: Path, report: Report
    ) -> tuple[OutputError, ...]:
        """The CUDA runner's module against the FP32 reference: on the GPU at the build's precision where
        one is present, else on the CPU in FP32 (checks the rebuilt or interpreted module itself)."""
        if net.instances.kind == "cpu":
            return ()
        import torch

        from imgpipe.ensembles.runners import TorchRunner

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report(f"{net.name}: accuracy gate of the CUDA runner's module ({device.type})")
        runner = TorchRunner.load(version_dir, device, {"channels_last": net.torch.channels_last})
        errors = gate(manifest, net, export.onnx_path, runner.run_numpy)
        return tuple(dataclasses.replace(e, output=f"{e.output} (torch, {device.type})") for e in errors)


class OnnxRuntimeTarget(OnnxTarget):
    """Triton's ONNX Runtime backend, optionally with its TensorRT execution accelerator on GPUs."""

    name = "onnxruntime"

    def model_spec(self, net: Network, precision: str) -> ModelSpec:
        accelerators: tuple[Accelerator, ...] = ()
        if net.onnxruntime.tensorrt_accelerator and net.instances.kind == "gpu":
            accelerators = (
                Accelerator(
                    "tensorrt",
                    {
                        "precision_mode": {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[precision],
                        "max_workspace_size_bytes": str(net.tensorrt.workspace_mib << 20),
                        "trt_engine_cache_enable": "true",
                        "trt_engine_cache_path": net.onnxruntime.engine_cache_path,
                    },
                ),
            )
        return network_model(
            net, platform="onnxruntime_onnx", default_model_filename="model.onnx", gpu_accelerators=accelerators
        )


def tensorrt_model_spec(net: Network, plans: dict[str, str], profiles: int) -> ModelSpec:
    """``plans``: compute capability (or "ampere+") -> plan file name of the served version."""
    cc_files = {cc: f for cc, f in plans.items() if cc != "ampere+"}
    gpu = Instances(count=net.instances.count, kind="gpu", gpus=net.instances.gpus,
                    profile_per_instance=net.instances.profile_per_instance)  # fmt: skip
    return network_model(
        net,
        platform="tensorrt_plan",
        default_model_filename=plans.get("ampere+", next(iter(plans.values()), "model.plan")),
        cc_model_filenames=cc_files,
        cuda_graphs=net.tensorrt.cuda_graphs,
        instance_groups=instance_groups(gpu, profiles),
    )


def resolve_archs(
    requested: tuple[str, ...], gpu: trtp.Gpu | None, settings: trtp.PlanSettings, dry_run: bool
) -> list[str]:
    """Which plans to build: "ampere+" for a hardware-compatible plan, else compute capabilities."""
    if settings.hardware_compatible:
        return ["ampere+"]
    if requested:
        return list(requested)
    if gpu is not None:
        return [gpu.cc]
    if dry_run:
        return list(trtp.DEFAULT_ARCHS)
    raise trtp.PlanBuildError(
        "no GPU found: TensorRT plans are built on the GPU they will run on. Build on a GPU node, or use"
        " --dry-run (with --gpu-arch 8.0,9.0) for the trtexec commands"
    )


class TensorRTTarget(Target):
    """TensorRT plans, one per compute capability, joined in one version (``cc_model_filenames``)."""

    name = "tensorrt"

    def __init__(self, builder: PlanBuilder | None = None) -> None:
        self.builder: PlanBuilder = builder or TensorRTPlanBuilder()

    def candidate(self, version_dir: Path, metadata: dict[str, Any]) -> Callable[[dict], dict]:
        gpu = self.builder.local_gpu()
        plans = metadata.get("plans", {})
        entry = plans.get("ampere+") or (plans.get(gpu.cc) if gpu else None)
        if self.builder.tensorrt_version() is None or entry is None:
            raise ValueError(f"version {version_dir.name} is a TensorRT plan: validate it on a GPU node with"
                             " TensorRT installed")  # fmt: skip
        plan = version_dir / entry["plan"]
        return lambda feeds: self.builder.run_plan(plan, feeds)

    def build(
        self,
        manifest: Manifest,
        net: Network,
        export: ExportResult,
        model_dir: Path,
        options: BuildOptions,
        report: Report,
        cache_dir: Path,
    ) -> NetworkBuild:
        start = time.perf_counter()
        settings = trtp.PlanSettings.of(net, options.precision)
        profiles = trtp.profiles_for(net)
        gpu = self.builder.local_gpu()
        archs = resolve_archs(options.gpu_archs, gpu, settings, options.dry_run)
        timing_cache = cache_dir / "tensorrt" / "timing.cache"
        calib_cache = (
            cache_dir / "tensorrt" / f"{net.name}-{export.sha256[:16]}.calib" if settings.precision == "int8" else None
        )
        newest = latest(model_dir)

        if options.dry_run:
            target_dir = model_dir / str((newest.number + 1) if newest else 1)
            commands = []
            for cc in archs:
                plan = target_dir / trtp.plan_filename(None if cc == "ampere+" else cc)
                where = "any Ampere-or-newer GPU" if cc == "ampere+" else f"a GPU of compute capability {cc}"
                line = " ".join(trtp.trtexec_command(export.onnx_path, plan, net, settings, timing_cache, calib_cache))
                commands.append(f"# {net.name} on {where}\n{line}")
            notes = ()
            if len(profiles) > 1:
                notes = (f"trtexec builds one optimization profile; `imgpipe build` builds all {len(profiles)}",)
            return NetworkBuild(
                net.name, "dry run", None, time.perf_counter() - start, commands=tuple(commands), notes=notes
            )

        trt_version = self.builder.tensorrt_version()
        if trt_version is None:
            raise trtp.PlanBuildError(
                "TensorRT is not installed here: build plans inside the NGC TensorRT container or where the"
                " `tensorrt` wheel is installed, or print the trtexec commands with --dry-run"
            )
        local = gpu.cc if gpu else ""
        for cc in archs:
            if cc not in ("ampere+", local):
                raise trtp.PlanBuildError(
                    f"cannot build a plan for compute capability {cc} on this GPU ({local}): run the build on a"
                    " node of each architecture (their plans join the same version), or set"
                    " tensorrt.hardware_compatible"
                )
        cc = archs[0]
        base = {"onnx": export.sha256, "settings": settings.__dict__, "tensorrt": trt_version}
        key = trtp.plan_key(export.sha256, settings, profiles, trt_version, cc)
        plans: dict[str, dict] = dict(newest.metadata.get("plans", {})) if newest else {}
        same_base = newest is not None and newest.metadata.get("base") == base
        if same_base and plans.get(cc, {}).get("key") == key:
            version_dir, action = newest.path, "unchanged"  # type: ignore[union-attr]
        else:
            fresh = not same_base
            version_dir = new_version_dir(model_dir) if fresh else newest.path  # type: ignore[union-attr]
            if fresh:
                plans = {}
            plan_path = version_dir / trtp.plan_filename(None if cc == "ampere+" else cc)
            report(f"{net.name}: building {plan_path.name} ({settings.precision})")
            calibration = sample_batches(manifest, net) if settings.precision == "int8" else []
            gate_errors: tuple[OutputError, ...] = ()
            try:
                meta = self.builder.build_plan(
                    export.onnx_path, plan_path, net, settings, timing_cache, calibration, calib_cache
                )
                if options.gate:
                    report(f"{net.name}: accuracy gate")
                    gate_errors = tuple(
                        gate(manifest, net, export.onnx_path, lambda feeds: self.builder.run_plan(plan_path, feeds))
                    )
                    if not all(e.passed for e in gate_errors):
                        raise AccuracyError(list(gate_errors))
            except BaseException:
                if fresh:
                    discard(version_dir)
                else:
                    plan_path.unlink(missing_ok=True)
                raise
            plans[cc] = {**meta, "key": key, "gate": [e.__dict__ for e in gate_errors]}
            write_metadata(
                version_dir, {"target": "tensorrt", "base": base, "plans": plans, "onnx_sha256": export.sha256}
            )
            action = f"version {version_dir.name}" if fresh else f"version {version_dir.name} (+{cc})"
        _write_warmup_samples(manifest, net, model_dir)
        spec = tensorrt_model_spec(net, {c: p["plan"] for c, p in plans.items()}, len(profiles))
        _finish_config(spec, model_dir, action != "unchanged", manifest)
        return NetworkBuild(net.name, action, int(version_dir.name), time.perf_counter() - start)


def target(name: str, plan_builder: PlanBuilder | None = None) -> Target:
    """The :class:`Target` of a name (``python``, ``onnxruntime``, ``tensorrt``)."""
    if name == "python":
        return PythonTarget()
    if name == "onnxruntime":
        return OnnxRuntimeTarget()
    if name == "tensorrt":
        return TensorRTTarget(plan_builder)
    raise ValueError(f"unknown target {name!r}: expected one of {', '.join(TARGETS)}")
