"""`imgpipe bench` end to end on this machine (CPU here; the same command used the GPU on the H200): tiny
durations and networks, so the figures mean nothing; what is checked is that every part is measured,
the ratios are computed from the parts, and the JSON and plots are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.server


def test_bench_measures_served_naive_and_model_only_and_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "imgpipe.cli", "bench", "--pipelines", "remove_background,detect_faces",
        "--variants", "fp16,naive", "--width", "4", "--concurrency", "1,2", "--duration", "1", "--warmup", "0.3",
        "--model-seconds", "0.2", "--step-instances", "1", "-o", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "where the time goes" in done.stdout and "served/naive" in done.stdout
    result = json.loads((out / "bench.json").read_text())
    assert set(result["served"]) == {"fp16", "naive"}
    for pipeline in ("remove_background", "detect_faces"):
        for variant in ("fp16", "naive"):
            points = result["served"][variant][pipeline]
            assert points and all(p["errors"] == 0 for p in points)
            assert points[-1]["stopped"]
        entry = result["summary"][pipeline]
        fp16, naive = entry["peak"]["fp16"]["throughput"], entry["peak"]["naive"]["throughput"]
        assert entry["served_over_naive"] == pytest.approx(fp16 / naive)
        assert entry["served_over_model_only"] == pytest.approx(fp16 / entry["model_only_per_s"])
        assert Image.open(out / f"bench_{pipeline}.png").size[0] > 800
    assert result["per_request"]["remove_background"] == {"segmenter": 1.0}
    assert set(result["per_request"]["detect_faces"]) == {"pnet", "rnet", "onet"}
    assert result["model_only"]["segmenter"]["items_per_s"] > 0 and result["model_only"]["pnet"]["levels"] > 1
    assert "remove_background" in result["times"]["fp16"]["remove_background"]
