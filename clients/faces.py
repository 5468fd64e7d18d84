"""Clients for the face pipelines (contracts: :mod:`imgpipe.pipelines.detect_faces`, ``.swap_face``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgpipe.clients.triton import TritonClient
from imgpipe.pipelines import detect_faces as detect_contract
from imgpipe.pipelines import swap_face as swap_contract

DETECT_MODEL = detect_contract.CONTRACT.model
SWAP_MODEL = swap_contract.CONTRACT.model


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in pixels of the original image
    score: float
    landmarks: tuple[tuple[float, float], ...]  # left eye, right eye, nose, left mouth, right mouth
    mesh: tuple[tuple[float, float, float], ...] = ()  # 468 points (x, y, z) when asked for, else empty

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 6),
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
        }
        if self.mesh:
            out["mesh"] = [[round(v, 2) for v in point] for point in self.mesh]
        return out


def detect_faces(
    client: TritonClient,
    image: bytes,
    min_face_size: int | None = None,
    thresholds: tuple[float, float, float] | None = None,
    mesh: bool = False,
) -> list[Face]:
    """Faces in ``image``, best first. ``min_face_size`` (pixels) and the three MTCNN stage
    ``thresholds`` are sent as request parameters; the server's defaults are the contract's
    (20 and 0.6, 0.7, 0.7). ``mesh`` asks for each face's 468-point face mesh too."""
    parameters: dict[str, str | int | float | bool] = {}
    if min_face_size is not None:
        parameters["min_face_size"] = int(min_face_size)
    if thresholds is not None:
        for stage, value in zip(("pnet", "rnet", "onet"), thresholds, strict=True):
            parameters[f"{stage}_threshold"] = float(value)
    out = client.infer(
        DETECT_MODEL,
        {"IMAGE": np.array([image], dtype=object)},
        [o.name for o in detect_contract.CONTRACT.outputs if mesh or not o.optional],
        parameters=parameters or None,
    )
    meshes = out["MESH"].tolist() if mesh else [()] * len(out["BOXES"])
    faces = []
    for (x1, y1, x2, y2), score, points, grid in zip(
        out["BOXES"], out["SCORES"], out["LANDMARKS"], meshes, strict=True
    ):
        landmarks = tuple((float(x), float(y)) for x, y in points)
        box = (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
        faces.append(Face(box, float(score), landmarks, tuple(tuple(p) for p in grid)))
    return faces


@dataclass(frozen=True)
class SwapResult:
    image: bytes  # the encoded target (PNG or JPEG)
    swapped: int  # how many faces were replaced (0: no face in the target, returned unchanged)


def swap_face(
    client: TritonClient, source: bytes, target: bytes, faces: str | int = "all", fmt: str = "png"
) -> SwapResult:
    """Replace faces of ``target`` with the largest face of ``source``. ``faces``: ``all``, ``largest``
    or an index in detection order (best score first); ``fmt``: ``png`` or ``jpeg``."""
    out = client.infer(
        SWAP_MODEL,
        {"SOURCE": np.array([source], dtype=object), "TARGET": np.array([target], dtype=object)},
        [o.name for o in swap_contract.CONTRACT.outputs],
        parameters={"faces": str(faces), "format": fmt},
    )
    return SwapResult(bytes(out["IMAGE"].reshape(-1)[0]), int(out["SWAPPED"].reshape(-1)[0]))
