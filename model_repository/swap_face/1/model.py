"""Triton Python-backend (BLS) adapter for swap_face (logic: imgpipe.ensembles.swap_face)."""

import triton_python_backend_utils as pb_utils

from imgpipe.ensembles.swap_face import SwapFace


class TritonPythonModel:
    def initialize(self, args):
        self.step = SwapFace(pb_utils, args)

    async def execute(self, requests):
        return await self.step.execute(requests)
