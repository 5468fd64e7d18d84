"""Triton's Prometheus metrics over a load test's window: scraped directly, or through a real Prometheus
server started for the run (Debian's ``prometheus``: a generated scrape config, a free port, its own
data folder, stopped afterwards).

Either way the result is the same series — per scrape time, the counters and gauges the report needs —
and the same figures: per model the requests, executions and inferences counted in the window, the
average queue and compute time per request, the batch size reached (inferences per execution), and
per GPU the utilisation and memory where Triton reports them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.benchmark import fetch_metrics, parse_prometheus

# Counters per model (label ``model``), and GPU gauges (label ``gpu_uuid``).
COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
GAUGES = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes")
PROMETHEUS_CANDIDATES = (
    Path(__file__).resolve().parents[1] / ".venv" / "opt" / "debian" / "usr" / "bin" / "prometheus",
    Path("/usr/bin/prometheus"),
)

Series = list[tuple[float, dict[str, float]]]  # (unix time, {"metric{label}": value})


def _key(name: str, labels: dict[str, str]) -> str | None:
    if name in COUNTERS and "model" in labels:
        return f"{name}{{{labels['model']}}}"
    if name in GAUGES and "gpu_uuid" in labels:
        return f"{name}{{{labels['gpu_uuid']}}}"
    return None


def endpoint(metrics_url: str) -> str:
    """``host:port`` → ``http://host:port/metrics`` (a URL with a path is kept as it is)."""
    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    parts = urllib.parse.urlsplit(url)
    return url if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/metrics"


def snapshot(metrics_url: str) -> dict[str, float]:
    """The counters and gauges of one scrape, summed over versions and failure reasons (``name{model}``)."""
    values: dict[str, float] = {}
    for sample in parse_prometheus(fetch_metrics(endpoint(metrics_url))):
        key = _key(sample.name, sample.labels)
        if key is not None:
            values[key] = values.get(key, 0.0) + sample.value
    return values


class Scraper:
    """Scrapes Triton's endpoint every ``interval_s`` on a thread, from ``start()`` to ``stop()``."""

    source = "direct"

    def __init__(self, metrics_url: str, interval_s: float = 1.0) -> None:
        self.metrics_url = metrics_url
        self.interval_s = interval_s
        self.series: Series = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def _scrape(self) -> None:
        try:
            self.series.append((time.time(), snapshot(self.metrics_url)))
        except OSError as exc:  # the server went away mid-run: keep the error, keep going
            self.errors.append(f"{time.strftime('%H:%M:%S')} {exc}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._scrape()

    def start(self) -> None:
        self._scrape()  # the window's first point, before any request
        self._thread.start()

    def stop(self) -> Series:
        self._stop.set()
        self._thread.join(timeout=10)
        self._scrape()  # and its last, after the last answer
        return self.series


def prometheus_binary() -> Path | None:
    """Debian's Prometheus: extracted into the venv by ``make install``, or installed system-wide."""
    found = shutil.which("prometheus")
    for candidate in (*PROMETHEUS_CANDIDATES, Path(found) if found else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def scrape_config(targets: list[str], interval_s: float = 1.0, job: str = "triton") -> str:
    """A Prometheus configuration scraping Triton's metrics endpoints (``host:port``)."""
    interval = f"{max(1, round(interval_s * 1000))}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}],
    }
    return json.dumps(config, indent=1)  # YAML is a superset of JSON


@dataclass
class PrometheusServer:
    """A real Prometheus for one run: its own port and data folder, scraping ``target`` (host:port)."""

    target: str
    interval_s: float = 1.0
    binary: Path | None = None
    folder: Path | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    errors: list[str] = field(default_factory=list)
    source: str = "prometheus"
    started_at: float = 0.0

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        from imgpipe.server import free_ports

        self.binary = self.binary or prometheus_binary()
        if self.binary is None:
            raise FileNotFoundError("prometheus is not installed (make install extracts Debian's package)")
        self.folder = Path(tempfile.mkdtemp(prefix="imgpipe-prometheus-"))
        (self.folder / "prometheus.yml").write_text(scrape_config([self.target], self.interval_s))
        (self.port,) = free_ports(1)
        log = (self.folder / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # ready when its first scrape of the target succeeded
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.folder / 'prometheus.log').read_text()[-2000:]}")
            try:
                result = self.query("up")
                if any(r["value"][1] == "1" for r in result):
                    self.started_at = time.time()
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.close()
        raise TimeoutError(f"prometheus did not scrape {self.target} within {timeout_s:.0f} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body.get('error', body)}")
        return body["data"]["result"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", query=expression)

    def series(self, start: float, end: float, step_s: float | None = None) -> Series:
        """The counters and gauges between ``start`` and ``end`` (unix seconds), one point per step."""
        step = step_s or self.interval_s
        points: dict[float, dict[str, float]] = {}
        for name in (*COUNTERS, *GAUGES):
            for item in self._get("/api/v1/query_range", query=name, start=start, end=end, step=step):
                key = _key(name, item["metric"])
                if key is None:
                    continue
                for t, value in item["values"]:
                    point = points.setdefault(float(t), {})
                    point[key] = point.get(key, 0.0) + float(value)
        return sorted(points.items())

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class ModelWindow:
    """One model over the run's window (differences of Triton's cumulative counters)."""

    model: str
    requests: int  # successful requests
    failures: int
    executions: int  # batches the model ran
    inferences: int  # items (a batch of n counts n)
    queue_ms: float | None  # average per request
    compute_ms: float | None  # input + infer + output, average per request
    request_ms: float | None  # end to end inside Triton, average per request

    @property
    def batch_size(self) -> float | None:
        return self.inferences / self.executions if self.executions else None


def window(series: Series) -> dict[str, ModelWindow]:
    """Per model, what happened between the series' first and last points (models with requests only)."""
    if len(series) < 2:
        return {}
    first, last = series[0][1], series[-1][1]
    models = sorted({k[k.index("{") + 1 : -1] for k in last if k.startswith("nv_inference_request_success{")})
    out = {}
    for model in models:

        def d(name: str, model: str = model) -> float:
            key = f"{name}{{{model}}}"
            return max(0.0, last.get(key, 0.0) - first.get(key, 0.0))  # a counter reset (reload) counts from 0

        requests, failures = int(d("nv_inference_request_success")), int(d("nv_inference_request_failure"))
        if requests + failures == 0:
            continue
        handled = requests + failures

        def per(total_us: float, handled: int = handled) -> float | None:
            return total_us / handled / 1000.0 if handled else None

        compute = sum(d(f"nv_inference_compute_{p}_duration_us") for p in ("input", "infer", "output"))
        out[model] = ModelWindow(
            model,
            requests,
            failures,
            int(d("nv_inference_exec_count")),
            int(d("nv_inference_count")),
            per(d("nv_inference_queue_duration_us")),
            per(compute),
            per(d("nv_inference_request_duration_us")),
        )
    return out


def rates(series: Series, model: str) -> list[dict[str, float | None]]:
    """Per interval of the series: time since the start, queue and compute ms per request, and the batch
    size reached, for ``model`` (the plot's lines)."""
    out: list[dict[str, float | None]] = []
    if not series:
        return out
    t0 = series[0][0]
    for (_, a), (t, b) in itertools.pairwise(series):

        def d(name: str, a: dict[str, float] = a, b: dict[str, float] = b) -> float:
            key = f"{name}{{{model}}}"
            return b.get(key, 0.0) - a.get(key, 0.0)

        handled = d("nv_inference_request_success") + d("nv_inference_request_failure")
        executions = d("nv_inference_exec_count")
        compute = sum(d(f"nv_inference_compute_{p}_duration_us") for p in ("input", "infer", "output"))
        out.append(
            {
                "t": t - t0,
                "queue_ms": d("nv_inference_queue_duration_us") / handled / 1000 if handled > 0 else None,
                "compute_ms": compute / handled / 1000 if handled > 0 else None,
                "batch": d("nv_inference_count") / executions if executions > 0 else None,
            }
        )
    return out


def gpus(series: Series) -> dict[str, dict[str, float]]:
    """Per GPU over the window: mean and peak utilisation (0..1), peak memory used (bytes)."""
    out: dict[str, dict[str, float]] = {}
    for _, point in series:
        for key, value in point.items():
            if not key.startswith("nv_gpu_"):
                continue
            name, uuid = key[: key.index("{")], key[key.index("{") + 1 : -1]
            entry = out.setdefault(uuid, {"samples": 0, "utilization_sum": 0.0, "utilization_max": 0.0})
            if name == "nv_gpu_utilization":
                entry["samples"] += 1
                entry["utilization_sum"] += value
                entry["utilization_max"] = max(entry["utilization_max"], value)
            elif name == "nv_gpu_memory_used_bytes":
                entry["memory_used_max"] = max(entry.get("memory_used_max", 0.0), value)
            else:
                entry["memory_total"] = value
    for entry in out.values():
        samples = entry.pop("samples")
        entry["utilization_mean"] = entry.pop("utilization_sum") / samples if samples else 0.0
    return out
