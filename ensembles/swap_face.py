"""The ``swap_face`` BLS model: detect faces in both images, embed the source face, swap the target's.

source → MTCNN → its largest face → arcface_112_v2 crop → recognizer → embedding → latent
``embedding · emap / ‖embedding‖`` (inswapper contract). target → MTCNN → the chosen faces → arcface_128
crops → swapper, all faces as one batch → paste back with a feathered box mask → encoded image.
Request parameters: ``faces`` = ``all`` (default) | ``largest`` | a face index (detector order, best
score first), ``format`` = ``png`` (default) | ``jpeg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import face_geometry as geo
from imgpipe.ensembles import mtcnn
from imgpipe.ensembles.detect_faces import DetectFaces
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import decode_image, encode_image


def parse_selection(value: object) -> str | int:
    text = str(value if value is not None else "all").strip().lower()
    if text in ("all", "largest"):
        return text
    try:
        index = int(text)
    except ValueError:
        raise InvalidInputError(f"parameter 'faces' must be all, largest or a face index, got {value!r}") from None
    if index < 0:
        raise InvalidInputError(f"parameter 'faces' must be a non-negative index, got {index}")
    return index


def choose(faces: mtcnn.Faces, selection: str | int) -> list[int]:
    """Indices of the target faces to swap."""
    if len(faces) == 0:
        return []
    if selection == "all":
        return list(range(len(faces)))
    if selection == "largest":
        areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
        return [int(np.argmax(areas))]
    if selection >= len(faces):  # type: ignore[operator]
        raise InvalidInputError(f"parameter 'faces' = {selection}: the target has only {len(faces)} face(s)")
    return [int(selection)]


def identity_latent(embedding: np.ndarray, emap: np.ndarray) -> np.ndarray:
    """The swapper's ``source`` input: (embedding · emap) / ‖embedding‖ (inswapper contract)."""
    e = embedding.reshape(1, -1).astype(np.float64)
    return ((e @ emap.astype(np.float64)) / np.linalg.norm(e)).astype(np.float32)


class SwapFace(DetectFaces):
    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        self.emap = np.load(Path(self.model_dir) / "emap.npy")
        self.mask = geo.box_mask(128, float(self.parameters.get("mask_blur", "0.3")))

    async def embed(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32)
        crop = geo.warp(image, geo.align_matrix(landmarks, "arcface_112_v2", 112), 112)
        (embedding,) = await self.run("recognizer", (crop / 127.5 - 1.0).unsqueeze(0).numpy())
        return embedding[0]

    async def handle_async(self, request: Any) -> dict[str, np.ndarray]:
        parameters = self.request_parameters(request)
        unknown = sorted(set(parameters) - {"faces", "format"})
        if unknown:
            raise InvalidInputError(f"unknown parameter {unknown[0]!r}: expected faces, format")
        selection = parse_selection(parameters.get("faces"))
        fmt = str(parameters.get("format", "png")).lower()
        if fmt not in ("png", "jpeg"):
            raise InvalidInputError(f"parameter 'format' must be png or jpeg, got {fmt!r}")
        source = decode_image(self.single_image(request, "SOURCE"), self.max_pixels)
        target = decode_image(self.single_image(request, "TARGET"), self.max_pixels)
        source_faces = await self.detect(source, mtcnn.MtcnnParams())
        if len(source_faces) == 0:
            raise InvalidInputError("no face found in the source image")
        areas = (source_faces.boxes[:, 2] - source_faces.boxes[:, 0]) * (
            source_faces.boxes[:, 3] - source_faces.boxes[:, 1]
        )
        embedding = await self.embed(source, source_faces.landmarks[int(np.argmax(areas))])
        latent = identity_latent(embedding, self.emap)

        target_faces = await self.detect(target, mtcnn.MtcnnParams())
        chosen = choose(target_faces, selection)
        frame = torch.from_numpy(target).permute(2, 0, 1).to(torch.float32)
        if chosen:
            matrices = [geo.align_matrix(target_faces.landmarks[i], "arcface_128", 128) for i in chosen]
            crops = torch.stack([geo.warp(frame, m, 128) / 255.0 for m in matrices])
            (swapped,) = await self.run("swapper", crops.numpy(), np.repeat(latent, len(chosen), axis=0))
            for face, matrix in zip(torch.from_numpy(swapped), matrices, strict=True):
                frame = geo.paste_back(frame, face.clamp(0, 1) * 255.0, matrix, self.mask)
        result = frame.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        encoded = encode_image(result, fmt)
        return {"IMAGE": np.array([encoded], dtype=object), "SWAPPED": np.array([len(chosen)], dtype=np.int32)}
