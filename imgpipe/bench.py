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
  Before each sweep one request is sent alone and its response described (``responses`` in the JSON:
  the encoded image's format read from its bytes, its size and bytes; faces found; the mesh files), so
  the JSON shows what was measured, e.g. that ``--remove-background-format webp`` returned WebP.
- ratios: served ÷ model-only, served ÷ naive; each reference network's stage (the segmenter's, the
  colorizer's, …) as a share of the GPU's dense FP16 peak; p99 ÷ p50 at the peak; GPU memory FP16 ÷ FP32;
  where the time goes per model.

Every pipeline of the registry is covered (:data:`PIPELINES`): ``remove_background`` (1024×768 RGB JPEGs in,
the RGBA cut-out in ``BenchOptions.remove_background_format`` out), ``detect_faces`` (the astronaut),
``swap_face`` (the astronaut into the camera photo), ``colorize`` (greyscale versions of the 1024×768
photos, PNG out at SIZE 512) and ``reconstruct_face`` (the astronaut, the manifest's default method and
the contract's default mesh format).

Writes ``bench.json`` and ``bench_<pipeline>.png`` (throughput and p99 against concurrency, one line per
variant) under the output folder. Runs on any machine; on a GPU it uses the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import io
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
from imgpipe.pipelines.remove_background import CONTRACT as REMOVE_BACKGROUND
from imgpipe.pipelines.remove_background import FORMATS as REMOVE_BACKGROUND_FORMATS

# Every built-in pipeline of imgpipe.pipelines.registry (tests/test_bench.py checks none is missing).
PIPELINES = ("remove_background", "detect_faces", "swap_face", "colorize", "reconstruct_face")
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
    step_instances: int = 0  # Python-step instances of the fp16/fp32 variants; 0: see step_instances()
    build_only: bool = False  # build the variants' repositories and stop (a warm cache for a later run)
    manifest: Path = DEFAULT_MANIFEST
    output: Path = Path("out/bench")
    cache_dir: Path = CACHE_DIR
    # FORMAT of every remove_background request, one of the contract's (png, webp, jpeg): encoding bounds that
    # pipeline served (docs/benchmarks.md), so the format is part of what is measured.
    remove_background_format: str = "png"
    photo_size: tuple[int, int] = PHOTO_SIZE  # width, height of remove_background's and colorize's photos

    def __post_init__(self) -> None:
        if self.remove_background_format not in REMOVE_BACKGROUND_FORMATS:
            raise ValueError(
                f"remove_background_format: expected one of {', '.join(REMOVE_BACKGROUND_FORMATS)},"
                f" got {self.remove_background_format!r}"
            )


@dataclass
class Result:
    machine: dict[str, Any]
    options: dict[str, Any]
    served: dict[str, dict[str, list[benchmark.Point]]] = field(default_factory=dict)  # variant → pipeline
    times: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant → pipeline → model
    per_request: dict[str, dict[str, float]] = field(default_factory=dict)  # pipeline → network → items
    model_only: dict[str, dict[str, Any]] = field(default_factory=dict)  # network → best batch, items/s
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline → figures and ratios
    responses: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant → pipeline → facts
    input_sizes: dict[str, list[int]] = field(default_factory=dict)  # pipeline → [width, height] of its images


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["peak_fp16_tflops"] = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in info["gpu"]), None)
    return info


# -- the variants ---------------------------------------------------------------------------------


def step_instances(options: BenchOptions, batched: bool) -> int:
    """Python-step instances of a tuned variant's pipeline: ``--step-instances``, else one per 4 CPU cores, and
    one per 2 for an unbatched BLS model (detect_faces, swap_face, reconstruct_face): Triton hands such a model
    one request per execute, and its instance waits for the networks it calls, so instances are what lets
    requests overlap (on the H100 with one per 4 cores: 4 instances, ~100 ms per detect_faces request, 38
    requests/s)."""
    if options.step_instances:
        return options.step_instances
    cores = os.cpu_count() or 4
    return max(1, cores // 4 if batched else cores // 2)


def variant_manifest(base: dict[str, Any], variant: str, options: BenchOptions, gpu: bool, path: Path) -> Manifest:
    """The manifest of one variant: the bench's pipelines, full-width reference networks, and the
    variant's serving configuration (``--set``-style overrides on a copy of the manifest).

    Every network follows the same rules whichever pipeline uses it (the reference ones, the segmenter,
    colorizer and face regressor among them, at ``options.width``; the naive variant's batch 1, one
    instance, no CUDA graphs), and so does every pipeline's Python step (the naive variant's one CPU
    instance and batch 1)."""
    from imgpipe.pipelines.registry import registry

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
    known = registry()
    for pipeline in data["pipelines"]:
        batched = "max_batch_size" in {f.name for f in dataclasses.fields(known[pipeline].settings)}
        if variant == "naive":
            sets.append(f'pipelines.{pipeline}.instances={{count = 1, kind = "cpu"}}')
            # batch 1 everywhere: the pipelines' own batching too (remove_background's ensemble, colorize's BLS)
            if batched:
                sets.append(f"pipelines.{pipeline}.max_batch_size=1")
        else:
            sets.append(f'pipelines.{pipeline}.instances={{count = {step_instances(options, batched)}, kind = "auto"}}')
    if "remove_background" in data["pipelines"] and variant != "naive":
        sets.append("pipelines.remove_background.max_batch_size=16")
        # the encoder bounds this pipeline: half the cores encode
        sets.append(f"pipelines.remove_background.encode_instances={max(1, (os.cpu_count() or 2) // 2)}")
    for assignment in sets:
        apply_override(data, assignment)
    return parse_manifest(data, path)


def needed(pipelines: Sequence[str]) -> set[str]:
    """The pipelines a bench of ``pipelines`` builds: those and, transitively, those whose settings they read
    (each pipeline's ``requires``: swap_face and reconstruct_face find faces with detect_faces' detector)."""
    from imgpipe.pipelines.registry import registry

    known = registry()
    found: set[str] = set()
    todo = list(pipelines)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += known[name].requires
    return found


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    photos: list[bytes]  # 1024×768 RGB JPEGs (remove_background)
    grey_photos: list[bytes]  # the same photos in greyscale, JPEGs (colorize: its input is a grey photo)
    face: bytes  # the astronaut, PNG (detect_faces, reconstruct_face, swap_face's source)
    target: bytes  # the camera photo, PNG (swap_face's target)
    face_rgb: np.ndarray


def inputs(photo_size: tuple[int, int] = PHOTO_SIZE) -> Inputs:
    from PIL import Image

    from imgpipe.samples import encode, sample_array

    photos, grey = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(sample_array(name)).convert("RGB").resize(photo_size, Image.Resampling.BICUBIC)
        photos.append(encode(np.asarray(image), "JPEG"))
        grey.append(encode(np.asarray(image.convert("L")), "JPEG"))  # a one-channel JPEG, as a scanned photo
    face = sample_array("astronaut")
    return Inputs(photos, grey, encode(face, "PNG"), encode(sample_array("camera"), "PNG"), face)


def input_size(pipeline: str, data: Inputs, photo_size: tuple[int, int]) -> list[int]:
    """[width, height] of the images ``pipeline``'s bench requests carry (the face pipelines: the 512² sample
    faces), recorded in bench.json so that capacity plans keep each size's curve apart (:mod:`imgpipe.capacity`)."""
    if pipeline in ("remove_background", "colorize"):
        return list(photo_size)
    height, width = data.face_rgb.shape[:2]
    return [width, height]


def remove_background_mode(fmt: str) -> str:
    """MODE of the bench's remove_background requests in FORMAT ``fmt``: the contract's default (the RGBA
    cut-out), or, where the pipeline refuses that mode in ``fmt`` (JPEG has no alpha), a composite on the
    default background: the same work (segmentation, refinement, one encode) without the alpha channel."""
    from imgpipe.ensembles.background import parse_options
    from imgpipe.errors import InvalidInputError

    default = REMOVE_BACKGROUND.input("MODE").default or "rgba"
    try:
        parse_options(default, None, fmt)
    except InvalidInputError:
        return "composite"
    return default


def response_for(pipeline: str, data: Inputs, remove_background_format: str = "png") -> Callable[[Any], Any]:
    """One request of ``pipeline`` through its real client; returns what the client returns. Requests that
    cycle through several inputs take the next one on each call."""
    from imgpipe.clients.colorize import colorize_one
    from imgpipe.clients.faces import detect_faces, swap_face
    from imgpipe.clients.reconstruct import reconstruct_face
    from imgpipe.clients.remove_background import remove_background
    from imgpipe.pipelines import reconstruct_face as reconstruct_contract

    counter = iter(range(1 << 62))
    if pipeline == "remove_background":
        fmt, mode = remove_background_format, remove_background_mode(remove_background_format)

        def cut_out(client: Any) -> bytes:
            photo = data.photos[next(counter) % len(data.photos)]
            return remove_background(client, photo, mode=mode, fmt=fmt)  # type: ignore[arg-type]

        return cut_out
    if pipeline == "detect_faces":
        return lambda client: detect_faces(client, data.face)
    if pipeline == "swap_face":
        return lambda client: swap_face(client, data.face, data.target)
    if pipeline == "colorize":  # the client's defaults: PNG out, SIZE 512 (DDColor's)
        return lambda client: colorize_one(client, data.grey_photos[next(counter) % len(data.grey_photos)])
    if pipeline == "reconstruct_face":
        # method not sent: the manifest's (the pipeline's default, "mesh"); the contract's default format (GLB)
        fmt = reconstruct_contract.CONTRACT.param("format").default
        return lambda client: reconstruct_face(client, data.face, fmt=fmt)
    raise ValueError(f"no bench request for pipeline {pipeline!r}: expected one of {', '.join(PIPELINES)}")


class WrongAnswerError(RuntimeError):
    """A request answered OK with an output the bench's input cannot give (no face in a photo of one)."""


def check_answer(pipeline: str, response: Any) -> None:
    """Raise :class:`WrongAnswerError` where an OK answer is visibly wrong, so that the sweep counts it as an
    error and not as throughput: every bench face image holds one face. (On the H100, swap_face and
    reconstruct_face answered "no face found" for such a photo now and then under load; detect_faces would
    answer the same fault with an empty list, counted as served without this check.)"""
    if pipeline == "detect_faces" and len(response) == 0:
        raise WrongAnswerError("detect_faces found no face in the bench photo of one")
    if pipeline == "swap_face" and not response.swapped:
        raise WrongAnswerError("swap_face swapped no face in the bench photo of one")


def request_for(pipeline: str, data: Inputs, remove_background_format: str = "png") -> Callable[[Any], int]:
    """One request of ``pipeline``, its answer checked (:func:`check_answer`); returns the items it processed:
    one image."""
    send = response_for(pipeline, data, remove_background_format)

    def call(client: Any) -> int:
        check_answer(pipeline, send(client))
        return 1

    return call


def _image_facts(encoded: bytes) -> dict[str, Any]:
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        return {"format": image.format, "size": list(image.size), "mode": image.mode, "bytes": len(encoded)}


def describe_response(pipeline: str, response: Any) -> dict[str, Any]:
    """What one response held, read from it rather than assumed: an encoded image's format (from its bytes),
    size, colour mode and bytes; the faces found; the mesh files' format and bytes."""
    if pipeline in ("remove_background", "colorize"):
        return _image_facts(response)
    if pipeline == "detect_faces":
        return {"faces": len(response)}
    if pipeline == "swap_face":
        return {**_image_facts(response.image), "swapped": response.swapped}
    if pipeline == "reconstruct_face":
        meshes = [face.mesh for face in response.faces]
        formats = sorted({_mesh_format(m) for m in meshes})
        return {"faces": len(meshes), "format": ",".join(formats) or None, "bytes": sum(map(len, meshes))}
    return {}


def describe_facts(facts: dict[str, Any]) -> str:
    """A response's facts in a few words: ``WEBP 1024×768 RGBA, 412 KiB``, ``1 face``, ``glb 1 face, 2150 KiB``."""
    if "error" in facts:
        return facts["error"]
    words = []
    if "size" in facts:
        words.append(f"{facts['format']} {facts['size'][0]}×{facts['size'][1]} {facts['mode']}")
    elif facts.get("format"):
        words.append(str(facts["format"]))
    if "faces" in facts:
        words.append(f"{facts['faces']} face{'s' if facts['faces'] != 1 else ''}")
    text = " ".join(words)
    if "bytes" in facts:
        text += f", {facts['bytes'] / 1024:.0f} KiB"
    return text


def _mesh_format(data: bytes) -> str:
    """A mesh file's format from its first bytes: binary glTF, PLY, or OBJ (a ZIP of face.obj, .mtl, .png)."""
    for magic, name in ((b"glTF", "glb"), (b"ply", "ply"), (b"PK", "obj")):
        if data.startswith(magic):
            return name
    return "unknown"


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


def pyramid_networks(manifest: Manifest) -> set[str]:
    """The networks run over an image pyramid (MTCNN's pnet, as the manifest's detect_faces names it): their
    model-only time is the bench image's real pyramid, level by level, not a batch of one shape."""
    detect = manifest.pipelines.get("detect_faces")
    if detect is None or detect.detector != "mtcnn":
        return set()
    return {detect.pnet}


def _feeds(net: Any, batch: int, device: Any) -> dict[str, Any]:
    """A batch of random inputs of ``net``: dynamic dimensions at the manifest's ``opt_shape`` (required for
    them, and the shape TensorRT's profile is tuned for: e.g. 512² for a DDColor ONNX declared [3, -1, -1],
    the detector's input size for a user's SCRFD or YuNet), in each input's type."""
    import torch

    from imgpipe.dtypes import torch_dtype

    feeds = {}
    for spec in net.inputs:
        kind = torch_dtype(spec.dtype)
        shape = (batch, *spec.static_shape)
        if kind.is_floating_point:
            feeds[spec.name] = torch.randn(shape, device=device).to(kind)
        else:
            feeds[spec.name] = torch.zeros(shape, dtype=kind, device=device)
    return feeds


def _time_pyramid(runner: Any, net: Any, data: Inputs, device: Any, seconds: float) -> dict[str, Any]:
    """pnet: pyramids per second of the bench's face image (the pyramid detect_faces builds for it)."""
    from imgpipe.ensembles import mtcnn

    image = mtcnn.image_tensor(data.face_rgb).to(device)
    levels = mtcnn.pnet_inputs(image, mtcnn.pyramid(*data.face_rgb.shape[:2], mtcnn.MtcnnParams()))
    feeds = [{net.input().name: x.to(device)} for x in levels]
    for f in feeds:
        runner.run([f])
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or not rounds:
        for f in feeds:
            runner.run([f])
        rounds += 1
    per_image = (time.perf_counter() - start) / rounds
    return {"images_per_s": 1 / per_image, "levels": len(feeds), "batch": 1}


def model_only(
    manifest: Manifest, repo: Path, networks: Sequence[str], seconds: float, report: Report, data: Inputs
) -> dict[str, dict[str, Any]]:
    """Best items/s of each network at its batch sizes, with the runner the server uses on this machine
    (the one the network's config names: the CUDA runner on a GPU, ONNX Runtime on a CPU; the TFLite-imported
    networks, face mesh and BlazeFace, run there as their exported ONNX like any other).

    pnet (:func:`pyramid_networks`): seconds per image for the real pyramid of the bench's face image. Any
    other network with dynamic dimensions (the default manifest has none) is timed at its manifest
    ``opt_shape`` (:func:`_feeds`; ``shape`` in its entry). A network that cannot be timed gets ``error`` in
    its entry instead of ending the run (the sweeps before it are kept); the pipelines that use it get no
    model-only figure."""
    import json

    import torch

    from imgpipe.build.triton_config import parse
    from imgpipe.build.versions import served
    from imgpipe.ensembles.runners import OnnxRuntimeRunner, TorchRunner

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    pyramids = pyramid_networks(manifest)
    found: dict[str, dict[str, Any]] = {}
    for name in networks:
        runner = None
        try:
            net = manifest.network(name)
            version = repo / name / str(served(repo / name)[-1])
            config = parse((repo / name / "config.pbtxt").read_text())
            options = json.loads(config.parameters["imgpipe.runner_options"].string_value)
            on_gpu = gpu and config.parameters["imgpipe.runner"].string_value == "torch"  # the server's choice
            if on_gpu:
                runner = TorchRunner.load(version, device, options)
            else:
                runner = OnnxRuntimeRunner.load(version, device, {})
            if name in pyramids:
                found[name] = _time_pyramid(runner, net, data, device, seconds)
                levels = found[name]["levels"]
                report(f"model-only {name}: {found[name]['images_per_s']:.1f} pyramids/s ({levels} levels)")
                continue
            rates = {batch: _time_runner(runner, _feeds(net, batch, device), seconds) for batch in net.buckets()}
            best = max(rates, key=rates.__getitem__)
            found[name] = {"items_per_s": rates[best], "batch": best, "by_batch": rates}
            if any(-1 in spec.shape for spec in net.inputs):
                found[name]["shape"] = {spec.name: list(spec.static_shape) for spec in net.inputs}
            report(f"model-only {name}: {rates[best]:.1f} items/s at batch {best}")
        except Exception as exc:  # one network's failure must not lose the sweeps measured before it
            found[name] = {"error": f"{type(exc).__name__}: {exc}"}
            report(f"model-only {name}: failed: {found[name]['error']}")
        finally:
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
    from imgpipe.clients.triton import TritonClient
    from imgpipe.pipelines.registry import registry
    from imgpipe.server import Ports, TritonServer, free_ports

    gpu = torch.cuda.is_available()
    base = tomllib.loads(Path(options.manifest).read_text(encoding="utf-8"))
    options.output.mkdir(parents=True, exist_ok=True)
    result = Result(machine(), {k: str(v) for k, v in dataclasses.asdict(options).items()})
    fmt = options.remove_background_format
    result.options["remove_background_mode"] = remove_background_mode(fmt)  # rgba, or composite for JPEG
    data = inputs(options.photo_size)
    result.input_sizes = {p: input_size(p, data, options.photo_size) for p in options.pipelines}
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
            result.served[variant], result.times[variant], result.responses[variant] = {}, {}, {}
            for pipeline in options.pipelines:
                # One request alone first (before the statistics' baseline): what the sweep's responses are.
                try:
                    with TritonClient(server.grpc_url, "grpc", retry=None) as client:
                        answer = describe_response(pipeline, response_for(pipeline, data, fmt)(client))
                except Exception as exc:  # the sweep will count the same failure; the message is kept here
                    answer = {"error": benchmark._describe(exc)}
                result.responses[variant][pipeline] = answer
                report(f"{variant} {pipeline}: one response: {describe_facts(answer)}")
                before = benchmark.model_stats(server.grpc_url, "grpc")
                points = benchmark.sweep(
                    server.grpc_url,
                    "grpc",
                    request_for(pipeline, data, fmt),
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
                entry = registry()[pipeline].contract.model
                sent = sum(p.sent for p in points)
                spent = benchmark.settled_delta(server.grpc_url, "grpc", before, entry, sent)
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
    """Per pipeline: the peak of each variant, model-only throughput, the ratios the issue asks for.

    A pipeline's model-only rate is 1 ÷ the sum over its networks of (items per request ÷ items per second),
    ``model_only_ms`` each network's share; it is None when one of its networks has no model-only figure
    (``model_only_missing`` names them): a rate without it would be too high. On a GPU of known peak, each
    reference network the pipeline uses gets its roofline (GFLOP per item × items/s against the dense FP16
    peak), the segmenter's also under ``segmenter_roofline``."""
    summary: dict[str, dict[str, Any]] = {}
    tuned = options.variants[0]
    peak_tflops = result.machine.get("peak_fp16_tflops")
    gflops: dict[str, float | None] = {}
    for pipeline in options.pipelines:
        peaks = {
            v: benchmark.peak(result.served[v][pipeline])
            for v in options.variants
            if pipeline in result.served.get(v, {}) and result.served[v][pipeline]
        }
        per_network: dict[str, float] = {}
        missing = []
        for name, items in result.per_request.get(pipeline, {}).items():
            measured = result.model_only.get(name, {})
            if measured.get("images_per_s"):  # pnet: one pyramid per detected image
                per_network[name] = items / max(measured["levels"], 1) / measured["images_per_s"]
            elif measured.get("items_per_s"):
                per_network[name] = items / measured["items_per_s"]
            else:
                missing.append(name)
        seconds = sum(per_network.values())
        model_rate = 1 / seconds if seconds and not missing else None
        entry: dict[str, Any] = {
            "peak": {
                v: {"concurrency": p.concurrency, "throughput": p.throughput, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms}
                for v, p in peaks.items()
            },
            "model_only_per_s": model_rate,
            "model_only_ms": {name: value * 1e3 for name, value in per_network.items()},
        }
        if missing:
            entry["model_only_missing"] = missing
        top = peaks.get(tuned)
        if top is not None and model_rate:
            entry["served_over_model_only"] = top.throughput / model_rate
        if top is not None and "naive" in peaks and peaks["naive"].throughput:
            entry["served_over_naive"] = top.throughput / peaks["naive"].throughput
        if top is not None and top.p50_ms:
            entry["p99_over_p50_at_peak"] = (top.p99_ms or 0) / top.p50_ms
        if peak_tflops:
            rooflines = {}
            for name in per_network:
                rate = result.model_only[name].get("items_per_s")
                if name not in gflops:
                    gflops[name] = network_gflop(manifest, name)
                gflop = gflops[name]
                if rate and gflop:
                    rooflines[name] = {
                        "gflop_per_image": gflop,
                        "images_per_s": rate,
                        "tflops": rate * gflop / 1e3,
                        "share_of_fp16_peak": rate * gflop / 1e3 / peak_tflops,
                    }
            if rooflines:
                entry["rooflines"] = rooflines
            if "segmenter" in rooflines:
                entry["segmenter_roofline"] = rooflines["segmenter"]
        summary[pipeline] = entry
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


def network_gflop(manifest: Manifest, name: str) -> float | None:
    """GFLOP of one item through a reference network at the bench's width (None for imported networks,
    whose architecture imgpipe does not count)."""
    import torch

    from imgpipe.build.networks import build_reference, count_flops

    net = manifest.network(name)
    if net.source.kind != "reference":
        return None
    model = build_reference(net.source.architecture, net.source.width, net.source.seed).eval()
    with torch.inference_mode():
        return count_flops(model, *(torch.zeros(1, *spec.static_shape) for spec in net.inputs)) / 1e9


def save(result: Result, options: BenchOptions) -> None:
    benchmark.save_json(options.output / "bench.json", dataclasses.asdict(result))
    for pipeline in options.pipelines:
        variants = {v: by[pipeline] for v, by in result.served.items() if pipeline in by}
        what = f", {options.remove_background_format.upper()} out" if pipeline == "remove_background" else ""
        title = f"{pipeline} on {result.machine.get('gpu', 'CPU')} (width {options.width}{what})"
        benchmark.plot(variants, options.output / f"bench_{pipeline}.png", title, items="images")
