"""What a load test sends: real encoded images of a chosen size mix, one request function per pipeline,
and how each answer is classified (the outcome names the Locust events carry).

Kept free of Locust and gevent so the CLI, the tuner and perf_analyzer's cross-check share it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

PIPELINES = ("remove_background", "detect_faces", "swap_face", "colorize", "reconstruct_face")
# Outcomes: ok, then the failure kinds. queue_full is the server shedding load by design (a bounded queue
# said no); the others are unexpected in a load test of well-formed requests.
OUTCOMES = ("ok", "queue_full", "timeout", "unavailable", "invalid_argument", "error")
EXPECTED_FAILURES = frozenset({"queue_full"})
DEFAULT_SIZES = "1024x768"
_SIZE = re.compile(r"^(\d+)x(\d+)(?::(\d+))?$")


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    weight: int = 1

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" + (f":{self.weight}" if self.weight != 1 else "")


def parse_sizes(text: str) -> tuple[Size, ...]:
    """``"640x480,1024x768:3"`` → the size mix (``:N`` weights a size N times; default 1)."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        match = _SIZE.match(part)
        if match is None:
            raise ValueError(f"--sizes: {part!r} is not WIDTHxHEIGHT[:WEIGHT], e.g. 1024x768 or 640x480:3")
        width, height, weight = int(match[1]), int(match[2]), int(match[3] or 1)
        if not (16 <= width <= 8192 and 16 <= height <= 8192 and 1 <= weight <= 100):
            raise ValueError(f"--sizes: {part!r}: sides within 16..8192, weight within 1..100")
        sizes.append(Size(width, height, weight))
    if not sizes:
        raise ValueError("--sizes: at least one size")
    return tuple(sizes)


def photos(pipeline: str, sizes: tuple[Size, ...]) -> list[bytes]:
    """JPEG photos for ``pipeline`` at each size of the mix (repeated by weight): people for the face
    pipelines (the astronaut, Grace Hopper), every sample photo for the others."""
    from PIL import Image

    from imgpipe.samples import encode, sample_array

    names = ("astronaut", "hopper") if pipeline in ("detect_faces", "swap_face", "reconstruct_face") else (
        "astronaut", "coffee", "chelsea", "hopper", "camera"
    )  # fmt: skip
    out = []
    for size in sizes:
        for i in range(size.weight):
            array = sample_array(names[i % len(names)])
            image = Image.fromarray(array).convert("RGB").resize((size.width, size.height), Image.Resampling.BICUBIC)
            out.append(encode(np.asarray(image), "JPEG"))
    return out


def request_for(pipeline: str, images: list[bytes]) -> Callable[[Any, int], int]:
    """``call(client, i)``: the ``i``-th request of ``pipeline`` (images taken in turn); returns the bytes
    received. swap_face swaps the next photo's face into this one."""
    from imgpipe.clients.colorize import colorize_one
    from imgpipe.clients.faces import detect_faces, swap_face
    from imgpipe.clients.reconstruct import reconstruct_face
    from imgpipe.clients.remove_background import remove_background

    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r} (have: {', '.join(PIPELINES)})")
    n = len(images)

    def call(client: Any, i: int) -> int:
        image = images[i % n]
        if pipeline == "remove_background":
            return len(remove_background(client, image))
        if pipeline == "detect_faces":
            return 16 * len(detect_faces(client, image))  # 4 box + 10 landmark + score floats per face, roughly
        if pipeline == "swap_face":
            return len(swap_face(client, images[(i + 1) % n], image).image)
        if pipeline == "colorize":
            return len(colorize_one(client, image))
        return sum(len(face.mesh) for face in reconstruct_face(client, image).faces)

    return call


def outcome(exc: BaseException | None) -> str:
    """The outcome of one request: ``ok`` or its failure kind (by Triton's status and message)."""
    if exc is None:
        return "ok"
    status = str(getattr(exc, "status", "")).upper()
    message = str(getattr(exc, "message", exc)).lower()
    if "maximum queue size" in message or "exceeds maximum queue" in message:
        return "queue_full"
    if "INVALID_ARGUMENT" in status or status == "400":
        return "invalid_argument"
    if "DEADLINE" in status or "timed out" in message or "timeout" in message:
        return "timeout"
    if "UNAVAILABLE" in status or isinstance(exc, ConnectionError) or "connection refused" in message:
        return "unavailable"
    return "error"


SHAPES = ("constant", "ramp", "step")


def users_at(
    shape: str, elapsed: float, users: int, run_seconds: float, step_users: int = 1, step_seconds: float = 10.0
) -> int | None:
    """The users a load shape wants ``elapsed`` seconds into the run; None once the run is over.
    constant: all of them; ramp: 1 → users, linearly over the run; step: ``step_users`` more every
    ``step_seconds``, up to users."""
    if elapsed >= run_seconds:
        return None
    users = max(1, users)
    if shape == "ramp":
        return max(1, math.ceil(users * elapsed / run_seconds))
    if shape == "step":
        return min(users, (1 + int(elapsed // max(0.1, step_seconds))) * max(1, step_users))
    if shape == "constant":
        return users
    raise ValueError(f"unknown load shape {shape!r} (have: {', '.join(SHAPES)})")
