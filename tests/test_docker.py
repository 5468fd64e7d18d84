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
    (wanted,) = re.findall(r'pip install "\.\[([^\]]+)\]"', text)
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
    assert '"--model-repository=/opt/imgpipe/model_repository"' in text
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", text, flags=re.M)
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in text  # Triton 2.51, the local server's version
