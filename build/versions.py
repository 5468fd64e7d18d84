"""Model versions: numbered folders, each with an ``imgpipe.json`` sidecar describing its artifact.

A build compares its cache key with the newest version's: unchanged, nothing is written; changed, a
new folder ``N+1`` is written. Which versions Triton serves is the config's ``version_policy``:
``latest { num_versions: K }`` normally, ``specific { versions: [V] }`` after ``imgpipe rollback``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.build.triton_config import parse, render_proto

METADATA = "imgpipe.json"


class VersionError(RuntimeError):
    """A versions or rollback request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Version:
    number: int
    path: Path
    metadata: dict[str, Any]


def versions(model_dir: Path) -> list[Version]:
    """Every numbered version folder of a model, oldest first."""
    if not model_dir.is_dir():
        return []
    found = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit():
            sidecar = child / METADATA
            meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            found.append(Version(int(child.name), child, meta))
    return sorted(found, key=lambda v: v.number)


def latest(model_dir: Path) -> Version | None:
    found = versions(model_dir)
    return found[-1] if found else None


def new_version_dir(model_dir: Path) -> Path:
    newest = latest(model_dir)
    path = model_dir / str(newest.number + 1 if newest else 1)
    path.mkdir(parents=True)
    return path


def write_metadata(version_dir: Path, metadata: dict[str, Any]) -> None:
    (version_dir / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def discard(version_dir: Path) -> None:
    shutil.rmtree(version_dir, ignore_errors=True)


def served(model_dir: Path) -> list[int]:
    """The versions the model's config tells Triton to serve."""
    numbers = [v.number for v in versions(model_dir)]
    config_path = model_dir / "config.pbtxt"
    if not numbers or not config_path.is_file():
        return []
    policy = parse(config_path.read_text()).version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        return sorted(v for v in policy.specific.versions if v in numbers)
    if which == "all":
        return numbers
    keep = policy.latest.num_versions if which == "latest" else 1
    return numbers[-max(keep, 1) :]


def pinned_policy(model_dir: Path) -> list[int]:
    """Versions pinned by a rollback (a ``specific`` policy), or [] when the latest are served."""
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        return []
    policy = parse(config_path.read_text()).version_policy
    return list(policy.specific.versions) if policy.WhichOneof("policy_choice") == "specific" else []


def rollback(model_dir: Path, to: int | None = None) -> int:
    """Serve the version before the one served now (or ``to``); returns the version now served."""
    numbers = [v.number for v in versions(model_dir)]
    if not numbers:
        raise VersionError(f"{model_dir.name}: no versions in {model_dir}")
    current = served(model_dir)
    if to is None:
        older = [n for n in numbers if current and n < min(current)]
        if not older:
            raise VersionError(f"{model_dir.name}: no version older than {min(current)} to roll back to")
        to = older[-1]
    if to not in numbers:
        raise VersionError(f"{model_dir.name}: no version {to} (have {', '.join(map(str, numbers))})")
    by_number = {v.number: v for v in versions(model_dir)}
    now_target = by_number[max(current)].metadata.get("target") if current else None
    then_target = by_number[to].metadata.get("target")
    if now_target and then_target and now_target != then_target:
        raise VersionError(
            f"{model_dir.name}: version {to} was built for the {then_target} target, the config serves"
            f" {now_target}: rebuild with --target {then_target} instead"
        )
    config_path = model_dir / "config.pbtxt"
    config = parse(config_path.read_text())
    config.version_policy.specific.versions[:] = [to]
    config_path.write_text(render_proto(config))
    return to
