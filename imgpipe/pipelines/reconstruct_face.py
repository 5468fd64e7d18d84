"""``reconstruct_face``: a BLS model that turns each face of an image (or the chosen one) into a textured
3D mesh file and its coefficients, by one of two methods (``method`` in the manifest, or per request):

- ``mesh`` (the default; real weights only): MediaPipe's 468-point face mesh on each detected face, its
  852 triangles (derived at build time from MediaPipe's tessellation) plus 46 closing the eyes and the
  mouth (898), in a metric frame (centred, scaled by the eye distance, y up, the camera looking along
  −z), textured with the photo; the head pose from a rigid fit of its five landmarks to Deep3DFaceRecon's
  standard 3D landmarks.
- ``3dmm`` (Deep3DFaceRecon's contract): 5 landmarks → ``align_img`` → 224×224 crop → the face regressor
  (ResNet-50 → 257 coefficients) → a BFM-format 3DMM (shape, SH-lit colour, pose). The basis is a file
  the operator supplies (``basis``); without one, a SYNTHETIC basis generated at build time stands in.
  The manifest's regressor is an untrained reference network until a real one is configured.

The step lives in :mod:`imgpipe.ensembles.reconstruct_face`; the maths in :mod:`imgpipe.ensembles.face3d`,
the files in :mod:`imgpipe.ensembles.face3d_io`, the preview in :mod:`imgpipe.ensembles.face3d_render`.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Literal

from imgpipe.imaging import IntakeSettings
from imgpipe.manifest import Instances, Manifest, ManifestError
from imgpipe.pipelines import detect_faces
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Param, Pipeline, bls_model, register, settings_json

METHODS = ("mesh", "3dmm")
FORMATS = ("glb", "obj", "ply")
TRIANGLES_FILE = "triangles.npy"  # method mesh: MediaPipe's tessellation, eyes and mouth closed (898 triangles)
BASIS_FILE = "basis.npz"  # method 3dmm: the checked, packed 3DMM basis
REGRESSOR_SHAPES = {"inputs": ((3, 224, 224),), "outputs": ((257,),)}
MESH_COEFFICIENTS = ("yaw", "pitch", "roll", "scale", "cx", "cy")

CONTRACT = Contract(
    model="reconstruct_face",
    summary="3D face reconstruction: one encoded image in; for each chosen face a textured mesh file"
    " (GLB, OBJ or PLY), its head pose and its coefficients out.",
    inputs=(IO("IMAGE", "BYTES", (1,), "encoded image: JPEG, PNG or WebP bytes, EXIF orientation applied"),),
    outputs=(
        IO(
            "MESH",
            "BYTES",
            (-1,),
            "one file per chosen face, in the format parameter's format: glb (binary glTF 2.0, textured),"
            " ply (binary, vertex colours) or obj (a ZIP of face.obj, face.mtl and face.png); metres, y up,"
            " the camera looking along -z",
        ),
        IO("BOXES", "FP32", (-1, 4), "the chosen faces' boxes, same order as MESH: x1, y1, x2, y2 in pixels"),
        IO(
            "POSE",
            "FP32",
            (-1, 3),
            "head pose per face in degrees: yaw (> 0: nose towards the image's right), pitch (> 0: down),"
            " roll (> 0: counter-clockwise on the image); R = Rz(roll)·Ry(yaw)·Rx(pitch)",
        ),
        IO(
            "COEFFICIENTS",
            "FP32",
            (-1, -1),
            "per face: method 3dmm the regressor's 257 (id 80, exp 64, tex 80, angles 3 in radians, SH"
            " lighting 27, translation 3); method mesh 6: yaw, pitch, roll (degrees), scale (image pixels"
            " per metre), cx, cy (the mesh's origin in image pixels: x = cx + scale·X, y = cy - scale·Y)",
        ),
        IO(
            "PREVIEW",
            "BYTES",
            (1,),
            "PNG: the input with the faces' boxes, then each face's mesh rendered and shaded from the front"
            " and turned by 45 degrees; computed only when requested",
            optional=True,
        ),
    ),
    parameters=(
        Param(
            "faces",
            "string",
            "all",
            "faces to reconstruct: all, the largest, or an index in detection order (best score first)",
            choices=("all", "largest"),
            or_index=True,
        ),
        Param("format", "string", "glb", "file format of MESH", choices=FORMATS),
        Param("method", "string", "mesh", "how to reconstruct (the default is the manifest's method)", choices=METHODS),
    ),
)


@dataclass(frozen=True)
class Settings(IntakeSettings):
    """``[pipelines.reconstruct_face]`` (faces are found with the ``detect_faces`` pipeline's detector)."""

    method: Literal["mesh", "3dmm"] = "mesh"
    mesh: str = "face_mesh"  # method mesh: the face landmark network ("" = method mesh not offered)
    regressor: str = "face_regressor"  # method 3dmm: Deep3DFaceRecon-contract network ("" = not offered)
    basis: str = ""  # method 3dmm: BFM-format .npz/.mat next to the manifest; "" = the synthetic basis
    texture_size: int = 1024  # longest side of a texture PNG (the photo's pixels are kept up to it)
    preview_size: int = 256  # side of each rendered view in PREVIEW
    instances: Instances = field(default_factory=Instances)

    def __post_init__(self) -> None:
        super().__post_init__()  # the intake limits
        if self.method == "mesh" and not self.mesh:
            raise ManifestError("mesh: required when method = 'mesh' (the face mesh network)")
        if self.method == "3dmm" and not self.regressor:
            raise ManifestError("regressor: required when method = '3dmm' (the face regressor network)")
        if not 16 <= self.texture_size <= 8192:
            raise ManifestError(f"texture_size: must be within [16, 8192], got {self.texture_size}")
        if not 64 <= self.preview_size <= 1024:
            raise ManifestError(f"preview_size: must be within [64, 1024], got {self.preview_size}")

    def methods(self) -> tuple[str, ...]:
        """The methods a request may ask for (those whose network is configured)."""
        return tuple(m for m, net in (("mesh", self.mesh), ("3dmm", self.regressor)) if net)


def contract_for(settings: Settings) -> Contract:
    """The contract as one deployment serves it: the ``method`` parameter defaults to the manifest's."""
    parameters = tuple(
        dataclasses.replace(p, default=settings.method) if p.name == "method" else p for p in CONTRACT.parameters
    )
    return dataclasses.replace(CONTRACT, parameters=parameters)


@register
class ReconstructFace(Pipeline):
    name = "reconstruct_face"
    settings = Settings
    contract = CONTRACT
    requires = ("detect_faces",)

    def networks(self, settings: Settings) -> dict[str, str]:
        roles = {}
        if settings.mesh:
            roles["mesh"] = settings.mesh
        if settings.regressor:
            roles["regressor"] = settings.regressor
        return roles

    def validate(self, manifest: Manifest, settings: Settings) -> None:
        if settings.regressor:
            net = manifest.network(settings.regressor)
            shapes = {
                "inputs": tuple(t.shape for t in net.inputs),
                "outputs": tuple(t.shape for t in net.outputs),
            }
            if shapes != REGRESSOR_SHAPES:
                raise ManifestError(
                    f"pipelines.reconstruct_face.regressor: {settings.regressor!r} does not follow the"
                    f" Deep3DFaceRecon contract: expected input [3, 224, 224] (RGB /255) and output [257], got {shapes}"
                )
        if settings.basis and not manifest.resolve(settings.basis).is_file():
            raise ManifestError(f"pipelines.reconstruct_face.basis: {manifest.resolve(settings.basis)} does not exist")

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.ensembles.reconstruct_face import ReconstructFace as Step

        detect: detect_faces.Settings = ctx.settings("detect_faces")
        roles = {**detect_faces.detector_roles(detect), **self.networks(settings)}
        extra = {"imgpipe.detector": settings_json(detect)}
        if settings.regressor:  # named in the 3dmm files' comments: whether the coefficients mean anything
            extra["imgpipe.regressor_license"] = ctx.manifest.network(settings.regressor).license
        return [
            bls_model(CONTRACT, Step, settings, ctx.manifest, roles, served=contract_for(settings), extra=extra)
        ]

    def assets(self, ctx: BuildContext, settings: Settings) -> dict[str, dict[str, bytes]]:
        """The face mesh's triangles (method mesh) and the checked 3DMM basis (method 3dmm): a basis file
        with the wrong layout stops the build with the array's name and its expected shape."""
        import numpy as np

        files: dict[str, bytes] = {}
        if settings.mesh:
            from imgpipe.ensembles.face3d import face_mesh_triangles

            buffer = io.BytesIO()
            np.save(buffer, face_mesh_triangles())
            files[TRIANGLES_FILE] = buffer.getvalue()
        if settings.regressor:
            from imgpipe.build.bfm import basis_asset

            path = ctx.manifest.resolve(settings.basis) if settings.basis else None
            files[BASIS_FILE] = basis_asset(path, "pipelines.reconstruct_face.basis")
        return {CONTRACT.model: files}
