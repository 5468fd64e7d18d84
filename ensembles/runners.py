"""Runners: one interface that executes a network inside a Python-backend model.

A :class:`Runner` takes the inputs of several requests (named torch tensors with a batch dimension),
runs them as one batch per distinct input shape (e.g. pnet's pyramid levels) and splits the outputs
back per request. Implementations: :class:`OnnxRuntimeRunner` (ONNX Runtime on CPU) and
:class:`TorchRunner` (PyTorch on CUDA: FP16/TF32, channels-last, CUDA graphs per batch bucket, one
stream per instance). A runner declares the device types it serves on; the network step falls back to
ONNX Runtime on the CPU with a log line when its instance's device is not one of them.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

Feeds = dict[str, torch.Tensor]
TORCH_SPEC = "torch.json"  # in a python-target version folder: how the CUDA runner builds the module


class Runner(ABC):
    kind: ClassVar[str]
    devices: ClassVar[tuple[str, ...]]  # torch device types this runner executes on
    input_names: list[str]
    output_names: list[str]

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @classmethod
    @abstractmethod
    def load(cls, version_dir: Path, device: torch.device, options: dict[str, Any]) -> Runner:
        """The runner of the artifact in ``version_dir`` on ``device`` (``options``: the config's)."""

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of numpy arrays in and out (the accuracy gate's interface)."""
        (out,) = self.run([{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}])
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

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
        # No busy-waiting between ops: in a server, several instances and other models share the cores,
        # and ORT's spinning threads take CPU time from them (measured: goodput under overload).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) else None

    @classmethod
    def load(cls, version_dir: Path, device: torch.device, options: dict[str, Any]) -> OnnxRuntimeRunner:
        return cls(str(version_dir / options.get("model_file", "model.onnx")), device)

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


def torch_module(version_dir: Path, spec: dict[str, Any]) -> torch.nn.Module:
    """The network as a torch module: a reference architecture rebuilt from its seed (the same weights
    the export used), or the ONNX graph through :class:`~imgpipe.ensembles.onnx_torch.OnnxModule`."""
    source = spec["source"]
    if source["kind"] == "reference":
        from imgpipe.build.networks import build_reference

        return build_reference(source["architecture"], source["width"], source["seed"])
    from imgpipe.ensembles.onnx_torch import OnnxModule

    return OnnxModule(version_dir / spec["onnx"])


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class TorchRunner(Runner):
    """PyTorch on the instance's GPU. FP16 when the build's precision asks (FP32 in and out, as the
    contract says), TF32 for FP32; channels-last for 4-D inputs; optionally one CUDA graph per batch
    bucket, captured at start-up (requests padded up to the next bucket; networks with dynamic
    spatial dimensions run eagerly); its own CUDA stream."""

    kind = "torch"
    devices = ("cuda",)

    def __init__(self, module: torch.nn.Module, spec: dict[str, Any], device: torch.device,
                 options: dict[str, Any]) -> None:  # fmt: skip
        super().__init__(device)
        self.input_names = [i["name"] for i in spec["inputs"]]
        self.output_names = list(spec["outputs"])
        self.shapes = {i["name"]: tuple(i["shape"]) for i in spec["inputs"]}
        float_types = {"FP32", "FP16"}
        self.floats = {i["name"] for i in spec["inputs"] if i["dtype"] in float_types}
        half = spec.get("precision") in ("fp16", "int8") and device.type == "cuda"
        self.dtype = torch.float16 if half else torch.float32
        self.channels_last = bool(options.get("channels_last", True)) and all(len(s) == 3 for s in self.shapes.values())
        cuda = device.type == "cuda"
        static = all(-1 not in s for s in self.shapes.values())
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # cuDNN's autotuner times every algorithm for each new input shape: once per bucket for a network
            # of fixed shapes, but for every new image size for a dynamic one (pnet's pyramid levels: each
            # photo size brings ~10 new shapes, and the choices are kept for ever). One network per process,
            # so the process-wide flag is this network's.
            torch.backends.cudnn.benchmark = static
        module = module.eval().to(device=device, dtype=self.dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.graphs: dict[int, _Captured] = {}
        if cuda and options.get("cuda_graphs") and static:
            self._capture(sorted(int(b) for b in options.get("buckets", [1])))

    @classmethod
    def load(cls, version_dir: Path, device: torch.device, options: dict[str, Any]) -> TorchRunner:
        spec = json.loads((version_dir / TORCH_SPEC).read_text())
        return cls(torch_module(version_dir, spec), spec, device, options)

    def _prepare(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if name in self.floats:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _eager(self, feeds: Feeds) -> tuple[torch.Tensor, ...]:
        out = self.module(*(self._prepare(n, feeds[n]) for n in self.input_names))
        return out if isinstance(out, tuple | list) else (out,)

    def _capture(self, buckets: list[int]) -> None:
        """One graph per bucket, largest first, sharing one memory pool."""
        pool = None
        with torch.inference_mode():
            for batch in sorted(buckets, reverse=True):
                inputs = {n: self._prepare(n, torch.zeros((batch, *self.shapes[n]), device=self.device))
                          for n in self.input_names}  # fmt: skip
                with torch.cuda.stream(self.stream):  # warm up (cuDNN picks its algorithms) off the graph
                    for _ in range(3):
                        self._eager(inputs)
                self.stream.synchronize()  # type: ignore[union-attr]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                    outputs = self._eager(inputs)
                pool = graph.pool()
                self.graphs[batch] = _Captured(graph, inputs, tuple(outputs))

    def _replay(self, feeds: Feeds, count: int) -> tuple[torch.Tensor, ...]:
        top = max(self.graphs)
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, count, top):
            size = min(top, count - start)
            captured = self.graphs[min(b for b in self.graphs if b >= size)]
            for name in self.input_names:
                captured.inputs[name][:size].copy_(feeds[name][start : start + size], non_blocking=True)
            captured.graph.replay()
            parts.append(tuple(o[:size].clone() for o in captured.outputs))
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))

    def forward(self, feeds: Feeds) -> Feeds:
        count = len(feeds[self.input_names[0]])
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        if self.stream is not None:
            # The inputs may still be in flight on the caller's stream (a host-to-device copy from pageable
            # memory returns before its DMA ends). Asked for inside the context below, the current stream
            # would be self.stream, and the wait a no-op: that race was the H100's "no face found".
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), context:
            outputs = self._replay(feeds, count) if self.graphs else self._eager(feeds)
            result = {n: o.float().contiguous() for n, o in zip(self.output_names, outputs, strict=True)}
        if self.stream is not None:
            self.stream.synchronize()
        return result


RUNNERS: dict[str, type[Runner]] = {OnnxRuntimeRunner.kind: OnnxRuntimeRunner, TorchRunner.kind: TorchRunner}
