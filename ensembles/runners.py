"""Runners: one interface that executes a network inside a Python-backend model.

A :class:`Runner` takes the inputs of several requests (named torch tensors with a batch dimension),
runs them as one batch per distinct input shape (e.g. pnet's pyramid levels) and splits the outputs
back per request. Implementations: :class:`OnnxRuntimeRunner` (ONNX Runtime on CPU, the ``python``
target today). A runner declares the device types it can run on; the network step falls back to CPU
with a log line when its instance's device is not one of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

Feeds = dict[str, torch.Tensor]


class Runner(ABC):
    kind: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]  # torch device types this runner executes on
    input_names: list[str]
    output_names: list[str]

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def forward(self, feeds: Feeds) -> Feeds:
        """One batch through the network: inputs by name → outputs by name, on ``self.device``."""

    def run(self, batches: Sequence[Feeds]) -> list[Feeds]:
        """Several requests' inputs as one batch per distinct shape; each request's outputs, in order."""
        groups: dict[tuple, list[int]] = {}
        for index, batch in enumerate(batches):
            groups.setdefault(tuple(tuple(batch[n].shape[1:]) for n in self.input_names), []).append(index)
        results: list[Feeds] = [{} for _ in batches]
        for indices in groups.values():
            for index, out in zip(indices, self._run_same_shape([batches[i] for i in indices]), strict=True):
                results[index] = out
        return results

    def _run_same_shape(self, batches: Sequence[Feeds]) -> list[Feeds]:
        counts = [len(b[self.input_names[0]]) for b in batches]
        feeds = {name: torch.cat([b[name] for b in batches]) if len(batches) > 1 else batches[0][name]
                 for name in self.input_names}  # fmt: skip
        outputs = self.forward(feeds)
        per_output = {name: torch.split(value, counts) for name, value in outputs.items()}
        return [{name: parts[i] for name, parts in per_output.items()} for i in range(len(batches))]


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on CPU. A model whose ONNX has a fixed batch of 1 runs item by item."""

    kind = "onnxruntime"
    devices = ("cpu",)

    def __init__(
        self, onnx_path: str, device: torch.device | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        import onnxruntime as ort

        super().__init__(device or torch.device("cpu"))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) else None

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of numpy arrays (the accuracy gate's interface)."""
        count = len(feeds[self.input_names[0]])
        if self.fixed_batch == 1 and count > 1:
            parts = [self.session.run(self.output_names, {k: v[i : i + 1] for k, v in feeds.items()})
                     for i in range(count)]  # fmt: skip
            results = [np.concatenate([p[j] for p in parts]) for j in range(len(self.output_names))]
        else:
            results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results, strict=True))

    def forward(self, feeds: Feeds) -> Feeds:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        return {k: torch.from_numpy(v).to(self.device) for k, v in self.run_numpy(arrays).items()}


RUNNERS: dict[str, type[Runner]] = {OnnxRuntimeRunner.kind: OnnxRuntimeRunner}
