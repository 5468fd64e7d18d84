"""Where the project's files lie: the checkout when installed editable, else the working folder.

``IMGPIPE_ROOT`` overrides both (the serving image sets it).
"""

from __future__ import annotations

import os
from pathlib import Path


def _project_root() -> Path:
    if "IMGPIPE_ROOT" in os.environ:
        return Path(os.environ["IMGPIPE_ROOT"]).resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "model_repository").is_dir():
        return checkout
    return Path.cwd().resolve()


ROOT = _project_root()
DEFAULT_MANIFEST = ROOT / "manifest.toml"
DEFAULT_REPOSITORY = ROOT / "model_repository"
# Exported ONNX files keyed by content hash, so an unchanged network is never exported twice.
CACHE_DIR = Path(os.environ.get("IMGPIPE_CACHE", ROOT / ".cache")).resolve()
