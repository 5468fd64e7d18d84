"""imgpipe tune: trials on a server of its own, reloads between them, the winner written back to a copy
of the manifest with only the tuned keys changed (comments and layout kept)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgpipe.loadtest.tune import Tuner, applicable, assignments_for, current_values, write_back
from imgpipe.manifest import tomllib
from imgpipe.paths import DEFAULT_MANIFEST


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flatten(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def test_write_back_changes_only_the_tuned_keys_and_keeps_comments(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    shutil.copy(DEFAULT_MANIFEST, manifest)
    data = tomllib.loads(manifest.read_text())
    knobs = {"max_batch_size": 4, "encode_instances": 2, "queue": "bounded"}
    tuned = assignments_for(data, "remove_background", ["selfie_segmenter"], knobs, users=8)
    assert tuned["pipelines.remove_background.encode_instances"] == 2  # absent from the manifest: added
    assert current_values(data, tuned)["pipelines.remove_background.encode_instances"] is None
    before, after = write_back(manifest, tuned)
    assert before == manifest.read_text()  # nothing written by write_back itself
    old, new = _flatten(tomllib.loads(before)), _flatten(tomllib.loads(after))
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    assert changed == {k for k, v in tuned.items() if old.get(k) != v}
    assert new["networks.selfie_segmenter.batching.max_batch_size"] == 4
    assert new["networks.selfie_segmenter.batching.queue.max_queue_size"] == 32
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert comments == [line for line in after.splitlines() if line.lstrip().startswith("#")]
    assert len(after.splitlines()) - len(before.splitlines()) <= 1  # the added key: one line at most
    assert [k.name for k in applicable("detect_faces")] == [
        "max_batch_size", "max_queue_delay_us", "step_instances", "network_instances", "queue"
    ]  # fmt: skip


@pytest.mark.server
def test_tune_runs_trials_with_reloads_and_picks_within_the_budget(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    shutil.copy(DEFAULT_MANIFEST, manifest)
    tuner = Tuner(
        "remove_background", manifest, tmp_path / "tune", budget_ms=20_000, trials=3, users=4, trial_s=6,
        sizes="320x240",
    )  # fmt: skip
    best = tuner.run()
    for t in tuner.results:
        print(f"trial {t.number} {t.label}: {t.throughput:.2f}/s p99 {t.p99_ms} ms batch {t.batch} {t.error}")
    print(tuner.explanation())
    assert [t.label for t in tuner.results][:2] == ["unbatched", "manifest"] and len(tuner.results) == 3
    assert all(not t.error and t.throughput > 0 and t.within_budget for t in tuner.results)
    # The reloads took effect: unbatched, no model ran a batch of more than one; the manifest's dynamic
    # batching (4 users against max batch 16) did batch the segmenter or the encoder at least once.
    unbatched, as_is = tuner.results[0], tuner.results[1]
    assert all(size == 1.0 for size in unbatched.batch.values()), unbatched.batch
    assert max(as_is.batch.values()) > 1.0, as_is.batch
    assert best is not None and best in tuner.results and tuner.speedup() is not None
    assert (tmp_path / "tune" / "tune.json").is_file() and (tmp_path / "tune" / "tune.png").is_file()
    assert manifest.read_text() == DEFAULT_MANIFEST.read_text()  # tune itself never writes the manifest
