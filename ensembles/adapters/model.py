"""Triton Python-backend adapter, written into the repository by `imgpipe build` (do not edit).

The step class comes from the config parameter ``imgpipe.step`` (``module:Class``); the logic lives in
the installed ``imgpipe`` package (:mod:`imgpipe.ensembles.step`).
"""

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
