"""The capacity plan: pods for a rate and a mix from measured curves, and the HPA simulation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from imgpipe import capacity as c


def _curves() -> c.Curves:
    return c.Curves(
        {
            ("a", None): c.Curve("a", (c.Point(1, 10, 100), c.Point(4, 30, 400), c.Point(8, 40, 1200))),
            ("b", None): c.Curve("b", (c.Point(1, 5, 300), c.Point(4, 10, 800))),
        },
        "constructed",
    )


def test_capacity_is_the_best_measured_point_within_the_target() -> None:
    curve = _curves()["a"]
    assert curve.capacity(1000).throughput == 30 and curve.capacity(2000).throughput == 40
    assert curve.capacity(50) is None
    with pytest.raises(KeyError, match="no measured curve"):
        _curves()["z"]


def test_plan_shares_each_gpu_between_the_pipelines() -> None:
    plan = c.plan(_curves(), rate=100, mix=c.parse_mix("a=3,b=1"), p99_ms=1000, utilisation=0.5)
    # a: 75 req/s at 30 per GPU = 2.5 GPUs; b: 25 at 10 = 2.5 GPUs; 5 GPUs at 50 % busy -> 10 pods
    assert [(r.pipeline, r.rate, r.gpu_share) for r in plan.rows] == [("a", 75, 2.5), ("b", 25, 2.5)]
    assert plan.pods == 10 and plan.mixed_capacity == pytest.approx(20.0)
    assert c.plan(_curves(), rate=1, mix={"a": 1.0}, p99_ms=1000).pods == 2  # never fewer than two
    with pytest.raises(ValueError, match="no measured point has p99 within 200 ms"):
        c.plan(_curves(), rate=10, mix={"b": 1.0}, p99_ms=200)
    assert c.parse_mix("a=1, b=3") == {"a": 0.25, "b": 0.75}
    for bad in ("a=x", "a=-1", "", "a=0"):
        with pytest.raises(ValueError, match="--mix"):
            c.parse_mix(bad)


def test_the_measured_h100_curves_give_a_plan() -> None:
    curves = c.load_curves()
    assert "H100" in curves.source
    plan = c.plan(curves, 50, c.parse_mix("remove_background=0.6,detect_faces=0.3,swap_face=0.1"), 1000)
    print(c.table([plan]))
    assert plan.pods >= math.ceil(plan.gpu_time / 0.7) and 10 < plan.mixed_capacity < 50


def test_hpa_holds_under_capacity_scales_up_after_pods_start_and_down_slowly() -> None:
    hpa = c.Hpa(target_queue_ms=50, min_pods=2, pod_ready_s=90)
    calm = c.simulate(lambda t: 20.0, per_pod=27.0, seconds=600, hpa=hpa)
    assert {s.pods for s in calm.steps} == {2} and calm.max_queue_ms() < hpa.target_queue_ms
    busy = c.simulate(c.step_load(20.0, 80.0, 120.0), per_pod=27.0, seconds=1800, hpa=hpa)
    at = {int(s.t): s for s in busy.steps}
    assert at[150].pods == 2 and at[150].desired > 2  # asked for, not ready yet
    assert at[120 + 15 + 90 + 1].pods > 2  # the first new pods serve after pod_ready_s
    assert busy.max_queue_ms(after=600) < hpa.target_queue_ms  # the backlog is drained
    downs = [b.t for a, b in itertools.pairwise(busy.steps) if b.pods < a.pods]
    assert downs and all(later - earlier >= hpa.scale_down_period_s for earlier, later in itertools.pairwise(downs))
    assert all(s.pods * 27.0 >= 80.0 for s in busy.steps if s.t > 600)  # never scaled below the load


def test_min_replicas_from_the_plan_absorb_the_step_that_makes_min_two_oscillate() -> None:
    """docs/scaling.md's two pictures: the H100 mix stepping from 20 to 80 req/s."""
    curves = c.load_curves()
    peak = c.plan(curves, 80, c.parse_mix("remove_background=0.6,detect_faces=0.3,swap_face=0.1"), 1000)
    small = c.simulate(c.step_load(20, 80, 120), peak.mixed_capacity, 3600, c.Hpa())
    planned = c.simulate(c.step_load(20, 80, 120), peak.mixed_capacity, 3600, c.Hpa(min_pods=peak.pods))
    assert max(s.pods for s in small.steps) == c.Hpa().max_pods and small.max_queue_ms(after=1800) > 50
    assert {s.pods for s in planned.steps} == {peak.pods} == {5} and planned.max_queue_ms() < 50


def test_capacity_command_prints_the_plan_and_draws_the_simulations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from imgpipe.cli import app

    args = ["capacity", "--rate", "80", "--mix", "remove_background=0.6,detect_faces=0.3,swap_face=0.1",
            "--simulate", "20:80@120", "-o", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "5 pods" in result.output and "minReplicas 5: pods 5-5" in result.output
    assert (tmp_path / "hpa-min2.png").is_file() and (tmp_path / "hpa-plan.png").is_file()
    bad = CliRunner().invoke(app, ["capacity", "--rate", "10", "--mix", "sharpen=1"])
    assert bad.exit_code != 0 and "sharpen" in bad.output


def _bench_json(path: Path, size: list[int] | None, throughputs: list[float]) -> Path:
    """A bench.json as `imgpipe bench` writes it, remove_background measured at ``size`` (None: a run from
    before sizes were recorded)."""
    points = [{"concurrency": 4**i, "throughput": t, "p99_ms": 200.0 * (i + 1), "errors": 0}
              for i, t in enumerate(throughputs)]  # fmt: skip
    data = {"machine": {"gpu": "NVIDIA H100"}, "served": {"fp16": {"remove_background": points}}}
    if size is not None:
        data["input_sizes"] = {"remove_background": size}
    path.write_text(json.dumps(data))
    return path


def test_a_mix_of_image_sizes_is_planned_from_curves_measured_at_each_size(tmp_path: Path) -> None:
    """Guards issue 13's 'image size mix': each size has its own measured curve, none is extrapolated."""
    small = _bench_json(tmp_path / "small.json", None, [20.0, 60.0, 80.0])  # the 1024x768 bench of old runs
    large = _bench_json(tmp_path / "large.json", [2048, 1536], [5.0, 15.0, 20.0])
    curves = c.load_curves([small, large])
    mix = c.parse_mix("remove_background@1024x768=3,remove_background@2048X1536=1")
    assert mix == {"remove_background@1024x768": 0.75, "remove_background@2048x1536": 0.25}
    plan = c.plan(curves, 40, mix, 1000)
    rows = {r.pipeline: r for r in plan.rows}
    assert rows["remove_background@1024x768"].capacity == 80.0 and rows["remove_background@2048x1536"].capacity == 20
    assert plan.gpu_time == pytest.approx(30 / 80 + 10 / 20)
    with pytest.raises(KeyError, match="several sizes"):
        c.plan(curves, 40, c.parse_mix("remove_background=1"), 1000)
    with pytest.raises(KeyError, match="--photo-size 4096x3072"):
        c.plan(curves, 40, c.parse_mix("remove_background@4096x3072=1"), 1000)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        c.parse_mix("remove_background@big=1")
    with pytest.raises(ValueError, match="another --bench"):
        c.load_curves([small, small])


def test_capacity_command_takes_several_bench_runs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgpipe.cli import app

    small = _bench_json(tmp_path / "small.json", [1024, 768], [20.0, 60.0, 80.0])
    large = _bench_json(tmp_path / "large.json", [2048, 1536], [5.0, 15.0, 20.0])
    args = ["capacity", "--rate", "40", "--bench", str(small), "--bench", str(large),
            "--mix", "remove_background@1024x768=3,remove_background@2048x1536=1"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "remove_background@2048x1536" in result.output and "2 pods" in result.output
    missing = CliRunner().invoke(app, [*args[:-1], "remove_background@640x480=1"], env={"COLUMNS": "200"})
    assert missing.exit_code != 0 and "not measured" in missing.output
