"""The ``reconstruct_face`` BLS model (declared in :mod:`imgpipe.pipelines.reconstruct_face`).

image → detector → the chosen faces, then by method:

- ``mesh``: the face mesh of all chosen faces in one batch → each in the metric frame
  (:func:`imgpipe.ensembles.face3d.mesh_frame`), its normals over the 898 triangles (MediaPipe's 852, the
  eyes and mouth closed: :func:`imgpipe.ensembles.face3d.close_holes`), a texture cut
  from the photo under it (uv from each point's image position), vertex colours sampled from the photo,
  head pose from the five-landmark rigid fit (:func:`imgpipe.ensembles.face3d.head_pose`);
- ``3dmm``: ``align_img`` crops of all chosen faces → the regressor as one batch → 257 coefficients each →
  the 3DMM (:func:`imgpipe.ensembles.face3d.assemble`): vertices in metres (the 3DMM's decimetres × 0.1),
  the texture cut from the photo under the vertices' projections (the crop's camera mapped back to the
  image), vertex colours = the 3DMM's SH-lit colour.

→ one mesh file per face (:mod:`imgpipe.ensembles.face3d_io`), and when asked a PREVIEW
(:mod:`imgpipe.ensembles.face3d_render`). The maths runs on the instance's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgpipe.ensembles import face3d, face3d_io, face3d_render, face_mesh, mtcnn
from imgpipe.ensembles.detect_faces import DEFAULT_PARAMS, FaceFinder
from imgpipe.ensembles.step import Outputs
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import encode_png
from imgpipe.pipelines.reconstruct_face import BASIS_FILE, TRIANGLES_FILE, Settings, contract_for


def choose(faces: mtcnn.Faces, selection: str | int) -> list[int]:
    """Indices of the faces to reconstruct (``selection`` as the contract's ``faces`` parameter parses it);
    no face, or an index past the last face, is the caller's mistake."""
    if len(faces) == 0:
        raise InvalidInputError("no face found in the image")
    if selection == "all":
        return list(range(len(faces)))
    if selection == "largest":
        return [faces.largest()]
    if selection >= len(faces):  # type: ignore[operator]
        raise InvalidInputError(
            f"parameter 'faces' = {selection}: the image has only {len(faces)} face(s) (indices 0..{len(faces) - 1})"
        )
    return [int(selection)]


@dataclass(frozen=True)
class Reconstruction:
    """The chosen faces' results: ``meshes`` (host, for the writers), ``pose`` [F,3] degrees (yaw, pitch,
    roll), ``coefficients`` [F,K], and per face what the preview draws (device tensors)."""

    meshes: list[face3d_io.FaceMesh]
    pose: torch.Tensor
    coefficients: torch.Tensor
    drawables: list[dict[str, torch.Tensor]]


def degrees(angles: torch.Tensor) -> torch.Tensor:
    """(x, y, z) = (pitch, yaw, roll) radians [F,3] → (yaw, pitch, roll) degrees, float32."""
    return torch.rad2deg(angles[:, [1, 0, 2]]).to(torch.float32)


def _host(t: torch.Tensor, dtype: Any = np.float32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


class ReconstructFace(FaceFinder):
    settings_type = Settings

    def setup(self) -> None:
        super().setup()
        folder = Path(self.model_dir)
        self.triangles: torch.Tensor | None = None
        self.basis: face3d.Basis | None = None
        if self.settings.mesh:
            self.triangles = torch.from_numpy(np.load(folder / TRIANGLES_FILE).astype(np.int64)).to(self.device)
        if self.settings.regressor:
            self.basis = face3d.Basis.load(str(folder / BASIS_FILE), self.device)
        self.regressor_license = self.parameters.get("imgpipe.regressor_license", "")
        self.contract = contract_for(self.settings)  # the method parameter defaults to the manifest's

    def warm_up(self) -> None:
        """Run each maths path once on a tiny input at start-up, so the first caller does not pay for the
        kernels' first use (measured without it: 1.8 s for the first request with PREVIEW, on the CPU and on
        an H200; 0.17-0.27 s for the later ones on the CPU)."""
        super().warm_up()
        device = self.device
        image = torch.zeros((32, 32, 3), dtype=torch.uint8, device=device)
        vertices = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.0, 0.01, 0.0]], device=device)
        triangles = torch.tensor([[0, 1, 2]], device=device)
        normals = face3d.vertex_normals(vertices[None], triangles)[0]
        xy = vertices[:, :2] * 1000 + 5
        texture = face3d.photo_texture(image, xy, 16)
        face3d.sample_colours(image, xy)
        face3d_render.render_view(vertices, normals, triangles, 16, 45.0, uv=texture.uv, texture=texture.image)
        face3d.head_pose(face3d.mesh_frame(torch.rand((1, face_mesh.POINTS, 3), device=device) * 100).vertices)
        if self.basis is not None:
            face3d.assemble(self.basis, torch.zeros((1, face3d.COEFFICIENTS), device=device))
            five = torch.tensor([[[10.0, 12.0], [20.0, 12.0], [15.0, 17.0], [11.0, 22.0], [19.0, 22.0]]], device=device)
            face3d.align_crops(image, five)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # -- methods ---------------------------------------------------------------------------------------
    async def from_mesh(self, image: torch.Tensor, faces: mtcnn.Faces) -> Reconstruction:
        assert self.triangles is not None
        meshes = await face_mesh.find_meshes(image, faces, self.run)
        frame = face3d.mesh_frame(meshes.points)
        pose = degrees(face3d.head_pose(frame.vertices))
        normals = face3d.vertex_normals(frame.vertices, self.triangles)
        coefficients = torch.cat([pose, frame.scale[:, None], frame.centre[:, :2]], 1).to(torch.float32)
        comment = (
            "imgpipe reconstruct_face, method mesh: MediaPipe face mesh (468 points; 898 triangles: its 852, the"
            " eyes and mouth closed), metres"
            " (eye centres 0.063 apart), y up, camera looking along -z; texture from the photo"
        )
        out, drawables = [], []
        for i in range(len(faces)):
            xy = meshes.points[i, :, :2]
            texture = face3d.photo_texture(image, xy, self.settings.texture_size)
            colours = face3d.sample_colours(image, xy)
            out.append(
                face3d_io.FaceMesh(
                    _host(frame.vertices[i]), _host(self.triangles, np.int64), _host(normals[i]),
                    _host(texture.uv), _host(texture.image, np.uint8), _host(colours, np.uint8), comment,
                )
            )  # fmt: skip
            drawables.append({"vertices": frame.vertices[i], "normals": normals[i], "triangles": self.triangles,
                              "uv": texture.uv, "texture": texture.image})  # fmt: skip
        return Reconstruction(out, pose, coefficients, drawables)

    async def from_3dmm(self, image: torch.Tensor, faces: mtcnn.Faces) -> Reconstruction:
        assert self.basis is not None
        crops, alignments = face3d.align_crops(image, faces.landmarks)
        (coefficients,) = await self.run("regressor", crops)
        coefficients = coefficients.to(self.device, torch.float32).reshape(len(faces), -1)
        if coefficients.shape[1] != face3d.COEFFICIENTS:
            raise RuntimeError(f"the regressor returned {coefficients.shape[1]} values per face, expected 257")
        result = face3d.assemble(self.basis, coefficients)
        pose = degrees(face3d.split_coefficients(coefficients).angle)
        vertices = result.vertices * face3d.DECIMETRE
        colours = (result.colour.clamp(0, 1) * 255).round().to(torch.uint8)
        basis = self.basis.description or "3DMM basis"
        comment = (
            f"imgpipe reconstruct_face, method 3dmm (Deep3DFaceRecon contract): {basis}; regressor:"
            f" {self.regressor_license or 'see the manifest'}; metres (the 3DMM's decimetres x 0.1), y up,"
            " camera looking along -z; texture from the photo, vertex colours = the 3DMM's lit colour"
        )
        out, drawables = [], []
        for i, alignment in enumerate(alignments):
            xy = alignment.crop_to_image(result.projected[i].to(torch.float64)).to(torch.float32)
            texture = face3d.photo_texture(image, xy, self.settings.texture_size)
            out.append(
                face3d_io.FaceMesh(
                    _host(vertices[i]), _host(self.basis.triangles, np.int64), _host(result.normals[i]),
                    _host(texture.uv), _host(texture.image, np.uint8), _host(colours[i], np.uint8), comment,
                )
            )  # fmt: skip
            drawables.append({"vertices": vertices[i], "normals": result.normals[i], "triangles": self.basis.triangles,
                              "uv": texture.uv, "texture": texture.image})  # fmt: skip
        return Reconstruction(out, pose, coefficients, drawables)

    # -- the request -----------------------------------------------------------------------------------
    def preview(self, image: torch.Tensor, boxes: torch.Tensor, result: Reconstruction) -> bytes:
        """PNG: the input with the boxes, then for each face (the first MAX_FACES) its views."""
        size = self.settings.preview_size
        views = [
            [_host(face3d_render.render_view(size=size, yaw_degrees=yaw, **drawable), np.uint8)
             for yaw in face3d_render.VIEWS]
            for drawable in result.drawables[: face3d_render.MAX_FACES]
        ]  # fmt: skip
        picture = face3d_render.compose(_host(image, np.uint8), _host(boxes), views, size)
        return encode_png(picture)

    async def handle_async(self, request: Any) -> Outputs:
        parameters = self.contract.parse_parameters(self.request_parameters(request))
        method = parameters["method"]
        offered = self.settings.methods()
        if method not in offered:
            raise InvalidInputError(
                f"parameter 'method' = {method!r} is not configured on this server (offered: {', '.join(offered)})"
            )
        image = self.image(self.single_image(request))
        faces = await self.detect(image, DEFAULT_PARAMS, fit=True)
        chosen = faces.select(choose(faces, parameters["faces"]))
        if method == "mesh":
            result = await self.from_mesh(image, chosen)
        else:
            result = await self.from_3dmm(image, chosen)
        files = [face3d_io.encode_mesh(mesh, parameters["format"]) for mesh in result.meshes]
        outputs: Outputs = {
            "MESH": np.array(files, dtype=object),
            "BOXES": chosen.boxes.to(torch.float32),
            "POSE": result.pose,
            "COEFFICIENTS": result.coefficients,
        }
        if "PREVIEW" in self.requested_outputs(request):
            outputs["PREVIEW"] = np.array([self.preview(image, chosen.boxes, result)], dtype=object)
        return outputs
