"""The ``detect_faces`` BLS model (declared in :mod:`imgpipe.pipelines.detect_faces`).

MTCNN: pnet runs once per pyramid level, all levels concurrently (``async_exec``); rnet and onet get
every candidate of the image in one batch (split at the network's ``max_batch_size``, the pieces again
concurrent). SCRFD/YuNet/BlazeFace: letterbox, one network call, decode (BlazeFace: MediaPipe's
centred letterbox, anchors, decoding and weighted NMS, :mod:`imgpipe.ensembles.face_decoders`).
Concurrent callers' network requests meet in the networks' dynamic batchers. The maths runs on the
instance's device.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from imgpipe.ensembles import face_decoders, face_mesh, mtcnn
from imgpipe.ensembles.step import BlsStep, Outputs
from imgpipe.errors import InvalidInputError
from imgpipe.imaging import IntakeLimits, decode_image
from imgpipe.manifest import from_table
from imgpipe.pipelines import detect_faces as declared


def mtcnn_params(parsed: dict[str, Any]) -> mtcnn.MtcnnParams:
    """The cascade's parameters from the contract's parsed request parameters."""
    return mtcnn.MtcnnParams(
        min_face_size=parsed["min_face_size"],
        thresholds=(parsed["pnet_threshold"], parsed["rnet_threshold"], parsed["onet_threshold"]),
        scale_factor=parsed["scale_factor"],
        score_threshold=parsed["score_threshold"],
        max_faces=parsed["max_faces"],
    )


DEFAULT_PARAMS = mtcnn_params(declared.CONTRACT.parse_parameters({}))


class FaceFinder(BlsStep):
    """A BLS step that finds faces with the configured detector (``imgpipe.detector`` settings)."""

    def setup(self) -> None:
        super().setup()
        table = json.loads(self.parameters["imgpipe.detector"])
        self.detector: declared.Settings = from_table(declared.Settings, table, f"{self.name}.detector")

    def image(self, data: bytes) -> torch.Tensor:
        """Encoded bytes → H×W×3 uint8 on this step's device, through the image intake with the pipeline's
        limits (:func:`imgpipe.imaging.decode_image`: Pillow on the CPU)."""
        return torch.from_numpy(decode_image(data, limits=IntakeLimits.of(self.settings))).to(self.device)

    async def detect(self, image: torch.Tensor, params: mtcnn.MtcnnParams, fit: bool = False) -> mtcnn.Faces:
        """Faces in original-image pixels, best first (at most ``params.max_faces``), with the configured
        detector. MTCNN's pyramid is held to ``max_pyramid_pixels``: past it the request is refused, or with
        ``fit`` its min_face_size is raised until the pyramid fits."""
        faces = await self._detect(image, params, fit)
        return faces if len(faces) <= params.max_faces else faces.select(list(range(params.max_faces)))

    async def _detect(self, image: torch.Tensor, params: mtcnn.MtcnnParams, fit: bool) -> mtcnn.Faces:
        if self.detector.detector == "mtcnn":
            height, width = image.shape[:2]
            budget = self.detector.max_pyramid_pixels
            if mtcnn.pyramid_pixels(height, width, params) > budget:
                size = mtcnn.fit_min_face_size(height, width, params, budget)
                if not fit:
                    raise InvalidInputError(
                        f"a {width}x{height} image at min_face_size {params.min_face_size} needs more detector work"
                        f" than allowed: use min_face_size {size} or more, or a smaller image"
                    )
                params = dataclasses.replace(params, min_face_size=size)
            return await mtcnn.detect(image, params, self.run)
        size = self.detector.input_size
        if self.detector.detector == "blazeface":
            x, box = face_decoders.letterbox_blazeface(image, size)
        else:
            x, box = face_decoders.letterbox(image, size, self.detector.detector)
        outputs = await self.run("detector", x)
        decode = face_decoders.DECODERS[self.detector.detector]
        kwargs = {} if params.score_threshold is None else {"threshold": params.score_threshold}
        faces = decode(list(outputs), size, size, **kwargs)
        return box.to_image(faces, *image.shape[:2])


class DetectFaces(FaceFinder):
    settings_type = declared.Settings

    async def handle_async(self, request: Any) -> Outputs:
        params = mtcnn_params(declared.CONTRACT.parse_parameters(self.request_parameters(request)))
        image = self.image(self.single_image(request))
        faces = await self.detect(image, params)
        outputs: Outputs = {"BOXES": faces.boxes, "SCORES": faces.scores, "LANDMARKS": faces.landmarks}
        if "MESH" in self.requested_outputs(request):
            if "mesh" not in self.networks:
                raise InvalidInputError("MESH: no face mesh network is configured (pipelines.detect_faces.mesh)")
            outputs["MESH"] = (await face_mesh.find_meshes(image, faces, self.run)).points
        return outputs
