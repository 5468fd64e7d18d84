"""Reduced-precision ONNX artifacts for the ``python`` and ``onnxruntime`` targets.

``fp16``: weights and activations in float16 with float32 inputs/outputs (onnxruntime's own
converter). ``int8``: static QDQ quantization (per-channel weights) calibrated on the network's sample
inputs through its own preprocessing. Both run on ONNX Runtime's CPU provider, so the accuracy gate
measures a real error here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from imgpipe.build.calibration import sample_batches
from imgpipe.manifest import Manifest, Network


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """The float16 converter can insert the same Cast twice (same input, same output name; seen on the
    swapper graph), which ONNX Runtime refuses as a duplicate definition. Identical nodes compute the
    same value, so all but the first are dropped."""
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def convert(source: Path, target: Path, precision: str, manifest: Manifest, net: Network) -> None:
    if precision == "fp32":
        shutil.copyfile(source, target)
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        _drop_duplicate_nodes(model)
        onnx.save(model, str(target))
    elif precision == "int8":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches: Iterator[dict[str, np.ndarray]] = iter(
                    {k: v[i : i + 1] for k, v in batch.items()}
                    for batch in sample_batches(manifest, net)
                    for i in range(len(next(iter(batch.values()))))
                )

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
    else:
        raise ValueError(f"unknown precision {precision!r}: expected fp32, fp16 or int8")
