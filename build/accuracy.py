"""Accuracy gate: does the built artifact still compute what the FP32 ONNX computes?

The network's sample inputs (its own preprocessing, :mod:`imgpipe.build.calibration`) run through the
FP32 ONNX with ONNX Runtime (the reference) and through the built artifact; every output gets its max
and mean absolute error, image outputs (rank ≥ 3 without the batch) their PSNR, and each is held to the
network's ``tolerance`` in the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.build.calibration import sample_batches
from imgpipe.manifest import Manifest, Network, Tolerance

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class OutputError:
    network: str
    output: str
    max_abs: float
    mean_abs: float
    psnr: float | None  # dB; None for outputs that are not images
    failures: tuple[str, ...]  # which tolerances were exceeded, in words

    @property
    def passed(self) -> bool:
        return not self.failures


class AccuracyError(RuntimeError):
    def __init__(self, errors: list[OutputError]) -> None:
        failed = [e for e in errors if not e.passed]
        super().__init__(
            "; ".join(f"{e.network}.{e.output}: {', '.join(e.failures)}" for e in failed) or "accuracy gate failed"
        )
        self.errors = errors


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Peak signal-to-noise ratio, the peak being the reference's value range."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def compare(net: Network, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> list[OutputError]:
    tol: Tolerance = net.tolerance
    errors = []
    for spec in net.outputs:
        ref = reference[spec.name].astype(np.float64)
        got = candidate[spec.name].astype(np.float64)
        if ref.shape != got.shape:
            errors.append(
                OutputError(net.name, spec.name, math.inf, math.inf, None, (f"shape {got.shape} != {ref.shape}",))
            )
            continue
        diff = np.abs(ref - got)
        max_abs, mean_abs = float(diff.max()), float(diff.mean())
        image_psnr = psnr(ref, got) if len(spec.shape) >= 3 else None
        failures = []
        if max_abs > tol.max_abs:
            failures.append(f"max abs error {max_abs:.3g} > {tol.max_abs:.3g}")
        if mean_abs > tol.mean_abs:
            failures.append(f"mean abs error {mean_abs:.3g} > {tol.mean_abs:.3g}")
        if image_psnr is not None and tol.min_psnr and image_psnr < tol.min_psnr:
            failures.append(f"PSNR {image_psnr:.1f} dB < {tol.min_psnr:.1f} dB")
        errors.append(OutputError(net.name, spec.name, max_abs, mean_abs, image_psnr, tuple(failures)))
    return errors


def onnx_runner(path: Path) -> Runner:
    """ONNX Runtime on CPU over one batch, with the same runner the ``python`` target serves with."""
    from imgpipe.ensembles.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(str(path)).run_numpy


def gate(
    manifest: Manifest, net: Network, reference_onnx: Path, candidate: Runner, samples: int = 2
) -> list[OutputError]:
    """Run reference and candidate on ``samples`` sample items and compare every output."""
    batches = sample_batches(manifest, net, limit=samples)
    reference = onnx_runner(reference_onnx)
    ref_out: dict[str, list[np.ndarray]] = {}
    got_out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, value in reference(batch).items():
            ref_out.setdefault(name, []).append(value)
        for name, value in candidate(batch).items():
            got_out.setdefault(name, []).append(value)
    missing = [s.name for s in net.outputs if s.name not in got_out]
    if missing:
        raise AccuracyError(
            [OutputError(net.name, m, math.inf, math.inf, None, ("missing from the artifact",)) for m in missing]
        )
    return compare(
        net,
        {k: np.concatenate(v) for k, v in ref_out.items()},
        {k: np.concatenate(v) for k, v in got_out.items()},
    )
