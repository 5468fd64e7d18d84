"""Capacity planning from measured throughput/latency curves: how many GPUs (pods) a request rate and a
pipeline mix need under a p99 target, and how a HorizontalPodAutoscaler on Triton's queue time reacts to
a change of load (a small time-stepped simulation).

The curves are ``imgpipe bench``'s served sweeps (``docs/benchmarks/bench.json``: per pipeline, throughput
and p99 at each concurrency, one GPU, one Triton). One pod = one GPU = one Triton serving every pipeline,
so pipelines share a GPU's time: a pipeline at rate r with per-GPU capacity c uses r / c of a GPU.

Model assumptions (stated in docs/scaling.md): capacity at a latency target is the highest measured
throughput whose p99 is within the target (no interpolation between measured concurrencies); images
of several sizes are planned from curves measured at each size (``imgpipe bench --photo-size``; a mix names
them ``pipeline@WxH``) and never extrapolated from another size; the HPA follows
Kubernetes' algorithm (desired = ceil(current × metric / target), a 10 % tolerance, a sync period, a
scale-down stabilisation window) on the average queue time per request, which the simulation estimates
from the backlog (Little's law) plus the queue time measured at the operating point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.bench import PHOTO_SIZE
from imgpipe.paths import ROOT

BENCH_JSON = ROOT / "docs" / "benchmarks" / "bench.json"


@dataclass(frozen=True)
class Point:
    concurrency: int
    throughput: float  # requests/s
    p99_ms: float


Size = tuple[int, int]  # width, height of a pipeline's request images

# Input sizes of the bench runs that did not record them (``input_sizes`` in bench.json): its fixed inputs,
# the photos at the bench's default size and the 512² sample faces.
BENCH_SIZES_BEFORE_RECORDED: dict[str, Size] = {
    "remove_background": PHOTO_SIZE,
    "colorize": PHOTO_SIZE,
    "detect_faces": (512, 512),
    "swap_face": (512, 512),
    "reconstruct_face": (512, 512),
}


@dataclass(frozen=True)
class Curve:
    pipeline: str
    points: tuple[Point, ...]
    size: Size | None = None  # the request images' size the curve was measured with

    def capacity(self, p99_ms: float) -> Point | None:
        """The highest-throughput measured point whose p99 is within ``p99_ms``; None if none is."""
        within = [p for p in self.points if p.p99_ms <= p99_ms]
        return max(within, key=lambda p: p.throughput) if within else None


def size_text(size: Size | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "unknown size"


def parse_size(text: str) -> Size:
    """``"2048x1536"`` → (2048, 1536)."""
    width, sep, height = text.strip().lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise ValueError(f"{text!r} is not an image size WIDTHxHEIGHT, e.g. 2048x1536") from None
    if not sep or min(size) <= 0:
        raise ValueError(f"{text!r} is not an image size WIDTHxHEIGHT, e.g. 2048x1536")
    return size


@dataclass(frozen=True)
class Curves:
    curves: dict[tuple[str, Size | None], Curve]  # (pipeline, request image size) → curve
    source: str  # where the figures come from, for the reader: file(s), GPU, variant

    def sizes(self, pipeline: str) -> list[Size | None]:
        return [size for name, size in self.curves if name == pipeline]

    def __getitem__(self, key: str) -> Curve:
        """The curve of ``pipeline`` or ``pipeline@WxH``. Without a size, the pipeline must have been measured at
        one size only; a size that was not measured is refused (curves are not scaled between sizes)."""
        pipeline, _, size_part = key.partition("@")
        sizes = self.sizes(pipeline)
        if not sizes:
            have = sorted({name for name, _ in self.curves})
            raise KeyError(f"no measured curve for {pipeline!r} (have: {', '.join(have)})")
        measured = ", ".join(size_text(s) for s in sizes)
        if not size_part:
            if len(sizes) > 1:
                raise KeyError(f"{pipeline} was measured at several sizes ({measured}): name one, {pipeline}@WxH")
            return self.curves[(pipeline, sizes[0])]
        size = parse_size(size_part)
        if (pipeline, size) not in self.curves:
            raise KeyError(
                f"{pipeline} at {size_text(size)}: not measured (measured: {measured}); run `imgpipe bench"
                f" --photo-size {size_text(size)}` on the GPU and pass its bench.json with another --bench"
            )
        return self.curves[(pipeline, size)]


def load_curves(paths: Path | Sequence[Path] = BENCH_JSON, variant: str = "fp16") -> Curves:
    """The served sweeps of one or more ``imgpipe bench`` runs (points with errors are left out), each
    pipeline's curve keyed by the size of the images its requests carried."""
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    curves: dict[tuple[str, Size | None], Curve] = {}
    sources = []
    for path in files:
        data = json.loads(path.read_text())
        recorded = data.get("input_sizes") or {}
        for pipeline, points in data["served"][variant].items():
            size = tuple(recorded[pipeline]) if pipeline in recorded else BENCH_SIZES_BEFORE_RECORDED.get(pipeline)
            key = (pipeline, size)
            if key in curves:
                raise ValueError(f"{path.name}: {pipeline} at {size_text(size)} is measured in another --bench too")
            curves[key] = Curve(
                pipeline,
                tuple(
                    Point(p["concurrency"], p["throughput"], p["p99_ms"])
                    for p in points
                    if not p.get("errors") and p.get("p99_ms") is not None
                ),
                size,  # type: ignore[arg-type]
            )
        sources.append(f"{path.name}: {data.get('machine', {}).get('gpu', 'unknown GPU')}")
    return Curves(curves, f"{'; '.join(sources)}, {variant}")


def parse_mix(text: str) -> dict[str, float]:
    """``"remove_background=0.6,detect_faces=0.4"`` → shares summing to 1 (weights are normalised). A pipeline
    may be named with its request images' size, ``remove_background@2048x1536=0.2``, once per size."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, weight = part.partition("=")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not PIPELINE[@WxH]=WEIGHT") from None
        if value < 0:
            raise ValueError(f"--mix: {part!r}: the weight must not be negative")
        pipeline, at, size = name.strip().partition("@")
        key = f"{pipeline}@{size_text(parse_size(size))}" if at else pipeline
        mix[key] = mix.get(key, 0.0) + value
    total = sum(mix.values())
    if not mix or total <= 0:
        raise ValueError("--mix: at least one pipeline with a positive weight")
    return {k: v / total for k, v in mix.items()}


@dataclass(frozen=True)
class Row:
    pipeline: str
    rate: float  # requests/s of this pipeline
    capacity: float  # requests/s one GPU serves within the p99 target
    concurrency: int  # in flight per GPU at that point
    gpu_share: float  # rate / capacity: GPUs' worth of time


@dataclass(frozen=True)
class Plan:
    rate: float
    p99_ms: float
    utilisation: float  # target busy share of each GPU (headroom for bursts and failures)
    rows: tuple[Row, ...]
    pods: int  # one GPU each
    source: str

    @property
    def gpu_time(self) -> float:
        return sum(r.gpu_share for r in self.rows)

    @property
    def mixed_capacity(self) -> float:
        """Requests/s of this mix one GPU serves within the target (the GPU's time shared by the mix)."""
        return self.rate / self.gpu_time if self.gpu_time else math.inf


def plan(curves: Curves, rate: float, mix: Mapping[str, float], p99_ms: float, utilisation: float = 0.7) -> Plan:
    """Pods (GPUs) for ``rate`` requests/s split by ``mix`` with every pipeline's p99 within ``p99_ms``,
    each GPU kept at most ``utilisation`` busy; at least 2 pods (one can fail or be rescheduled)."""
    if rate <= 0 or not 0 < utilisation <= 1:
        raise ValueError("rate must be positive and utilisation within (0, 1]")
    rows = []
    for pipeline, share in mix.items():
        point = curves[pipeline].capacity(p99_ms)
        if point is None:
            best = min(p.p99_ms for p in curves[pipeline].points)
            raise ValueError(f"{pipeline}: no measured point has p99 within {p99_ms:g} ms (the best is {best:.0f} ms)")
        rows.append(Row(pipeline, rate * share, point.throughput, point.concurrency, rate * share / point.throughput))
    gpu_time = sum(r.gpu_share for r in rows)
    return Plan(rate, p99_ms, utilisation, tuple(rows), max(2, math.ceil(gpu_time / utilisation)), curves.source)


# -- the autoscaler ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hpa:
    """Kubernetes' HPA on the average queue time per request (Prometheus Adapter metric)."""

    target_queue_ms: float = 50.0
    min_pods: int = 2
    max_pods: int = 32
    sync_s: float = 15.0  # the controller's period
    tolerance: float = 0.1  # no change while metric/target is within 1 ± tolerance
    scale_down_window_s: float = 300.0  # the highest recommendation of this window is used to scale down
    scale_up_percent: float = 100.0  # Kubernetes' default scale-up policy: +100 % or +4 pods per 15 s,
    scale_up_pods: int = 4  # whichever is more
    scale_down_pods: int = 1  # imgpipe's scale-down policy: at most this many pods ...
    scale_down_period_s: float = 60.0  # ... per this period (Kubernetes' default: 100 % per 15 s)
    pod_ready_s: float = 90.0  # a new pod: scheduling, image, model load until ready


@dataclass
class Step:
    t: float
    rate: float
    pods: int  # ready pods
    desired: int
    capacity: float  # requests/s the ready pods serve
    backlog: float  # requests waiting beyond the operating point
    queue_ms: float  # average queue time per request (the HPA's metric)


@dataclass
class Simulation:
    steps: list[Step] = field(default_factory=list)

    def max_queue_ms(self, after: float = 0.0) -> float:
        return max((s.queue_ms for s in self.steps if s.t >= after), default=0.0)


def simulate(
    rate_at: Callable[[float], float],
    per_pod: float,
    seconds: float,
    hpa: Hpa = Hpa(),
    base_queue_ms: float = 10.0,
    start_pods: int | None = None,
    dt: float = 1.0,
) -> Simulation:
    """Step a deployment through ``rate_at(t)`` requests/s: pods serve ``per_pod`` requests/s each (the mix's
    capacity within the target); arrivals beyond the capacity build a backlog whose wait (Little's law)
    adds to the queueing of a busy server (``base_queue_ms`` × u/(1-u), u the ready pods' load: equal to
    ``base_queue_ms`` at half load); the HPA acts every ``sync_s`` and new pods serve after ``pod_ready_s``."""
    ready = start_pods or hpa.min_pods
    pending: list[tuple[float, int]] = []  # (ready at, pods)
    recommendations: list[tuple[float, int]] = []
    backlog, desired, last_down = 0.0, ready, -math.inf
    sim = Simulation()
    t = 0.0
    while t <= seconds:
        ready += sum(n for at, n in pending if at <= t)
        pending = [(at, n) for at, n in pending if at > t]
        rate = rate_at(t)
        capacity = ready * per_pod
        backlog = max(0.0, backlog + (rate - capacity) * dt)
        utilisation = min(1.0, rate / capacity) if capacity else 1.0
        # Waiting grows like a single queue's u/(1-u) (base_queue_ms at half load), plus the backlog's wait.
        queue_ms = base_queue_ms * utilisation / max(0.05, 1 - utilisation) + (
            1000.0 * backlog / capacity if capacity else math.inf
        )
        if t % hpa.sync_s < dt:
            total = ready + sum(n for _, n in pending)
            ratio = queue_ms / hpa.target_queue_ms
            want = total if abs(ratio - 1) <= hpa.tolerance else math.ceil(total * ratio)
            want = min(hpa.max_pods, max(hpa.min_pods, want))
            recommendations = [(at, n) for at, n in recommendations if at > t - hpa.scale_down_window_s]
            recommendations.append((t, want))
            if want > total:  # up at once, within the scale-up policy
                limit = max(math.ceil(total * (1 + hpa.scale_up_percent / 100)), total + hpa.scale_up_pods)
                desired = min(want, limit)
                pending.append((t + hpa.pod_ready_s, desired - total))
            else:  # down to the window's highest recommendation, within the scale-down policy
                desired = max(n for _, n in recommendations)
                if desired < total and t - last_down >= hpa.scale_down_period_s:
                    desired = max(desired, total - hpa.scale_down_pods)
                    ready -= min(ready, total - desired)
                    last_down = t
                else:
                    desired = total
        sim.steps.append(Step(t, rate, ready, desired, capacity, backlog, queue_ms))
        t += dt
    return sim


def step_load(low: float, high: float, at: float) -> Callable[[float], float]:
    return lambda t: high if t >= at else low


def table(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    """Rows for docs/scaling.md and the CLI."""
    return [
        {
            "rate": p.rate,
            "p99_ms": p.p99_ms,
            "per_gpu": round(p.mixed_capacity, 1),
            "gpu_time": round(p.gpu_time, 2),
            "pods": p.pods,
            **{f"{r.pipeline}_per_gpu": round(r.capacity, 1) for r in p.rows},
        }
        for p in plans
    ]


def plot(sim: Simulation, hpa: Hpa, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in sim.steps]
    fig, (load, queue) = plt.subplots(2, 1, figsize=(10, 6.5), dpi=120, sharex=True, layout="constrained")
    load.plot(t, [s.rate for s in sim.steps], label="offered load (req/s)")
    load.plot(t, [s.capacity for s in sim.steps], label="capacity of ready pods (req/s)")
    pods = load.twinx()
    pods.step(t, [s.pods for s in sim.steps], where="post", color="grey", linestyle=":", label="ready pods")
    pods.step(t, [s.desired for s in sim.steps], where="post", color="black", linewidth=0.8, label="desired pods")
    pods.set_ylabel("pods")
    pods.set_ylim(bottom=0)
    load.set_ylabel("requests / s")
    load.legend(loc="upper left", fontsize=8)
    pods.legend(loc="lower right", fontsize=8)
    queue.plot(t, [max(1.0, s.queue_ms) for s in sim.steps], color="tab:red", label="average queue time per request")
    queue.axhline(hpa.target_queue_ms, color="tab:red", linestyle="--", linewidth=1, label="HPA target")
    queue.set_yscale("log")
    queue.set_ylim(bottom=1.0)
    queue.set(xlabel="seconds", ylabel="ms")
    queue.legend(fontsize=8)
    for axis in (load, queue):
        axis.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return path
