"""The ``python`` target's network runner: one ONNX file executed with ONNX Runtime.

All requests of one ``execute`` call run as one batch: their inputs are concatenated along the batch
dimension, the session runs once, and the outputs are split back per request. A model whose ONNX has
a fixed batch of 1 (some exported checkpoints) is run item by item instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imgpipe.ensembles.step import PythonStep
from imgpipe.errors import InvalidInputError


class OnnxBatchRunner:
    """ONNX Runtime over batches of named numpy arrays (no Triton involved: unit-testable)."""

    def __init__(self, onnx_path: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) else None

    def run(self, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Run several requests' inputs as one batch (one batch per distinct input shape, e.g. pnet's
        pyramid levels); returns each request's outputs, in order."""
        groups: dict[tuple, list[int]] = {}
        for index, batch in enumerate(batches):
            groups.setdefault(tuple(batch[n].shape[1:] for n in self.input_names), []).append(index)
        if len(groups) > 1:
            results: list[dict[str, np.ndarray]] = [{} for _ in batches]
            for indices in groups.values():
                for index, out in zip(indices, self._run_same_shape([batches[i] for i in indices]), strict=True):
                    results[index] = out
            return results
        return self._run_same_shape(batches)

    def _run_same_shape(self, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        counts = [len(next(iter(b.values()))) for b in batches]
        feeds = {name: np.concatenate([b[name] for b in batches]) for name in self.input_names}
        if self.fixed_batch == 1 and sum(counts) > 1:
            parts = [
                self.session.run(self.output_names, {k: v[i : i + 1] for k, v in feeds.items()})
                for i in range(sum(counts))
            ]
            results = [np.concatenate([p[j] for p in parts]) for j in range(len(self.output_names))]
        else:
            results = self.session.run(self.output_names, feeds)
        splits = np.cumsum(counts)[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [{name: per_output[j][i] for j, name in enumerate(self.output_names)} for i in range(len(batches))]


class OnnxRunnerModel(PythonStep):
    """The Python-backend model around :class:`OnnxBatchRunner`."""

    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        super().__init__(pb_utils, args)
        filename = self.parameters.get("onnx_file", "model.onnx")
        self.runner = OnnxBatchRunner(f"{self.model_dir}/{filename}")
        self.dtypes = {i["name"]: i["data_type"] for i in self.config["input"]}

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        feeds, valid, responses = [], [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                feed = {}
                for name in self.runner.input_names:
                    t = self.pb.get_input_tensor_by_name(request, name)
                    if t is None:
                        raise InvalidInputError(f"missing input {name!r}")
                    feed[name] = t.as_numpy()
                feeds.append(feed)
                valid.append(index)
            except InvalidInputError as exc:
                responses[index] = self.error(str(exc), self.pb.TritonError.INVALID_ARG)
        if feeds:
            try:
                for index, outputs in zip(valid, self.runner.run(feeds), strict=True):
                    responses[index] = self.response(outputs)
            except Exception as exc:
                for index in valid:
                    responses[index] = self.error(f"{self.name} failed: {exc}", self.pb.TritonError.INTERNAL)
        return responses
