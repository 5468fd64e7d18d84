"""A cross-check of the load tests with NVIDIA ``perf_analyzer``.

``tritonclient`` 2.51.0's manylinux wheel ships ``perf_analyzer`` next to the interpreter
(``.venv/bin/perf_analyzer``), linked against two libraries the wheel does not carry: ``libb64.so.0d``
(Debian's ``libb64-0d``, which ``make install`` extracts under ``.venv/opt/debian`` without installing
it system-wide) and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel; loaded at start-up,
no GPU needed). :func:`environment` points ``LD_LIBRARY_PATH`` at both.

:func:`input_data` writes a pipeline's request as perf_analyzer's ``--input-data`` JSON, and :func:`run`
measures one pipeline at one concurrency and returns perf_analyzer's own figures (its CSV report).

BYTES inputs in that JSON: perf_analyzer copies a ``{"b64": ...}`` value's decoded bytes into the
request *as the serialized tensor*, so for a BYTES tensor they must already hold Triton's string
serialization — each element a 4-byte little-endian length followed by its bytes. A JPEG sent without
that prefix reaches the server as a string of length 0xE0FFD8FF (the JPEG's first four bytes), and every
request fails ("incomplete string data for inference input 'IMAGE'"). Short text options (``FORMAT``,
``MODE``) travel as a JSON array of strings, which perf_analyzer serializes itself.

perf_analyzer asks for every output of the model, optional ones included, so ``detect_faces`` computes its
face mesh (MESH) and ``reconstruct_face`` its preview for every request: heavier than a client that asks
for the default outputs only.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

LIBB64 = "libb64.so.0d"
LIBCUDART = "libcudart.so.12"
# Where `make install` extracts Debian's libb64-0d (dpkg -x), inside the environment.
DEBIAN_ROOT = Path(sys.prefix) / "opt" / "debian"
INSTALL_HINT = "run `make install` (it installs nvidia-cuda-runtime-cu12 and extracts Debian's libb64-0d into .venv)"

Protocol = Literal["grpc", "http"]


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not start, failed, or reported nothing; the message ends with its output's tail."""


@dataclass(frozen=True)
class PerfResult:
    """perf_analyzer's figures for one pipeline at one concurrency (its CSV report, latencies in ms)."""

    pipeline: str
    protocol: str
    concurrency: int
    throughput: float  # inferences per second (requests per second: one image per request)
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float | None  # the client's average latency, from perf_analyzer's summary
    request_count: int | None  # requests perf_analyzer counted in its measurement
    csv_path: Path
    log_path: Path
    command: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "throughput": self.throughput,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "avg_ms": self.avg_ms,
            "request_count": self.request_count,
            "csv_path": str(self.csv_path),
            "log_path": str(self.log_path),
            "command": list(self.command),
        }


# -- finding the binary and its libraries ----------------------------------------------------------


def binary() -> Path | None:
    """The ``perf_analyzer`` executable: the one tritonclient installed beside this interpreter, else
    one on ``PATH``; None when there is neither."""
    candidates = [Path(sysconfig.get_path("scripts")) / "perf_analyzer", Path(sys.executable).parent / "perf_analyzer"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


def libb64_dir() -> Path | None:
    """The folder holding the extracted ``libb64.so.0d`` (``.venv/opt/debian/usr/lib/<triplet>``)."""
    for pattern in (f"usr/lib/*/{LIBB64}", f"usr/lib/{LIBB64}", f"lib/*/{LIBB64}"):
        for path in sorted(DEBIAN_ROOT.glob(pattern)):
            return path.parent
    return None


def cudart_dir() -> Path | None:
    """The folder of ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` wheel (``nvidia/cuda_runtime/lib``)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        preferred = Path(root) / "cuda_runtime" / "lib" / LIBCUDART
        if preferred.is_file():
            return preferred.parent
        for path in sorted(Path(root).glob(f"*/lib/{LIBCUDART}")):
            return path.parent
    return None


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``LD_LIBRARY_PATH`` led by the extracted
    libb64 folder and the CUDA runtime wheel's lib folder."""
    env = dict(os.environ if base is None else base)
    folders = [str(d) for d in (libb64_dir(), cudart_dir()) if d is not None]
    current = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in folders]
    if folders or current:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(folders + current)
    return env


def unavailable_reason() -> str | None:
    """None when perf_analyzer starts here; else one sentence saying why it does not, and what to do."""
    path = binary()
    if path is None:
        return f"perf_analyzer is not installed (tritonclient's manylinux wheel ships it): {INSTALL_HINT}"
    env = environment()
    try:
        done = subprocess.run([str(path), "--version"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} does not start: {exc}"
    output = (done.stdout + done.stderr).strip()
    if done.returncode == 0 and "Perf Analyzer" in output:
        return None
    missing = _missing_libraries(path, env)
    if missing:
        return f"{path} cannot load {', '.join(missing)}: {INSTALL_HINT}"
    return f"{path} --version exited with {done.returncode}: {_tail(output, 400)}"


def _missing_libraries(path: Path, env: Mapping[str, str]) -> list[str]:
    try:
        done = subprocess.run(["ldd", str(path)], env=dict(env), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^\s*(\S+)\s*=>\s*not found", done.stdout, flags=re.MULTILINE)


# -- the request: perf_analyzer's --input-data JSON --------------------------------------------------


def _contract(pipeline: str) -> Any:
    from imgpipe.pipelines.registry import registry

    pipelines = registry()
    if pipeline not in pipelines:
        raise ValueError(f"unknown pipeline {pipeline!r}: expected one of {', '.join(sorted(pipelines))}")
    return pipelines[pipeline].contract


def serialize_bytes(*elements: bytes) -> bytes:
    """Triton's serialization of a BYTES tensor: per element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def input_data(pipeline: str, images: Sequence[bytes], options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """perf_analyzer's ``--input-data`` JSON for ``pipeline``: one ``data`` entry per image (perf_analyzer
    sends them round-robin). Every required input is an encoded image, sent as ``{"b64": ...}`` of its
    serialized BYTES tensor (length prefix included). A pipeline with several image inputs (``swap_face``:
    SOURCE, TARGET) takes, in entry ``i``, image ``i`` for its first input and image ``i + 1`` (cyclic) for
    the next: ``[a, b]`` swaps a into b and b into a. ``options`` sets optional text inputs (``FORMAT``,
    ``MODE``, ``SIZE``…), checked against the contract's choices, the same value in every entry."""
    contract = _contract(pipeline)
    images = list(images)
    if not images:
        raise ValueError("input_data needs at least one image")
    for i, image in enumerate(images):
        if not isinstance(image, bytes | bytearray) or not image:
            raise ValueError(f"image {i} is not a non-empty bytes object")
    required = [i for i in contract.inputs if not i.optional]
    for io in required:
        if io.dtype != "BYTES" or tuple(io.dims) != (1,):
            raise ValueError(
                f"{pipeline}: required input {io.name} is {io.dtype} {list(io.dims)}; only encoded images (BYTES [1]) "
                "are supported"
            )
    fixed: dict[str, list[str]] = {}
    for name, value in (options or {}).items():
        io = next((i for i in contract.inputs if i.name == name), None)
        if io is None or not io.optional or io.dtype != "BYTES":
            choices = ", ".join(i.name for i in contract.inputs if i.optional and i.dtype == "BYTES") or "none"
            raise ValueError(f"{pipeline}: {name!r} is not an optional text input (expected one of: {choices})")
        fixed[name] = [io.choose(value) if io.choices else str(value)]
    data = []
    for i in range(len(images)):
        entry: dict[str, Any] = {}
        for k, io in enumerate(required):
            image = bytes(images[(i + k) % len(images)])
            entry[io.name] = {"b64": base64.b64encode(serialize_bytes(image)).decode("ascii")}
        entry |= {name: list(value) for name, value in fixed.items()}
        data.append(entry)
    return {"data": data}


# -- running it ------------------------------------------------------------------------------------


def _tail(text: str, limit: int = 2000) -> str:
    """The end of perf_analyzer's output; a command-line error keeps only its line, not the usage text after it."""
    text = text.split("\nUsage: ", 1)[0].strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _host_port(url: str) -> str:
    """perf_analyzer's ``-u`` takes host:port (no scheme)."""
    return re.sub(r"^[a-z]+://", "", url.strip()).rstrip("/")


def _parameter_flags(contract: Any, parameters: Mapping[str, Any] | None) -> list[str]:
    flags = []
    for name, value in (parameters or {}).items():
        param = next((p for p in contract.parameters if p.name == name), None)
        if param is None:
            known = ", ".join(p.name for p in contract.parameters) or "none"
            raise ValueError(f"{contract.model}: unknown request parameter {name!r} (expected one of: {known})")
        typed = param.parse(value)
        kind = "int" if isinstance(typed, int) else "double" if isinstance(typed, float) else "string"
        flags += ["--request-parameter", f"{name}:{typed}:{kind}"]
    return flags


def parse_csv(path: Path) -> dict[str, float]:
    """The one measured row of perf_analyzer's ``-f`` report (latencies in microseconds, as written)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer wrote no measurement row to {path}")
    row = rows[-1]
    needed = ("Concurrency", "Inferences/Second", "p50 latency", "p90 latency", "p95 latency", "p99 latency")
    missing = [c for c in needed if c not in row]
    if missing:
        raise PerfAnalyzerError(f"{path}: no column {', '.join(missing)} in {', '.join(row)}")
    return {k: float(v) for k, v in row.items() if k and v not in (None, "")}


def _summary_number(stdout: str, label: str) -> float | None:
    match = re.search(rf"^\s*{re.escape(label)}:\s*([0-9.]+)", stdout, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


def run(
    pipeline: str,
    url: str,
    protocol: Protocol,
    concurrency: int,
    images: Sequence[bytes],
    out_dir: Path,
    measurement_ms: int = 5000,
    request_count: int | None = None,
    *,
    max_trials: int = 5,
    stability_percent: float = 10.0,
    options: Mapping[str, str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
) -> PerfResult:
    """Measure ``pipeline``'s public model at ``concurrency`` concurrent requests with perf_analyzer.

    Bounded either way. Without ``request_count`` (the mode for throughput): time windows of
    ``measurement_ms`` until the last three agree within ``stability_percent`` (throughput and average
    latency, max/min) or ``max_trials`` windows have passed, when perf_analyzer fails ("Failed to obtain
    stable measurement"); the first window after an idle server is often slow, hence more trials than three.
    With ``request_count``: that many requests, measured once, no stability search — but perf_analyzer
    polls for the count once a second, so the window (and the throughput's denominator) is rounded up to
    whole seconds: trust its latencies, not its throughput, for short runs.

    ``options`` set optional text inputs (see :func:`input_data`); ``parameters`` are request parameters
    (gRPC only). perf_analyzer requests every output, optional ones included (detect_faces' MESH,
    reconstruct_face's PREVIEW are computed). The subprocess is killed after ``timeout_s`` (default:
    generous for the bound chosen). Writes the input JSON, the CSV report and perf_analyzer's output
    under ``out_dir``; raises :class:`PerfAnalyzerError` naming perf_analyzer's stderr tail when it fails."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if parameters and protocol != "grpc":
        raise ValueError("perf_analyzer sends request parameters (--request-parameter) over gRPC only")
    if request_count is not None and request_count < 1:
        raise ValueError(f"request_count must be >= 1, got {request_count}")
    if measurement_ms < 100 or max_trials < 1:
        raise ValueError("measurement_ms must be >= 100 and max_trials >= 1")
    reason = unavailable_reason()
    if reason is not None:
        raise PerfAnalyzerError(reason)
    contract = _contract(pipeline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{pipeline}_{protocol}_c{concurrency}"
    data_path = out_dir / f"{stem}.input.json"
    csv_path = out_dir / f"{stem}.csv"
    log_path = out_dir / f"{stem}.log"
    data_path.write_text(json.dumps(input_data(pipeline, images, options)))
    csv_path.unlink(missing_ok=True)

    command = [
        str(binary()),
        "-m", contract.model,
        "-u", _host_port(url),
        "-i", protocol,
        # One image per request; a batched model (max_batch_size > 0) gets the batch dimension, [1, 1].
        "-b", "1",
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--input-data", str(data_path),
        "-f", str(csv_path),
        *_parameter_flags(contract, parameters),
    ]  # fmt: skip
    if request_count is not None:
        command += ["--request-count", str(request_count)]
    else:
        command += [
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(measurement_ms),
            "--max-trials", str(max_trials),
            "--stability-percentage", f"{stability_percent:g}",
        ]  # fmt: skip
    if timeout_s is None:
        # Time windows: every trial, plus the requests still in flight. A request count: no rate is known
        # beforehand, so a minute plus 10 s a request per concurrent slot.
        timeout_s = 60.0 + (
            3 * max_trials * measurement_ms / 1000 if request_count is None else 10.0 * request_count / concurrency
        )
    try:
        done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        log_path.write_text(out + err)
        raise PerfAnalyzerError(
            f"perf_analyzer ran past {timeout_s:.0f} s on {pipeline} ({protocol}, concurrency {concurrency}): "
            f"{_tail(err or out)}"
        ) from None
    log_path.write_text(f"$ {' '.join(command)}\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0 or not csv_path.is_file():
        raise PerfAnalyzerError(
            f"perf_analyzer failed on {pipeline} ({protocol}, concurrency {concurrency}, exit {done.returncode}): "
            f"{_tail(done.stderr or done.stdout)}"
        )
    row = parse_csv(csv_path)
    count = _summary_number(done.stdout, "Request count")
    avg = _summary_number(done.stdout, "Avg latency")
    return PerfResult(
        pipeline=pipeline,
        protocol=protocol,
        concurrency=int(row["Concurrency"]),
        throughput=row["Inferences/Second"],
        p50_ms=row["p50 latency"] / 1000,
        p90_ms=row["p90 latency"] / 1000,
        p95_ms=row["p95 latency"] / 1000,
        p99_ms=row["p99 latency"] / 1000,
        avg_ms=avg / 1000 if avg is not None else None,
        request_count=int(count) if count is not None else None,
        csv_path=csv_path,
        log_path=log_path,
        command=tuple(command),
    )
