"""Reusable pieces of ``imgpipe bench``: a closed-loop load driver, Triton's per-model statistics, GPU
memory from the metrics endpoint, and output (JSON, a plot, rich tables).

The load driver is closed-loop: at concurrency N, N threads each send a request, wait for its answer and
send the next. Every level runs ``warmup_s`` (not recorded) then ``duration_s`` (recorded) and keeps
going while throughput still rises; :func:`sweep` returns one :class:`Point` per level.

What a Point counts (the window is ``[t0, t1]``, ``t1 - t0 = duration_s``):

- ``requests``/``items``/latencies: successful requests that *completed* inside the window (a request
  that started during warm-up and ended inside the window counts: its latency is a steady-state one).
  Throughput is ``items / seconds`` with ``seconds = duration_s``, as perf_analyzer counts it.
- ``sent``: every request the level issued — warm-up, window, and the ones still in flight at ``t1``
  (the threads start no request after ``t1`` and wait for the last answers), successes and failures.
  A model that each request reaches exactly once sees its ``inference_count`` rise by exactly the sum of
  ``sent - errors`` over the sweep (once Triton has recorded the last request, see :func:`model_stats`).
- ``errors``: failed requests over the whole level (warm-up included), and the first error's message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.clients.triton import TritonClient, check_protocol

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_CONCURRENCIES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)

# Why a sweep stopped after a point (Point.stopped); "" on every point but the last.
STOP_FLAT = "flat"  # throughput rose by less than flat_ratio over the best so far, two levels running
STOP_ERRORS = "errors"  # a request failed
STOP_EMPTY = "no_completions"  # no request completed inside the window: duration_s is too short
STOP_END = "end_of_levels"  # every concurrency was run and throughput was still rising
STOP_REASONS: dict[str, str] = {
    STOP_FLAT: "throughput stopped rising",
    STOP_ERRORS: "requests failed",
    STOP_EMPTY: "no request completed inside the measured window (lengthen duration_s)",
    STOP_END: "last concurrency reached, throughput still rising",
}


# ---------------------------------------------------------------------------------------------------
# The load driver
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One concurrency level of a sweep. Latencies are per request, in milliseconds; ``None`` when no
    request completed inside the window."""

    concurrency: int
    requests: int  # successful requests completed inside the measured window
    items: int  # what those requests returned (images, faces)
    seconds: float  # the measured window
    throughput: float  # items / seconds
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    errors: int  # failed requests over the whole level, warm-up included
    first_error: str | None
    sent: int  # every request issued by the level: warm-up, window, in flight at its end; failures too
    stopped: str = ""  # why the sweep stopped after this point (STOP_*), "" if it went on
    gpu_memory_bytes: dict[str, float] | None = None  # used bytes per GPU near the window's end; None: not sampled


@dataclass(frozen=True)
class _Record:
    start: float
    end: float
    items: int
    error: str | None


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return f"{type(exc).__name__}{f' [{status}]' if status else ''}: {exc}"


def _percentiles(latencies_ms: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    if not latencies_ms:
        return None, None, None, None
    import numpy as np

    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(values.mean())


def _sample_gpu_memory(metrics_url: str | None) -> dict[str, float] | None:
    if metrics_url is None:
        return None
    try:
        return gpu_memory(metrics_url)
    except OSError:  # a metrics endpoint that does not answer must not end the benchmark
        return None


def run_level(
    url: str,
    protocol: str,
    request: Callable[[TritonClient], int],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    metrics_url: str | None = None,
) -> Point:
    """One closed-loop level: ``concurrency`` threads sharing one :class:`TritonClient` (one connection
    per thread, opened by its first request, inside the warm-up). ``Point.stopped`` is left empty."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration_s <= 0 or warmup_s < 0:
        raise ValueError(f"duration_s must be > 0 and warmup_s >= 0, got {duration_s} and {warmup_s}")
    client = TritonClient(url, check_protocol(protocol), retry=None)  # raw outcomes: a retry would hide a failure
    go = threading.Event()
    window: list[float] = []  # [t0, t1], written before `go` is set
    per_thread: list[list[_Record]] = [[] for _ in range(concurrency)]

    def worker(records: list[_Record]) -> None:
        go.wait()
        if not window:  # the level failed before it started
            return
        end_of_window = window[1]
        while True:
            start = time.perf_counter()
            if start >= end_of_window:
                return
            try:
                items, error = int(request(client)), None
            except Exception as exc:  # every failure is counted, whatever raised it
                items, error = 0, _describe(exc)
            records.append(_Record(start, time.perf_counter(), items, error))

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in per_thread]
    try:
        for thread in threads:
            thread.start()
        begin = time.perf_counter()
        window[:] = [begin + warmup_s, begin + warmup_s + duration_s]
        go.set()
        gpu = None
        if metrics_url is not None:  # sample under load, near the end of the window
            time.sleep(max(0.0, window[1] - 0.1 * duration_s - time.perf_counter()))
            gpu = _sample_gpu_memory(metrics_url)
        for thread in threads:
            thread.join()
    finally:
        go.set()
        client.close()

    t0, t1 = window
    records = [r for rs in per_thread for r in rs]
    failed = [r for r in records if r.error is not None]
    measured = [r for r in records if r.error is None and t0 <= r.end <= t1]
    items = sum(r.items for r in measured)
    p50, p90, p99, mean = _percentiles([(r.end - r.start) * 1e3 for r in measured])
    return Point(
        concurrency=concurrency,
        requests=len(measured),
        items=items,
        seconds=t1 - t0,
        throughput=items / (t1 - t0),
        requests_per_s=len(measured) / (t1 - t0),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=mean,
        errors=len(failed),
        first_error=min(failed, key=lambda r: r.end).error if failed else None,
        sent=len(records),
        gpu_memory_bytes=gpu,
    )


def stop_reason(points: Sequence[Point], flat_ratio: float = 0.03) -> str:
    """Why a sweep should stop after the last of ``points`` (a STOP_* code), or "" to go on.

    Flat: the last two levels each reached less than ``best * (1 + flat_ratio)``, ``best`` being the
    highest throughput of the levels before each of them.
    """
    if not points:
        return ""
    last = points[-1]
    if last.errors:
        return STOP_ERRORS
    if last.requests == 0:
        return STOP_EMPTY
    best, flat = points[0].throughput, 0
    for point in points[1:]:
        flat = flat + 1 if point.throughput < best * (1 + flat_ratio) else 0
        best = max(best, point.throughput)
    return STOP_FLAT if flat >= 2 else ""


def describe_point(point: Point) -> str:
    """One line for a progress display."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    line = (
        f"concurrency {point.concurrency}: {point.throughput:.2f} items/s ({point.requests_per_s:.2f} req/s), "
        f"p50 {ms(point.p50_ms)}, p99 {ms(point.p99_ms)}, {point.requests} requests, {point.errors} errors"
    )
    if point.first_error:
        line += f" (first: {point.first_error})"
    if point.stopped:
        line += f"; stop: {STOP_REASONS.get(point.stopped, point.stopped)}"
    return line


def sweep(
    url: str,
    protocol: str,
    request: Callable[[TritonClient], int],
    concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    flat_ratio: float = 0.03,
    progress: Callable[[str], None] | None = None,
    *,
    metrics_url: str | None = None,
) -> list[Point]:
    """Run :func:`run_level` at each concurrency in turn until :func:`stop_reason` says stop. The last
    point's ``stopped`` says why the sweep ended (``end_of_levels`` if it ran them all). ``request(client)``
    performs one inference and returns the number of items it processed; whatever it raises is counted
    as an error. ``metrics_url`` (Triton's ``/metrics``) adds a GPU memory sample to each point."""
    if not concurrencies:
        raise ValueError("concurrencies is empty")
    points: list[Point] = []
    for index, concurrency in enumerate(concurrencies):
        point = run_level(url, protocol, request, concurrency, duration_s, warmup_s, metrics_url)
        points.append(point)
        reason = stop_reason(points, flat_ratio) or (STOP_END if index == len(concurrencies) - 1 else "")
        if reason:
            points[-1] = point = dataclasses.replace(point, stopped=reason)
        if progress is not None:
            progress(describe_point(point))
        if reason:
            break
    return points


def peak(points: Sequence[Point]) -> Point:
    """The point of highest throughput (the first of equals)."""
    return max(points, key=lambda p: p.throughput)


# ---------------------------------------------------------------------------------------------------
# Triton statistics
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """Triton's cumulative statistics of one model, all versions summed. Durations are nanoseconds,
    summed *per request* (Triton's ``inference_stats``), except ``execution_ns``, summed *per execution*
    (its ``batch_stats``: compute input + infer + output of each batch once)."""

    name: str
    inference_count: int = 0  # items (batch elements) inferred
    execution_count: int = 0  # executions (batches)
    success_count: int = 0  # successful requests
    fail_count: int = 0
    success_ns: int = 0  # end-to-end time inside Triton, per request
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    execution_ns: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> executions


def _int(value: Any) -> int:
    """gRPC's JSON renders uint64 as strings and leaves zero fields out; HTTP gives ints."""
    return int(value) if value not in (None, "") else 0


def _duration(stats: Mapping[str, Any], key: str) -> tuple[int, int]:
    entry = stats.get(key) or {}
    return _int(entry.get("count")), _int(entry.get("ns"))


def parse_statistics(data: Mapping[str, Any]) -> dict[str, ModelStats]:
    """``get_inference_statistics`` output (gRPC ``as_json=True`` or HTTP) → one ModelStats per model."""
    merged: dict[str, ModelStats] = {}
    for entry in data.get("model_stats", []):
        inference = entry.get("inference_stats") or {}
        batch_sizes: dict[int, int] = {}
        execution_ns = 0
        for batch in entry.get("batch_stats") or []:
            size = _int(batch.get("batch_size"))
            count, infer_ns = _duration(batch, "compute_infer")
            batch_sizes[size] = batch_sizes.get(size, 0) + count
            execution_ns += infer_ns + _duration(batch, "compute_input")[1] + _duration(batch, "compute_output")[1]
        stats = ModelStats(
            name=entry["name"],
            inference_count=_int(entry.get("inference_count")),
            execution_count=_int(entry.get("execution_count")),
            success_count=_duration(inference, "success")[0],
            fail_count=_duration(inference, "fail")[0],
            success_ns=_duration(inference, "success")[1],
            queue_ns=_duration(inference, "queue")[1],
            compute_input_ns=_duration(inference, "compute_input")[1],
            compute_infer_ns=_duration(inference, "compute_infer")[1],
            compute_output_ns=_duration(inference, "compute_output")[1],
            execution_ns=execution_ns,
            batch_sizes=batch_sizes,
        )
        previous = merged.get(stats.name)
        merged[stats.name] = stats if previous is None else _combine(previous, stats, 1)
    return merged


_COUNTERS = tuple(f.name for f in dataclasses.fields(ModelStats) if f.name not in ("name", "batch_sizes"))


def _combine(a: ModelStats, b: ModelStats, sign: int) -> ModelStats:
    sizes = dict(a.batch_sizes)
    for size, count in b.batch_sizes.items():
        sizes[size] = sizes.get(size, 0) + sign * count
    return ModelStats(
        name=a.name,
        **{name: getattr(a, name) + sign * getattr(b, name) for name in _COUNTERS},
        batch_sizes={size: count for size, count in sorted(sizes.items()) if count},
    )


def model_stats(url: str, protocol: str) -> dict[str, ModelStats]:
    """Every loaded model's statistics, all versions summed.

    Triton records a request's statistics as it releases the request, which may be a moment after the
    client has its answer: a snapshot taken right after a sweep can miss the last few requests. Where
    exact counts matter, take snapshots until two agree (the tests do)."""
    with TritonClient(url, check_protocol(protocol)) as client:
        if client.protocol == "grpc":
            data = client.connection.get_inference_statistics(model_name="", as_json=True)
        else:
            data = client.connection.get_inference_statistics(model_name="")
    return parse_statistics(data)


def delta(before: Mapping[str, ModelStats], after: Mapping[str, ModelStats]) -> dict[str, ModelStats]:
    """``after - before`` per model. A model absent from ``before`` (loaded since) counts from zero; one
    absent from ``after`` (unloaded) is left out."""
    return {name: _combine(stats, before[name], -1) if name in before else stats for name, stats in after.items()}


def settled_delta(
    url: str,
    protocol: str,
    before: Mapping[str, ModelStats],
    model: str,
    expected: int,
    timeout_s: float = 5.0,
    quiet_s: float = 0.2,
) -> dict[str, ModelStats]:
    """Statistics since ``before`` once ``model`` has recorded ``expected`` requests (successes and
    failures) and no model's counts changed for ``quiet_s``; or whatever they are after ``timeout_s``.

    Triton records a request as it releases it, a moment after the client has its answer, and not in call
    order: a BLS entry model was seen recorded before one of its steps' requests (face_mesh 0.95 per
    reconstruct_face request) and after them (segmenter 1.1 per remove_background request)."""
    deadline = time.monotonic() + timeout_s
    previous: tuple[tuple[str, int, int], ...] | None = None
    while True:
        changes = delta(before, model_stats(url, protocol))
        done = changes[model].success_count + changes[model].fail_count if model in changes else 0
        counts = tuple(sorted((name, s.inference_count, s.success_count + s.fail_count) for name, s in changes.items()))
        if (done >= expected and counts == previous) or time.monotonic() > deadline:
            return changes
        previous = counts if done >= expected else None
        time.sleep(quiet_s)


@dataclass(frozen=True)
class ModelTimes:
    """Where a model's time goes over a stats delta.

    Per request (``queue_ms``, ``compute_ms`` and its parts): what a request spent waiting and being
    computed; a request executed in a batch of 8 is charged the whole batch's compute, so this is latency,
    not cost. Per execution (``execution_ms``): one batch's compute. Per inference (``cost_ms``): the
    model's busy time divided by the items it inferred — its cost per image or face.

    ``failures`` is Triton's count and not the caller's: Triton 2.51 counts a failed ensemble request twice,
    and a Python-backend model that answers with an error response as a success (server#8521). Count
    errors on the client (``Point.errors``).
    """

    name: str
    requests: int
    inferences: int
    executions: int
    failures: int
    avg_batch: float | None  # inferences / executions
    queue_ms: float | None  # per request
    compute_input_ms: float | None  # per request
    compute_infer_ms: float | None  # per request
    compute_output_ms: float | None  # per request
    compute_ms: float | None  # per request: input + infer + output
    request_ms: float | None  # per request: Triton's whole time for it (queue + compute + overheads)
    execution_ms: float | None  # per execution
    cost_ms: float | None  # busy time per inference
    busy_s: float  # total execution time (summed over instances)
    batch_sizes: dict[int, int]


def _per(ns: int, count: int) -> float | None:
    return ns / count / 1e6 if count else None


def breakdown(stats: Mapping[str, ModelStats], active_only: bool = True) -> dict[str, ModelTimes]:
    """The derived view of each model's statistics (usually a :func:`delta`), busiest first. With
    ``active_only``, models that served no request are left out."""
    views = {}
    for name, s in stats.items():
        if active_only and not (s.success_count or s.fail_count):
            continue
        n = s.success_count
        views[name] = ModelTimes(
            name=name,
            requests=n,
            inferences=s.inference_count,
            executions=s.execution_count,
            failures=s.fail_count,
            avg_batch=s.inference_count / s.execution_count if s.execution_count else None,
            queue_ms=_per(s.queue_ns, n),
            compute_input_ms=_per(s.compute_input_ns, n),
            compute_infer_ms=_per(s.compute_infer_ns, n),
            compute_output_ms=_per(s.compute_output_ns, n),
            compute_ms=_per(s.compute_input_ns + s.compute_infer_ns + s.compute_output_ns, n),
            request_ms=_per(s.success_ns, n),
            execution_ms=_per(s.execution_ns, s.execution_count),
            cost_ms=_per(s.execution_ns, s.inference_count),
            busy_s=s.execution_ns / 1e9,
            batch_sizes=dict(s.batch_sizes),
        )
    return dict(sorted(views.items(), key=lambda kv: -kv[1].busy_s))


# ---------------------------------------------------------------------------------------------------
# GPU memory (Triton's Prometheus metrics)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


# name{labels} value [timestamp]; label values are quoted with \\, \" and \n escapes.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (format 0.0.4), comments and blank lines skipped.

    A small parser of its own: ``prometheus_client`` is not a dependency of imgpipe, and Triton's
    metrics use only plain samples (no exemplars, no OpenMetrics). A malformed line is a ValueError."""
    samples = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"metrics line {number} is not a Prometheus sample: {raw!r}")
        name, label_text, value = match.groups()
        labels: dict[str, str] = {}
        position = 0
        while label_text and position < len(label_text):
            label = _LABEL.match(label_text, position)
            if label is None:
                raise ValueError(f"metrics line {number}: bad labels {label_text!r}")
            labels[label[1]] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m[0]], label[2])
            position = label.end()
        samples.append(Sample(name, labels, float(value)))
    return samples


@dataclass(frozen=True)
class Gpu:
    uuid: str
    used_bytes: float
    total_bytes: float | None
    utilization: float | None  # 0..1, Triton's nv_gpu_utilization


def gpus_from_metrics(text: str) -> dict[str, Gpu]:
    """Every GPU Triton reports (by ``gpu_uuid``); empty where it reports none (a machine without GPUs,
    or a server started with ``--allow-gpu-metrics=false``)."""
    series: dict[str, dict[str, float]] = {}
    for sample in parse_prometheus(text):
        if sample.name in ("nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_utilization"):
            uuid = sample.labels.get("gpu_uuid", "")
            series.setdefault(uuid, {})[sample.name] = sample.value
    return {
        uuid: Gpu(
            uuid,
            values["nv_gpu_memory_used_bytes"],
            values.get("nv_gpu_memory_total_bytes"),
            values.get("nv_gpu_utilization"),
        )
        for uuid, values in series.items()
        if "nv_gpu_memory_used_bytes" in values
    }


def fetch_metrics(metrics_url: str, timeout_s: float = 5.0) -> str:
    """The text of Triton's metrics endpoint (``http://host:8002/metrics``; the scheme may be left out)."""
    if "://" not in metrics_url:
        metrics_url = f"http://{metrics_url}"
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        return response.read().decode("utf-8")


def gpu_memory(metrics_url: str) -> dict[str, float]:
    """Bytes of memory used per GPU (by uuid), as Triton last polled them (every ``--metrics-interval-ms``,
    2 s by default); empty on a machine without GPUs."""
    return {uuid: gpu.used_bytes for uuid, gpu in gpus_from_metrics(fetch_metrics(metrics_url)).items()}


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, paths → strings, non-finite floats → None, numpy scalars →
    Python numbers, dict keys → strings; recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_json(path: Path | str, data: Any) -> Path:
    """Write ``data`` as indented, strictly valid JSON (see :func:`to_jsonable`); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


_FAILED: dict[str, Any] = {"s": 140, "facecolors": "none", "edgecolors": "red", "zorder": 3}


def plot(
    variants: Mapping[str, Sequence[Point]],
    path: Path,
    title: str,
    *,
    items: str = "items",
    dpi: int = 150,
) -> Path:
    """Two panels side by side — throughput and p99 latency against concurrency (log2 x axis) — with one
    line per variant. Points with errors are circled in red. The latency axis turns logarithmic when the
    variants' p99 spans more than a factor of 30 (the label says so). Writes a PNG; creates the folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=dpi, layout="constrained")
    levels = sorted({p.concurrency for points in variants.values() for p in points}) or [1]
    latencies = [p.p99_ms for points in variants.values() for p in points if p.p99_ms]
    log_latency = bool(latencies) and max(latencies) / min(latencies) > 30
    for name, points in variants.items():
        (line,) = left.plot([p.concurrency for p in points], [p.throughput for p in points], marker="o", label=name)
        timed = [p for p in points if p.p99_ms is not None]
        right.plot([p.concurrency for p in timed], [p.p99_ms for p in timed], marker="o", color=line.get_color())
        failed = [p for p in points if p.errors]
        if failed:
            left.scatter([p.concurrency for p in failed], [p.throughput for p in failed], **_FAILED)
            failed = [p for p in failed if p.p99_ms is not None]
            right.scatter([p.concurrency for p in failed], [p.p99_ms for p in failed], **_FAILED)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_locator(FixedLocator(levels))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlabel("concurrency (requests in flight)")
        axis.grid(True, which="both", alpha=0.3)
    left.set_ylabel(f"throughput ({items}/s)")
    left.set_ylim(bottom=0)
    left.set_title("throughput")
    if log_latency:
        right.set_yscale("log")
    else:
        right.set_ylim(bottom=0)
    right.set_ylabel(f"p99 latency (ms{', log scale' if log_latency else ''})")
    right.set_title("p99 latency per request")
    if variants:
        left.legend(title="variant")
    fig.suptitle(title)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(points: Sequence[Point], title: str = "", items: str = "items") -> Table:
    """A rich Table of a sweep, one row per concurrency; the peak throughput in bold."""
    from rich.table import Table

    table = Table(title=title or None)
    for column in ("concurrency", f"{items}/s", "requests/s", "p50 ms", "p90 ms", "p99 ms", "requests", "errors"):
        table.add_column(column, justify="right")
    table.add_column("note")
    best = peak(points) if points else None
    for p in points:
        note = STOP_REASONS.get(p.stopped, p.stopped) if p.stopped else ""
        if p.first_error:
            note = f"{note}; first error: {p.first_error}" if note else f"first error: {p.first_error}"
        table.add_row(
            str(p.concurrency),
            f"{p.throughput:.2f}",
            f"{p.requests_per_s:.2f}",
            _ms(p.p50_ms),
            _ms(p.p90_ms),
            _ms(p.p99_ms),
            str(p.requests),
            str(p.errors),
            note,
            style="bold" if p is best and p.throughput > 0 else None,
        )
    return table


def stats_table(times: Mapping[str, ModelTimes], title: str = "where the time goes") -> Table:
    """A rich Table of :func:`breakdown`: per model, requests, average batch, queue and compute per
    request, compute per execution, and cost (busy time) per inference."""
    from rich.table import Table

    table = Table(title=title or None)
    table.add_column("model")
    for column in (
        "requests",
        "inferences",
        "avg batch",
        "queue ms/req",
        "compute ms/req",
        "ms/execution",
        "cost ms/item",
        "busy s",
        "failed",
    ):
        table.add_column(column, justify="right")
    for t in times.values():
        table.add_row(
            t.name,
            str(t.requests),
            str(t.inferences),
            _ms(t.avg_batch, 2),
            _ms(t.queue_ms, 2),
            _ms(t.compute_ms, 2),
            _ms(t.execution_ms, 2),
            _ms(t.cost_ms, 2),
            f"{t.busy_s:.2f}",
            str(t.failures),
        )
    return table
