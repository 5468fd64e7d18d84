"""The capacity plan: pods for a rate and a mix from measured curves, and the HPA simulation."""

from __future__ import annotations

import itertools
import math

import pytest

from imgpipe import capacity as c


def _curves() -> c.Curves:
    return c.Curves(
        {
            "a": c.Curve("a", (c.Point(1, 10, 100), c.Point(4, 30, 400), c.Point(8, 40, 1200))),
            "b": c.Curve("b", (c.Point(1, 5, 300), c.Point(4, 10, 800))),
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
