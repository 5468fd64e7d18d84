"""Networks for each execution target (DESIGN §3): artifacts, versions, configs and the accuracy gate.

``python``      the ONNX (at the requested precision) + the ONNX Runtime runner adapter (Python backend)
``onnxruntime`` the ONNX for Triton's ONNX Runtime backend, optionally with its TensorRT accelerator
``tensorrt``    one ``model_smXY.plan`` per GPU architecture, ``cc_model_filenames`` in the config

A build writes a new version folder only when the artifact's cache key changed (ONNX hash, target,
precision and build settings; for plans also the TensorRT version and compute capability). Serving
knobs that only touch ``config.pbtxt`` (batching, instances, warmup, ...) rewrite the config alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from imgpipe.build import tensorrt_plan as trtp
from imgpipe.build.accuracy import AccuracyError, OutputError, gate, onnx_runner
from imgpipe.build.calibration import sample_batches
from imgpipe.build.export import ExportResult
from imgpipe.build.files import write_if_changed
from imgpipe.build.onnx_precision import convert
from imgpipe.build.triton_config import Accelerator, ModelSpec, instance_groups, network_model, render
from imgpipe.build.versions import discard, latest, new_version_dir, pinned_policy, write_metadata
from imgpipe.manifest import Instances, Manifest, Network

Target = Literal["python", "onnxruntime", "tensorrt"]
TARGETS: tuple[str, ...] = ("python", "onnxruntime", "tensorrt")
Report = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    target: Target = "python"
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
    for name, value in batch.items():
        path = model_dir / "warmup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.ascontiguousarray(value[:1]).tobytes())


def _finish_config(spec: ModelSpec, model_dir: Path, new_version: bool) -> bool:
    """Write the config, keeping a rollback's pinned versions unless this build made a new version."""
    pinned = [] if new_version else pinned_policy(model_dir)
    if pinned:
        spec = ModelSpec(**{**spec.__dict__, "version_policy_specific": tuple(pinned)})
    return write_if_changed(model_dir / "config.pbtxt", render(spec))


def onnx_model_spec(net: Network, target: str, precision: str) -> ModelSpec:
    if target == "python":
        # The runner executes ONNX Runtime on CPU: CPU instances whatever the manifest says for GPUs.
        cpu = Instances(count=net.instances.count, kind="cpu")
        return network_model(
            net, backend="python", parameters={"onnx_file": "model.onnx"}, instance_groups=instance_groups(cpu)
        )
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


def build_onnx_target(
    manifest: Manifest, net: Network, export: ExportResult, model_dir: Path, options: BuildOptions, report: Report
) -> NetworkBuild:
    start = time.perf_counter()
    precision = options.precision or net.precision
    key = _key(
        {
            "onnx": export.sha256,
            "target": options.target,
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
            report(f"{net.name}: writing version {version_dir.name} ({options.target}, {precision})")
            convert(export.onnx_path, version_dir / "model.onnx", precision, manifest, net)
            if options.target == "python":
                adapter = resources.files("imgpipe.ensembles").joinpath("adapters/onnx_runner_model.py").read_text()
                (version_dir / "model.py").write_text(adapter)
            if options.gate:
                report(f"{net.name}: accuracy gate")
                gate_errors = tuple(gate(manifest, net, export.onnx_path, onnx_runner(version_dir / "model.onnx")))
                if not all(e.passed for e in gate_errors):
                    raise AccuracyError(list(gate_errors))
        except BaseException:
            discard(version_dir)  # a failed or drifting build never becomes a served version
            raise
        write_metadata(
            version_dir,
            {
                "key": key,
                "target": options.target,
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
        _finish_config(onnx_model_spec(net, options.target, precision), model_dir, action.startswith("version"))
    return NetworkBuild(net.name, action, version, time.perf_counter() - start, gate_errors)


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


def build_tensorrt_target(
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
    gpu = None if options.dry_run else trtp.local_gpu()
    archs = resolve_archs(
        options.gpu_archs, gpu if not options.dry_run else trtp.local_gpu(), settings, options.dry_run
    )
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

    trt_version = trtp.tensorrt_version()
    if trt_version is None:
        raise trtp.PlanBuildError(
            "TensorRT is not installed here: build plans inside the NGC TensorRT container or where the"
            " `tensorrt` wheel is installed, or print the trtexec commands with --dry-run"
        )
    local = gpu.cc if gpu else ""
    for cc in archs:
        if cc not in ("ampere+", local):
            raise trtp.PlanBuildError(
                f"cannot build a plan for compute capability {cc} on this GPU ({local}): run the build on a node"
                " of each architecture (their plans join the same version), or set tensorrt.hardware_compatible"
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
            meta = trtp.build_plan(export.onnx_path, plan_path, net, settings, timing_cache, calibration, calib_cache)
            if options.gate:
                report(f"{net.name}: accuracy gate")
                gate_errors = tuple(
                    gate(manifest, net, export.onnx_path, lambda feeds: trtp.run_plan(plan_path, feeds))
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
        write_metadata(version_dir, {"target": "tensorrt", "base": base, "plans": plans, "onnx_sha256": export.sha256})
        action = f"version {version_dir.name}" if fresh else f"version {version_dir.name} (+{cc})"
    _write_warmup_samples(manifest, net, model_dir)
    spec = tensorrt_model_spec(net, {c: p["plan"] for c, p in plans.items()}, len(profiles))
    _finish_config(spec, model_dir, action != "unchanged")
    return NetworkBuild(net.name, action, int(version_dir.name), time.perf_counter() - start)
