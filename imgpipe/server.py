"""Launch the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel (DESIGN §6).

The wheel carries a ``tritonserver`` 2.51 binary, its shared libraries, the Python backend and one
Python-backend stub per CPython version. The stub embeds an interpreter that finds its packages
through the ``python3`` first on ``PATH``, so the server is started with this interpreter's ``bin/``
first on ``PATH`` and with a writable copy of the backends folder holding the matching stub.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from imgpipe.paths import CACHE_DIR


class ServerError(RuntimeError):
    """The server could not be started or did not become ready; the message says why."""


# Triton's restrictable API groups (``--http-restricted-api`` / ``--grpc-restricted-protocol``, 2.51).
RESTRICTABLE_APIS = (
    "health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace",
    "logging",
)  # fmt: skip
# What `imgpipe serve --admin-key` guards by default: everything that changes the server or reads its internals.
# model-config and metadata stay open: the pipelines' contracts are published in their configs.
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace", "statistics")
DEFAULT_ADMIN_HEADER = "imgpipe-admin-key"
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY_VALUE = re.compile(r"[A-Za-z0-9._~+/-]{8,256}")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class Restriction:
    """Triton's restricted APIs: a request to one of ``apis`` must carry the header ``header: key``.

    Over gRPC Triton expects the header as ``triton-grpc-protocol-<header>`` (its own prefix);
    :class:`imgpipe.clients.triton.TritonClient` adds it. Refused requests get HTTP 403, gRPC UNAVAILABLE.
    """

    key: str
    header: str = DEFAULT_ADMIN_HEADER
    apis: tuple[str, ...] = ADMIN_APIS

    def __post_init__(self) -> None:
        unknown = [a for a in self.apis if a not in RESTRICTABLE_APIS]
        if unknown or not self.apis:
            raise ServerError(f"restricted APIs must be among {', '.join(RESTRICTABLE_APIS)}; got {unknown or 'none'}")
        if not _HEADER_NAME.fullmatch(self.header):
            raise ServerError("the admin header name must be lower-case letters, digits and '-'")
        if not _KEY_VALUE.fullmatch(self.key):
            raise ServerError("the admin key must be 8-256 characters of letters, digits and ._~+/-")

    def args(self) -> list[str]:
        spec = f"{','.join(self.apis)}:{self.header}={self.key}"
        return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]

    def http_headers(self) -> dict[str, str]:
        return {self.header: self.key}


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC endpoint: the server's PEM certificate (chain) and key; with ``client_ca`` mutual TLS,
    clients must present a certificate signed by that CA. Triton's HTTP endpoint has no TLS: put it behind a
    TLS-terminating proxy, or keep it on localhost."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        for name, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"gRPC TLS {name} file {path} does not exist")
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args


def host_port(host: str, port: int) -> str:
    """``host:port``, IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def as_dict(self) -> dict[str, int]:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics}


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the wheel's server lie."""

    binary: Path
    libs: Path
    backends: Path
    stubs: Path
    caches: Path

    @classmethod
    def find(cls) -> TritonDistribution:
        # Located without importing it: pytriton's own __init__ pulls in its client and their needs,
        # which a server-only install (e.g. the server's files carried to a GPU node) does not have.
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:  # pragma: no cover - depends on the install
            raise ServerError(
                "the local Triton server needs the 'nvidia-pytriton' package: pip install 'imgpipe[local]'"
            )
        root = Path(next(iter(spec.submodule_search_locations))).resolve()
        dist = cls(
            binary=root / "tritonserver" / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            backends=root / "tritonserver" / "backends",
            stubs=root / "tritonserver" / "python_backend_stubs",
            caches=root / "tritonserver" / "caches",
        )
        if not dist.binary.is_file():
            raise ServerError(f"no tritonserver binary at {dist.binary}")
        return dist

    def stub_for(self, version: tuple[int, int]) -> Path:
        stub = self.stubs / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version[0]}.{version[1]}")
        return stub

    def prepare_backends(self, cache_dir: Path) -> Path:
        """Return a writable backends folder whose python backend holds this interpreter's stub."""
        target = cache_dir / f"backends-py{sys.version_info[0]}{sys.version_info[1]}"
        stub_target = target / "python" / "triton_python_backend_stub"
        if not stub_target.is_file():
            staging = Path(tempfile.mkdtemp(prefix="backends-", dir=cache_dir))
            shutil.copytree(self.backends, staging / "b", dirs_exist_ok=True)
            shutil.copy2(self.stub_for(sys.version_info[:2]), staging / "b" / "python" / stub_target.name)
            with contextlib.suppress(OSError):
                (staging / "b").rename(target)  # atomic: concurrent launchers see a whole folder or none
            shutil.rmtree(staging, ignore_errors=True)
        return target


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR, as servers set it: connections
    lingering in TIME_WAIT after a server stopped do not make the port busy; a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int = 3) -> list[int]:
    """Ports the kernel reports free right now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)'(?: version \d+)?: (.*)")
_PORT_FAILURE = re.compile(r"(failed to start \w+ service.*|.*Address already in use.*|.*Socket .* already in use.*)")


def explain_failure(log: str) -> str:
    """Turn Triton's log into the sentence a user needs: which model failed and Triton's reason."""
    reasons = [f"model '{m.group(1)}' failed to load: {m.group(2).strip()}" for m in _LOAD_FAILURE.finditer(log)]
    reasons += [m.group(1).strip() for m in _PORT_FAILURE.finditer(log)]
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    tail = "\n".join(log.strip().splitlines()[-15:])
    return f"tritonserver exited; last log lines:\n{tail}"


@dataclass
class TritonServer:
    """One ``tritonserver`` process over a model repository.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    model_repository: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"  # the address HTTP, gRPC and metrics bind to (0.0.0.0: every interface)
    log_verbose: int = 0
    startup_timeout_s: float = 240.0
    cache_dir: Path | None = None
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None
    cache_mib: int = 0  # response cache (models whose config enables it)
    poll_secs: int = 0  # poll the repository for new/rolled-back versions
    restriction: Restriction | None = None  # admin APIs guarded by a header key
    grpc_tls: GrpcTls | None = None
    metrics: bool = True  # Prometheus metrics endpoint on or off
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_lines: list[str] = field(default_factory=list, init=False, repr=False)
    _reader: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the server: the bind address, or loopback for a wildcard."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    @property
    def http_url(self) -> str:
        return host_port(self.connect_host, self.ports.http)

    @property
    def grpc_url(self) -> str:
        return host_port(self.connect_host, self.ports.grpc)

    @property
    def metrics_url(self) -> str | None:
        return f"http://{host_port(self.connect_host, self.ports.metrics)}/metrics" if self.metrics else None

    @property
    def log(self) -> str:
        return "".join(self._log_lines)

    def command(self, backends: Path) -> list[str]:
        dist = TritonDistribution.find()
        return [
            str(dist.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            *(
                [f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}"]
                if self.metrics
                else ["--allow-metrics=false"]
            ),
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            *(
                [f"--cache-directory={dist.caches}", f"--cache-config=local,size={self.cache_mib << 20}"]
                if self.cache_mib
                else []
            ),
            *(["--model-control-mode=poll", f"--repository-poll-secs={self.poll_secs}"] if self.poll_secs else []),
            *(self.restriction.args() if self.restriction else []),
            *(self.grpc_tls.args() if self.grpc_tls else []),
            *self.extra_args,  # last: they may override any of the above
        ]

    def environment(self) -> dict[str, str]:
        env = os.environ.copy()
        dist = TritonDistribution.find()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The Python-backend stub resolves its packages through the python3 first on PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self) -> TritonServer:
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run `imgpipe build` first")
        wanted = {n: p for n, p in self.ports.as_dict().items() if self.metrics or n != "metrics"}
        taken = [f"{name} port {port}" for name, port in wanted.items() if not port_is_free(port)]
        if taken:
            raise ServerError(f"cannot start tritonserver: {', '.join(taken)} already in use")
        cache = self.cache_dir or CACHE_DIR
        cache.mkdir(parents=True, exist_ok=True)
        backends = TritonDistribution.find().prepare_backends(cache)
        command = self.command(backends)  # before the process: a missing TLS file is reported here
        self._process = subprocess.Popen(
            command,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        sink = self.log_path.open("a", encoding="utf-8") if self.log_path else None
        try:
            for raw in iter(self._process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                self._log_lines.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
        finally:
            if sink:
                sink.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        headers = self.restriction.http_headers() if self.restriction else {}
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                if self._reader:
                    self._reader.join(timeout=5)
                raise ServerError(explain_failure(self.log))
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver was not ready after {self.startup_timeout_s:.0f} s\n{explain_failure(self.log)}"
        )

    def loaded_models(self) -> list[dict[str, str]]:
        """The repository index: name, version and state of every model Triton knows (sends the admin key
        when the repository API is restricted)."""
        headers = self.restriction.http_headers() if self.restriction else {}
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index", data=b"{}", headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests and unloads models), SIGKILL after the timeout."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._reader:
            self._reader.join(timeout=5)
        code = self._process.returncode
        self._process = None
        return code

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
