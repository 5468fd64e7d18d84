"""Shared machinery of imgpipe's Python-backend models.

``model.py`` adapters in ``model_repository/`` pass in ``triton_python_backend_utils`` (importable only
inside the Triton stub) and delegate to a :class:`PythonStep`. Every request is answered on its own:
a caller's mistake (:class:`~imgpipe.errors.InvalidInputError`) becomes an ``INVALID_ARG`` response
for that request only, anything else an ``INTERNAL`` one, and the other requests of the batch go on.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgpipe.errors import InvalidInputError


class PythonStep:
    def __init__(self, pb_utils: Any, args: dict[str, str]) -> None:
        self.pb = pb_utils
        self.config: dict[str, Any] = json.loads(args["model_config"])
        self.name: str = self.config["name"]
        self.parameters: dict[str, str] = {
            k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()
        }
        self.model_dir = f"{args['model_repository']}/{args['model_version']}"

    # -- to implement ------------------------------------------------------------------------
    def handle(self, request: Any) -> dict[str, np.ndarray | torch.Tensor]:
        """Outputs of one request, by name."""
        raise NotImplementedError

    # -- Triton entry point ------------------------------------------------------------------
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self.response(self.handle(request)))
            except Exception as exc:  # keep serving: one failed request must not take the batch down
                responses.append(self.failure(exc))
        return responses

    def failure(self, exc: Exception) -> Any:
        """The error response for an exception: INVALID_ARG for the caller's mistakes, else INTERNAL."""
        if isinstance(exc, InvalidInputError):
            return self.error(str(exc), self.pb.TritonError.INVALID_ARG)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return self.error(f"{self.name} failed: {detail}", self.pb.TritonError.INTERNAL)

    def response(self, outputs: dict[str, np.ndarray | torch.Tensor]) -> Any:
        tensors = []
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                tensors.append(self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous())))
            else:
                tensors.append(self.pb.Tensor(name, value))
        return self.pb.InferenceResponse(output_tensors=tensors)

    def error(self, message: str, code: Any) -> Any:
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    # -- reading inputs ----------------------------------------------------------------------
    def tensor(self, request: Any, name: str) -> torch.Tensor:
        """An input as a torch tensor, on the device Triton put it on (no copy through DLPack)."""
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            raise InvalidInputError(f"missing input {name!r}")
        return torch.utils.dlpack.from_dlpack(t.to_dlpack())

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

    def request_parameters(self, request: Any) -> dict[str, Any]:
        """The request's parameters (Triton request parameters, sent by the client)."""
        raw = request.parameters() if hasattr(request, "parameters") else "{}"
        return json.loads(raw) if raw else {}

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """One BLS request to another model of the repository, outputs in ``outputs`` order (on CPU)."""
        request = self.pb.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[self.pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
            preferred_memory=self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [self.pb.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]

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
