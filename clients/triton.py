"""One client API over Triton's gRPC and HTTP protocols (tritonclient underneath).

:class:`TritonClient` is safe to share between threads: each thread gets its own tritonclient
connection (the HTTP client is not thread-safe). Server errors become :class:`InferenceError`, which
keeps the protocol's status (``StatusCode.INVALID_ARGUMENT`` / ``400``) and Triton's message.

Security options (see README "Running it safely"): ``headers`` are sent with every call; ``admin_key`` is the
key of a server started with restricted APIs (``imgpipe serve --admin-key``), sent as the header that
protocol expects; ``ssl`` (gRPC only) connects over TLS, verifying the server against ``root_certificates``
and presenting ``certificate_chain`` + ``private_key`` for mutual TLS (PEM file paths).

Failures and retries:

- :class:`TransportError` (a subclass of :class:`InferenceError`, so existing ``except InferenceError`` code
  still catches it) is the one error type for every request that got no answer from the server, over both
  protocols: connection refused, reset or closed (a server restarting or gone), a TLS handshake failure, no
  answer within ``timeout_s``. Its ``status`` uses the gRPC names for both protocols
  (``StatusCode.UNAVAILABLE``, ``StatusCode.DEADLINE_EXCEEDED`` for a timeout); ``transient`` says whether
  retrying can help. The HTTP client's bare ``ConnectionRefusedError`` and friends never escape.
- Inference is idempotent, so :meth:`TritonClient.infer` (and :meth:`TritonClient.call` for read-only
  methods, ``get_*``/``is_*``) retries under a :class:`Retry` policy (the default: exponential backoff with
  jitter, 0.05 s doubling to 2 s, until 30 s after the first attempt): a transient transport failure, an
  UNAVAILABLE answer (e.g. "Server is stopping" during a drain), a model that is (re)loading ("has no available
  versions": the supervisor reloading it, a rolling update) and a Python-backend stub that died ("Stub process
  ... is not healthy": ``imgpipe serve`` reloads the model within a second or two). It never retries a refusal
  that will not change: INVALID_ARG and any other server answer, a TLS failure, a timeout, and Triton's
  restricted-protocol refusal ("This protocol is restricted, expecting header ...", gRPC UNAVAILABLE).
  Queue-full rejections ("Exceeds maximum queue size", UNAVAILABLE) are the server shedding load on purpose:
  retrying them adds load exactly when the server is saturated, and load tests (``imgpipe loadtest``,
  ``imgpipe benchmark``) count them as outcomes, so they are **not** retried unless ``Retry(queue_full=True)``.
  ``retry=None`` turns retries off (raw outcomes).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from imgpipe.dtypes import triton_name

Protocol = Literal["grpc", "http"]
DEFAULT_URLS: dict[str, str] = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_ADMIN_HEADER = "imgpipe-admin-key"  # the header `imgpipe serve --admin-key` checks
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton prefixes a gRPC restricted-protocol header with it
UNAVAILABLE = "StatusCode.UNAVAILABLE"
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class TransportError(InferenceError):
    """The request got no answer from the server, over either protocol: connection refused, reset or closed,
    TLS handshake failure, no answer within the client's ``timeout_s``.

    ``status`` is ``StatusCode.UNAVAILABLE`` (``StatusCode.DEADLINE_EXCEEDED`` for a timeout) for both protocols;
    ``transient`` is True where a retry can succeed (refused/reset/closed: a server restarting), False for TLS
    failures and timeouts. With a reset or a timeout, the server may or may not have run the request."""

    def __init__(self, status: str, message: str, transient: bool) -> None:
        super().__init__(status, message)
        self.transient = transient


@dataclass(frozen=True)
class Retry:
    """When :class:`TritonClient` retries an idempotent call, and how long it keeps trying.

    A retryable failure (see the module docstring) is retried after a backoff that doubles from
    ``first_backoff_s`` up to ``max_backoff_s``, each drawn at random between half and all of it (jitter, so
    that clients cut off together do not come back together), until ``deadline_s`` after the first attempt:
    no attempt starts after it, and the last failure is raised. An attempt in progress is never cut short
    (each has the client's ``timeout_s``). ``queue_full=True`` also retries "Exceeds maximum queue size"."""

    deadline_s: float = 30.0
    first_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    queue_full: bool = False

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or self.first_backoff_s <= 0 or self.max_backoff_s < self.first_backoff_s:
            raise ValueError("Retry needs deadline_s >= 0 and 0 < first_backoff_s <= max_backoff_s")

    def backoff(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (0 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.first_backoff_s * 2.0 ** min(attempt, 32))
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_RETRY = Retry()

# gRPC reports its own connection failures as UNAVAILABLE, like some of Triton's answers: these are gRPC's.
_GRPC_TRANSPORT = re.compile(
    r"failed to connect|connection refused|socket closed|stream removed|connection reset|broken pipe|goaway|"
    r"dns resolution|end of file|handshake|\bssl\b|certificate|\btls\b|connection timed out|network is unreachable|"
    r"no route to host|keepalive|too many pings",
    re.IGNORECASE,
)
_TLS = re.compile(r"handshake|\bssl\b|certificate|\btls\b", re.IGNORECASE)
_RESTRICTED = "This protocol is restricted"  # Triton's restricted-protocol refusal (gRPC UNAVAILABLE): final
_QUEUE_FULL = "Exceeds maximum queue size"
# Server answers that a later attempt can get past: a model (re)loading, a dead stub being reloaded by the
# supervisor, the server draining ("Server is stopping" is UNAVAILABLE, handled by status).
_TRANSIENT_ANSWERS = re.compile(r"has no available versions|Stub process '[^']*' is not healthy")
_READ_ONLY = re.compile(r"(get|is)_\w+")


def _http_transport_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP client (geventhttpclient) raises when there is no answer, besides OSError."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from geventhttpclient.response import HTTPParseError
        from geventhttpclient.useragent import ConnectionError as UserAgentConnectionError

        errors += [HTTPParseError, UserAgentConnectionError]
    except ImportError:  # pragma: no cover - geventhttpclient is a dependency of tritonclient[http]
        pass
    return tuple(errors)


def classify(exc: BaseException) -> InferenceError | None:
    """The :class:`InferenceError` (or :class:`TransportError`) for what tritonclient raised; None if ``exc`` is
    neither a server answer nor a transport failure (a bug: let it propagate)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceError):
        return exc
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status()), exc.message() or str(exc)
        if status == DEADLINE_EXCEEDED:
            return TransportError(DEADLINE_EXCEEDED, message, transient=False)
        if status == UNAVAILABLE and _RESTRICTED not in message and _GRPC_TRANSPORT.search(message):
            return TransportError(UNAVAILABLE, message, transient=not _TLS.search(message))
        return InferenceError(status, message)
    if isinstance(exc, TimeoutError):
        return TransportError(DEADLINE_EXCEEDED, f"no answer in time: {exc}", transient=False)
    if isinstance(exc, _http_transport_errors()):
        detail = str(exc) or type(exc).__name__
        return TransportError(UNAVAILABLE, f"{type(exc).__name__}: {detail}", transient=True)
    return None


def is_retryable(error: InferenceError, policy: Retry) -> bool:
    """Whether ``policy`` retries ``error`` (see the module docstring for the rules and the reasons)."""
    if isinstance(error, TransportError):
        return error.transient
    if _RESTRICTED in error.message:
        return False
    if _QUEUE_FULL in error.message:
        return policy.queue_full
    return error.status in (UNAVAILABLE, "503") or bool(_TRANSIENT_ANSWERS.search(error.message))


class TritonClient:
    """A client of one server over one protocol; see the module docstring for errors and retries.

    ``retry``: the :class:`Retry` policy of idempotent calls (default :data:`DEFAULT_RETRY`: until 30 s),
    or None for raw outcomes (one attempt; load tests). ``retried`` counts the retries made so far."""

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
        retry: Retry | None = DEFAULT_RETRY,
    ) -> None:
        self.protocol = check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.retry = retry
        self.retried = 0
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

    def _reconnect(self) -> None:
        """Drop this thread's connection after a transport failure: the next attempt opens a fresh one (a gRPC
        channel would otherwise wait out its own reconnect backoff, up to minutes, after a server restart; an
        HTTP pool may hold dead sockets)."""
        client = getattr(self._local, "client", None)
        if client is None:
            return
        self._local.client = None
        with self._lock:
            if client in self._opened:
                self._opened.remove(client)
        try:
            client.close()
        except Exception:  # closing a broken connection may fail; it is dropped either way
            log.debug("closing a broken connection failed", exc_info=True)

    def _attempts(self, what: str, attempt: Callable[[], T], retry: Retry | None) -> T:
        """Run ``attempt`` under ``retry``; raise :class:`InferenceError` / :class:`TransportError`."""
        start = time.monotonic()
        tries = 0
        while True:
            try:
                return attempt()
            except Exception as exc:
                error = classify(exc)
                if error is None:
                    raise
            if isinstance(error, TransportError):
                self._reconnect()
            if retry is None or not is_retryable(error, retry):
                raise error from None
            pause = retry.backoff(tries)
            if time.monotonic() + pause - start > retry.deadline_s:
                raise error from None
            tries += 1
            with self._lock:
                self.retried += 1
            log.debug("%s: %s (%s); retry %d in %.2f s", what, error.status, error.message[:200], tries, pause)
            time.sleep(pause)

    def is_ready(self, model: str | None = None) -> bool:
        headers = self.headers or None
        try:
            if model:
                return bool(self.connection.is_model_ready(model, headers=headers))
            return bool(self.connection.is_server_ready(headers=headers))
        except Exception as exc:
            if isinstance(classify(exc), TransportError):
                self._reconnect()
            return False

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any tritonclient call with this client's headers, e.g. ``call("get_model_repository_index")``
        or ``call("update_log_settings", {...})``; a refusal raises :class:`InferenceError`, no answer
        :class:`TransportError`. Read-only methods (``get_*``, ``is_*``) are retried under the client's policy."""
        if self.headers:
            kwargs.setdefault("headers", self.headers)
        retry = self.retry if _READ_ONLY.fullmatch(method) else None
        return self._attempts(method, lambda: getattr(self.connection, method)(*args, **kwargs), retry)

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        parameters: dict[str, str | int | float | bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on named numpy inputs (batch dimension included, if the model has one) and
        return named outputs. ``parameters`` become Triton request parameters. Retried under the client's
        :class:`Retry` policy (inference is idempotent)."""
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

        def attempt() -> Any:
            if self.protocol == "grpc":
                return self.connection.infer(
                    model, infer_inputs, outputs=requested, client_timeout=self.timeout_s, parameters=parameters,
                    headers=self.headers or None,
                )  # fmt: skip
            return self.connection.infer(
                model, infer_inputs, outputs=requested, parameters=parameters, headers=self.headers or None
            )

        result = self._attempts(f"infer {model}", attempt, self.retry)
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
