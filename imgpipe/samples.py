"""Sample images for the demo and the tests: real photos shipped inside scikit-image's wheel (DESIGN §7),
and Grace Hopper's portrait (U.S. Navy photo, public domain) from matplotlib's wheel — a second real face."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (scikit-image loader or matplotlib:<sample file>, encoded format)
SAMPLES: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut", "JPEG"),
    "coffee": ("coffee", "PNG"),
    "chelsea": ("chelsea", "WEBP"),
    "camera": ("camera", "PNG"),  # greyscale
    "hopper": ("matplotlib:grace_hopper.jpg", "JPEG"),
}
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


def sample_array(name: str) -> np.ndarray:
    loader = SAMPLES[name][0]
    if loader.startswith("matplotlib:"):
        from matplotlib import cbook

        path = cbook.get_sample_data(loader.removeprefix("matplotlib:"), asfileobj=False)
        return np.asarray(Image.open(path).convert("RGB"))
    from skimage import data

    return getattr(data, loader)()


def encode(array: np.ndarray, fmt: str = "PNG", exif_orientation: int | None = None) -> bytes:
    """Encode an array; ``exif_orientation`` stores the EXIF Orientation tag (JPEG only)."""
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}), **kwargs)
    return buffer.getvalue()


def write_samples(folder: Path) -> list[Path]:
    """Write every sample image into ``folder`` in its format and return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (_loader, fmt) in SAMPLES.items():
        path = folder / f"{name}{_SUFFIX[fmt]}"
        path.write_bytes(encode(sample_array(name), fmt))
        paths.append(path)
    return paths
