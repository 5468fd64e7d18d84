"""Load tests: headless Locust runs against the real server (gRPC and HTTP), Triton's metrics through a real
Prometheus (Debian's, extracted by make install) and directly, and the pieces they are made of."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from imgpipe.clients.triton import InferenceError
from imgpipe.loadtest import metrics, scenarios
from imgpipe.loadtest.run import LoadTest, parse_duration, run


def test_size_mix_and_duration_parse_and_refuse_nonsense() -> None:
    assert scenarios.parse_sizes("640x480, 1024x768:3") == (scenarios.Size(640, 480), scenarios.Size(1024, 768, 3))
    for bad in ("640", "0x10", "640x480:0", ""):
        with pytest.raises(ValueError, match="--sizes"):
            scenarios.parse_sizes(bad)
    assert [parse_duration(d) for d in ("60s", "2m", "90", "500ms", 1.5)] == [60.0, 120.0, 90.0, 0.5, 1.5]
    with pytest.raises(ValueError, match="--duration"):
        parse_duration("soon")
    with pytest.raises(ValueError, match="unknown pipeline"):
        LoadTest("sharpen")
    with pytest.raises(ValueError, match="--shape"):
        LoadTest("colorize", shape="wave")


def test_photos_follow_the_size_mix() -> None:
    import io

    from PIL import Image

    sizes = scenarios.parse_sizes("64x48,32x32:2")
    images = scenarios.photos("detect_faces", sizes)
    assert [Image.open(io.BytesIO(b)).size for b in images] == [(64, 48), (32, 32), (32, 32)]
    assert all(b[:2] == b"\xff\xd8" for b in images)  # JPEG


def test_load_shapes() -> None:
    run_s = 30.0
    assert [scenarios.users_at("constant", t, 8, run_s) for t in (0, 29.9)] == [8, 8]
    assert [scenarios.users_at("ramp", t, 8, run_s) for t in (0, 7.5, 15, 29.9)] == [1, 2, 4, 8]
    assert [scenarios.users_at("step", t, 8, run_s, 3, 10) for t in (0, 10, 20, 25)] == [3, 6, 8, 8]
    assert scenarios.users_at("constant", 30.0, 8, run_s) is None  # the run is over: Locust stops
    with pytest.raises(ValueError, match="unknown load shape"):
        scenarios.users_at("sine", 1.0, 8, run_s)


def test_outcomes_from_triton_status_and_message() -> None:
    def kind(status: str, message: str) -> str:
        return scenarios.outcome(InferenceError(status, message))

    assert scenarios.outcome(None) == "ok"
    assert kind("StatusCode.UNAVAILABLE", "Exceeds maximum queue size") == "queue_full"
    assert kind("503", "in ensemble 'remove_background', Exceeds maximum queue size") == "queue_full"
    assert kind("StatusCode.INVALID_ARGUMENT", "bad IMAGE") == "invalid_argument"
    assert kind("400", "bad IMAGE") == "invalid_argument"
    assert kind("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded") == "timeout"
    assert kind("StatusCode.UNAVAILABLE", "failed to connect to all addresses") == "unavailable"
    assert scenarios.outcome(ConnectionRefusedError(111, "Connection refused")) == "unavailable"
    assert kind("StatusCode.INTERNAL", "boom") == "error"


def test_window_figures_from_counters() -> None:
    def point(success: float, execs: float, queue_us: float, infer_us: float) -> dict[str, float]:
        return {
            "nv_inference_request_success{seg}": success,
            "nv_inference_request_failure{seg}": 0.0,
            "nv_inference_count{seg}": success,
            "nv_inference_exec_count{seg}": execs,
            "nv_inference_queue_duration_us{seg}": queue_us,
            "nv_inference_compute_infer_duration_us{seg}": infer_us,
            "nv_gpu_utilization{GPU-1}": 0.5,
            "nv_gpu_memory_used_bytes{GPU-1}": 2.0**30,
        }

    series = [(0.0, point(10, 10, 1000, 5000)), (1.0, point(30, 15, 5000, 45000)), (2.0, point(50, 20, 9000, 85000))]
    (seg,) = metrics.window(series).values()
    assert (seg.requests, seg.executions, seg.inferences, seg.batch_size) == (40, 10, 40, 4.0)
    assert seg.queue_ms == pytest.approx(8000 / 40 / 1000) and seg.compute_ms == pytest.approx(80000 / 40 / 1000)
    assert [r["batch"] for r in metrics.rates(series, "seg")] == [4.0, 4.0]
    gpu = {"utilization_max": 0.5, "memory_used_max": 2.0**30, "utilization_mean": 0.5}
    assert metrics.gpus(series)["GPU-1"] == gpu
    assert json.loads(metrics.scrape_config(["localhost:8002"]))["scrape_configs"][0]["static_configs"] == [
        {"targets": ["localhost:8002"]}
    ]
    assert metrics.endpoint("localhost:8002") == "http://localhost:8002/metrics"


def _stats_rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "locust_stats.csv").open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.mark.server
def test_twenty_second_headless_run_with_prometheus_and_perf_analyzer(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert metrics.prometheus_binary() is not None, "make install extracts Debian's prometheus into .venv/opt"
    test = LoadTest(
        "remove_background", users=2, spawn_rate=2, duration_s=20, url=server.grpc_url, sizes="640x480,320x240",
        metrics_url=server.metrics_url, cross_check=True,
    )  # fmt: skip
    report = run(test, tmp_path / "run")
    models = [(m.model, m.requests, m.batch_size) for m in report.models.values()]
    print(f"remove_background, 2 users, 20 s: {report.throughput:.2f} ok/s, p50 {report.p50_ms:.0f} ms,"
          f" p99 {report.p99_ms:.0f} ms; models {models}")  # fmt: skip
    rows = _stats_rows(report.folder)
    # Locust's CSV and the request log agree (the CSV is written at the stop: answers still in flight then
    # reach the log only)
    assert report.ok - test.users <= int(rows["remove_background:ok"]["Request Count"]) <= report.ok
    assert report.unexpected_failures == 0 and set(report.outcomes) <= {"ok", "queue_full"}
    assert {"report.html", "report.png", "summary.json", "metrics.json", "requests.csv"} <= {
        p.name for p in report.folder.iterdir()
    }
    # Triton's figures through Prometheus over the same window: every model of the chain counted exactly
    # the requests Locust saw answered, with non-negative queue and positive compute times.
    assert report.metrics_source == "prometheus"
    for name in ("remove_background", "bg_preprocess", "selfie_segmenter", "bg_postprocess"):
        model = report.models[name]
        assert model.requests == report.ok and model.failures == 0, name
        assert model.queue_ms is not None and model.queue_ms >= 0, name
        assert model.compute_ms is not None and model.compute_ms > 0, name
        assert 1 <= (model.batch_size or 0) <= 16, name
    assert report.models["selfie_segmenter"].inferences == report.ok  # one mask per image
    summary = json.loads((report.folder / "summary.json").read_text())
    assert summary["ok"] == report.ok and summary["metrics_source"] == "prometheus"
    # NVIDIA's perf_analyzer on the same scenario (concurrency 2, the same photos) after Locust: the two
    # throughputs agree within 15 % (the bound; 1.07 measured here).
    check = summary["cross_check"]
    print(f"cross-check: {check}")
    assert "error" not in check, check
    assert check["perf_analyzer_throughput_per_s"] > 0 and check["agree_within_15_percent"], check


@pytest.mark.server
def test_http_run_is_bounded_by_its_request_budget_and_scrapes_directly(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    test = LoadTest(
        "detect_faces", users=2, spawn_rate=2, duration_s=60, url=server.http_url, protocol="http", sizes="320x240",
        max_requests=6, metrics_url=server.metrics_url, prometheus=False, shape="ramp",
    )  # fmt: skip
    report = run(test, tmp_path / "run")
    assert report.seconds < 45  # stopped by the budget, not the duration
    total = sum(o.requests for o in report.outcomes.values())
    assert 6 <= total <= 6 + test.users and report.unexpected_failures == 0
    assert report.metrics_source == "direct" and report.models["detect_faces"].requests >= report.ok


@pytest.mark.server
def test_ui_mode_serves_locusts_web_ui_and_still_stops_by_itself(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import threading
    import urllib.request

    from imgpipe.server import free_ports

    (port,) = free_ports(1)
    pages: list[bytes] = []

    def fetch() -> None:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    pages.append(response.read())
                    return
            except OSError:
                threading.Event().wait(0.1)

    watcher = threading.Thread(target=fetch, daemon=True)
    watcher.start()
    test = LoadTest(
        "colorize", users=1, spawn_rate=1, duration_s=6, url=server.grpc_url, sizes="160x120", ui=True,
        web_port=port, metrics_url=server.metrics_url, prometheus=False,
    )  # fmt: skip
    report = run(test, tmp_path / "run")
    watcher.join(timeout=5)
    assert pages and b"locust" in pages[0].lower()  # the web UI answered during the run
    assert report.ok > 0 and report.unexpected_failures == 0 and report.seconds < 40
