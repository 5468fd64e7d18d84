"""One bounded load test: Locust (headless, or with its web UI) against a running server, Triton's
metrics over the same window (directly, or through a real Prometheus), and the report: Locust's CSV and
HTML, the metric series, a summary, and a picture.

Locust runs in its own process (``python -m locust -f imgpipe/loadtest/locustfile.py``): it monkeypatches
the standard library with gevent, which this process (Rich, the scraper thread, Prometheus) should not
inherit.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from imgpipe.loadtest import metrics, scenarios

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str | float) -> float:
    """``"60s"``, ``"2m"``, ``"1.5h"``, ``"500ms"`` or a number of seconds → seconds."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"--duration: {text!r} is not a duration such as 60s, 2m or 90")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match[2] or "s"]
    return float(match[1]) * scale


def metrics_url_for(url: str) -> str:
    """Triton's metrics endpoint next to a gRPC/HTTP address: the same host, port 8002."""
    host = urlsplit(url if "://" in url else f"//{url}").hostname or "localhost"
    return f"{host}:8002"


@dataclass(frozen=True)
class LoadTest:
    """What to run. Every run is bounded: ``duration_s`` and ``max_requests``, only ``url``."""

    pipeline: str
    users: int = 8
    spawn_rate: float = 8.0
    duration_s: float = 60.0
    url: str = "localhost:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    sizes: str = scenarios.DEFAULT_SIZES
    shape: Literal["constant", "ramp", "step"] = "constant"
    step_users: int = 1
    step_seconds: float = 10.0
    max_requests: int = 100_000
    think_ms: float = 0.0
    request_timeout_s: float = 60.0
    metrics_url: str | None = None  # default: the url's host, port 8002
    prometheus: bool = True  # a real Prometheus where one is installed; else scrape directly
    ui: bool = False
    web_port: int = 8089
    scrape_interval_s: float = 1.0
    cross_check: bool = False  # also measure the same scenario with perf_analyzer, after Locust

    def __post_init__(self) -> None:
        if self.pipeline not in scenarios.PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r} (have: {', '.join(scenarios.PIPELINES)})")
        if not 1 <= self.users <= 10_000:
            raise ValueError(f"--users must be within 1..10000, got {self.users}")
        if not 0 < self.duration_s <= 24 * 3600:
            raise ValueError(f"--duration must be within (0 s, 24 h], got {self.duration_s} s")
        if self.shape not in scenarios.SHAPES:
            raise ValueError(f"--shape must be one of {', '.join(scenarios.SHAPES)}, got {self.shape!r}")
        if self.max_requests < 1:
            raise ValueError(f"--max-requests must be at least 1, got {self.max_requests}")
        scenarios.parse_sizes(self.sizes)

    def locust_command(self, prefix: Path) -> list[str]:
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
            "--host", self.url, "--users", str(self.users), "--spawn-rate", str(self.spawn_rate),
            "--pipeline", self.pipeline, "--protocol", self.protocol, "--sizes", self.sizes,
            "--shape", self.shape, "--run-seconds", str(self.duration_s),
            "--step-users", str(self.step_users), "--step-seconds", str(self.step_seconds),
            "--max-requests", str(self.max_requests), "--think-ms", str(self.think_ms),
            "--request-timeout", str(self.request_timeout_s),
            "--csv", str(prefix), "--csv-full-history", "--html", str(prefix.parent / "report.html"),
            "--requests-log", str(prefix.parent / "requests.csv"),
            "--loglevel", "WARNING", "--logfile", str(prefix.parent / "locust.log"), "--stop-timeout", "10",
        ]  # fmt: skip
        if self.ui:  # the web UI, started by itself and quitting when the run ends (still bounded)
            command += ["--web-host", "127.0.0.1", "--web-port", str(self.web_port), "--autostart", "--autoquit", "5"]
        else:
            command += ["--headless"]
        return command


@dataclass(frozen=True)
class Outcome:
    """The requests of one outcome (``ok``, ``queue_full``, …), from the per-request log."""

    requests: int
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None


@dataclass(frozen=True)
class Requests:
    """Every request of a run: when it ended (unix s), its outcome, latency (ms) and bytes received."""

    end: np.ndarray
    outcome: np.ndarray  # str
    ms: np.ndarray
    size: np.ndarray

    @classmethod
    def read(cls, path: Path, pipeline: str) -> Requests:
        rows = list(csv.DictReader(path.open(newline=""))) if path.exists() else []
        rows = [r for r in rows if r["name"].startswith(f"{pipeline}:")]
        return cls(
            np.array([float(r["time"]) for r in rows]),
            np.array([r["name"].split(":", 1)[1] for r in rows], dtype=object),
            np.array([float(r["ms"]) for r in rows]),
            np.array([int(r["bytes"]) for r in rows]),
        )

    def outcomes(self) -> dict[str, Outcome]:
        out = {}
        for kind in sorted(set(self.outcome)):
            ms = self.ms[self.outcome == kind]
            out[str(kind)] = Outcome(len(ms), *(float(np.percentile(ms, q)) for q in (50, 99)), float(ms.mean()))
        return out

    def span(self) -> tuple[float, float]:
        """From the first request's start to the last answer (unix seconds)."""
        if not len(self.end):
            return 0.0, 0.0
        return float((self.end - self.ms / 1000).min()), float(self.end.max())

    def throughput(self) -> float:
        """ok requests per second over the span."""
        first, last = self.span()
        return int((self.outcome == "ok").sum()) / (last - first) if last > first else 0.0


@dataclass
class Report:
    """What a run measured (``summary.json``)."""

    test: LoadTest
    folder: Path
    seconds: float
    outcomes: dict[str, Outcome]  # per outcome of the pipeline's requests
    throughput: float  # ok requests per second
    p50_ms: float | None
    p99_ms: float | None
    unexpected_failures: int
    metrics_source: str
    models: dict[str, metrics.ModelWindow]
    gpus: dict[str, dict[str, float]]
    metrics_errors: list[str] = field(default_factory=list)
    plot: Path | None = None
    cross_check: dict[str, Any] | None = None  # perf_analyzer's figures and the two tools' ratio
    started: float = 0.0  # unix time the run started (the plots' zero)

    @property
    def ok(self) -> int:
        return self.outcomes["ok"].requests if "ok" in self.outcomes else 0


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN → None


def read_history(prefix: Path) -> list[dict[str, Any]]:
    """Locust's ``PREFIX_stats_history.csv``: one row per second and name (``Aggregated`` included)."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run(test: LoadTest, folder: Path, console: Any = None) -> Report:
    """Run ``test``, write its report into ``folder``, return what it measured."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "locust"
    metrics_url = test.metrics_url or metrics_url_for(test.url)
    collector: metrics.Scraper | metrics.PrometheusServer
    if test.prometheus and metrics.prometheus_binary() is not None:
        target = urlsplit(metrics_url if "://" in metrics_url else f"//{metrics_url}").netloc
        collector = metrics.PrometheusServer(target, test.scrape_interval_s).start()
        console.print(f"prometheus at {collector.url} scraping {target} every {test.scrape_interval_s:g} s")
    else:
        if test.prometheus:
            console.print("prometheus is not installed: scraping Triton's metrics endpoint directly")
        collector = metrics.Scraper(metrics_url, test.scrape_interval_s)
        collector.start()
    if test.ui:
        console.print(f"Locust's web UI: http://127.0.0.1:{test.web_port} (the run starts and stops by itself)")
    start = time.time()
    try:
        with (
            open(folder / "locust.out", "w") as out,
            Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar,
        ):
            process = subprocess.Popen(test.locust_command(prefix), stdout=out, stderr=subprocess.STDOUT)
            task = bar.add_task(f"{test.pipeline}: {test.users} users", total=test.duration_s)
            limit = test.duration_s + 60.0  # the run's own bound, plus start-up and draining
            while process.poll() is None:
                elapsed = time.time() - start
                if elapsed > limit:
                    process.terminate()
                    process.wait(timeout=30)
                    break
                bar.update(task, completed=min(elapsed, test.duration_s), description=_progress(test, prefix))
                time.sleep(0.5)
            bar.update(task, completed=test.duration_s)
        end = time.time()
        if not Path(f"{prefix}_stats.csv").exists():
            raise RuntimeError(f"locust wrote no statistics: {(folder / 'locust.out').read_text()[-2000:]}")
        if isinstance(collector, metrics.PrometheusServer):
            time.sleep(2 * test.scrape_interval_s + 0.5)  # the last answers scraped
            series = collector.series(start - test.scrape_interval_s, time.time())
        else:
            series = collector.stop()
    finally:
        if isinstance(collector, metrics.PrometheusServer):
            collector.close()
        else:
            collector.stop()
    report = _report(test, folder, prefix, start, end, series, collector.source, collector.errors)
    if test.cross_check:
        report.cross_check = cross_check(test, folder, report.throughput, console)
        (folder / "summary.json").write_text(json.dumps(summary(report), indent=1, default=str))
    return report


def cross_check(test: LoadTest, folder: Path, locust_throughput: float, console: Any) -> dict[str, Any]:
    """The same scenario (pipeline, protocol, concurrency = users, the same photos) measured by NVIDIA's
    perf_analyzer in time windows, and how its throughput compares with Locust's."""
    from imgpipe.loadtest import perf_analyzer

    reason = perf_analyzer.unavailable_reason()
    if reason is not None:
        return {"error": reason}
    console.print(f"perf_analyzer: the same scenario at concurrency {test.users} …")
    images = scenarios.photos(test.pipeline, scenarios.parse_sizes(test.sizes))
    window_ms = int(min(10_000, max(2_000, test.duration_s * 1000 / 4)))
    try:
        result = perf_analyzer.run(
            test.pipeline, test.url, test.protocol, test.users, images, folder / "perf_analyzer",
            # 16 windows: the entry queue's occasional 0.5 s wait (README, work limits) makes windows noisy
            measurement_ms=window_ms, max_trials=16, stability_percent=25.0,
        )  # fmt: skip
    except (perf_analyzer.PerfAnalyzerError, OSError) as exc:
        return {"error": str(exc)[-1000:]}
    ratio = locust_throughput / result.throughput if result.throughput else None
    return {
        "perf_analyzer_throughput_per_s": result.throughput,
        "perf_analyzer_p50_ms": result.p50_ms,
        "perf_analyzer_p99_ms": result.p99_ms,
        "locust_throughput_per_s": locust_throughput,
        "locust_over_perf_analyzer": ratio,
        "agree_within_15_percent": ratio is not None and abs(ratio - 1) <= 0.15,
        "window_ms": window_ms,
        "command": " ".join(result.command),
    }


def _progress(test: LoadTest, prefix: Path) -> str:
    history = read_history(prefix)
    last = [r for r in history if r.get("Name") == "Aggregated"]
    if not last:
        return f"{test.pipeline}: starting"
    row = last[-1]
    rate = float(row["Requests/s"])
    return f"{test.pipeline}: {row['User Count']} users, {row['Total Request Count']} requests, {rate:.1f}/s"


def _report(
    test: LoadTest,
    folder: Path,
    prefix: Path,
    start: float,
    end: float,
    series: metrics.Series,
    source: str,
    errors: list[str],
) -> Report:
    requests = Requests.read(folder / "requests.csv", test.pipeline)
    outcomes = requests.outcomes()
    ok = outcomes.get("ok")
    unexpected = sum(
        o.requests for kind, o in outcomes.items() if kind != "ok" and kind not in scenarios.EXPECTED_FAILURES
    )
    report = Report(
        test=test,
        folder=folder,
        seconds=end - start,
        outcomes=outcomes,
        throughput=requests.throughput(),
        p50_ms=ok.p50_ms if ok else None,
        p99_ms=ok.p99_ms if ok else None,
        unexpected_failures=unexpected,
        metrics_source=source,
        models=metrics.window(series),
        gpus=metrics.gpus(series),
        metrics_errors=list(errors),
        started=start,
    )
    (folder / "metrics.json").write_text(json.dumps({"source": source, "series": series}, indent=None))
    report.plot = plot(report, requests, read_history(prefix), series, folder / "report.png")
    (folder / "summary.json").write_text(json.dumps(summary(report), indent=1, default=str))
    return report


def summary(report: Report) -> dict[str, Any]:
    return {
        "test": asdict(report.test),
        "seconds": round(report.seconds, 2),
        "throughput_per_s": report.throughput,
        "p50_ms": report.p50_ms,
        "p99_ms": report.p99_ms,
        "ok": report.ok,
        "unexpected_failures": report.unexpected_failures,
        "outcomes": {k: asdict(v) for k, v in report.outcomes.items()},
        "metrics_source": report.metrics_source,
        "models": {k: {**asdict(v), "batch_size": v.batch_size} for k, v in report.models.items()},
        "gpus": report.gpus,
        "metrics_errors": report.metrics_errors,
        "cross_check": report.cross_check,
        "files": sorted(p.name for p in report.folder.iterdir()),
    }


def plot(report: Report, requests: Requests, history: list[dict[str, Any]], series: metrics.Series, path: Path) -> Path:
    """Four panels against seconds since the start: throughput (ok and failed per second, and the users),
    p50/p99 latency (per 2-second window), queue vs compute time per model, and the batch size each model
    reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), dpi=120, layout="constrained")
    (tput, latency), (times, batch) = axes
    if len(requests.end):
        t = requests.end - report.started
        width = max(1.0, round(float(t.max()) / 30))  # about 30 bins: batches finish in bursts
        edges = np.arange(0.0, math.ceil(t.max()) + width, width)
        ok = requests.outcome == "ok"
        for mask, label, colour in ((ok, "ok / s", "tab:blue"), (~ok, "failed / s", "tab:red")):
            tput.plot(
                edges[1:], np.histogram(t[mask], edges)[0] / width, label=label, color=colour, drawstyle="steps-pre"
            )
        windows = np.arange(0.0, edges[-1] + 2.0, 2.0)
        centres, p50, p99 = [], [], []
        for lo, hi in itertools.pairwise(windows):
            ms = requests.ms[ok & (t >= lo) & (t < hi)]
            if len(ms):
                centres.append((lo + hi) / 2)
                p50.append(np.percentile(ms, 50))
                p99.append(np.percentile(ms, 99))
        latency.plot(centres, p50, marker=".", label="p50")
        latency.plot(centres, p99, marker=".", label="p99")
    rows = [r for r in history if r.get("Name") == "Aggregated"]
    if rows:
        users = tput.twinx()
        users.plot([float(r["Timestamp"]) - report.started for r in rows], [int(r["User Count"]) for r in rows],
                   color="grey", linestyle=":")  # fmt: skip
        users.set_ylabel("users (dotted)")
        users.set_ylim(bottom=0)
    tput.set(title="throughput (per bin of a few seconds)", xlabel="seconds since the start", ylabel="requests / s")
    latency.set(title="latency of ok requests, per 2 s", xlabel="seconds since the start", ylabel="ms")
    busiest = sorted(report.models.values(), key=lambda m: -(m.request_ms or 0) * m.requests)[:4]
    offset = series[0][0] - report.started if series else 0.0
    for model in busiest:
        points = metrics.rates(series, model.model)
        t = [p["t"] + offset for p in points]
        (line,) = times.plot(t, [p["queue_ms"] for p in points], linestyle="--", label=f"{model.model} queue")
        times.plot(t, [p["compute_ms"] for p in points], color=line.get_color(), label=f"{model.model} compute")
        batch.plot(t, [p["batch"] for p in points], color=line.get_color(), label=model.model)
    times.set(
        title=f"queue (dashed) vs compute per request ({report.metrics_source} metrics)",
        xlabel="seconds since the start",
        ylabel="ms",
    )
    batch.set(title="batch size reached (inferences / executions)", xlabel="seconds since the start", ylabel="items")
    for axis in (tput, latency, times, batch):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    test = report.test
    fig.suptitle(
        f"imgpipe loadtest {test.pipeline} ({test.protocol}, {test.shape}, {test.users} users, {test.sizes}):"
        f" {report.throughput:.2f} ok/s, p50 {_ms(report.p50_ms)}, p99 {_ms(report.p99_ms)}"
    )
    fig.savefig(path)
    plt.close(fig)
    return path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
