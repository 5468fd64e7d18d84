"""Launch the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel (DESIGN §6).

The wheel carries a ``tritonserver`` 2.51 binary, its shared libraries, the Python backend and one
Python-backend stub per CPython version. The stub embeds an interpreter that finds its packages
through the ``python3`` first on ``PATH``, so the server is started with this interpreter's ``bin/``
first on ``PATH`` and with a writable copy of the backends folder holding the matching stub.

Fault tolerance (issue 12), as :class:`TritonServer` runs it:

- **Supervisor** (``supervise=True``, the default): the server runs in explicit model-control mode with every
  model loaded at start (``--model-control-mode=explicit --load-model=*``, unless ``poll_secs`` or an extra
  flag chooses the mode), and :class:`imgpipe.supervisor.Supervisor` reloads a model whose Python-backend stub
  died; ``restarts`` counts its repairs. Explicit mode opens Triton's load/unload API, which the default
  ("none") mode refuses: when no :class:`Restriction` is given, the launcher therefore guards the
  ``model-repository`` API with a fresh random key of its own (only the supervisor and :meth:`loaded_models`
  know it), so nobody else can unload models. In poll mode (``poll_secs``) Triton refuses model control, so
  the supervisor cannot reload: a dead stub stops the server (non-zero exit) for an orchestrator to restart.
  When the supervisor gives up, ``failure`` says why.
- **Drain** (``grace_s``, 30 s, Triton's ``--exit-timeout-secs``): measured on 2.51, SIGTERM makes Triton
  (1) close the HTTP listener at once (new HTTP connections are refused, so readiness probes fail and load
  balancers stop sending) while it keeps serving gRPC and the HTTP keep-alive connections already open, until
  those connections close or the grace period ends; (2) then stop admitting inference (new requests get
  UNAVAILABLE "Server is stopping") and let the requests in flight finish within what is left of the grace
  period; (3) unload the models (requests in that second get NOT_FOUND "... has no available versions",
  which the client retries) and close gRPC. In-flight requests are cut only when HTTP clients keep their
  connections open (and busy) for the whole grace period: the two phases share one budget. :meth:`stop`
  sends SIGTERM and waits for that sequence; once the requests are done (Triton logs that it is unloading) it
  allows ``unload_timeout_s`` for the unloading, then kills the process group -- a model version whose stub
  died while serving a request never finishes unloading in 2.51 and would otherwise hold the exit for the
  whole grace period.
- **Shared memory**: the Python backend gets a per-start region prefix
  (``--backend-config=python,shm-region-prefix-name=imgpipe_<pid>_<random>_``); after the server exited,
  :meth:`stop` removes ``/dev/shm/<prefix>*``, which also covers the regions of killed stubs and of a killed
  server. Other servers' regions (other prefixes) are never touched.
- **Internal key**: each start puts a fresh random key in the server's environment (inherited by the stubs,
  :data:`imgpipe.guard.INTERNAL_KEY_ENV`), which internal models require from their callers; with
  ``open_internal_models`` the variable is removed instead, so internal networks and steps can be called
  directly (debugging, perf_analyzer on one network).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
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

from imgpipe.guard import INTERNAL_KEY_ENV
from imgpipe.paths import CACHE_DIR
from imgpipe.supervisor import Supervisor

log = logging.getLogger(__name__)


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
    """Where the pieces of the server lie: the ``nvidia-pytriton`` wheel's (the local server), or else an installed
    Triton such as NGC's ``tritonserver`` container (``/opt/tritonserver``, or ``$IMGPIPE_TRITON_HOME``), whose
    Python backend already carries the stub of the container's Python (``system``: nothing is copied)."""

    binary: Path
    libs: Path
    backends: Path
    stubs: Path
    caches: Path
    system: bool = False

    @classmethod
    def find(cls) -> TritonDistribution:
        # Located without importing it: pytriton's own __init__ pulls in its client and their needs,
        # which a server-only install (e.g. the server's files carried to a GPU node) does not have.
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            return cls.installed()
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

    @classmethod
    def installed(cls) -> TritonDistribution:
        """An installed Triton (the NGC container's layout), used where the wheel is not installed."""
        home = Path(os.environ.get("IMGPIPE_TRITON_HOME", "/opt/tritonserver"))
        if not (home / "bin" / "tritonserver").is_file():
            raise ServerError(
                "no Triton server found: pip install 'imgpipe[local]' (the nvidia-pytriton wheel), or run in NGC's"
                f" tritonserver container ({home}/bin/tritonserver; IMGPIPE_TRITON_HOME names another folder)"
            )
        return cls(home / "bin" / "tritonserver", home / "lib", home / "backends", home / "backends", home / "caches",
                   system=True)  # fmt: skip

    def stub_for(self, version: tuple[int, int]) -> Path:
        stub = self.stubs / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version[0]}.{version[1]}")
        return stub

    def prepare_backends(self, cache_dir: Path) -> Path:
        """Return a backends folder whose python backend holds this interpreter's stub: an installed Triton's
        own, or a writable copy of the wheel's with the stub of this Python (made once in ``cache_dir``)."""
        if self.system:
            return self.backends
        cache_dir.mkdir(parents=True, exist_ok=True)
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


def flag_value(args: tuple[str, ...] | list[str], flag: str) -> str | None:
    """The value the last occurrence of ``flag`` gives in ``args`` (``--flag=value`` or ``--flag value``)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


SHM_DIR = Path("/dev/shm")
CUDA_MEMORY_POOL_MIB = 1024  # per GPU (see TritonServer.cuda_memory_pool_mib)
OMP_WAIT_POLICY = "PASSIVE"  # the stubs' OpenMP threads sleep when idle (see TritonServer.environment)
# Triton 2.51 logs this once no inference is in flight any more and it starts unloading the models.
_UNLOADING = "All models are stopped, unloading models"


def visible_gpus(dev: Path = Path("/dev")) -> list[int]:
    """Triton's device ids of this machine's GPUs: the NVIDIA device files, as many as CUDA_VISIBLE_DEVICES
    lets through (without importing CUDA). Empty on a machine without one."""
    found = sorted(int(p.name[len("nvidia") :]) for p in dev.glob("nvidia[0-9]*") if p.name[6:].isdigit())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
        found = found[: min(count, len(found))]
    return list(range(len(found)))


def _new_shm_prefix() -> str:
    """A /dev/shm name prefix no other server uses: this process's pid and a random part."""
    return f"imgpipe_{os.getpid()}_{secrets.token_hex(4)}_"


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
    supervise: bool = True  # reload a model whose Python-backend stub died (module docstring)
    grace_s: float = 30.0  # SIGTERM drain: Triton's --exit-timeout-secs, and what stop() waits for
    unload_timeout_s: float = 10.0  # after the last request finished, how long unloading may take at stop
    open_internal_models: bool = False  # no internal key: internal networks/steps callable from outside
    # Triton's CUDA memory pool per GPU (--cuda-memory-pool-byte-size, 64 MiB by default): the Python backend
    # hands GPU tensors between steps through it, and past it falls back to pinned host memory or fails to
    # fill the buffer ("failed to copy data", server#7148). One remove_background batch of 16 holds ~200 MB.
    cuda_memory_pool_mib: int = field(
        default_factory=lambda: int(os.environ.get("IMGPIPE_CUDA_MEMORY_POOL_MIB", CUDA_MEMORY_POOL_MIB))
    )
    failure: str | None = field(default=None, init=False)  # why the supervisor stopped the server, if it did
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_lines: list[str] = field(default_factory=list, init=False, repr=False)
    _reader: threading.Thread | None = field(default=None, init=False, repr=False)
    _supervisor: Supervisor | None = field(default=None, init=False, repr=False)
    _restarts_before: int = field(default=0, init=False, repr=False)
    _shm_prefix: str = field(default_factory=_new_shm_prefix, init=False, repr=False)
    _internal_key: str | None = field(default=None, init=False, repr=False)
    _control_key: str = field(default_factory=lambda: secrets.token_hex(24), init=False, repr=False)
    _stop_lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

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

    @property
    def pid(self) -> int | None:
        """The ``tritonserver`` process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def restarts(self) -> int:
        """Models the supervisor reloaded since this object was created (over all its starts)."""
        return self._restarts_before + (self._supervisor.restarts if self._supervisor else 0)

    @property
    def internal_key(self) -> str | None:
        """The key this start put in the server's environment (None with ``open_internal_models``)."""
        return self._internal_key

    @property
    def shm_prefix(self) -> str | None:
        """The prefix of this server's Python-backend regions in /dev/shm (None if an extra flag set one)."""
        return None if self._own_shm_prefix_overridden else self._shm_prefix

    @property
    def _own_shm_prefix_overridden(self) -> bool:
        return any("shm-region-prefix-name" in a for a in self.extra_args)

    @property
    def model_control_mode(self) -> str:
        """Triton's model-control mode: an extra flag's choice, else poll (``poll_secs``), else explicit with the
        supervisor, else none."""
        chosen = flag_value(self.extra_args, "--model-control-mode")
        if chosen:
            return chosen
        if self.poll_secs:
            return "poll"
        return "explicit" if self.supervise else "none"

    @property
    def _launcher_chose_explicit(self) -> bool:
        return self.model_control_mode == "explicit" and not flag_value(self.extra_args, "--model-control-mode")

    @property
    def admin(self) -> Restriction | None:
        """The restriction the launcher knows the key of: the caller's, or (explicit mode chosen by the launcher,
        no caller's restriction) the launcher's own key over the model-repository API."""
        if self.restriction is not None:
            return self.restriction
        if self._launcher_chose_explicit:
            return Restriction(self._control_key, DEFAULT_ADMIN_HEADER, ("model-repository",))
        return None

    @property
    def exit_timeout_s(self) -> float:
        """Triton's exit timeout: ``grace_s``, or what an extra ``--exit-timeout-secs`` sets."""
        chosen = flag_value(self.extra_args, "--exit-timeout-secs")
        return float(chosen) if chosen else self.grace_s

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
            *(["--model-control-mode=explicit", "--load-model=*"] if self._launcher_chose_explicit else []),
            *(self.admin.args() if self.admin else []),
            *(self.grpc_tls.args() if self.grpc_tls else []),
            *(
                []
                if self._own_shm_prefix_overridden
                else [f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
            ),
            f"--exit-timeout-secs={math.ceil(self.grace_s)}",
            *(f"--cuda-memory-pool-byte-size={gpu}:{self.cuda_memory_pool_mib << 20}" for gpu in visible_gpus()),
            *self.extra_args,  # last: they may override any of the above
        ]

    def environment(self) -> dict[str, str]:
        env = os.environ.copy()
        dist = TritonDistribution.find()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The Python-backend stub resolves its packages through the python3 first on PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # Many stub processes share the cores, each with OpenMP threads (torch); threads that spin after their
        # work take CPU from the others. Passive waiting, measured in test_reliability's overload test on 2
        # cores: goodput at 2x the queue capacity 20-25 req/s against 18-19 spinning (p100 0.9 s against
        # 1.6 s), one caller alone 42 ms against 33 ms. A value the caller set is kept.
        env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
        # The stubs inherit it: internal models refuse callers without it (imgpipe.guard).
        if self._internal_key is None:
            env.pop(INTERNAL_KEY_ENV, None)
        else:
            env[INTERNAL_KEY_ENV] = self._internal_key
        return env

    def start(self) -> TritonServer:
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} does not exist: run `imgpipe build` first")
        wanted = {n: p for n, p in self.ports.as_dict().items() if self.metrics or n != "metrics"}
        taken = [f"{name} port {port}" for name, port in wanted.items() if not port_is_free(port)]
        if taken:
            raise ServerError(f"cannot start tritonserver: {', '.join(taken)} already in use")
        backends = TritonDistribution.find().prepare_backends(self.cache_dir or CACHE_DIR)
        # Fresh per start: a restarted server shares nothing with the previous one.
        self._shm_prefix = _new_shm_prefix()
        self._control_key = secrets.token_hex(24)
        self._internal_key = None if self.open_internal_models else secrets.token_urlsafe(32)
        self.failure = None
        self._log_lines = []
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
        if self.supervise:
            admin = self.admin
            self._supervisor = Supervisor(
                self._process.pid,
                self.http_url,
                give_up=self._give_up,
                headers=admin.http_headers() if admin and "model-repository" in admin.apis else {},
                can_reload=self.model_control_mode == "explicit",
            ).start()
        return self

    def _give_up(self, reason: str) -> None:
        """The supervisor could not repair the server: record why and stop it (``imgpipe serve`` then exits
        non-zero, so an orchestrator restarts it)."""
        self.failure = reason
        log.error("stopping tritonserver: %s", reason)
        self.stop()

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
        headers = self.admin.http_headers() if self.admin else {}
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
        headers = self.admin.http_headers() if self.admin else {}
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index", data=b"{}", headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Drain and stop: SIGTERM, then Triton's own sequence (module docstring) within the grace period; the
        process group is killed once the requests are done and unloading exceeds ``unload_timeout_s``, or after
        ``timeout_s`` (default: the grace period plus ``unload_timeout_s`` plus 5 s). Then this server's
        /dev/shm regions are removed. Returns tritonserver's exit status (negative: killed by that signal)."""
        with self._stop_lock:
            process = self._process
            if process is None:
                return None
            if self._supervisor is not None:
                self._supervisor.halt()
                self._restarts_before += self._supervisor.restarts
                self._supervisor = None
            if process.poll() is None:
                limit = timeout_s if timeout_s is not None else self.exit_timeout_s + self.unload_timeout_s + 5
                self._drain(process, limit)
            if process.returncode != 0:  # a crash or a kill can leave stubs behind (seen after a segfault)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            if self._reader:
                self._reader.join(timeout=5)
            self._remove_shm()
            self._process = None
            return process.returncode

    def _drain(self, process: subprocess.Popen[bytes], limit_s: float) -> None:
        start = time.monotonic()
        logged = len(self._log_lines)
        process.send_signal(signal.SIGTERM)
        unloading_since: float | None = None
        while True:
            try:
                process.wait(timeout=0.2)
                return
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if unloading_since is None and any(_UNLOADING in line for line in self._log_lines[logged:]):
                unloading_since = now
            stuck = unloading_since is not None and now - unloading_since > self.unload_timeout_s
            if stuck or now - start > limit_s:
                log.warning(
                    "tritonserver still %s %.0f s after SIGTERM: killing it",
                    "unloading (no request left)" if stuck else "running", now - start,
                )  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return

    def _remove_shm(self) -> None:
        """Remove this server's Python-backend regions (its own prefix only) once it has exited."""
        prefix = self.shm_prefix
        if prefix is None or not SHM_DIR.is_dir():
            return
        for path in SHM_DIR.glob(f"{prefix}*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
