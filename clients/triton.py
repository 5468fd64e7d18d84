"""One client API over Triton's gRPC and HTTP protocols (tritonclient underneath).

:class:`TritonClient` is safe to share between threads: each thread gets its own tritonclient
connection (the HTTP client is not thread-safe). Server errors become :class:`InferenceError`, which
keeps the protocol's status (``StatusCode.INVALID_ARGUMENT`` / ``400``) and Triton's message.

Security options (see README "Running it safely"): ``headers`` are sent with every call; ``admin_key`` is the
key of a server started with restricted APIs (``imgpipe serve --admin-key``), sent as the header that
protocol expects; ``ssl`` (gRPC only) connects over TLS, verifying the server against ``root_certificates``
and presenting ``certificate_chain`` + ``private_key`` for mutual TLS (PEM file paths).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgpipe.dtypes import triton_name

Protocol = Literal["grpc", "http"]
DEFAULT_URLS: dict[str, str] = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_ADMIN_HEADER = "imgpipe-admin-key"  # the header `imgpipe serve --admin-key` checks
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton prefixes a gRPC restricted-protocol header with it


def admin_headers(protocol: Protocol, key: str, header: str = DEFAULT_ADMIN_HEADER) -> dict[str, str]:
    """The header carrying the admin ``key`` of a server with restricted APIs, as ``protocol`` sends it."""
    return {f"{GRPC_RESTRICTED_PREFIX}{header}" if protocol == "grpc" else header: key}


def check_protocol(protocol: str) -> Protocol:
    """``protocol`` if it is one the clients speak, else a ValueError that names the choices."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    return protocol  # type: ignore[return-value]


class InferenceError(RuntimeError):
    """The server refused or failed a request."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def is_invalid_argument(self) -> bool:
        return self.status in ("StatusCode.INVALID_ARGUMENT", "400")


class TritonClient:
    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol = "grpc",
        timeout_s: float = 120.0,
        *,
        headers: Mapping[str, str] | None = None,
        admin_key: str | None = None,
        admin_header: str = DEFAULT_ADMIN_HEADER,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
    ) -> None:
        self.protocol = check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.headers: dict[str, str] = dict(headers or {})
        if admin_key is not None:
            self.headers.update(admin_headers(self.protocol, admin_key, admin_header))
        files = dict(root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain)
        ssl = ssl or any(f is not None for f in files.values())  # a certificate file implies TLS
        if ssl and self.protocol != "grpc":
            raise ValueError("TLS is offered on gRPC only (Triton's HTTP endpoint has none): use protocol='grpc'")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")
        self.ssl = ssl
        tls = {"ssl": True, **{k: None if f is None else str(f) for k, f in files.items()}}
        self._tls: dict[str, Any] = tls if ssl else {}
        self._local = threading.local()
        self._opened: list[Any] = []  # every thread's connection, so close() reaches them all
        self._lock = threading.Lock()

    @property
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    @property
    def connection(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url, **self._tls)
            else:
                client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            self._local.client = client
            with self._lock:
                self._opened.append(client)
        return client

    def is_ready(self, model: str | None = None) -> bool:
        headers = self.headers or None
        try:
            if model:
                return bool(self.connection.is_model_ready(model, headers=headers))
            return bool(self.connection.is_server_ready(headers=headers))
        except Exception:
            return False

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any tritonclient call with this client's headers, e.g. ``call("get_model_repository_index")``
        or ``call("update_log_settings", {...})``; a refusal raises :class:`InferenceError`."""
        from tritonclient.utils import InferenceServerException

        if self.headers:
            kwargs.setdefault("headers", self.headers)
        try:
            return getattr(self.connection, method)(*args, **kwargs)
        except InferenceServerException as exc:
            raise InferenceError(str(exc.status()), exc.message() or str(exc)) from None

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        parameters: dict[str, str | int | float | bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on named numpy inputs (batch dimension included, if the model has one) and
        return named outputs. ``parameters`` become Triton request parameters."""
        from tritonclient.utils import InferenceServerException

        module = self._module
        infer_inputs = []
        for name, array in inputs.items():
            dtype = triton_name(array.dtype)
            tensor = module.InferInput(name, list(array.shape), dtype)
            if self.protocol == "http" and dtype != "BYTES":
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = self.connection.infer(
                    model, infer_inputs, outputs=requested, client_timeout=self.timeout_s, parameters=parameters,
                    headers=self.headers or None,
                )  # fmt: skip
            else:
                result = self.connection.infer(
                    model, infer_inputs, outputs=requested, parameters=parameters, headers=self.headers or None
                )
        except InferenceServerException as exc:
            raise InferenceError(str(exc.status()), exc.message() or str(exc)) from None
        return {name: result.as_numpy(name) for name in outputs}

    def close(self) -> None:
        """Close every connection this client opened. Triton waits for open HTTP keep-alive connections
        when it shuts down (up to its exit timeout, 30 s by default), so close clients you are done with."""
        with self._lock:
            opened, self._opened = self._opened, []
        for client in opened:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bytes_tensor(*items: bytes | str) -> np.ndarray:
    """A ``[len(items), 1]`` BYTES tensor (one element per batch item)."""
    return np.array([[i.encode() if isinstance(i, str) else i] for i in items], dtype=object)
