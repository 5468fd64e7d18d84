"""The ``detect_faces`` BLS model: the MTCNN cascade over the pnet/rnet/onet network models.

pnet runs once per pyramid level, all levels concurrently (``async_exec``); rnet and onet get every
candidate of the image in one batch (split at the network's ``max_batch_size``, the pieces again
concurrent). Concurrent callers' network requests meet in the networks' dynamic batchers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgpipe.ensembles import face_decoders, mtcnn
from imgpipe.ensembles.step import PythonStep
from imgpipe.imaging import DEFAULT_MAX_PIXELS, decode_image


class NetworkCaller(PythonStep):
    """A Python-backend model that calls manifest networks by role through BLS."""

    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        self.max_pixels = int(self.parameters.get("max_pixels", DEFAULT_MAX_PIXELS))
        # role -> {"model", "inputs", "outputs", "max_batch"}, written by the build from the manifest
        self.networks: dict[str, dict[str, Any]] = json.loads(self.parameters["networks"])

    async def run(self, role: str, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """All items as one batch (split at the network's max_batch_size, the pieces concurrent);
        outputs in manifest order."""
        net = self.networks[role]
        count = len(inputs[0])
        if count == 0:
            return tuple(np.zeros((0,)) for _ in net["outputs"])
        step = int(net["max_batch"])
        parts = await asyncio.gather(
            *(
                self.infer(
                    net["model"],
                    {n: x[i : i + step] for n, x in zip(net["inputs"], inputs, strict=True)},
                    net["outputs"],
                )
                for i in range(0, count, step)
            )
        )
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(net["outputs"])))

    async def execute(self, requests: Sequence[Any]) -> list[Any]:  # type: ignore[override]
        async def one(request: Any) -> Any:
            try:
                return self.response(await self.handle_async(request))
            except Exception as exc:
                return self.failure(exc)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def handle_async(self, request: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


class DetectFaces(NetworkCaller):
    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        self.detector = self.parameters.get("detector", "mtcnn")
        self.input_size = int(self.parameters.get("input_size", "640"))

    async def detect(self, rgb: np.ndarray, params: mtcnn.MtcnnParams) -> mtcnn.Faces:
        """Faces in original-image pixels, best first, with the configured detector."""
        if self.detector == "mtcnn":
            return await self.cascade(rgb, params)
        x, box = face_decoders.letterbox(rgb, self.input_size, self.detector)
        outputs = await self.run("detector", x)
        decode = face_decoders.DECODERS[self.detector]
        kwargs = {} if params.score_threshold is None else {"threshold": params.score_threshold}
        faces = decode(list(outputs), self.input_size, self.input_size, **kwargs)
        return box.to_image(faces, *rgb.shape[:2])

    async def cascade(self, rgb: np.ndarray, params: mtcnn.MtcnnParams) -> mtcnn.Faces:
        image = mtcnn.image_tensor(rgb)
        height, width = rgb.shape[:2]
        scales = mtcnn.pyramid(height, width, params)
        levels = await asyncio.gather(*(self.run("pnet", x) for x in mtcnn.pnet_inputs(image, scales)))
        boxes = mtcnn.stage1([(o[0], o[1]) for o in levels], scales, params)
        if len(boxes) == 0:
            return mtcnn.Faces.none()
        reg, prob = await self.run("rnet", mtcnn.crops(image, boxes, 24))
        boxes = mtcnn.stage2(boxes, reg, prob, params)
        if len(boxes) == 0:
            return mtcnn.Faces.none()
        reg, points, prob = await self.run("onet", mtcnn.crops(image, boxes, 48))
        return mtcnn.stage3(boxes, reg, points, prob, params, height, width)

    async def handle_async(self, request: Any) -> dict[str, np.ndarray]:
        params = mtcnn.MtcnnParams.from_request(self.request_parameters(request))
        rgb = decode_image(self.single_image(request), self.max_pixels)
        faces = await self.detect(rgb, params)
        return {"BOXES": faces.boxes, "SCORES": faces.scores, "LANDMARKS": faces.landmarks}
