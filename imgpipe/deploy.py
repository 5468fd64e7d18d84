"""The local monitoring stack's generated files (deploy/compose/): Prometheus' scrape config — from the same
code as ``imgpipe loadtest``'s Prometheus — and Grafana's provisioning and dashboard, built with grafanalib.

``imgpipe deploy-configs`` writes them; tests/test_deploy.py checks that the committed files are what this
code generates, that Prometheus' own ``promtool`` accepts the config, and that every metric the dashboard
queries is one Triton exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from imgpipe.loadtest.metrics import scrape_config
from imgpipe.paths import ROOT

COMPOSE = ROOT / "deploy" / "compose"
TRITON_TARGET = "tritonserver:8002"  # the compose service's metrics port
DATASOURCE = "Prometheus"
# GPU metrics: Triton exports them only on a machine with a GPU.
GPU_METRICS = frozenset({"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"})


def _panel(title: str, unit: str, queries: list[tuple[str, str]], x: int, y: int, description: str) -> object:
    from grafanalib.core import GridPos, Target, TimeSeries

    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=[
            Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)
        ],
        unit=unit,
        gridPos=GridPos(h=8, w=12, x=x, y=y),
    )


def dashboard() -> dict:
    """imgpipe's Grafana dashboard: throughput, queue vs compute time per model, batch sizes, GPU
    utilisation and memory, failures."""
    from grafanalib._gen import DashboardEncoder
    from grafanalib.core import Dashboard, Time

    per_s = "sum by (model) (rate({metric}[1m]))"
    panels = [
        _panel("Throughput per model", "reqps", [(per_s.format(metric="nv_inference_request_success"), "{{model}}")],
               0, 0, "Successful requests per second, per model (the pipelines and their steps)."),
        _panel("Queue vs compute time per request", "ms", [
            ("sum by (model) (rate(nv_inference_queue_duration_us[1m])) / sum by (model)"
             " (rate(nv_inference_request_success[1m])) / 1000", "{{model}} queue"),
            ("sum by (model) (rate(nv_inference_compute_infer_duration_us[1m])) / sum by (model)"
             " (rate(nv_inference_request_success[1m])) / 1000", "{{model}} compute"),
        ], 12, 0, "Where a request's time goes inside Triton: waiting in the model's queue, or computing."),
        _panel("Batch size reached", "none", [
            ("sum by (model) (rate(nv_inference_count[1m])) / sum by (model) (rate(nv_inference_exec_count[1m]))",
             "{{model}}"),
        ], 0, 8, "Inferences per execution: how much dynamic batching gathers."),
        _panel("Failures per second", "reqps", [
            ("sum by (model, reason) (rate(nv_inference_request_failure[1m]))", "{{model}} {{reason}}"),
        ], 12, 8, "REJECTED: a bounded queue was full (load shedding); BACKEND, OTHER, CANCELED: see the logs."),
        _panel("GPU utilisation", "percentunit", [("nv_gpu_utilization", "{{gpu_uuid}}")], 0, 16,
               "Triton's GPU utilisation (0-1); empty on a machine without GPUs."),
        _panel("GPU memory used", "bytes", [("nv_gpu_memory_used_bytes", "{{gpu_uuid}}"),
                                            ("nv_gpu_memory_total_bytes", "{{gpu_uuid}} total")], 12, 16,
               "Device memory used and total per GPU."),
    ]  # fmt: skip
    board = Dashboard(
        title="imgpipe",
        uid="imgpipe",
        description="imgpipe on Triton: throughput, queue vs compute, batching, GPU, failures",
        panels=panels,
        time=Time("now-30m", "now"),
        refresh="10s",
        tags=["imgpipe", "triton"],
    ).auto_panel_ids()
    return json.loads(json.dumps(board.to_json_data(), cls=DashboardEncoder))


def queried_metrics(board: dict) -> set[str]:
    """Every metric name the dashboard's queries use."""
    names = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\b(nv_[a-z_]+)\b", target["expr"]))
    return names


def files() -> dict[str, str]:
    """deploy/compose/'s generated files, by path relative to it."""
    datasources = {
        "apiVersion": 1,
        "datasources": [{"name": DATASOURCE, "type": "prometheus", "access": "proxy", "url": "http://prometheus:9090",
                         "isDefault": True}],
    }  # fmt: skip
    providers = {
        "apiVersion": 1,
        "providers": [{"name": "imgpipe", "type": "file", "disableDeletion": True,
                       "options": {"path": "/var/lib/grafana/dashboards"}}],
    }  # fmt: skip
    return {
        "prometheus.yml": scrape_config([TRITON_TARGET], interval_s=5.0) + "\n",
        "grafana/provisioning/datasources/prometheus.yml": json.dumps(datasources, indent=1) + "\n",
        "grafana/provisioning/dashboards/imgpipe.yml": json.dumps(providers, indent=1) + "\n",
        "grafana/dashboards/imgpipe.json": json.dumps(dashboard(), indent=1, sort_keys=True) + "\n",
    }


def write(folder: Path = COMPOSE) -> list[Path]:
    written = []
    for name, text in files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
