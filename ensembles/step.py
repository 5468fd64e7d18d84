"""The runtime of imgpipe's Python-backend models (steps, BLS models, network runners).

One generic adapter (``adapters/model.py``, package data written into the repository by the build)
imports the step class named by the config parameter ``imgpipe.step`` (``module:Class``) and delegates
``initialize``/``execute``/``finalize`` to it. ``triton_python_backend_utils`` is passed in, so steps
import without Triton and are unit-testable.

A step knows its instance's device (``model_instance_kind``/``model_instance_device_id``: a KIND_GPU
instance works on ``cuda:<id>``, a CPU one, or a GPU one on a machine without CUDA, on ``cpu``). Inputs
arrive as torch tensors through DLPack; outputs leave the same way (BYTES as numpy object arrays). BLS
requests send and receive torch tensors through DLPack too, asking Triton for outputs in the step's
device memory.

Every request is answered on its own: a caller's mistake (:class:`~imgpipe.errors.InvalidInputError`,
or an ``INVALID_ARG`` from a model called through BLS) becomes an ``INVALID_ARG`` response for that
request only; anything else is logged with its traceback and answered ``INTERNAL`` with a short line;
the other requests of the batch go on.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import torch

from imgpipe.errors import InvalidInputError
from imgpipe.guard import INTERNAL_KEY_PARAM, VISIBILITY_PARAM, carries_key, check_internal, internal_key

Outputs = dict[str, "np.ndarray | torch.Tensor | Pending"]


class InnerModelError(RuntimeError):
    """A model called through BLS failed for a reason that is not the caller's."""


class OverloadedError(RuntimeError):
    """A model called through BLS shed the request (its queue was full, or the request waited past the queue's
    timeout): the server is busy, not broken. Answered UNAVAILABLE, which a client may retry after a pause."""


# What Triton says when a queue policy rejects a request (the code is lost on the way back through BLS).
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


# Triton 24.x loses the error code of a response that reaches a BLS model: every error arrives as
# INTERNAL (triton-inference-server/server#7804). So a BLS request carries the parameter BLS_CALLER,
# and a step answering such a request marks its INVALID_ARG messages with BLS_MARK; the BLS model
# strips the mark and answers its own caller INVALID_ARG with the same sentence.
BLS_CALLER = "imgpipe.bls_caller"
KEEP_ALIVE = 16  # responses whose CUDA outputs a step keeps referenced (see Step.response)
# BLS traffic in GPU memory (inputs and outputs passed as CUDA tensors between stubs) was measured on
# the H100 under load: the stubs logged "failed to copy data: invalid argument" while loading GPU
# buffers, and 3 of ~200 swap_face requests came back with no face found in a photo that has one. The
# "no face found" turned out to be a stream race in TorchRunner (fixed); the copy failures were not
# re-measured, so BLS requests still travel in host memory (the steps still compute on the GPU).
BLS_GPU_MEMORY = False
BLS_MARK = "[imgpipe:INVALID_ARG] "
# A step answering a BLS request hands over its CUDA outputs as host tensors, copied by its own code
# before execute returns, when BLS travels in host memory: the caller asked for host memory anyway, and
# otherwise the Python backend copies the stub's CUDA output into the host buffer itself, after execute has
# returned (what KEEP_ALIVE works around). A suspect of the GPU fault in docs/benchmarks.md, which it
# was not (measured on the H100), kept as a safeguard. IMGPIPE_BLS_HOST_OUTPUTS=0 (in the server's
# environment) turns it off.
BLS_HOST_OUTPUTS = not BLS_GPU_MEMORY and os.environ.get("IMGPIPE_BLS_HOST_OUTPUTS", "1") != "0"
# Threads per step instance that encode images (Pillow releases the GIL while it encodes): the images of
# a batch, and of the requests of one execute, are encoded at once instead of one after another.
ENCODE_THREADS = min(4, os.cpu_count() or 1)


class Pending:
    """A BYTES output still being encoded on the step's threads (:meth:`Step.encode`): the response
    waits for it. ``shape`` is the output's shape (one item per future)."""

    def __init__(self, futures: Sequence[Future], shape: tuple[int, ...]) -> None:
        self.futures, self.shape = list(futures), shape

    def result(self) -> np.ndarray:
        return np.array([f.result() for f in self.futures], dtype=object).reshape(self.shape)


def _host(value: Any) -> Any:
    """A tensor as a numpy array on the host (read in the calling thread, in its stream's order)."""
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else value


def instance_device(args: dict[str, str], log: Any = None) -> torch.device:
    """The device of this model instance: ``cuda:<id>`` for a KIND_GPU instance where CUDA works."""
    if args.get("model_instance_kind") == "GPU":
        if torch.cuda.is_available():
            return torch.device("cuda", int(args.get("model_instance_device_id", "0") or 0))
        if log is not None:
            log(f"{args.get('model_name', 'model')}: KIND_GPU instance but CUDA is not available, running on CPU")
    return torch.device("cpu")


def load_step(pb_utils: Any, args: dict[str, str]) -> Step:
    """The step object the config names (``imgpipe.step`` = ``module:Class``). A plugin's folder
    (``imgpipe.python_path``, written by the build for manifest plugins) is added to ``sys.path``."""
    config = json.loads(args["model_config"])
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    for folder in filter(None, parameters.get("imgpipe.python_path", "").split(":")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    target = parameters.get("imgpipe.step")
    if not target:
        raise ValueError(f"{config.get('name')}: the config has no 'imgpipe.step' parameter (module:Class)")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(pb_utils, args)


class Step:
    """Base of every Python-backend model's logic. Subclasses implement :meth:`handle` (one request →
    its outputs) and do their start-up work in :meth:`setup`."""

    #: The pipeline settings dataclass the config's ``imgpipe.settings`` JSON is read into (optional).
    settings_type: ClassVar[type | None] = None

    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        self.pb = pb_utils
        self.config: dict[str, Any] = json.loads(args["model_config"])
        self.name: str = self.config["name"]
        self.parameters: dict[str, str] = {
            k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()
        }
        self.model_dir = f"{args['model_repository']}/{args['model_version']}"
        # CUDA outputs of the last responses: Triton reads them after execute returns, and torch's caching
        # allocator would hand their memory to the next request if nothing held them (measured on the H100:
        # garbage sizes and a crashed server under load before this).
        self._alive: collections.deque[tuple[torch.Tensor, ...]] = collections.deque(maxlen=KEEP_ALIVE)
        self._encoders: ThreadPoolExecutor | None = None  # made by the first encode (steps that encode)
        self.device = instance_device(args, self.log_warn)
        # Who may call this model (imgpipe.guard): an internal one refuses requests without this server's key.
        self.visibility = self.parameters.get(VISIBILITY_PARAM, "public")
        self.internal_key = internal_key()
        # Triton runs the config's warmup samples through execute right after initialize, before the model
        # can be reached, without parameters: that many keyless requests are admitted first, and no more.
        self._warmups = sum(max(1, int(w.get("count", 1) or 1)) for w in self.config.get("model_warmup", []))
        self.settings: Any = None
        if self.settings_type is not None and "imgpipe.settings" in self.parameters:
            from imgpipe.manifest import from_table

            table = json.loads(self.parameters["imgpipe.settings"])
            self.settings = from_table(self.settings_type, table, f"{self.name}.settings")
        self.setup()
        self.warm_up()

    # -- to implement ------------------------------------------------------------------------
    def setup(self) -> None:
        """Start-up work (constants on the device, masks, anchor grids, files): once, not per request."""

    def handle(self, request: Any) -> Outputs:
        """Outputs of one request, by name."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Release what :meth:`setup` took (called when Triton unloads the model); call super()."""
        self._alive.clear()
        if self._encoders is not None:
            self._encoders.shutdown(wait=True)  # Triton finalizes after the last execute: nothing is pending

    # -- encoding on the step's threads ------------------------------------------------------
    def encode(self, function: Callable[..., bytes], *args: Any, **kwargs: Any) -> Future:
        """``function(*args, **kwargs)`` (an encoder: numpy in, bytes out) on this instance's encoder
        threads. Give it host arrays: device tensors are read here, in the step's own thread."""
        if self._encoders is None:
            self._encoders = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix=f"{self.name}-encode")
        args = tuple(_host(a) for a in args)
        return self._encoders.submit(function, *args, **{k: _host(v) for k, v in kwargs.items()})

    # -- logging -----------------------------------------------------------------------------
    def _logger(self) -> Any:
        return getattr(self.pb, "Logger", None) if hasattr(self, "pb") else None

    def log_warn(self, message: str) -> None:
        logger = self._logger()
        if logger is not None:
            logger.log_warn(message)

    def log_error(self, message: str) -> None:
        logger = self._logger()
        if logger is not None:
            logger.log_error(message)
        else:  # outside Triton (tests): stderr
            print(message, file=sys.stderr)

    # -- Triton entry point ------------------------------------------------------------------
    def admit(self, request: Any) -> None:
        """Refuse a request from outside to an internal model (:mod:`imgpipe.guard`)."""
        if self._warmups > 0:
            self._warmups -= 1
            return
        check_internal(self.name, self.visibility, self._raw_parameters(request), self.internal_key)

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        # Every request is handled first (their encodings, if any, start on the encoder threads), then
        # answered: the images of all of them are encoded at once.
        handled: list[Outputs | Exception] = []
        for request in requests:
            try:
                self.admit(request)
                handled.append(self.handle(request))
            except Exception as exc:  # keep serving: one failed request must not take the batch down
                handled.append(exc)
        return [self.respond(outputs, request) for outputs, request in zip(handled, requests, strict=True)]

    def respond(self, outputs: Outputs | Exception, request: Any) -> Any:
        """The response to ``request``: its outputs, or the error response of what went wrong."""
        if isinstance(outputs, Exception):
            return self.failure(outputs, request)
        try:
            return self.response(outputs, request)
        except Exception as exc:  # an encoding that failed, or an output Triton refused
            return self.failure(exc, request)

    def failure(self, exc: BaseException, request: Any = None) -> Any:
        """The error response for an exception: INVALID_ARG for the caller's mistakes; anything else
        is logged with its traceback on the server and answered INTERNAL with one short line."""
        if isinstance(exc, InvalidInputError):
            parameters = self._raw_parameters(request) if request is not None else {}
            # Marked for a BLS caller only: an outside caller naming itself one gets the plain sentence.
            mark = BLS_MARK if BLS_CALLER in parameters and carries_key(parameters, self.internal_key) else ""
            return self.error(f"{mark}{exc}", self.pb.TritonError.INVALID_ARG)
        if isinstance(exc, OverloadedError):
            return self.error(str(exc), self.pb.TritonError.UNAVAILABLE)
        self.log_error(f"{self.name}: unexpected error\n{''.join(traceback.format_exception(exc))}")
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[0][:300]
        return self.error(f"{self.name} failed: {detail}", self.pb.TritonError.INTERNAL)

    def response(self, outputs: Outputs, request: Any = None) -> Any:
        """The response holding ``outputs`` (pending encodings awaited). CUDA tensors go to Triton through
        DLPack, except for a BLS caller of this server in host memory: those are copied to the host here
        (:data:`BLS_HOST_OUTPUTS`)."""
        ready = {k: v.result() if isinstance(v, Pending) else v for k, v in outputs.items()}
        to_host = BLS_HOST_OUTPUTS and request is not None and self.from_bls(request)
        ready = {k: (v.cpu() if to_host else v.contiguous()) if isinstance(v, torch.Tensor) else v
                 for k, v in ready.items()}  # fmt: skip
        cuda = tuple(v for v in ready.values() if isinstance(v, torch.Tensor) and v.is_cuda)
        if cuda:
            self.settle(cuda)
            self._alive.append(cuda)
        return self.pb.InferenceResponse(output_tensors=[self.to_triton(k, v) for k, v in ready.items()])

    @staticmethod
    def settle(values: Any) -> None:
        """Wait for the kernels that produce CUDA tensors handed to Triton: Triton reads them through
        DLPack on its own stream, which does not wait for torch's (measured: zero-sized images under
        load on the H100 without this)."""
        devices = {v.device for v in values if isinstance(v, torch.Tensor) and v.is_cuda}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()

    def warm_up(self) -> None:
        """Create this instance's CUDA context and kernels at start-up, not in the first request."""
        if self.device.type == "cuda":
            x = torch.rand((1, 3, 64, 64), device=self.device)
            torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
            torch.cuda.synchronize(self.device)

    def error(self, message: str, code: Any) -> Any:
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    def to_triton(self, name: str, value: np.ndarray | torch.Tensor) -> Any:
        """A Triton tensor from a torch tensor (DLPack, no copy, on its device) or a numpy array."""
        if isinstance(value, torch.Tensor) and value.numel() == 0:  # nothing to share; DLPack needs data
            value = value.cpu().numpy()
        if isinstance(value, torch.Tensor):
            return self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        return self.pb.Tensor(name, value)

    # -- reading inputs ----------------------------------------------------------------------
    def tensor(self, request: Any, name: str) -> torch.Tensor:
        """An input as a torch tensor on this step's device (DLPack; copied only if Triton put it
        elsewhere)."""
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            raise InvalidInputError(f"missing input {name!r}")
        return torch.utils.dlpack.from_dlpack(t.to_dlpack()).to(self.device)

    def bytes_items(self, request: Any, name: str) -> list[bytes]:
        """A BYTES input of shape [batch, 1] → one bytes object per batch item."""
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            raise InvalidInputError(f"missing input {name!r}")
        return [bytes(v) for v in t.as_numpy().reshape(-1)]

    def single_image(self, request: Any, name: str = "IMAGE") -> bytes:
        items = self.bytes_items(request, name)
        if len(items) != 1:
            raise InvalidInputError(f"input {name!r} must hold exactly one image, got {len(items)}")
        return items[0]

    def optional_string(self, request: Any, name: str) -> str | None:
        """An optional BYTES input holding one UTF-8 string (the same for every batch item)."""
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            return None
        values = {bytes(v) for v in t.as_numpy().reshape(-1)}
        if len(values) != 1:
            raise InvalidInputError(f"input {name!r} must hold one value per request, got {len(values)}")
        try:
            return values.pop().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {name!r} is not UTF-8 text") from None

    @staticmethod
    def requested_outputs(request: Any) -> set[str]:
        """The outputs the caller asked for (Triton passes every output when none was named)."""
        names = request.requested_output_names() if hasattr(request, "requested_output_names") else None
        return set(names or ())

    def from_bls(self, request: Any) -> bool:
        """Whether ``request`` came from a BLS step (it names its caller; an outside caller that claims to be
        one only gets host tensors, which it receives anyway)."""
        return BLS_CALLER in self._raw_parameters(request)

    @staticmethod
    def _raw_parameters(request: Any) -> dict[str, Any]:
        try:
            raw = request.parameters() if hasattr(request, "parameters") else "{}"
            return json.loads(raw) if raw else {}
        except (TypeError, ValueError):
            return {}

    def request_parameters(self, request: Any) -> dict[str, Any]:
        """The request's parameters (Triton request parameters, sent by the client)."""
        parameters = self._raw_parameters(request)
        parameters.pop(BLS_CALLER, None)
        parameters.pop(INTERNAL_KEY_PARAM, None)
        return parameters


class BlsStep(Step):
    """A step that calls other models of the repository (BLS), asynchronously: the requests of one
    ``execute`` call, and the model calls inside each, run concurrently."""

    def setup(self) -> None:
        # role -> {"model", "inputs", "outputs", "max_batch"}, written by the build from the manifest
        self.networks: dict[str, dict[str, Any]] = json.loads(self.parameters.get("imgpipe.networks", "{}"))

    async def handle_async(self, request: Any) -> Outputs:
        raise NotImplementedError

    async def execute(self, requests: Sequence[Any]) -> list[Any]:  # type: ignore[override]
        async def one(request: Any) -> Any:
            try:
                self.admit(request)
                outputs = await self.handle_async(request)
                for value in outputs.values():  # encodings on the step's threads: awaited, not blocked on
                    if isinstance(value, Pending):
                        await asyncio.gather(*(asyncio.wrap_future(f) for f in value.futures))
                return self.response(outputs, request)
            except Exception as exc:
                return self.failure(exc, request)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def _memory(self) -> Any:
        if self.device.type == "cuda" and BLS_GPU_MEMORY:
            return self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_GPU, self.device.index or 0)
        return self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_CPU, 0)

    def from_triton(self, tensor: Any) -> torch.Tensor | np.ndarray:
        """A Triton tensor as a torch tensor on this step's device (DLPack); BYTES as a numpy array."""
        if tensor.is_cpu():
            array = tensor.as_numpy()
            if array.dtype == object:
                return array
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(self.device)

    async def infer(
        self, model: str, inputs: dict[str, torch.Tensor | np.ndarray], outputs: Sequence[str]
    ) -> list[Any]:
        """One BLS request to another model, outputs in ``outputs`` order as torch tensors on this
        step's device (BYTES as numpy arrays). An INVALID_ARG from that model is re-raised as the
        caller's mistake, with its message."""
        if not BLS_GPU_MEMORY:
            inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        request = self.pb.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[self.to_triton(k, v) for k, v in inputs.items()],
            preferred_memory=self._memory(),
            parameters={
                BLS_CALLER: self.name,
                **({INTERNAL_KEY_PARAM: self.internal_key} if self.internal_key else {}),
            },
        )
        self.settle(inputs.values())
        response = await request.async_exec()
        if response.has_error():
            error = response.error()
            message = error.message()
            code = error.code() if hasattr(error, "code") else None
            if BLS_MARK in message or code == self.pb.TritonError.INVALID_ARG:
                raise InvalidInputError(message[message.index(BLS_MARK) + len(BLS_MARK) :] if BLS_MARK in message
                                        else message)  # fmt: skip
            if any(m in message for m in OVERLOAD_MESSAGES):
                raise OverloadedError(f"the server is busy: {model} shed the request ({message[:80]}); retry later")
            raise InnerModelError(f"{model}: {message}")
        return [self.from_triton(self.pb.get_output_tensor_by_name(response, n)) for n in outputs]

    async def run(self, role: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The network of ``role`` on all items as one batch (split at its max_batch_size, the pieces
        concurrent); outputs in manifest order, on this step's device."""
        net = self.networks[role]
        count = len(inputs[0])
        if count == 0:
            return tuple(torch.zeros((0,), device=self.device) for _ in net["outputs"])
        step = int(net["max_batch"])
        parts = await asyncio.gather(
            *(
                self.infer(
                    net["model"],
                    {n: x[i : i + step].contiguous() for n, x in zip(net["inputs"], inputs, strict=True)},
                    net["outputs"],
                )
                for i in range(0, count, step)
            )
        )
        return tuple(torch.cat([p[j] for p in parts]) for j in range(len(net["outputs"])))
