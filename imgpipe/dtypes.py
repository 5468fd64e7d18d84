"""The one table of tensor types: Triton's names and their numpy, torch, ONNX and config equivalents.

Everything that converts a type (manifest validation, ONNX checks, config rendering, clients, steps,
calibration data) reads it from here. torch and onnx are resolved lazily, so clients need neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DType:
    triton: str  # Triton's name without the TYPE_ prefix, as manifests and clients write it
    numpy: str
    torch: str | None  # None: no torch equivalent (BYTES)
    onnx: str  # onnx.TensorProto enum name

    @property
    def config(self) -> str:
        """The ``model_config.proto`` enum name (Triton calls BYTES ``TYPE_STRING`` in configs)."""
        return "TYPE_STRING" if self.triton == "BYTES" else f"TYPE_{self.triton}"


DTYPES: dict[str, DType] = {
    d.triton: d
    for d in (
        DType("BOOL", "bool", "bool", "BOOL"),
        DType("UINT8", "uint8", "uint8", "UINT8"),
        DType("INT8", "int8", "int8", "INT8"),
        DType("INT32", "int32", "int32", "INT32"),
        DType("INT64", "int64", "int64", "INT64"),
        DType("FP16", "float16", "float16", "FLOAT16"),
        DType("FP32", "float32", "float32", "FLOAT"),
        DType("BYTES", "object", None, "STRING"),
    )
}
_BY_NUMPY = {d.numpy: d for d in DTYPES.values()}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor type {name!r}: expected one of {', '.join(DTYPES)}") from None


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(dtype(name).numpy)


def torch_dtype(name: str) -> Any:
    import torch

    spec = dtype(name)
    if spec.torch is None:
        raise ValueError(f"{name} tensors have no torch equivalent")
    return getattr(torch, spec.torch)


def onnx_type(name: str) -> int:
    import onnx

    return int(getattr(onnx.TensorProto, dtype(name).onnx))


def from_onnx(elem_type: int) -> str:
    """The Triton type name of an ONNX ``TensorProto`` element type (e.g. a Cast node's ``to``)."""
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type)
    for spec in DTYPES.values():
        if spec.onnx == name:
            return spec.triton
    raise ValueError(f"ONNX element type {name} has no Triton equivalent")


def triton_name(array_dtype: np.dtype | str) -> str:
    """The Triton type name of a numpy dtype (``object`` and byte strings are BYTES)."""
    kind = np.dtype(array_dtype)
    if kind.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _BY_NUMPY[kind.name].triton
    except KeyError:
        raise ValueError(f"numpy dtype {kind.name} has no Triton equivalent") from None
