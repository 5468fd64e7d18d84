"""Triton Python-backend adapter: runs this version's ONNX file (``python`` target). Generated copy."""

import triton_python_backend_utils as pb_utils

from imgpipe.ensembles.onnx_runner import OnnxRunnerModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = OnnxRunnerModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)
