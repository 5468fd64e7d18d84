"""Security options of the launcher, `imgpipe serve` and the clients, on the real server: restricted admin APIs
(HTTP and gRPC), gRPC over TLS and mutual TLS with certificates made here, the bind address, metrics off,
extra Triton flags; the serving image's non-root user (statically).

The servers serve one tiny Python-backend model (``echo``) written here: these tests are about the server's
surface, not a pipeline, and a one-stub repository starts in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgpipe.clients.triton import GRPC_RESTRICTED_PREFIX, InferenceError, TritonClient, admin_headers
from imgpipe.paths import ROOT
from imgpipe.server import ADMIN_APIS, GrpcTls, Ports, Restriction, ServerError, TritonServer, free_ports
from tests.conftest import serve_banner, write_echo_repository

KEY = "s3cret-admin-key-0123"
HEADER = "imgpipe-admin-key"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security_repo")
    return write_echo_repository(root)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it, and
    a second CA that signed nothing here (the openssl CLI: the `cryptography` package is not installed)."""
    d = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN=imgpipe test {ca}",
                 "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.crt"))  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))  # fmt: skip
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(d / f"{name}.ext"),
                 "-out", str(d / f"{name}.crt"))  # fmt: skip
    return {p.stem if p.suffix == ".crt" else f"{p.stem}_key": p for p in d.iterdir() if p.suffix in (".crt", ".key")}


@pytest.fixture(scope="module")
def secured(repo: Path, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Admin APIs behind the key, gRPC over TLS, explicit model control through --triton-arg-style extra flags."""
    server = TritonServer(
        repo,
        Ports(*free_ports(3)),
        restriction=Restriction(KEY, HEADER),
        grpc_tls=GrpcTls(certs["server"], certs["server_key"]),
        extra_args=("--model-control-mode=explicit", "--load-model=*"),
        log_path=tmp_path_factory.mktemp("logs") / "secured.log",
    )
    with server:
        yield server


def _http(server: TritonServer, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    headers = {HEADER: key} if key else {}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _tls_client(server: TritonServer, certs: dict[str, Path], **kwargs: object) -> TritonClient:
    # The certificate names localhost and 127.0.0.1; gRPC checks the target's name against it.
    return TritonClient(server.grpc_url, "grpc", timeout_s=20, root_certificates=certs["ca"], **kwargs)  # type: ignore[arg-type]


def _echo(client: TritonClient) -> np.ndarray:
    return client.infer("echo", {"X": np.arange(4, dtype=np.float32)}, ["Y"])["Y"]


# ---------------------------------------------------------------------------------------------- no server


def test_launcher_flags_bind_localhost_and_carry_the_options(repo: Path, certs: dict[str, Path]) -> None:
    plain = TritonServer(repo, Ports(1, 2, 3)).command(Path("/b"))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in plain
    assert not any("ssl" in a for a in plain)
    # Only the launcher's own key guards model control (the supervisor's explicit mode; imgpipe.server docstring).
    assert {a.split("=", 1)[1].split(":", 1)[0] for a in plain if "restricted" in a} == {"model-repository"}
    server = TritonServer(
        repo, Ports(1, 2, 3), host="0.0.0.0", restriction=Restriction(KEY), metrics=False,
        grpc_tls=GrpcTls(certs["server"], certs["server_key"], certs["ca"]), extra_args=("--log-info=false",),
    )  # fmt: skip
    args = server.command(Path("/b"))
    spec = f"{','.join(ADMIN_APIS)}:{HEADER}={KEY}"
    assert f"--http-restricted-api={spec}" in args and f"--grpc-restricted-protocol={spec}" in args
    assert "--allow-metrics=false" in args and not any(a.startswith("--metrics-") for a in args)
    assert {"--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={certs['ca']}"} <= set(args)
    assert args[-1] == "--log-info=false"  # extra flags come last, so they override
    assert server.grpc_url == f"127.0.0.1:{2}" and server.metrics_url is None  # a wildcard is reached on loopback


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"apis": ("everything",)}, "restricted APIs"), ({"header": "Bad Header"}, "header name"),
     ({"key": "short"}, "admin key"), ({"key": "has:colon=and,comma"}, "admin key")],
)  # fmt: skip
def test_restriction_refuses_what_triton_would_misparse(kwargs: dict, message: str) -> None:
    with pytest.raises(ServerError, match=message):
        Restriction(**{"key": KEY, **kwargs})


def test_client_options_are_checked() -> None:
    assert admin_headers("grpc", KEY) == {f"{GRPC_RESTRICTED_PREFIX}{HEADER}": KEY}
    assert admin_headers("http", KEY) == {HEADER: KEY}
    with pytest.raises(ValueError, match="gRPC only"):
        TritonClient("localhost:8000", "http", ssl=True)
    with pytest.raises(ValueError, match="both"):
        TritonClient("localhost:8001", "grpc", private_key="k.pem")


def test_serving_image_runs_as_a_non_root_user() -> None:
    text = (ROOT / "docker" / "Dockerfile.serve").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users, "no USER line: the image would run as root"
    last = users[-1]
    assert last.split(":")[0] not in ("root", "0"), last
    assert last.split(":")[0].isdigit()  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert re.search(rf"useradd [^\n]*--uid {last.split(':')[0]}\b", text)  # the user exists in the image
    tail = text[text.rindex("\nUSER ") :]
    assert not re.search(r"^USER\s+(root|0)\b", tail, flags=re.M)
    assert text.index("\nUSER ") > text.rindex("\nRUN ")  # nothing runs as root after it; the CMD runs as the user
    assert "\nCMD " in tail


# ---------------------------------------------------------------------------------------------- restricted APIs


@pytest.mark.server
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v2/repository/index", {}), ("/v2/logging", None), ("/v2/logging", {"log_info": True}),
     ("/v2/models/stats", None), ("/v2/trace/setting", None), ("/v2/systemsharedmemory/status", None),
     ("/v2/repository/models/echo/load", {})],
)  # fmt: skip
def test_http_admin_apis_refuse_without_the_key_and_accept_with_it(
    secured: TritonServer, path: str, body: dict | None
) -> None:
    status, text = _http(secured, path, body)
    assert status == 403 and f"expecting header '{HEADER}'" in text, (status, text)
    status, text = _http(secured, path, body, key="wrong-key-0123")
    assert status == 403, (status, text)
    status, text = _http(secured, path, body, key=KEY)
    assert status == 200, (status, text)


@pytest.mark.server
def test_http_inference_and_health_stay_open(secured: TritonServer) -> None:
    assert _http(secured, "/v2/health/ready")[0] == 200
    assert _http(secured, "/v2/models/echo/config")[0] == 200  # the contracts stay readable
    with TritonClient(secured.http_url, "http") as client:
        assert _echo(client).tolist() == [0, 1, 2, 3]
    assert [m["name"] for m in secured.loaded_models()] == ["echo"]  # the launcher sends its key


@pytest.mark.server
def test_grpc_admin_protocols_refuse_without_the_key_and_accept_with_it(
    secured: TritonServer, certs: dict[str, Path]
) -> None:
    calls = [("get_model_repository_index", (), {}), ("get_log_settings", (), {}),
             ("update_log_settings", ({"log_info": True},), {}), ("get_inference_statistics", (), {}),
             ("get_trace_settings", (), {}), ("get_system_shared_memory_status", (), {}),
             ("unload_model", ("echo",), {}), ("load_model", ("echo",), {})]  # fmt: skip
    refusal = f"restricted, expecting header '{GRPC_RESTRICTED_PREFIX}{HEADER}'"
    with _tls_client(secured, certs) as anonymous, _tls_client(secured, certs, admin_key=KEY) as admin:
        for method, args, kwargs in calls:
            with pytest.raises(InferenceError, match=refusal):
                anonymous.call(method, *args, **kwargs)
            admin.call(method, *args, **kwargs)
            if method == "unload_model":
                assert not anonymous.is_ready("echo")
        deadline = time.monotonic() + 30
        while not anonymous.is_ready("echo") and time.monotonic() < deadline:  # loaded again by the admin
            time.sleep(0.2)
        assert [m.name for m in admin.call("get_model_repository_index").models] == ["echo"]
        assert _echo(anonymous).tolist() == [0, 1, 2, 3]  # inference needs no key


# ---------------------------------------------------------------------------------------------- TLS


@pytest.mark.server
def test_grpc_tls_handshake_verified_and_plain_text_refused(secured: TritonServer, certs: dict[str, Path]) -> None:
    with _tls_client(secured, certs) as tls:
        assert tls.is_ready() and _echo(tls).tolist() == [0, 1, 2, 3]
    # retry=None: a plain-text client on the TLS port sees "Socket closed", as from a server going away, which
    # the client would otherwise retry until its deadline
    with TritonClient(secured.grpc_url, "grpc", timeout_s=5, retry=None) as plain:
        assert not plain.is_ready()
        with pytest.raises(InferenceError, match="UNAVAILABLE"):
            _echo(plain)
    with TritonClient(secured.grpc_url, "grpc", timeout_s=5, root_certificates=certs["other_ca"]) as untrusted:
        assert not untrusted.is_ready()  # a server certificate from a CA the client does not trust: refused
    # HTTP stays plain text (Triton has no TLS there); it still answers on its own port
    assert _http(secured, "/v2/health/live")[0] == 200


@pytest.fixture(scope="module")
def mutual(repo: Path, certs: dict[str, Path]) -> Iterator[TritonServer]:
    """Mutual TLS, metrics off."""
    tls = GrpcTls(certs["server"], certs["server_key"], client_ca=certs["ca"])
    with TritonServer(repo, Ports(*free_ports(3)), grpc_tls=tls, metrics=False) as server:
        yield server


@pytest.mark.server
def test_mutual_tls_needs_a_client_certificate(mutual: TritonServer, certs: dict[str, Path]) -> None:
    with _tls_client(mutual, certs, private_key=certs["client_key"], certificate_chain=certs["client"]) as client:
        assert client.is_ready() and _echo(client).tolist() == [0, 1, 2, 3]
    with _tls_client(mutual, certs, retry=None) as anonymous:  # refused as "Socket closed": not retried here
        assert not anonymous.is_ready()
        with pytest.raises(InferenceError):
            _echo(anonymous)


@pytest.mark.server
def test_metrics_off_leaves_the_metrics_port_closed(mutual: TritonServer) -> None:
    assert mutual.metrics_url is None
    assert mutual.ports.metrics not in _listening()
    assert mutual.ports.http in _listening()


def test_a_missing_certificate_file_is_reported_before_starting(repo: Path, tmp_path: Path) -> None:
    server = TritonServer(repo, Ports(*free_ports(3)), grpc_tls=GrpcTls(tmp_path / "no.crt", tmp_path / "no.key"))
    with pytest.raises(ServerError, match=r"certificate file .* does not exist"):
        server.start()
    assert not server.is_running()


# ---------------------------------------------------------------------------------------------- bind address


def _listening() -> dict[int, set[str]]:
    """Every listening TCP socket on this machine: port -> local addresses (from /proc/net/tcp and tcp6)."""
    found: dict[int, set[str]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] != "0A":  # LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                text = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.setdefault(int(port, 16), set()).add(text)
    return found


def _other_local_address() -> str | None:
    """A non-loopback address of this machine, if it has one (the route's source address; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.server
def test_default_server_listens_on_localhost_only(repo: Path) -> None:
    ports = Ports(*free_ports(3))
    with TritonServer(repo, ports) as server:  # the defaults, as the test suite and `imgpipe serve` use them
        listening = _listening()
        for name, port in ports.as_dict().items():
            assert listening.get(port), f"{name} port {port} is not listening"
            assert listening[port] <= {"127.0.0.1", "::ffff:127.0.0.1"}, (name, listening[port])
        other = _other_local_address()
        if other is not None:  # the machine's other address: nothing answers there
            for port in ports.as_dict().values():
                with socket.socket() as sock, pytest.raises(OSError):
                    sock.settimeout(2)
                    sock.connect((other, port))
        assert server.is_running()


@pytest.mark.server
def test_serve_command_wires_the_security_options(repo: Path, certs: dict[str, Path]) -> None:
    """`imgpipe serve` with the admin key (from the environment), gRPC TLS, metrics off and an extra Triton flag."""
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "imgpipe.cli", "serve", "-r", str(repo), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--grpc-tls-cert", str(certs["server"]),
               "--grpc-tls-key", str(certs["server_key"]), "--no-metrics",
               "--triton-arg=--model-control-mode=explicit", "--triton-arg=--load-model=echo"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "IMGPIPE_ADMIN_KEY": KEY}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    seen = serve_banner(proc, 120)
    try:
        output = "".join(seen)
        assert "tritonserver ready" in output, output
        assert "TLS" in output and "admin APIs" in output and "model-repository" in output and "off" in output
        assert "echo" in output and "READY" in output  # the banner's repository index went through with the key
        assert KEY not in output
        listening = _listening()
        assert metrics not in listening and listening[grpc] <= {"127.0.0.1", "::ffff:127.0.0.1"}
        fake = TritonServer(repo, Ports(http, grpc, metrics))
        assert _http(fake, "/v2/repository/index", {})[0] == 403
        assert _http(fake, "/v2/repository/index", {}, key=KEY)[0] == 200
        with _tls_client(fake, certs) as client:
            assert _echo(client).tolist() == [0, 1, 2, 3]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
