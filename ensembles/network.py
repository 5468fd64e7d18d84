"""The network model of the ``python`` target: a Python-backend model around a :class:`Runner`.

All requests of one ``execute`` call (Triton's dynamic batcher gathers them) run as one batch; a
request with a missing input is answered INVALID_ARG alone and the others go on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imgpipe.ensembles.runners import RUNNERS, OnnxRuntimeRunner, Runner
from imgpipe.ensembles.step import Step
from imgpipe.errors import InvalidInputError


class NetworkStep(Step):
    def setup(self) -> None:
        kind = self.parameters.get("imgpipe.runner", "onnxruntime")
        cls = RUNNERS[kind]
        options = json.loads(self.parameters.get("imgpipe.runner_options", "{}"))
        options.setdefault("model_file", self.parameters.get("imgpipe.model_file", "model.onnx"))
        if self.device.type not in cls.devices:
            self.log_warn(f"{self.name}: the {kind} runner needs {' or '.join(cls.devices)}; this instance is on"
                          f" {self.device.type}: running ONNX Runtime on the CPU instead")  # fmt: skip
            cls, self.device = OnnxRuntimeRunner, torch.device("cpu")
        self.runner: Runner = cls.load(Path(self.model_dir), self.device, options)
        self.ranges: dict[str, dict[str, Any]] = json.loads(self.parameters.get("imgpipe.shape_ranges", "{}"))

    def check(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A dynamic input's shape (without the batch) at least the manifest's min_shape (smaller inputs
        are the caller's mistake; ONNX Runtime would fail them as an internal error)."""
        limits = self.ranges.get(name)
        if limits is not None:
            shape, low = list(tensor.shape[1:]), limits["min"]
            if len(shape) != len(low) or any(s < lo for s, lo in zip(shape, low, strict=True)):
                raise InvalidInputError(f"input {name!r} has shape {shape}: each dimension must be at least {low}")
        return tensor

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        feeds, valid, responses = [], [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                self.admit(request)
                feeds.append({name: self.check(name, self.tensor(request, name)) for name in self.runner.input_names})
                valid.append(index)
            except InvalidInputError as exc:
                responses[index] = self.failure(exc, request)
        if feeds:
            try:
                for index, outputs in zip(valid, self.runner.run(feeds), strict=True):
                    responses[index] = self.response(outputs, requests[index])
            except Exception as exc:
                for index in valid:
                    responses[index] = self.failure(exc)
        return responses

    def finalize(self) -> None:
        del self.runner
        super().finalize()
