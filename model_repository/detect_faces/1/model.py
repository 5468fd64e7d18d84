"""Triton Python-backend (BLS) adapter for detect_faces (logic: imgpipe.ensembles.detect_faces)."""

import triton_python_backend_utils as pb_utils

from imgpipe.ensembles.detect_faces import DetectFaces


class TritonPythonModel:
    def initialize(self, args):
        self.step = DetectFaces(pb_utils, args)

    async def execute(self, requests):
        return await self.step.execute(requests)
