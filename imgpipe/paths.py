"""Where the project's files lie.

``ROOT`` is ``IMGPIPE_ROOT`` when set, else the source tree when imgpipe is installed editable from
one, else the working folder: a non-editable install (``pip install .``) builds and serves from
wherever it is run. The default manifest is ``ROOT/manifest.toml`` when that file exists, else the
copy shipped inside the package (``imgpipe init`` writes it out for editing).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_MANIFEST = PACKAGE_DIR / "manifest.toml"


def _project_root() -> Path:
    if "IMGPIPE_ROOT" in os.environ:
        return Path(os.environ["IMGPIPE_ROOT"]).resolve()
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "ensembles").is_dir():
        return checkout
    return Path.cwd().resolve()


ROOT = _project_root()
DEFAULT_MANIFEST = ROOT / "manifest.toml" if (ROOT / "manifest.toml").is_file() else PACKAGED_MANIFEST
DEFAULT_REPOSITORY = ROOT / "model_repository"
# Exported ONNX files keyed by content hash, so an unchanged network is never exported twice.
CACHE_DIR = Path(os.environ.get("IMGPIPE_CACHE", ROOT / ".cache")).resolve()
