"""imgpipe.benchmark: the closed-loop driver against the real server (``server`` marker), and its rules,
parsers and output without one."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from imgpipe.benchmark import (
    STOP_EMPTY,
    STOP_END,
    STOP_ERRORS,
    STOP_FLAT,
    ModelStats,
    Point,
    breakdown,
    delta,
    fetch_metrics,
    gpu_memory,
    gpus_from_metrics,
    model_stats,
    parse_prometheus,
    parse_statistics,
    peak,
    plot,
    save_json,
    settled_delta,
    stats_table,
    stop_reason,
    summary_table,
    sweep,
)
from imgpipe.clients.remove_background import remove_background
from imgpipe.clients.triton import TritonClient
from imgpipe.manifest import load_manifest
from imgpipe.server import TritonServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _render(table: object) -> str:
    console = Console(record=True, width=220)
    console.print(table)
    return console.export_text()


def _check_point(point: Point, items_per_request: int = 1) -> None:
    """What holds for every point of a sweep whose requests all succeeded."""
    assert point.errors == 0 and point.first_error is None
    assert point.requests >= 1
    assert point.items == items_per_request * point.requests
    assert point.sent >= point.requests
    assert point.throughput == pytest.approx(point.items / point.seconds, rel=1e-12)
    assert point.requests_per_s == pytest.approx(point.requests / point.seconds, rel=1e-12)
    assert point.p50_ms is not None and point.p90_ms is not None and point.p99_ms is not None
    assert 0 < point.p50_ms <= point.p90_ms <= point.p99_ms


# ---------------------------------------------------------------------------------------------------
# Against the real server
# ---------------------------------------------------------------------------------------------------

SEG = load_manifest().pipelines["remove_background"].segmenter  # the served segmenter network


@pytest.mark.server
def test_sweep_counts_agree_with_tritons_statistics(server: TritonServer, astronaut_jpeg: bytes, tmp_path: Path):
    def one_image(client: TritonClient) -> int:
        assert remove_background(client, astronaut_jpeg).startswith(PNG_SIGNATURE)
        return 1

    url = server.grpc_url
    before = model_stats(url, "grpc")
    messages: list[str] = []
    points = sweep(
        url,
        "grpc",
        one_image,
        concurrencies=(1, 2),
        duration_s=1.5,
        warmup_s=0.3,
        progress=messages.append,
        metrics_url=server.metrics_url,
    )
    assert [p.concurrency for p in points] == [1, 2]
    assert [p.stopped for p in points] == ["", STOP_END]
    for point in points:
        _check_point(point)
        assert point.seconds == pytest.approx(1.5)
        assert point.gpu_memory_bytes == {}  # sampled, and this machine has no GPU
    assert len(messages) == 2 and messages[0].startswith("concurrency 1:")

    # Exactly what can be guaranteed: each request reaches the ensemble and the segmenter once, so both
    # count every request the sweep sent — warm-up, window and drain — no more, no less.
    sent = sum(p.sent for p in points)
    changes = settled_delta(url, "grpc", before, "remove_background", sent)
    assert changes["remove_background"].success_count == sent
    assert changes["remove_background"].fail_count == 0
    assert changes[SEG].inference_count == sent
    assert changes["bg_postprocess"].success_count == sent
    assert sum(changes[SEG].batch_sizes.values()) == changes[SEG].execution_count
    assert sum(size * n for size, n in changes[SEG].batch_sizes.items()) == sent

    times = breakdown(changes)
    assert {"remove_background", "bg_preprocess", SEG, "bg_postprocess"} <= times.keys()
    assert "pnet" not in times  # idle models are left out
    segmenter = times[SEG]
    assert segmenter.requests == sent and segmenter.avg_batch is not None and segmenter.avg_batch >= 1
    assert segmenter.queue_ms is not None and segmenter.queue_ms >= 0
    assert segmenter.compute_ms is not None and segmenter.compute_ms > 0
    assert segmenter.cost_ms is not None and 0 < segmenter.cost_ms <= segmenter.compute_ms + 1e-9
    # The ensemble's time per request covers its steps' compute.
    ensemble = times["remove_background"]
    assert ensemble.request_ms is not None and ensemble.request_ms >= segmenter.compute_ms
    assert SEG in _render(stats_table(times))

    out = plot({"served (gRPC)": points}, tmp_path / "bench" / "served.png", "remove_background, width 4, CPU")
    assert Image.open(out).size == (1800, 675)


@pytest.mark.server
def test_sweep_over_http(server: TritonServer, astronaut_jpeg: bytes):
    points = sweep(
        server.http_url,
        "http",
        lambda client: len([remove_background(client, astronaut_jpeg, mode="mask")]),
        concurrencies=(2,),
        duration_s=2.0,  # a loaded 2-core machine, and the entry queue's occasional 0.5 s wait (README)
        warmup_s=0.5,
    )
    assert len(points) == 1 and points[0].stopped == STOP_END
    _check_point(points[0])
    assert points[0].gpu_memory_bytes is None  # no metrics_url: not sampled


@pytest.mark.server
def test_failing_requests_are_counted_and_stop_the_sweep(server: TritonServer):
    url = server.grpc_url
    before = model_stats(url, "grpc")
    points = sweep(
        url,
        "grpc",
        lambda client: len([remove_background(client, b"these bytes are not an image")]),
        concurrencies=(1, 2),
        duration_s=0.5,
        warmup_s=0.1,
    )
    assert len(points) == 1 and points[0].stopped == STOP_ERRORS
    (point,) = points
    assert point.errors == point.sent > 0
    assert point.requests == point.items == 0 and point.throughput == 0
    assert point.p50_ms is None and point.p99_ms is None
    assert point.first_error is not None
    assert point.first_error.startswith("InferenceError [StatusCode.INVALID_ARGUMENT]: ")
    assert point.first_error.endswith("are not a JPEG, PNG or WebP image")

    changes = settled_delta(url, "grpc", before, "remove_background", point.sent)
    # Triton 2.51 counts a failed ensemble request twice in the ensemble's failures (its own and its
    # step's; server PR #7423 expects 2 per failure too), and the Python-backend step that answered with an
    # error response as a *success* (server issue #8521). The client's count is the one to trust.
    assert changes["remove_background"].fail_count in (point.sent, 2 * point.sent)
    assert changes["remove_background"].success_count == 0
    assert changes["bg_preprocess"].success_count + changes["bg_preprocess"].fail_count == point.sent
    assert changes[SEG].inference_count == 0  # refused before the network


@pytest.mark.server
def test_the_servers_metrics_parse_and_report_no_gpu(server: TritonServer):
    assert gpu_memory(server.metrics_url) == {}
    samples = parse_prometheus(fetch_metrics(server.metrics_url))
    assert any(s.name == "nv_inference_count" and s.labels.get("model") == SEG for s in samples)


# ---------------------------------------------------------------------------------------------------
# Without a server
# ---------------------------------------------------------------------------------------------------


def _point(concurrency: int, throughput: float, errors: int = 0, requests: int = 10) -> Point:
    return Point(
        concurrency=concurrency,
        requests=requests,
        items=round(throughput),
        seconds=1.0,
        throughput=throughput,
        requests_per_s=requests,
        p50_ms=10.0 * concurrency,
        p90_ms=12.0 * concurrency,
        p99_ms=15.0 * concurrency,
        mean_ms=10.5 * concurrency,
        errors=errors,
        first_error="boom" if errors else None,
        sent=requests + errors,
    )


@pytest.mark.parametrize(
    ("throughputs", "stop_at"),
    [
        ([10, 20, 20.2, 20.3, 40], 3),  # 20.2 and 20.3 are both < 20 * 1.03: stop after the fourth level
        ([10, 20, 20.2, 25, 25.1, 25.2], 5),  # one flat level, then a rise resets the count
        ([10, 9, 30, 30.5, 29], 4),  # a dip counts as flat; 30.5 (< 30 * 1.03) and 29 stop the sweep
        ([10, 20, 40, 80], None),  # still rising
        ([10, 10.2, 10.4, 10.6, 10.8], 2),  # each rise of 2 % is below 3 % of the best so far
    ],
)
def test_flat_stop_rule(throughputs: list[float], stop_at: int | None):
    points = [_point(2**i, t) for i, t in enumerate(throughputs)]
    reasons = [stop_reason(points[: i + 1], 0.03) for i in range(len(points))]
    first = next((i for i, reason in enumerate(reasons) if reason), None)
    assert first == stop_at
    if first is not None:
        assert reasons[first] == STOP_FLAT


def test_errors_and_empty_windows_stop_the_rule():
    assert stop_reason([_point(1, 10), _point(2, 30, errors=1)]) == STOP_ERRORS
    assert stop_reason([_point(1, 0, requests=0)]) == STOP_EMPTY
    assert stop_reason([]) == ""


def test_sweep_stops_when_a_fake_servers_throughput_levels_off():
    """A fake server with two slots of 20 ms served first come, first served: 50 req/s at concurrency 1,
    100 from 2 on, so the sweep runs 1, 2, 4 and 8 and stops there. The client is never connected."""
    free_at = [0.0, 0.0]  # when each slot is next free
    lock = threading.Lock()

    def fake(client: TritonClient) -> int:
        with lock:
            slot = min(range(len(free_at)), key=free_at.__getitem__)
            done = free_at[slot] = max(time.perf_counter(), free_at[slot]) + 0.02
        time.sleep(max(0.0, done - time.perf_counter()))
        return 3  # three items per request

    messages: list[str] = []
    started = time.perf_counter()
    points = sweep(
        "localhost:1",
        "grpc",
        fake,
        concurrencies=(1, 2, 4, 8, 16, 32),
        duration_s=0.4,
        warmup_s=0.05,
        flat_ratio=0.15,
        progress=messages.append,
    )
    elapsed = time.perf_counter() - started
    assert [p.concurrency for p in points] == [1, 2, 4, 8]
    assert [p.stopped for p in points] == ["", "", "", STOP_FLAT]
    assert len(messages) == 4 and "stop: throughput stopped rising" in messages[-1]
    for point in points:
        _check_point(point, items_per_request=3)
    assert points[1].throughput > 1.6 * points[0].throughput
    assert points[0].requests_per_s == pytest.approx(50, rel=0.2)
    assert points[3].requests_per_s == pytest.approx(100, rel=0.2)
    assert points[3].p50_ms == pytest.approx(80, rel=0.25)  # 8 in flight, 2 served at a time, 20 ms each
    for point in points:  # Little's law: requests in flight = throughput × mean latency
        assert point.mean_ms is not None
        assert point.requests_per_s * point.mean_ms / 1e3 == pytest.approx(point.concurrency, rel=0.15)
    assert peak(points).concurrency in (2, 4, 8)
    assert elapsed < 4 * (0.45 + 0.1)  # warm-up + window + drain per level; no hidden waits


def test_a_failing_request_function_is_counted_with_its_first_message():
    calls = iter(range(10**9))

    def sometimes(client: TritonClient) -> int:
        if next(calls) % 5 == 4:
            raise RuntimeError(f"boom {time.perf_counter()}")
        time.sleep(0.005)
        return 1

    points = sweep("localhost:1", "http", sometimes, concurrencies=(1, 2), duration_s=0.2, warmup_s=0.02)
    assert len(points) == 1 and points[0].stopped == STOP_ERRORS
    point = points[0]
    assert point.errors > 0 and point.requests > 0
    assert point.sent >= point.requests + point.errors
    assert point.first_error is not None and point.first_error.startswith("RuntimeError: boom ")


def test_sweep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="protocol"):
        sweep("localhost:1", "tcp", lambda c: 1, concurrencies=(1,), duration_s=0.01, warmup_s=0)
    with pytest.raises(ValueError, match="concurrency"):
        sweep("localhost:1", "grpc", lambda c: 1, concurrencies=(0,), duration_s=0.01, warmup_s=0)
    with pytest.raises(ValueError, match="empty"):
        sweep("localhost:1", "grpc", lambda c: 1, concurrencies=())


METRICS = r"""# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="segmenter",version="1"} 42
nv_inference_count{model="odd \"name\", with\\slash",version="2"} 7 1712345678000
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 0.87
nv_gpu_utilization{gpu_uuid="GPU-99999999-aaaa-bbbb-cccc-dddddddddddd"} 0
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 85520809984
nv_gpu_memory_total_bytes{gpu_uuid="GPU-99999999-aaaa-bbbb-cccc-dddddddddddd"} 85520809984
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 1.2884901888e+10
nv_gpu_memory_used_bytes{gpu_uuid="GPU-99999999-aaaa-bbbb-cccc-dddddddddddd"} 524288000
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.975
nv_energy_consumption{gpu_uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} NaN

"""
GPU_A = "GPU-1a2b3c4d-0000-1111-2222-333344445555"
GPU_B = "GPU-99999999-aaaa-bbbb-cccc-dddddddddddd"


def test_prometheus_parser_on_a_literal_sample():
    samples = parse_prometheus(METRICS)
    assert len(samples) == 10
    assert samples[0].name == "nv_inference_count" and samples[0].labels == {"model": "segmenter", "version": "1"}
    assert samples[0].value == 42
    assert samples[1].labels["model"] == 'odd "name", with\\slash' and samples[1].value == 7  # timestamp dropped
    cpu = next(s for s in samples if s.name == "nv_cpu_utilization")
    assert cpu.labels == {} and cpu.value == 0.975
    assert math.isnan(samples[-1].value)

    gpus = gpus_from_metrics(METRICS)
    assert set(gpus) == {GPU_A, GPU_B}
    assert gpus[GPU_A].used_bytes == 12_884_901_888 and gpus[GPU_A].total_bytes == 85_520_809_984
    assert gpus[GPU_A].utilization == pytest.approx(0.87) and gpus[GPU_B].utilization == 0
    assert gpus_from_metrics("nv_cpu_utilization 0.5\n") == {}
    with pytest.raises(ValueError, match="line 2"):
        parse_prometheus("ok 1\nnot a sample line at all\n")


@pytest.fixture()
def metrics_endpoint() -> Iterator[dict[str, str]]:
    """A local HTTP server answering /metrics with whatever the test puts in the dict."""
    body = {"text": METRICS}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    body["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    try:
        yield body
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_gpu_memory_from_a_metrics_endpoint(metrics_endpoint: dict[str, str]):
    assert gpu_memory(metrics_endpoint["url"]) == {GPU_A: 12_884_901_888.0, GPU_B: 524_288_000.0}
    assert gpu_memory(metrics_endpoint["url"].removeprefix("http://")) == gpu_memory(metrics_endpoint["url"])
    metrics_endpoint["text"] = "\n".join(line for line in METRICS.splitlines() if "gpu" not in line)
    assert gpu_memory(metrics_endpoint["url"]) == {}
    # ... and a sweep samples it once per level.
    metrics_endpoint["text"] = METRICS
    (point,) = sweep(
        "localhost:1",
        "grpc",
        lambda c: 1,
        concurrencies=(1,),
        duration_s=0.05,
        warmup_s=0,
        metrics_url=metrics_endpoint["url"],
    )
    assert point.gpu_memory_bytes == {GPU_A: 12_884_901_888.0, GPU_B: 524_288_000.0}


# Two versions of one model, as gRPC's as_json renders them: uint64 as strings, zero fields left out.
GRPC_STATS = {
    "model_stats": [
        {
            "name": "segmenter",
            "version": "1",
            "inference_count": "10",
            "execution_count": "4",
            "inference_stats": {
                "success": {"count": "6", "ns": "600000000"},
                "fail": {},
                "queue": {"count": "6", "ns": "60000000"},
                "compute_input": {"count": "6", "ns": "6000000"},
                "compute_infer": {"count": "6", "ns": "300000000"},
                "compute_output": {"count": "6", "ns": "12000000"},
            },
            "batch_stats": [
                {
                    "batch_size": "1",
                    "compute_input": {"count": "2", "ns": "1000000"},
                    "compute_infer": {"count": "2", "ns": "40000000"},
                    "compute_output": {"count": "2", "ns": "1000000"},
                },
                {
                    "batch_size": "4",
                    "compute_input": {"count": "2", "ns": "2000000"},
                    "compute_infer": {"count": "2", "ns": "100000000"},
                    "compute_output": {"count": "2", "ns": "4000000"},
                },
            ],
        },
        {"name": "segmenter", "version": "2", "inference_count": "2", "execution_count": "1",
         "inference_stats": {"success": {"count": "2", "ns": "10"}, "fail": {"count": "1", "ns": "5"}},
         "batch_stats": [{"batch_size": "2", "compute_infer": {"count": "1", "ns": "8"}}]},
        {"name": "idle", "version": "1", "inference_stats": {}},
    ]
}  # fmt: skip


def test_statistics_parse_sum_versions_subtract_and_derive():
    stats = parse_statistics(GRPC_STATS)
    seg = stats["segmenter"]
    assert (seg.inference_count, seg.execution_count, seg.success_count, seg.fail_count) == (12, 5, 8, 1)
    assert seg.queue_ns == 60_000_000 and seg.compute_infer_ns == 300_000_000
    assert seg.batch_sizes == {1: 2, 4: 2, 2: 1}
    assert seg.execution_ns == 148_000_000 + 8
    assert stats["idle"] == ModelStats("idle")

    # HTTP gives the same numbers as ints (the same parser).
    http_like = json.loads(json.dumps(GRPC_STATS), parse_int=int, object_hook=lambda d: {
        k: int(v) if isinstance(v, str) and v.isdigit() and k not in ("name", "version") else v
        for k, v in d.items()
    })  # fmt: skip
    assert parse_statistics(http_like) == stats

    before = {"segmenter": dataclasses.replace(seg, inference_count=2, execution_count=1, success_count=2,
                                               fail_count=1, success_ns=10, queue_ns=0, compute_input_ns=0,
                                               compute_infer_ns=0, compute_output_ns=0, execution_ns=8,
                                               batch_sizes={2: 1}),
              "unloaded": ModelStats("unloaded", inference_count=3)}  # fmt: skip
    after = {**stats, "new": ModelStats("new", success_count=1, inference_count=1)}
    changes = delta(before, after)
    assert set(changes) == {"segmenter", "idle", "new"}
    assert changes["segmenter"].batch_sizes == {1: 2, 4: 2}  # the batch of 2 was before: dropped
    assert changes["segmenter"].fail_count == 0 and changes["new"] == after["new"]

    times = breakdown(changes)
    assert list(times) == ["segmenter", "new"]  # busiest first; idle left out
    t = times["segmenter"]
    assert (t.requests, t.inferences, t.executions) == (6, 10, 4)
    assert t.avg_batch == 2.5
    assert t.queue_ms == pytest.approx(10.0)  # 60 ms over 6 requests
    assert t.compute_ms == pytest.approx(53.0)  # (6 + 300 + 12) ms over 6 requests
    assert t.request_ms == pytest.approx(100.0)
    assert t.execution_ms == pytest.approx(37.0)  # 148 ms over 4 executions
    assert t.cost_ms == pytest.approx(14.8)  # 148 ms over 10 items
    assert t.busy_s == pytest.approx(0.148)
    assert times["new"].avg_batch is None and times["new"].execution_ms is None
    assert "14.80" in _render(stats_table(times))


def test_json_output(tmp_path: Path):
    points = [_point(1, 10.0), dataclasses.replace(_point(2, 20.0), p99_ms=float("nan"), stopped=STOP_END)]
    path = save_json(
        tmp_path / "out" / "bench.json",
        {"served": points, "stats": parse_statistics(GRPC_STATS), "path": tmp_path, "n": np.float32(1.5)},
    )
    data = json.loads(path.read_text())
    assert data["served"][0]["concurrency"] == 1 and data["served"][0]["throughput"] == 10.0
    assert data["served"][1]["p99_ms"] is None and data["served"][1]["stopped"] == STOP_END
    assert data["stats"]["segmenter"]["batch_sizes"] == {"1": 2, "4": 2, "2": 1}
    assert data["path"] == str(tmp_path) and data["n"] == 1.5


def test_summary_table_renders_every_level():
    points = [_point(1, 10), _point(2, 19), dataclasses.replace(_point(4, 19.1, errors=2), stopped=STOP_ERRORS)]
    text = _render(summary_table(points, "remove_background served", items="images"))
    assert "images/s" in text and "p99 ms" in text and "remove_background served" in text
    assert "19.10" in text and "requests failed; first error: boom" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("│", "┃"))]) >= 4


def test_plot_writes_a_png_with_two_panels(tmp_path: Path):
    def curve(peak_tp: float, knee: int, base_ms: float, fail_at: int | None = None) -> list[Point]:
        out = []
        for c in (1, 2, 4, 8, 16, 32):
            tp = peak_tp * min(c, knee) / knee
            p = dataclasses.replace(_point(c, tp, errors=int(c == fail_at)), p99_ms=base_ms * max(1, c / knee))
            out.append(p)
            if c == fail_at:
                break
        return out

    variants = {"served": curve(160, 8, 120), "naive": curve(40, 2, 300, fail_at=16)}
    path = plot(variants, tmp_path / "bench" / "remove_background.png", "remove_background: served vs naive",
                items="images")  # fmt: skip
    assert path.is_file() and path.stat().st_size > 30_000
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG" and image.size == (1800, 675)  # 12 × 4.5 in at 150 dpi
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, text, antialiasing: not a blank canvas
    # Both halves carry a panel: each has dark (axis, text) pixels.
    left, right = pixels[:, :900], pixels[:, 900:]
    assert (left.sum(axis=2) < 200).sum() > 1000 and (right.sum(axis=2) < 200).sum() > 1000
    # Empty variants still make a figure.
    assert plot({}, tmp_path / "empty.png", "nothing").is_file()
