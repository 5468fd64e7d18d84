"""Triton Python-backend adapter, written into the repository by `imgpipe build` (do not edit).

The step class comes from the config parameter ``imgpipe.step`` (``module:Class``); the logic lives in
the installed ``imgpipe`` package (:mod:`imgpipe.ensembles.step`).
"""

import gc
import inspect

import triton_python_backend_utils as pb_utils

from imgpipe.ensembles.step import load_step


class TritonPythonModel:
    def initialize(self, args):
        self.step = load_step(pb_utils, args)

    async def execute(self, requests):
        responses = self.step.execute(requests)
        if inspect.isawaitable(responses):
            responses = await responses
        return responses

    def finalize(self):
        self.step.finalize()
        # The stub exits next, and the interpreter's final garbage collection walks every object torch and
        # the other imports made: about a CPU-second per stub, 9 s for 18 stubs on 2 cores at every stop.
        # Frozen objects are left to the process exit.
        gc.freeze()
