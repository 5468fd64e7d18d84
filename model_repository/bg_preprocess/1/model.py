"""Triton Python-backend adapter for remove_background's preprocess step (logic: imgpipe.ensembles)."""

import triton_python_backend_utils as pb_utils

from imgpipe.ensembles.remove_background import Preprocess


class TritonPythonModel:
    def initialize(self, args):
        self.step = Preprocess(pb_utils, args)

    def execute(self, requests):
        return self.step.execute(requests)
