"""``imgpipe bench``: every pipeline measured three ways in one run, side by side.

- **model-only**: the pipeline's networks alone, in-process, with the runner the server uses (the CUDA
  runner on a GPU, ONNX Runtime on a CPU), each at its best batch size; a pipeline request's network
  time is the sum over its networks of (items per request ÷ items per second), the items per request
  read from the served run's Triton statistics (pnet: the real image pyramid of the bench image).
- **served**: the real ``tritonserver`` over the generated repository, over gRPC, encoded images in and
  encoded images out, concurrency swept until throughput stops rising (:mod:`imgpipe.benchmark`).
  Variants: ``fp16`` (the tuned GPU configuration: FP16, CUDA graphs, pre/post on the GPU, several
  Python-step instances to spread PNG encoding), ``fp32`` (the same in FP32: the GPU-memory comparison)
  and ``naive`` (FP32, batch 1 everywhere, pre/post on the CPU, one instance each, no CUDA graphs).
- ratios: served ÷ model-only, served ÷ naive; the segmenter's network stage as a share of the GPU's
  dense FP16 peak; p99 ÷ p50 at the peak; GPU memory FP16 ÷ FP32; where the time goes per model.

Writes ``bench.json`` and ``bench_<pipeline>.png`` (throughput and p99 against concurrency, one line per
variant) under the output folder. Runs on any machine; on a GPU it uses the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe import benchmark
from imgpipe.manifest import Manifest, apply_override, parse_manifest, tomllib
from imgpipe.paths import CACHE_DIR, DEFAULT_MANIFEST

PIPELINES = ("remove_background", "detect_faces", "swap_face")
VARIANTS = ("fp16", "fp32", "naive")
# Dense FP16 tensor-core peak, TFLOP/s (no sparsity), by a word of the device name.
PEAK_FP16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
PHOTO_SIZE = (1024, 768)  # width, height of the remove_background photos
Report = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    pipelines: tuple[str, ...] = PIPELINES
    variants: tuple[str, ...] = VARIANTS
    width: int | None = 64  # reference networks' width (64: the full cost); None: the manifest's
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    duration_s: float = 8.0
    warmup_s: float = 2.0
    model_seconds: float = 2.0  # model-only: time spent per batch size
    step_instances: int = 0  # Python-step instances of the fp16/fp32 variants; 0: one per 4 CPU cores
    build_only: bool = False  # build the variants' repositories and stop (a warm cache for a later run)
    manifest: Path = DEFAULT_MANIFEST
    output: Path = Path("out/bench")
    cache_dir: Path = CACHE_DIR


@dataclass
class Result:
    machine: dict[str, Any]
    options: dict[str, Any]
    served: dict[str, dict[str, list[benchmark.Point]]] = field(default_factory=dict)  # variant → pipeline
    times: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant → pipeline → model
    per_request: dict[str, dict[str, float]] = field(default_factory=dict)  # pipeline → network → items
    model_only: dict[str, dict[str, Any]] = field(default_factory=dict)  # network → best batch, items/s
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline → figures and ratios


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["peak_fp16_tflops"] = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in info["gpu"]), None)
    return info


# -- the variants ---------------------------------------------------------------------------------


def variant_manifest(base: dict[str, Any], variant: str, options: BenchOptions, gpu: bool, path: Path) -> Manifest:
    """The manifest of one variant: the bench's pipelines, full-width reference networks, and the
    variant's serving configuration (``--set``-style overrides on a copy of the manifest)."""
    data = copy.deepcopy(base)
    data["pipelines"] = {k: v for k, v in data.get("pipelines", {}).items() if k in needed(options.pipelines)}
    sets: list[str] = []
    for name, net in data["networks"].items():
        source = net.get("source", {})
        if source.get("kind") == "reference" and options.width:
            sets.append(f"networks.{name}.source.width={options.width}")
        if variant == "naive":
            sets += [
                f"networks.{name}.batching.max_batch_size=1",
                f"networks.{name}.batching.preferred_batch_sizes=[]",
                f"networks.{name}.torch.cuda_graphs=false",
                f"networks.{name}.torch.channels_last=false",
                f"networks.{name}.instances.count=1",
            ]
        else:
            sets.append(f"networks.{name}.torch.cuda_graphs={'true' if gpu else 'false'}")
    if "pnet" in data["networks"] and variant != "naive":
        # pnet's pyramid levels differ in shape and do not batch: instances run them side by side
        sets.append(f"networks.pnet.instances.count={max(1, (os.cpu_count() or 4) // 4)}")
    if "segmenter" in data["networks"] and "remove_background" in data["pipelines"]:
        # The benchmark's segmenter is the RMBG-2.0 / BiRefNet reference at full cost (issue 8's figures and
        # roofline), not the default's 256² selfie segmenter.
        sets.append('pipelines.remove_background.segmenter="segmenter"')
    if "segmenter" in data["networks"] and variant != "naive":
        seg = "networks.segmenter.batching"
        sets += [
            f"{seg}.max_batch_size=16",
            f"{seg}.preferred_batch_sizes=[4, 8, 16]",
            f"{seg}.max_queue_delay_us=3000",
        ]
    steps = options.step_instances or max(1, (os.cpu_count() or 4) // 4)
    for pipeline in data["pipelines"]:
        if variant == "naive":
            sets.append(f'pipelines.{pipeline}.instances={{count = 1, kind = "cpu"}}')
        else:
            sets.append(f'pipelines.{pipeline}.instances={{count = {steps}, kind = "auto"}}')
    if "remove_background" in data["pipelines"]:
        sets.append(f"pipelines.remove_background.max_batch_size={1 if variant == 'naive' else 16}")
        if variant != "naive":  # the encoder bounds this pipeline: half the cores encode
            sets.append(f"pipelines.remove_background.encode_instances={max(1, (os.cpu_count() or 2) // 2)}")
    for assignment in sets:
        apply_override(data, assignment)
    return parse_manifest(data, path)


def needed(pipelines: Sequence[str]) -> set[str]:
    """The pipelines a bench of ``pipelines`` builds (swap_face needs detect_faces' settings)."""
    return set(pipelines) | ({"detect_faces"} if "swap_face" in pipelines else set())


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    photos: list[bytes]  # 1024×768 JPEGs
    face: bytes  # the astronaut, PNG
    target: bytes  # the camera photo, PNG
    face_rgb: np.ndarray


def inputs() -> Inputs:
    from PIL import Image

    from imgpipe.samples import encode, sample_array

    photos = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(sample_array(name)).convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
        photos.append(encode(np.asarray(image), "JPEG"))
    face = sample_array("astronaut")
    return Inputs(photos, encode(face, "PNG"), encode(sample_array("camera"), "PNG"), face)


def request_for(pipeline: str, data: Inputs) -> Callable[[Any], int]:
    """One request of ``pipeline`` (returns the items it processed: one image)."""
    from imgpipe.clients.faces import detect_faces, swap_face
    from imgpipe.clients.remove_background import remove_background

    counter = iter(range(1 << 62))

    if pipeline == "remove_background":

        def call(client: Any) -> int:
            remove_background(client, data.photos[next(counter) % len(data.photos)])
            return 1
    elif pipeline == "detect_faces":

        def call(client: Any) -> int:
            detect_faces(client, data.face)
            return 1
    else:

        def call(client: Any) -> int:
            swap_face(client, data.face, data.target)
            return 1

    return call


# -- model-only -----------------------------------------------------------------------------------


def _time_runner(runner: Any, feeds: dict[str, Any], seconds: float) -> float:
    """Items per second of ``runner`` on ``feeds`` (one batch), run repeatedly for about ``seconds``."""
    batch = len(next(iter(feeds.values())))
    runner.run([feeds])  # warm-up (and cuDNN's algorithm choice)
    runner.run([feeds])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.run([feeds])
        count += 1
    return count * batch / (time.perf_counter() - start)


def model_only(
    manifest: Manifest, repo: Path, networks: Sequence[str], seconds: float, report: Report, data: Inputs
) -> dict[str, dict[str, Any]]:
    """Best items/s of each network at its batch sizes, with the runner the server uses on this machine.
    pnet (dynamic H×W): seconds per image for the real pyramid of the bench's face image."""
    import json

    import torch

    from imgpipe.build.triton_config import parse
    from imgpipe.build.versions import served
    from imgpipe.ensembles import mtcnn
    from imgpipe.ensembles.runners import OnnxRuntimeRunner, TorchRunner

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    found: dict[str, dict[str, Any]] = {}
    for name in networks:
        net = manifest.network(name)
        version = repo / name / str(served(repo / name)[-1])
        config = parse((repo / name / "config.pbtxt").read_text())
        options = json.loads(config.parameters["imgpipe.runner_options"].string_value)
        on_gpu = gpu and config.parameters["imgpipe.runner"].string_value == "torch"  # the server's choice
        runner = TorchRunner.load(version, device, options) if on_gpu else OnnxRuntimeRunner.load(version, device, {})
        if -1 in net.input().shape:  # pnet: the bench image's pyramid, level by level
            image = mtcnn.image_tensor(data.face_rgb).to(device)
            levels = mtcnn.pnet_inputs(image, mtcnn.pyramid(*data.face_rgb.shape[:2], mtcnn.MtcnnParams()))
            feeds = [{net.input().name: x.to(device)} for x in levels]
            for f in feeds:
                runner.run([f])
            start, rounds = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                for f in feeds:
                    runner.run([f])
                rounds += 1
            per_image = (time.perf_counter() - start) / rounds
            found[name] = {"images_per_s": 1 / per_image, "levels": len(feeds), "batch": 1}
            report(f"model-only {name}: {1 / per_image:.1f} pyramids/s ({len(feeds)} levels)")
            del runner
            continue
        rates = {}
        for batch in net.buckets():
            feeds = {s.name: torch.randn(batch, *s.static_shape, device=device) for s in net.inputs}
            rates[batch] = _time_runner(runner, feeds, seconds)
        best = max(rates, key=rates.__getitem__)
        found[name] = {"items_per_s": rates[best], "batch": best, "by_batch": rates}
        report(f"model-only {name}: {rates[best]:.1f} items/s at batch {best}")
        del runner
        if gpu:
            torch.cuda.empty_cache()
    return found


# -- the run --------------------------------------------------------------------------------------


def run(options: BenchOptions, report: Report = print) -> Result:
    """Build each variant's repository, serve it, sweep each pipeline, measure the networks alone; save
    JSON and plots under ``options.output``; return everything measured."""
    import torch

    from imgpipe.build.repository import build_repository
    from imgpipe.build.targets import BuildOptions
    from imgpipe.server import Ports, TritonServer, free_ports

    gpu = torch.cuda.is_available()
    base = tomllib.loads(Path(options.manifest).read_text(encoding="utf-8"))
    options.output.mkdir(parents=True, exist_ok=True)
    result = Result(machine(), {k: str(v) for k, v in dataclasses.asdict(options).items()})
    data = inputs()
    repos: dict[str, tuple[Manifest, Path]] = {}
    for variant in options.variants:
        work = options.output / "repos" / variant
        manifest = variant_manifest(base, variant, options, gpu, work / "manifest.toml")
        precision = "fp16" if variant == "fp16" and gpu else "fp32"
        report(f"{variant}: building the repository ({precision})")
        started = time.perf_counter()
        build_repository(
            manifest,
            work / "repo",
            BuildOptions(precision=precision, gate=False),
            cache_dir=options.cache_dir,
            progress=lambda m: None,
        )
        report(f"{variant}: built in {time.perf_counter() - started:.0f} s")
        repos[variant] = (manifest, work / "repo")
        if options.build_only:
            continue
        with TritonServer(work / "repo", Ports(*free_ports(3)), log_path=work / "triton.log") as server:
            result.served[variant], result.times[variant] = {}, {}
            for pipeline in options.pipelines:
                before = benchmark.model_stats(server.grpc_url, "grpc")
                points = benchmark.sweep(
                    server.grpc_url,
                    "grpc",
                    request_for(pipeline, data),
                    options.concurrencies,
                    options.duration_s,
                    options.warmup_s,
                    progress=lambda m, p=pipeline, v=variant: report(f"{v} {p}: {m}"),
                    metrics_url=server.metrics_url,
                )
                result.served[variant][pipeline] = points
                if not server.is_running():
                    report(f"{variant}: tritonserver exited during {pipeline}; log tail:\n{server.log[-3000:]}")
                    break
                after = benchmark.model_stats(server.grpc_url, "grpc")
                spent = benchmark.delta(before, after)
                result.times[variant][pipeline] = {
                    k: dataclasses.asdict(v) for k, v in benchmark.breakdown(spent).items()
                }
                if variant == options.variants[0]:
                    result.per_request[pipeline] = items_per_request(pipeline, spent, manifest)
        if gpu:
            torch.cuda.empty_cache()
    if options.build_only:
        return result
    first_manifest, first_repo = repos[options.variants[0]]
    networks = sorted({n for p in options.pipelines for n in result.per_request.get(p, {})})
    result.model_only = model_only(first_manifest, first_repo, networks, options.model_seconds, report, data)
    result.summary = summarise(result, options, first_manifest)
    save(result, options)
    return result


def items_per_request(pipeline: str, spent: dict[str, Any], manifest: Manifest) -> dict[str, float]:
    """How many items each network inferred per request of ``pipeline`` (from the sweep's statistics)."""
    from imgpipe.pipelines.registry import registry

    model = registry()[pipeline].contract.model
    requests = spent[model].inference_count if model in spent else 0
    if not requests:
        return {}
    return {
        name: spent[name].inference_count / requests
        for name in manifest.networks
        if name in spent and spent[name].inference_count
    }


def summarise(result: Result, options: BenchOptions, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Per pipeline: the peak of each variant, model-only throughput, the ratios the issue asks for."""
    summary: dict[str, dict[str, Any]] = {}
    tuned = options.variants[0]
    for pipeline in options.pipelines:
        peaks = {
            v: benchmark.peak(result.served[v][pipeline]) for v in options.variants if pipeline in result.served[v]
        }
        seconds = 0.0
        for name, items in result.per_request.get(pipeline, {}).items():
            measured = result.model_only.get(name, {})
            if "images_per_s" in measured:  # pnet: one pyramid per detected image
                images = items / max(measured["levels"], 1)
                seconds += images / measured["images_per_s"]
            elif measured.get("items_per_s"):
                seconds += items / measured["items_per_s"]
        model_rate = 1 / seconds if seconds else None
        entry: dict[str, Any] = {
            "peak": {
                v: {"concurrency": p.concurrency, "throughput": p.throughput, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms}
                for v, p in peaks.items()
            },
            "model_only_per_s": model_rate,
        }
        top = peaks.get(tuned)
        if top is not None and model_rate:
            entry["served_over_model_only"] = top.throughput / model_rate
        if top is not None and "naive" in peaks and peaks["naive"].throughput:
            entry["served_over_naive"] = top.throughput / peaks["naive"].throughput
        if top is not None and top.p50_ms:
            entry["p99_over_p50_at_peak"] = (top.p99_ms or 0) / top.p50_ms
        summary[pipeline] = entry
    peak = result.machine.get("peak_fp16_tflops")
    if peak and "segmenter" in result.model_only:
        gflop = segmenter_gflop(manifest)
        rate = result.model_only["segmenter"]["items_per_s"]
        summary.setdefault("remove_background", {})["segmenter_roofline"] = {
            "gflop_per_image": gflop,
            "images_per_s": rate,
            "tflops": rate * gflop / 1e3,
            "share_of_fp16_peak": rate * gflop / 1e3 / peak,
        }
    memory: dict[str, float | None] = {}
    for variant, by_pipeline in result.served.items():
        samples = [max(p.gpu_memory_bytes.values()) for pts in by_pipeline.values() for p in pts if p.gpu_memory_bytes]
        memory[variant] = max(samples, default=None)
    if memory.get("fp16") and memory.get("fp32"):
        summary["gpu_memory"] = {
            "fp16_bytes": memory["fp16"],
            "fp32_bytes": memory["fp32"],
            "fp16_over_fp32": memory["fp16"] / memory["fp32"],
        }
    return summary


def segmenter_gflop(manifest: Manifest) -> float:
    import torch

    from imgpipe.build.networks import build_reference, count_flops

    net = manifest.network("segmenter")
    if net.source.kind != "reference":
        return float("nan")
    model = build_reference(net.source.architecture, net.source.width, net.source.seed)
    return count_flops(model, torch.zeros(1, *net.input().static_shape)) / 1e9


def save(result: Result, options: BenchOptions) -> None:
    benchmark.save_json(options.output / "bench.json", dataclasses.asdict(result))
    for pipeline in options.pipelines:
        variants = {v: by[pipeline] for v, by in result.served.items() if pipeline in by}
        title = f"{pipeline} on {result.machine.get('gpu', 'CPU')} (width {options.width})"
        benchmark.plot(variants, options.output / f"bench_{pipeline}.png", title, items="images")
