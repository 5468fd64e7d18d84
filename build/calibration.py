"""Sample inputs of a network: INT8 calibration, the accuracy gate and ``sample`` warmup data.

Images (scikit-image sample names or files next to the manifest) go through the network's own
preprocessing, named in the manifest (``calibration.preprocessing``); ``random`` gives seeded
normal data in the input's shape, for networks whose inputs are not images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from imgpipe.dtypes import numpy_dtype
from imgpipe.ensembles import background
from imgpipe.imaging import decode_image
from imgpipe.manifest import Manifest, Network, TensorSpec
from imgpipe.samples import SAMPLES, sample_array

# name -> (RGB uint8 H×W×3, the input's spec) -> one preprocessed item (no batch dimension)
PREPROCESSING: dict[str, Callable[[np.ndarray, TensorSpec], np.ndarray]] = {
    name: (
        lambda rgb, spec, name=name: background.preprocess(
            torch.from_numpy(rgb), background.input_size(name, spec.static_shape), name
        ).numpy()
    )
    for name in background.PREPROCESSING
}


def _nhwc(rgb: np.ndarray, spec: TensorSpec, low: float) -> np.ndarray:
    """RGB stretched to an NHWC input (bilinear, antialiased), scaled to [low, 1]."""
    unit = background.preprocess(torch.from_numpy(rgb), tuple(spec.static_shape[:2]), "selfie")
    return (unit * (1.0 - low) + low).numpy()


# MediaPipe's face networks: BlazeFace takes [-1, 1] (signed), the face mesh [0, 1] (unit), both NHWC.
PREPROCESSING["unit"] = lambda rgb, spec: _nhwc(rgb, spec, 0.0)
PREPROCESSING["signed"] = lambda rgb, spec: _nhwc(rgb, spec, -1.0)


def _ddcolor(rgb: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """DDColor's input: the photo's "grey RGB" (its L with a = b = 0) at the network's side."""
    from imgpipe.ensembles.colorize import network_input

    return network_input(torch.from_numpy(np.array(rgb)), spec.static_shape[-1]).numpy()


def _unit_chw(rgb: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """RGB /255 stretched to the input's C×H×W (bilinear, antialiased): e.g. Deep3DFaceRecon's regressor,
    calibrated on whole photos of faces, a proxy for its aligned 224² face crops."""
    unit = background.preprocess(torch.from_numpy(np.array(rgb)), tuple(spec.static_shape[1:]), "selfie")
    return unit.permute(2, 0, 1).contiguous().numpy()


PREPROCESSING["ddcolor"] = _ddcolor
PREPROCESSING["unit_chw"] = _unit_chw


def load_rgb(manifest: Manifest, name: str) -> np.ndarray:
    if name in SAMPLES:
        array = sample_array(name)
        return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    return decode_image(manifest.resolve(name).read_bytes())


def sample_batches(manifest: Manifest, net: Network, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batches (``calibration.batch_size`` items each) of every input of ``net``, as numpy arrays."""
    cal = net.calibration
    count = len(cal.images) if limit is None else min(limit, len(cal.images))
    if cal.preprocessing == "random":
        rng = np.random.default_rng(0)
        items = [
            {s.name: rng.standard_normal(s.static_shape).astype(numpy_dtype(s.dtype)) for s in net.inputs}
            for _ in range(max(count, 1))
        ]
    else:
        if cal.preprocessing not in PREPROCESSING:
            raise ValueError(
                f"networks.{net.name}.calibration.preprocessing: unknown {cal.preprocessing!r}"
                f" (have: random, {', '.join(PREPROCESSING)})"
            )
        if len(net.inputs) != 1:
            raise ValueError(f"networks.{net.name}: image preprocessing feeds networks with one input")
        spec = net.input()
        fn = PREPROCESSING[cal.preprocessing]
        items = [{spec.name: fn(load_rgb(manifest, name), spec)} for name in cal.images[:count]]
    size = max(1, min(cal.batch_size, net.batching.max_batch_size))
    return [
        {name: np.stack([item[name] for item in items[i : i + size]]) for name in items[0]}
        for i in range(0, len(items), size)
    ]
