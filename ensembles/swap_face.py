"""The ``swap_face`` BLS model (declared in :mod:`imgpipe.pipelines.swap_face`).

Both images → detector (concurrently) → the source's largest face and the chosen target faces, then:

- method ``mesh``: the face mesh of all of them in one batch → for each target face the source warped
  onto its mesh, colour-matched and blended (:func:`imgpipe.ensembles.mesh_swap.swap_face_mesh`);
- method ``inswapper``: source → arcface_112_v2 crop → recognizer → embedding → latent
  ``embedding · emap / ‖embedding‖``; target faces → arcface_128 crops → swapper, all faces as one
  batch → paste back with a feathered box mask.

→ encoded image. The maths runs on the instance's device.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import face_geometry as geo
from imgpipe.ensembles import face_mesh, mesh_swap, mtcnn
from imgpipe.ensembles.detect_faces import DEFAULT_PARAMS, FaceFinder
from imgpipe.ensembles.step import Outputs, Pending
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import encode_image
from imgpipe.pipelines.swap_face import CONTRACT, EMAP_FILE, TRIANGLES_FILE, Settings

SWAP_SIZE = 128  # inswapper_128


def choose(faces: mtcnn.Faces, selection: str | int) -> list[int]:
    """Indices of the target faces to swap (``selection`` as the contract's ``faces`` parameter parses it)."""
    if len(faces) == 0:
        return []
    if selection == "all":
        return list(range(len(faces)))
    if selection == "largest":
        return [faces.largest()]
    if selection >= len(faces):  # type: ignore[operator]
        raise InvalidInputError(f"parameter 'faces' = {selection}: the target has only {len(faces)} face(s)")
    return [int(selection)]


def identity_latent(embedding: torch.Tensor, emap: torch.Tensor) -> torch.Tensor:
    """The swapper's ``source`` input, 1×512: (embedding · emap) / ‖embedding‖ (inswapper contract)."""
    e = embedding.reshape(1, -1).to(torch.float64)
    return ((e @ emap.to(e.device, torch.float64)) / torch.linalg.vector_norm(e)).to(torch.float32)


class SwapFace(FaceFinder):
    settings_type = Settings

    def setup(self) -> None:
        super().setup()
        if self.settings.method == "mesh":
            self.triangles = torch.from_numpy(np.load(Path(self.model_dir) / TRIANGLES_FILE)).to(self.device)
        else:
            self.emap = torch.from_numpy(np.load(Path(self.model_dir) / EMAP_FILE)).to(self.device)
            self.mask = geo.box_mask(SWAP_SIZE, self.settings.mask_blur, device=self.device)

    async def embed(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The recognizer's embedding of the face at ``landmarks`` in CHW float ``image``."""
        crop = geo.warp(image, geo.align_matrix(landmarks, "arcface_112_v2", 112), 112)
        (embedding,) = await self.run("recognizer", (crop / 127.5 - 1.0).unsqueeze(0))
        return embedding[0]

    async def swap_mesh(
        self, frame: torch.Tensor, source: torch.Tensor, source_faces: mtcnn.Faces, target: torch.Tensor,
        target_faces: mtcnn.Faces, chosen: list[int],
    ) -> torch.Tensor:  # fmt: skip
        """Method ``mesh``: one face-mesh batch for the source face and every chosen target face."""
        src = face_mesh.roi_matrices(source_faces.select([source_faces.largest()]))
        dst = face_mesh.roi_matrices(target_faces.select(chosen))
        crops = torch.cat([face_mesh.crops(source, src), face_mesh.crops(target, dst)])
        raw, flag = await self.run("mesh", crops)
        meshes = face_mesh.project(raw.to(self.device), flag.to(self.device), torch.cat([src, dst]))
        face = source.permute(2, 0, 1).to(torch.float32)
        for points in meshes.points[1:, :, :2]:
            frame = mesh_swap.swap_face_mesh(
                frame, points, face, meshes.points[0, :, :2], self.triangles,
                feather=self.settings.feather, colour=self.settings.colour, inplace=True,
            )  # fmt: skip
        return frame

    async def swap_inswapper(
        self, frame: torch.Tensor, source: torch.Tensor, source_faces: mtcnn.Faces, target_faces: mtcnn.Faces,
        chosen: list[int],
    ) -> torch.Tensor:  # fmt: skip
        """Method ``inswapper``: recognizer embedding → swapper on arcface_128 crops → paste back."""
        face = source.permute(2, 0, 1).to(torch.float32)
        embedding = await self.embed(face, source_faces.landmarks[source_faces.largest()])
        latent = identity_latent(embedding, self.emap)
        matrices = geo.align_matrix(target_faces.landmarks[chosen], "arcface_128", SWAP_SIZE)
        crops = geo.warp(frame, matrices, SWAP_SIZE) / 255.0
        (swapped,) = await self.run("swapper", crops, latent.expand(len(chosen), -1))
        for face_crop, matrix in zip(swapped, matrices, strict=True):
            frame = geo.paste_back(frame, face_crop.clamp(0, 1) * 255.0, matrix, self.mask)
        return frame

    async def handle_async(self, request: Any) -> Outputs:
        parameters = CONTRACT.parse_parameters(self.request_parameters(request))
        source = self.image(self.single_image(request, "SOURCE"))
        target = self.image(self.single_image(request, "TARGET"))
        source_faces, target_faces = await asyncio.gather(
            self.detect(source, DEFAULT_PARAMS, fit=True), self.detect(target, DEFAULT_PARAMS, fit=True)
        )
        if len(source_faces) == 0:
            raise InvalidInputError("no face found in the source image")
        chosen = choose(target_faces, parameters["faces"])
        frame = target.permute(2, 0, 1).to(torch.float32)
        if chosen and self.settings.method == "mesh":
            frame = await self.swap_mesh(frame, source, source_faces, target, target_faces, chosen)
        elif chosen:
            frame = await self.swap_inswapper(frame, source, source_faces, target_faces, chosen)
        result = frame.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        encoded = self.encode(encode_image, result, parameters["format"])  # brought to the host by encode
        return {"IMAGE": Pending([encoded], (1,)), "SWAPPED": np.array([len(chosen)], dtype=np.int32)}
