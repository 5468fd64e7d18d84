"""``imgpipe tune PIPELINE``: find the serving configuration with the highest throughput whose p99 stays
under a latency budget, with Locust trials against a real server, and write it back to the manifest.

Only knobs that change ``config.pbtxt`` are turned (no artifact is rebuilt): per network of the pipeline
its max batch size (with the pipeline's own, where it has one), preferred batch sizes, max queue delay,
instance count and queue policy; per pipeline its step instances (and remove_background's encoder
instances). The server runs with ``--model-control-mode=explicit``; between trials the repository's
configs are rewritten from the varied manifest (a config-only build: the exported artifacts are
unchanged) and the pipeline's models are unloaded and loaded again, in dependency order.

The search is sequential (coordinate descent), bounded by ``--trials``: trial 1 is the unbatched
configuration (max batch 1, one instance of everything: the reference the speed-up is measured against),
trial 2 the manifest as it is (the incumbent); then each knob in turn takes each of its values with the
others held at the best so far, and a value is kept when it wins. The objective: the highest throughput
among the trials whose p99 is within the budget, where a challenger must beat the incumbent by 5 % (a
smaller edge is noise between short trials); none within the budget: the lowest p99 wins, and the report
says so.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.loadtest import run as loadrun
from imgpipe.manifest import NETWORK_QUEUE_SIZE, ManifestError, apply_override, parse_manifest, tomllib

Assignments = dict[str, Any]  # dotted manifest key → value


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple[Any, ...]


KNOBS = (
    Knob("max_batch_size", (4, 8, 16)),
    Knob("max_queue_delay_us", (0, 2000, 8000)),
    Knob("step_instances", (1, 2)),
    Knob("encode_instances", (1, 2)),
    Knob("network_instances", (1, 2)),
    Knob("queue", ("deep", "bounded")),
)


@dataclass
class Trial:
    number: int
    label: str
    knobs: dict[str, Any]
    assignments: Assignments
    throughput: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    failures: int = 0
    within_budget: bool = False
    compute_ms: dict[str, float] = field(default_factory=dict)  # per model, per item (batches shared out)
    batch: dict[str, float] = field(default_factory=dict)  # per model, the mean batch size it reached
    folder: str = ""
    error: str = ""


def chain(repo: Path, top: str) -> list[str]:
    """The models ``top`` runs, dependencies first and ``top`` last: an ensemble's steps, and the networks
    a BLS model calls (its ``imgpipe.networks`` parameter)."""
    from imgpipe.build.triton_config import parse

    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        config = parse((repo / name / "config.pbtxt").read_text())
        for step in config.ensemble_scheduling.step:
            visit(step.model_name)
        if "imgpipe.networks" in config.parameters:
            for role in json.loads(config.parameters["imgpipe.networks"].string_value).values():
                visit(role["model"])
        order.append(name)

    visit(top)
    return order


def assignments_for(
    data: dict[str, Any], pipeline: str, networks: list[str], knobs: dict[str, Any], users: int
) -> Assignments:
    """The manifest keys a point of the search sets (only keys that exist for this pipeline)."""
    settings = data["pipelines"][pipeline]
    out: Assignments = {}
    for knob, value in knobs.items():
        if knob == "max_batch_size":
            for net in networks:
                out[f"networks.{net}.batching.max_batch_size"] = value
                out[f"networks.{net}.batching.preferred_batch_sizes"] = [] if value == 1 else [value]
                if data["networks"][net].get("batching", {}).get("opt_batch"):
                    out[f"networks.{net}.batching.opt_batch"] = value
            if "max_batch_size" in settings or pipeline in ("remove_background", "colorize"):
                out[f"pipelines.{pipeline}.max_batch_size"] = value
        elif knob == "max_queue_delay_us":
            for net in networks:
                out[f"networks.{net}.batching.max_queue_delay_us"] = value
        elif knob == "step_instances":
            out[f"pipelines.{pipeline}.instances.count"] = value
        elif knob == "encode_instances" and pipeline == "remove_background":
            out[f"pipelines.{pipeline}.encode_instances"] = value
        elif knob == "network_instances":
            for net in networks:
                out[f"networks.{net}.instances.count"] = value
        elif knob == "queue":
            # deep: the manifest's default network queue (every queue is bounded); bounded: 4 × users
            size = NETWORK_QUEUE_SIZE if value == "deep" else 4 * users
            for net in networks:
                out[f"networks.{net}.batching.queue.max_queue_size"] = size
                out[f"networks.{net}.batching.queue.timeout_action"] = "REJECT"
    return out


def applicable(pipeline: str) -> tuple[Knob, ...]:
    return tuple(k for k in KNOBS if k.name != "encode_instances" or pipeline == "remove_background")


def current_values(data: dict[str, Any], assignments: Assignments) -> Assignments:
    """What the manifest says now for each key (None where it does not set it)."""
    out: Assignments = {}
    for key in assignments:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def variant(data: dict[str, Any], assignments: Assignments) -> dict[str, Any]:
    copied = copy.deepcopy(data)
    for key, value in assignments.items():
        apply_override(copied, f"{key}={json.dumps(value)}")
    return copied


@dataclass
class Tuner:
    """One tuning session against its own server (free ports, explicit model control)."""

    pipeline: str
    manifest_path: Path
    folder: Path
    budget_ms: float
    trials: int = 8
    users: int = 8
    trial_s: float = 20.0
    sizes: str = "1024x768"
    protocol: str = "grpc"
    prometheus: bool = False
    console: Any = None
    min_gain: float = 0.05  # a challenger must beat the incumbent's throughput by this share
    results: list[Trial] = field(default_factory=list)
    _steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.trials < 2:
            raise ValueError("--trials must be at least 2 (the unbatched reference and the manifest as it is)")
        if self.budget_ms <= 0:
            raise ValueError("--budget-ms must be positive")

    # -- the server and the configs -----------------------------------------------------------------

    def _build(self, data: dict[str, Any], models: list[str] | None) -> None:
        from imgpipe.build.repository import build_repository

        manifest = parse_manifest(data, self.manifest_path)
        build_repository(manifest, self.folder / "model_repository", models=models)

    def _reload(self, client: Any, models: list[str]) -> None:
        """Unload the chain top-down, load it bottom-up: every model reads its rewritten config."""
        connection = client.connection
        for name in reversed(models):
            connection.unload_model(name)
        deadline = time.monotonic() + 120
        for name in models:
            connection.load_model(name)
        while not all(connection.is_model_ready(m) for m in models):
            if time.monotonic() > deadline:
                raise RuntimeError(f"models not ready after reload: {models}")
            time.sleep(0.2)

    # -- the search ---------------------------------------------------------------------------------

    def points(self, base: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, knob values) of each trial, the later ones depending on the results so far."""
        yield "unbatched", {"max_batch_size": 1, "max_queue_delay_us": 0, "step_instances": 1,
                            "encode_instances": 1, "network_instances": 1}  # fmt: skip
        yield "manifest", {}
        for knob in applicable(self.pipeline):
            for value in knob.values:
                best = self.best()
                knobs = {**(best.knobs if best else {}), knob.name: value}
                if best is not None and best.knobs.get(knob.name) == value:
                    continue
                if any(t.knobs == knobs for t in self.results):
                    continue
                yield f"{knob.name}={value}", knobs

    def best(self) -> Trial | None:
        """The winner so far: the manifest as it is, unless a trial beats it — within the budget where the
        incumbent is not, or by at least ``min_gain`` more throughput (a smaller edge is noise between
        trials of a few seconds); with nothing within the budget, the lowest p99."""
        done = [t for t in self.results if not t.error and t.throughput > 0]
        incumbent = next((t for t in done if t.label == "manifest"), None)
        for t in done:
            if incumbent is None:
                incumbent = t
            elif t is not incumbent and self._beats(t, incumbent):
                incumbent = t
        return incumbent

    def _beats(self, challenger: Trial, incumbent: Trial) -> bool:
        if challenger.within_budget != incumbent.within_budget:
            return challenger.within_budget
        if challenger.within_budget:
            return challenger.throughput >= incumbent.throughput * (1 + self.min_gain)
        return (challenger.p99_ms or float("inf")) < (incumbent.p99_ms or float("inf"))

    def run(self) -> Trial | None:
        from imgpipe.clients.triton import TritonClient
        from imgpipe.server import Ports, TritonServer, free_ports

        base = tomllib.loads(self.manifest_path.read_text())
        if self.pipeline not in base.get("pipelines", {}):
            raise ManifestError(f"pipelines.{self.pipeline}: not in {self.manifest_path}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._build(base, None)
        repo = self.folder / "model_repository"
        models = chain(repo, self.pipeline)
        networks = [m for m in models if m in base["networks"]]
        self._steps = [m for m in models if m not in networks and m != self.pipeline]  # an ensemble's steps
        args = ("--model-control-mode=explicit", *(f"--load-model={m}" for m in models))
        # No stub supervisor (the tuner unloads and reloads models itself) and no client retries: a trial
        # measures the server's raw outcomes.
        server = TritonServer(
            repo, Ports(*free_ports(3)), extra_args=args, log_path=self.folder / "tritonserver.log", supervise=False
        )
        with server, TritonClient(server.grpc_url, "grpc", retry=None) as client:
            for label, knobs in self.points(base):
                if len(self.results) >= self.trials:
                    break
                number = len(self.results) + 1
                assignments = assignments_for(base, self.pipeline, networks, knobs, self.users)
                trial = Trial(number, label, knobs, assignments)
                self.results.append(trial)
                try:
                    self._build(variant(base, assignments), models)
                    self._reload(client, models)
                    self._measure(trial, server)
                except Exception as exc:  # a point that cannot be served is a result, not the end
                    trial.error = f"{type(exc).__name__}: {exc}"[:500]
                self._say(trial)
        self.save()
        return self.best()

    def _measure(self, trial: Trial, server: Any) -> None:
        url = server.grpc_url if self.protocol == "grpc" else server.http_url
        test = loadrun.LoadTest(
            self.pipeline, users=self.users, spawn_rate=float(self.users), duration_s=self.trial_s, url=url,
            protocol=self.protocol, sizes=self.sizes, metrics_url=server.metrics_url, prometheus=self.prometheus,  # type: ignore[arg-type]
        )  # fmt: skip
        report = loadrun.run(test, self.folder / f"trial-{trial.number}", console=self._quiet())
        trial.throughput, trial.p50_ms, trial.p99_ms = report.throughput, report.p50_ms, report.p99_ms
        trial.failures = sum(o.requests for kind, o in report.outcomes.items() if kind != "ok")
        trial.within_budget = trial.p99_ms is not None and trial.p99_ms <= self.budget_ms and not trial.failures
        trial.compute_ms = {  # per item: a batch's compute time shared among its items
            m.model: (m.compute_ms or 0.0) * m.executions / m.requests for m in report.models.values() if m.requests
        }
        trial.batch = {m.model: m.batch_size or 0.0 for m in report.models.values()}
        trial.folder = str(report.folder)

    def _quiet(self) -> Any:
        from rich.console import Console

        return Console(stderr=True, quiet=self.console is None)

    def _say(self, trial: Trial) -> None:
        if self.console is not None:
            status = trial.error or (
                f"{trial.throughput:.2f}/s, p50 {_ms(trial.p50_ms)}, p99 {_ms(trial.p99_ms)}"
                + (
                    ""
                    if trial.within_budget
                    else " (over the budget)"
                    if not trial.failures
                    else f", {trial.failures} failed"
                )
            )
            self.console.print(f"trial {trial.number} ({trial.label}): {status}", markup=False, highlight=False)

    # -- results ------------------------------------------------------------------------------------

    def speedup(self) -> float | None:
        """The best trial's throughput over the unbatched one's."""
        best = self.best()
        reference = self.results[0] if self.results else None
        if best is None or reference is None or not reference.throughput:
            return None
        return best.throughput / reference.throughput

    def explanation(self) -> str:
        """Where the time goes, in figures: the CPU work per request of the best trial times its
        throughput, against the cores there are. Said when the speed-up stays under 1.5×."""
        best, reference = self.best(), self.results[0] if self.results else None
        if best is None or reference is None:
            return "no trial succeeded"
        cores = os.cpu_count() or 1
        top = self.pipeline
        # An ensemble's own compute is its steps'; a BLS model's includes the networks it waits on.
        steps = {m: ms for m, ms in best.compute_ms.items() if (m != top) == bool(self._steps)}
        busy = best.throughput * sum(steps.values()) / 1000.0
        heaviest = sorted(steps.items(), key=lambda kv: -kv[1])[:3]
        text = (
            f"best {best.throughput:.2f}/s vs unbatched {reference.throughput:.2f}/s"
            f" ({(self.speedup() or 0):.2f}x). Compute, best trial: "
            + ", ".join(f"{m} {ms:.0f} ms" for m, ms in heaviest)
            + f" per image; at {best.throughput:.2f}/s the models execute {busy:.2f} s per second on {cores} cores"
        )
        if (self.speedup() or 0) < 1.5:
            text += (
                " — the steps that dominate are per-image CPU work (decoding, the guided filter, encoding) that"
                " batching does not shrink, and the cores are already busy, so batching and instances cannot"
                " multiply the throughput here"
                if busy >= 0.6 * cores
                else " — the cores are not saturated: more concurrency (--users) or a longer trial may show more"
            )
        return text

    def winning_assignments(self) -> Assignments:
        best = self.best()
        return dict(best.assignments) if best else {}

    def save(self) -> None:
        report = {
            "pipeline": self.pipeline,
            "budget_ms": self.budget_ms,
            "users": self.users,
            "trial_s": self.trial_s,
            "sizes": self.sizes,
            "search": "sequential (coordinate descent) over " + ", ".join(k.name for k in applicable(self.pipeline)),
            "trials": [asdict(t) for t in self.results],
            "best": asdict(self.best()) if self.best() else None,
            "speedup_over_unbatched": self.speedup(),
            "explanation": self.explanation(),
        }
        (self.folder / "tune.json").write_text(json.dumps(report, indent=1, default=str))
        plot(self, self.folder / "tune.png")


def plot(tuner: Tuner, path: Path) -> Path:
    """Each trial's throughput (bars) and p99 (dots) with the latency budget; the winner marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = tuner.results
    best = tuner.best()
    fig, axis = plt.subplots(figsize=(max(7, 1.1 * len(trials) + 3), 4.5), dpi=120, layout="constrained")
    x = list(range(len(trials)))
    colours = ["tab:green" if best is t else "tab:blue" if t.within_budget else "tab:grey" for t in trials]
    axis.bar(x, [t.throughput for t in trials], color=colours)
    axis.set_xticks(x, [f"{t.number}\n{t.label}" for t in trials], fontsize=7)
    axis.set_ylabel("throughput (ok requests / s)")
    latency = axis.twinx()
    latency.plot(x, [t.p99_ms for t in trials], "o", color="tab:red", label="p99")
    latency.axhline(
        tuner.budget_ms, color="tab:red", linestyle="--", linewidth=1, label=f"budget {tuner.budget_ms:g} ms"
    )
    latency.set_ylabel("p99 latency (ms)")
    latency.set_ylim(bottom=0)
    latency.legend(loc="upper left", fontsize=8)
    axis.set_title(
        f"imgpipe tune {tuner.pipeline}: {tuner.users} users, {tuner.trial_s:g} s per trial, {tuner.sizes}\n"
        + (f"best: trial {best.number} ({(tuner.speedup() or 0):.2f}x the unbatched throughput)" if best else ""),
        fontsize=10,
    )
    fig.savefig(path)
    plt.close(fig)
    return path


def write_back(manifest_path: Path, assignments: Assignments) -> tuple[str, str]:
    """(the manifest's text now, with ``assignments`` applied): comments and layout kept (tomlkit); only
    the keys whose value changes are touched."""
    import tomlkit

    before = manifest_path.read_text()
    document = tomlkit.parse(before)
    current = current_values(tomllib.loads(before), assignments)
    for key, value in assignments.items():
        if current[key] == value:
            continue
        *parents, leaf = key.split(".")
        node: Any = document
        for part in parents:
            if part not in node:
                node[part] = tomlkit.inline_table()
            node = node[part]
        node[leaf] = value
    return before, tomlkit.dumps(document)


def diff(before: str, after: str, path: Path) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), str(path), str(path)))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
