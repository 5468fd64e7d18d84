"""`imgpipe bench` end to end on this machine (CPU here; the same command used the GPU on the H200): tiny
durations and networks, so the figures mean nothing; what is checked is that every part is measured,
the ratios are computed from the parts, and the JSON and plots are written. The variant rules are checked
without a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.bench import (
    PIPELINES,
    BenchOptions,
    needed,
    pyramid_networks,
    remove_background_mode,
    variant_manifest,
)
from imgpipe.manifest import tomllib
from imgpipe.paths import DEFAULT_MANIFEST
from imgpipe.pipelines.registry import registry
from imgpipe.pipelines.remove_background import FORMATS


def bench(out: Path, *arguments: str) -> tuple[str, dict]:
    """Run the tiny bench (width 4, concurrency 1 and 2, 1 s per level) with ``arguments``; its stdout and JSON."""
    command = [
        sys.executable, "-m", "imgpipe.cli", "bench", "--width", "4", "--concurrency", "1,2", "--duration", "1",
        "--warmup", "0.3", "--model-seconds", "0.2", "--step-instances", "1", "-o", str(out), *arguments,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((out / "bench.json").read_text())


def check_summary(result: dict, out: Path, pipelines: tuple[str, ...], variants: tuple[str, ...]) -> None:
    """Every pipeline swept without errors in every variant; its ratios computed from its parts; its plot."""
    assert set(result["served"]) == set(variants)
    for pipeline in pipelines:
        for variant in variants:
            points = result["served"][variant][pipeline]
            assert points and all(p["errors"] == 0 for p in points)
            assert points[-1]["stopped"]
            assert "error" not in result["responses"][variant][pipeline]
        entry = result["summary"][pipeline]
        fp16, naive = entry["peak"]["fp16"]["throughput"], entry["peak"]["naive"]["throughput"]
        assert entry["served_over_naive"] == pytest.approx(fp16 / naive)
        assert entry["served_over_model_only"] == pytest.approx(fp16 / entry["model_only_per_s"])
        assert entry["model_only_per_s"] == pytest.approx(1e3 / sum(entry["model_only_ms"].values()))
        peak = entry["peak"]["fp16"]
        assert entry["p99_over_p50_at_peak"] == pytest.approx(peak["p99_ms"] / peak["p50_ms"])
        assert Image.open(out / f"bench_{pipeline}.png").size[0] > 800


def test_bench_covers_every_builtin_pipeline_with_the_same_variant_rules(tmp_path: Path) -> None:
    builtin = {name for name, p in registry().items() if type(p).__module__.startswith("imgpipe.pipelines.")}
    assert set(PIPELINES) == builtin
    assert needed(("reconstruct_face",)) == {"reconstruct_face", "detect_faces"}
    assert needed(("colorize",)) == {"colorize"}
    base = tomllib.loads(DEFAULT_MANIFEST.read_text())
    options = BenchOptions(pipelines=("colorize", "reconstruct_face"), width=64, step_instances=3)
    tuned = variant_manifest(base, "fp16", options, False, tmp_path / "fp16.toml")
    naive = variant_manifest(base, "naive", options, False, tmp_path / "naive.toml")
    assert set(tuned.pipelines) == {"colorize", "reconstruct_face", "detect_faces"}
    for name in ("colorizer", "colorizer_256", "face_regressor"):  # the reference networks at full width
        assert tuned.network(name).source.width == naive.network(name).source.width == 64
    assert tuned.network("face_mesh").source.kind == "tflite"  # imported networks keep theirs
    assert pyramid_networks(tuned) == {"pnet"}
    for name, settings in tuned.pipelines.items():
        assert (settings.instances.count, settings.instances.kind) == (3, "auto"), name
        assert (naive.pipelines[name].instances.count, naive.pipelines[name].instances.kind) == (1, "cpu"), name
    assert tuned.pipelines["colorize"].max_batch_size > 1 and naive.pipelines["colorize"].max_batch_size == 1
    # without --step-instances: twice the instances for the unbatched BLS models (one request per execute)
    default = variant_manifest(base, "fp16", BenchOptions(pipelines=("colorize", "reconstruct_face")), False,
                               tmp_path / "default.toml")  # fmt: skip
    cores = os.cpu_count() or 4
    counts = {name: settings.instances.count for name, settings in default.pipelines.items()}
    assert counts == {"colorize": max(1, cores // 4), "reconstruct_face": max(1, cores // 2),
                      "detect_faces": max(1, cores // 2)}  # fmt: skip
    for net in naive.networks.values():
        assert (net.batching.max_batch_size, net.instances.count, net.torch.cuda_graphs) == (1, 1, False), net.name
    # remove_background's FORMAT: PNG unless asked (the RGBA cut-out the published figures measured), one of the
    # contract's choices; JPEG (no alpha) is sent as a composite
    assert BenchOptions().remove_background_format == "png"
    assert {fmt: remove_background_mode(fmt) for fmt in FORMATS} == {"png": "rgba", "webp": "rgba", "jpeg": "composite"}
    with pytest.raises(ValueError, match="remove_background_format"):
        BenchOptions(remove_background_format="gif")


@pytest.mark.server
def test_bench_measures_served_naive_and_model_only_and_writes_json_and_plots(tmp_path: Path) -> None:
    """One run for four pipelines and the FORMAT option: on 2 cores each variant's server start (a dozen
    Python-backend stubs) costs more than the sweeps, so colorize, reconstruct_face (BLS models: their networks
    counted from Triton's statistics and timed alone, the TFLite-imported face mesh too) and WebP cut-outs
    share the run of remove_background and detect_faces."""
    out = tmp_path / "bench"
    pipelines = ("remove_background", "detect_faces", "colorize", "reconstruct_face")
    stdout, result = bench(
        out, "--pipelines", ",".join(pipelines), "--variants", "fp16,naive", "--remove-background-format", "webp"
    )
    assert "where the time goes" in stdout and "served/naive" in stdout
    check_summary(result, out, pipelines, ("fp16", "naive"))
    for pipeline in pipelines:
        assert pipeline in stdout.split("imgpipe bench on")[-1]  # a row of the printed summary
    assert result["per_request"]["remove_background"] == {"segmenter": 1.0}
    assert result["input_sizes"] == {"remove_background": [1024, 768], "colorize": [1024, 768],
                                     "detect_faces": [512, 512], "reconstruct_face": [512, 512]}  # fmt: skip
    assert set(result["per_request"]["detect_faces"]) == {"pnet", "rnet", "onet"}
    assert result["per_request"]["colorize"] == {"colorizer": 1.0}  # SIZE 512: never colorizer_256
    assert result["per_request"]["reconstruct_face"]["face_mesh"] == 1.0  # one face: one mesh, method mesh
    assert set(result["per_request"]["reconstruct_face"]) == {"pnet", "rnet", "onet", "face_mesh"}
    assert result["model_only"]["segmenter"]["items_per_s"] > 0 and result["model_only"]["pnet"]["levels"] > 1
    assert result["model_only"]["colorizer"]["items_per_s"] > 0 and result["model_only"]["face_mesh"]["items_per_s"] > 0
    assert "remove_background" in result["times"]["fp16"]["remove_background"]
    assert {"colorize", "colorizer"} <= set(result["times"]["fp16"]["colorize"])
    assert {"reconstruct_face", "face_mesh"} <= set(result["times"]["fp16"]["reconstruct_face"])
    # --remove-background-format webp: recorded, and what every variant's responses were (read from their bytes)
    assert result["options"]["remove_background_format"] == "webp"
    assert result["options"]["remove_background_mode"] == "rgba"
    for variant in ("fp16", "naive"):
        responses = result["responses"][variant]
        cut_out, colour = responses["remove_background"], responses["colorize"]
        assert (cut_out["format"], cut_out["size"], cut_out["mode"]) == ("WEBP", [1024, 768], "RGBA")
        assert (colour["format"], colour["size"], colour["mode"]) == ("PNG", [1024, 768], "RGB")  # grey in, RGB out
        assert (responses["reconstruct_face"]["format"], responses["reconstruct_face"]["faces"]) == ("glb", 1)
        assert responses["detect_faces"] == {"faces": 1}
    assert "WEBP 1024×768 RGBA" in stdout


def test_an_ok_answer_without_the_face_counts_as_an_error() -> None:
    """Guards the bench's throughput against answers that are OK but wrong (seen on the H100 under load)."""
    from imgpipe.bench import WrongAnswerError, check_answer
    from imgpipe.clients.faces import SwapResult

    check_answer("detect_faces", [object()])
    with pytest.raises(WrongAnswerError, match="no face"):
        check_answer("detect_faces", [])
    with pytest.raises(WrongAnswerError, match="swapped no face"):
        check_answer("swap_face", SwapResult(image=b"", swapped=0))
    check_answer("swap_face", SwapResult(image=b"", swapped=1))
    check_answer("colorize", b"")  # nothing to check: any image is an answer


def test_bench_refuses_a_photo_size_that_is_not_width_x_height(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgpipe.bench import Inputs, input_size
    from imgpipe.cli import app

    done = CliRunner().invoke(app, ["bench", "--photo-size", "big", "-o", str(tmp_path)], env={"COLUMNS": "200"})
    assert done.exit_code != 0 and "--photo-size" in done.output and "WIDTHxHEIGHT" in done.output
    faces = Inputs([], [], b"", b"", np.zeros((512, 384, 3), np.uint8))
    assert input_size("colorize", faces, (2048, 1536)) == [2048, 1536]
    assert input_size("swap_face", faces, (2048, 1536)) == [384, 512]
