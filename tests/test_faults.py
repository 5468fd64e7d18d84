"""Fault tolerance on the real server (issue 12, deliverable 3): a SIGKILLed Python-backend stub is reloaded by
the supervisor, SIGTERM drains the requests in flight, a restart is ridden out by the client's retries, /dev/shm
holds none of a stopped server's regions, the client never retries a refusal that cannot change, and every
start gets a fresh internal key.

One server over ``remove_background`` (its steps and the selfie segmenter, with the admin key set so the
supervisor has to send it) is shared by the tests in file order: the stub kill, then the restart (whose stop
follows the kill: /dev/shm must still come out clean), then the SIGTERM drain, which ends it. Two small servers
over a one-stub ``echo`` repository cover the launcher's own model-control key, an unload on purpose, poll mode
and ``open_internal_models``.
"""

from __future__ import annotations

import compileall
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from imgpipe.build.repository import build_repository
from imgpipe.clients.triton import (
    DEFAULT_RETRY,
    InferenceError,
    Retry,
    TransportError,
    TritonClient,
    bytes_tensor,
    classify,
    is_retryable,
)
from imgpipe.guard import INTERNAL_KEY_ENV
from imgpipe.manifest import parse_manifest
from imgpipe.samples import encode, sample_array
from imgpipe.server import SHM_DIR, Ports, Restriction, TritonServer, free_ports
from imgpipe.supervisor import stub_processes
from tests.conftest import manifest_data, write_echo_repository

KEY = "fault-admin-key-0123"
PIPELINE = "remove_background"
GRACE_S = 30.0  # the default
RECOVERY_LIMIT_S = 30.0  # the acceptance: answers again within 30 s of the kill


# ---------------------------------------------------------------------------------------------- helpers


def _environ(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _regions(prefix: str | None) -> list[Path]:
    assert prefix, "the server has no shm prefix of its own"
    return sorted(SHM_DIR.glob(f"{prefix}*"))


def _kind(exc: BaseException | None) -> str:
    """A request's outcome, in the words of the assertions."""
    if exc is None:
        return "ok"
    if isinstance(exc, TransportError):
        return "transport"
    if isinstance(exc, InferenceError):
        if "has no available versions" in exc.message:
            return "reloading"  # a model (re)loading or unloading: NOT_FOUND
        if "is not healthy" in exc.message:
            return "dead stub"
        if exc.status in ("StatusCode.UNAVAILABLE", "503"):
            return "unavailable"
        return f"other {exc.status}: {exc.message[:150]}"
    return f"exception {type(exc).__name__}: {str(exc)[:150]}"


@dataclass
class Outcome:
    caller: str
    start: float
    end: float
    kind: str


def _call(client: TritonClient, image: bytes) -> BaseException | None:
    try:
        out = client.infer(PIPELINE, {"IMAGE": bytes_tensor(image)}, ["OUTPUT"])["OUTPUT"]
    except Exception as exc:  # every failure is an outcome; the assertions say which are allowed
        return exc
    assert out.shape == (1, 1) and bytes(out[0, 0]).startswith(b"\x89PNG")
    return None


def _caller(name: str, client: TritonClient, image: bytes, stop: threading.Event, out: list[Outcome]) -> None:
    """Call the pipeline until ``stop``; a short pause after a failure, so that a broken model is not spun on."""
    with client:
        while not stop.is_set():
            start = time.monotonic()
            exc = _call(client, image)
            out.append(Outcome(name, start, time.monotonic(), _kind(exc)))
            if exc is not None:
                time.sleep(0.05)


def _stub_of(server: TritonServer, model: str) -> int:
    assert server.pid is not None
    pids = [s.pid for s in stub_processes(server.pid).values() if s.model == model]
    assert pids, f"no stub of {model} among the children of tritonserver {server.pid}"
    return pids[0]


def _wait(condition: object, timeout_s: float, what: str) -> float:
    """Poll ``condition()`` until true; the seconds it took."""
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """remove_background, its two steps and its segmenter network: four models, three stubs."""
    manifest = parse_manifest(manifest_data(), tmp_path_factory.mktemp("faults_manifest") / "manifest.toml")
    segmenter = manifest.pipelines[PIPELINE].segmenter
    root = tmp_path_factory.mktemp("faults_repo")
    build_repository(manifest, root, models=[PIPELINE, "bg_preprocess", "bg_postprocess", segmenter])
    (root / "segmenter_name").write_text(segmenter)
    return root


@pytest.fixture(scope="module")
def segmenter(repo: Path) -> str:
    return (repo / "segmenter_name").read_text()


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    running = TritonServer(
        repo, Ports(*free_ports(3)), restriction=Restriction(KEY), grace_s=GRACE_S, unload_timeout_s=5.0,
        log_path=tmp_path_factory.mktemp("logs") / "faults.log",
    )  # fmt: skip
    with running:
        yield running


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(sample_array("astronaut"), "JPEG")


@pytest.fixture(scope="module")
def big_photo() -> bytes:
    """Slow enough (a second or more, five at once on 2 cores) to be in flight when SIGTERM comes."""
    return encode(np.asarray(Image.fromarray(sample_array("astronaut")).resize((1200, 1200))), "JPEG")


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("echo_repo")
    return write_echo_repository(root)


def _echo(server: TritonServer) -> list[float]:
    with TritonClient(server.grpc_url, "grpc", retry=None) as client:
        return client.infer("echo", {"X": np.arange(3, dtype=np.float32)}, ["Y"])["Y"].tolist()


def _post(server: TritonServer, path: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=b"{}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------------------------------------- no server


def _ise(message: str, status: str) -> InferenceServerException:
    return InferenceServerException(message, status=status)


@pytest.mark.parametrize(
    ("raised", "kind", "retried"),
    [
        (_ise("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to "
              "remote host: Connection refused", "StatusCode.UNAVAILABLE"), TransportError, True),
        (_ise("Stream removed (Socket closed)", "StatusCode.UNAVAILABLE"), TransportError, True),
        (ConnectionRefusedError(111, "Connection refused"), TransportError, True),
        (ConnectionResetError(104, "Connection reset by peer"), TransportError, True),
        (_ise("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake failed: "
              "SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED", "StatusCode.UNAVAILABLE"), TransportError, False),
        (_ise("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"), TransportError, False),
        (TimeoutError("timed out"), TransportError, False),
        (_ise("This protocol is restricted, expecting header 'triton-grpc-protocol-imgpipe-admin-key'",
              "StatusCode.UNAVAILABLE"), InferenceError, False),
        (_ise("in ensemble 'remove_background', Exceeds maximum queue size", "StatusCode.UNAVAILABLE"),
         InferenceError, False),
        (_ise("Server is stopping, scheduler for model has stopped accepting new inference requests",
              "StatusCode.UNAVAILABLE"), InferenceError, True),
        (_ise("Request for unknown model: 'remove_background' has no available versions", "StatusCode.NOT_FOUND"),
         InferenceError, True),
        (_ise("Request for unknown model: 'nope' is not found", "404"), InferenceError, False),
        (_ise("in ensemble 'remove_background', Stub process 'selfie_segmenter_0_0' is not healthy.",
              "StatusCode.INTERNAL"), InferenceError, True),
        (_ise("IMAGE is not an image", "StatusCode.INVALID_ARGUMENT"), InferenceError, False),
        (_ise("IMAGE is not an image", "400"), InferenceError, False),
    ],
)  # fmt: skip
def test_failures_are_classified_and_only_transient_ones_retried(
    raised: BaseException, kind: type[InferenceError], retried: bool
) -> None:
    error = classify(raised)
    assert type(error) is kind, (raised, error)
    assert error is not None and is_retryable(error, DEFAULT_RETRY) is retried
    if isinstance(error, TransportError):
        assert error.status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        assert error.transient is retried
    assert classify(ValueError("a bug")) is None  # not a failure of the server: it propagates


def test_queue_full_is_retried_only_on_request_and_backoff_is_bounded() -> None:
    full = InferenceError("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")
    assert not is_retryable(full, Retry()) and is_retryable(full, Retry(queue_full=True))
    policy = Retry(first_backoff_s=0.1, max_backoff_s=1.0)
    for attempt, ceiling in ((0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (50, 1.0)):
        pauses = [policy.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses), (attempt, min(pauses), max(pauses))
        assert max(pauses) - min(pauses) > ceiling / 10  # jittered, not one fixed pause
    with pytest.raises(ValueError):
        Retry(first_backoff_s=0)


def test_launcher_flags_for_supervision_drain_and_shm(repo: Path) -> None:
    args = TritonServer(repo, Ports(1, 2, 3), grace_s=12.5).command(Path("/b"))
    assert {"--model-control-mode=explicit", "--load-model=*", "--exit-timeout-secs=13"} <= set(args)
    prefix = next(a for a in args if "shm-region-prefix-name=" in a).split("shm-region-prefix-name=")[1]
    assert prefix.startswith(f"imgpipe_{os.getpid()}_") and len(prefix) > len(f"imgpipe_{os.getpid()}_") + 4
    assert any(a.startswith("--http-restricted-api=model-repository:") for a in args)  # the launcher's own key
    polled = TritonServer(repo, Ports(1, 2, 3), poll_secs=5)
    assert polled.model_control_mode == "poll" and "--load-model=*" not in polled.command(Path("/b"))
    chosen = TritonServer(repo, Ports(1, 2, 3), extra_args=("--model-control-mode=explicit", "--load-model=a"))
    assert "--load-model=*" not in chosen.command(Path("/b")) and chosen.admin is None  # the caller's choice
    unsupervised = TritonServer(repo, Ports(1, 2, 3), supervise=False)
    assert unsupervised.model_control_mode == "none"
    assert not any("restricted" in a for a in unsupervised.command(Path("/b")))


def test_serve_command_offers_the_fault_tolerance_options() -> None:
    done = subprocess.run([sys.executable, "-m", "imgpipe.cli", "serve", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    for option in ("--no-supervise", "--grace-secs", "--open-internal-models", "--poll-secs"):
        assert option in done.stdout, option


# ---------------------------------------------------------------------------------------------- shared server


@pytest.mark.server
def test_refusals_that_cannot_change_are_not_retried(server: TritonServer) -> None:
    """The restricted-protocol refusal (gRPC UNAVAILABLE!) and INVALID_ARG fail at once, with retries on."""
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with TritonClient(url, protocol, retry=Retry(deadline_s=30)) as client:  # type: ignore[arg-type]
            start = time.monotonic()
            with pytest.raises(InferenceError, match=r"restricted|expecting header") as info:
                client.call("get_model_repository_index")
            assert not isinstance(info.value, TransportError)
            with pytest.raises(InferenceError) as bad:
                client.infer(PIPELINE, {"IMAGE": bytes_tensor(b"not an image")}, ["OUTPUT"])
            assert bad.value.is_invalid_argument
            assert time.monotonic() - start < 5 and client.retried == 0, (protocol, client.retried)


@pytest.mark.server
def test_every_start_puts_a_fresh_internal_key_in_the_server_environment(server: TritonServer) -> None:
    assert server.pid is not None and server.internal_key is not None
    key = _environ(server.pid).get(INTERNAL_KEY_ENV)
    assert key == server.internal_key and len(key) >= 40
    assert key not in " ".join(server.command(Path("/b")))  # never on a command line
    for stub in stub_processes(server.pid):  # the stubs inherit it: the models read it there
        assert _environ(stub).get(INTERNAL_KEY_ENV) == key


@pytest.mark.server
def test_a_killed_stub_is_reloaded_and_the_pipeline_answers_again(
    server: TritonServer, segmenter: str, photo: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL the segmenter's stub under four callers: three without retries (their failures are counted and
    reported), one with retries (it must see none)."""
    restarts = server.restarts
    outcomes: list[Outcome] = []
    stop = threading.Event()
    callers = [
        ("grpc-1", TritonClient(server.grpc_url, "grpc", retry=None)),
        ("grpc-2", TritonClient(server.grpc_url, "grpc", retry=None)),
        ("http-1", TritonClient(server.http_url, "http", retry=None)),
        ("retrying", TritonClient(server.grpc_url, "grpc", retry=Retry(deadline_s=RECOVERY_LIMIT_S))),
    ]
    threads = [threading.Thread(target=_caller, args=(n, c, photo, stop, outcomes)) for n, c in callers]
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: {o.caller for o in outcomes if o.kind == "ok"} == {n for n, _ in callers}, 60, "warm-up")
        victim = _stub_of(server, segmenter)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def answered_again() -> bool:
            return any(o.kind == "ok" and o.start > killed and o.caller != "retrying" for o in outcomes)

        recovered_s = _wait(answered_again, RECOVERY_LIMIT_S, "remove_background answering again after the kill")
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    after = [o for o in outcomes if o.end > killed]
    failed = Counter(o.kind for o in after if o.kind != "ok" and o.caller != "retrying")
    retrying_failed = sum(o.kind != "ok" for o in after if o.caller == "retrying")
    with capsys.disabled():
        print(f"\n[stub kill] {segmenter} stub pid {victim} SIGKILLed; remove_background answered again after "
              f"{recovered_s:.1f} s; failed requests in between (3 callers without retries): "
              f"{sum(failed.values())} {dict(failed)}; supervisor restarts: {server.restarts - restarts}; "
              f"the retrying caller: {retrying_failed} failures")  # fmt: skip
    assert server.restarts == restarts + 1
    assert _stub_of(server, segmenter) != victim  # a new stub serves it
    assert set(failed) <= {"dead stub", "reloading"}, failed  # what Triton answers until and while it reloads
    assert retrying_failed == 0
    assert server.is_running() and server.failure is None


@pytest.mark.server
def test_a_restart_is_ridden_out_by_retries_and_leaves_no_shared_memory(
    server: TritonServer, photo: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stop (after the stub kill above: the killed stub's region and its never-unloaded model version must not
    outlive the server) and start again on the same ports while clients with retries keep calling."""
    assert server.pid is not None
    key, prefix = _environ(server.pid)[INTERNAL_KEY_ENV], server.shm_prefix
    assert _regions(prefix)  # the per-server prefix took effect: the regions are there while it runs
    start = time.monotonic()
    assert server.stop() is not None
    stop_s = time.monotonic() - start
    assert not _regions(prefix), _regions(prefix)
    assert stop_s < GRACE_S, stop_s  # the stuck old version did not hold the exit for the whole grace period
    with capsys.disabled():
        print(f"\n[restart] stop() after the stub kill took {stop_s:.1f} s; /dev/shm regions left: 0")

    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with TritonClient(url, protocol, timeout_s=5, retry=None) as raw:  # type: ignore[arg-type]
            with pytest.raises(TransportError) as info:  # the one type, over both protocols
                _call_or_raise(raw, photo)
            assert info.value.status == "StatusCode.UNAVAILABLE" and info.value.transient

    results: dict[str, tuple[str, float, int]] = {}

    def patient(protocol: str, url: str) -> None:
        with TritonClient(url, protocol, retry=Retry(deadline_s=90)) as client:  # type: ignore[arg-type]
            begun = time.monotonic()
            exc = _call(client, photo)
            results[protocol] = (_kind(exc), time.monotonic() - begun, client.retried)

    threads = [threading.Thread(target=patient, args=p) for p in (("grpc", server.grpc_url), ("http", server.http_url))]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # they are failing and backing off now
    server.start()
    for thread in threads:
        thread.join(timeout=120)
    with capsys.disabled():
        print(f"[restart] clients with retries: {results} (outcome, seconds, retries)")
    for protocol in ("grpc", "http"):
        kind, took, retried = results[protocol]
        assert kind == "ok" and retried > 0 and took < 90, (protocol, results[protocol])
    assert server.pid is not None
    assert _environ(server.pid)[INTERNAL_KEY_ENV] not in (key, "")  # a fresh key for the new start
    assert server.shm_prefix != prefix


def _call_or_raise(client: TritonClient, image: bytes) -> None:
    exc = _call(client, image)
    if exc is not None:
        raise exc


@pytest.mark.server
def test_sigterm_drains_requests_in_flight(
    server: TritonServer, photo: bytes, big_photo: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests in flight at SIGTERM complete; what is sent afterwards completes or gets a clean refusal
    (UNAVAILABLE "Server is stopping", the unload window's NOT_FOUND, or a TransportError), never INTERNAL, never
    a hang. Then the server is gone and its /dev/shm regions with it."""
    prefix = server.shm_prefix
    outcomes: list[Outcome] = []
    sigterm = threading.Event()
    names = [f"grpc-{i}" for i in range(3)] + [f"http-{i}" for i in range(2)]
    ready = threading.Barrier(len(names) + 2)

    def two_requests(name: str) -> None:
        protocol = name.split("-")[0]
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with TritonClient(url, protocol, retry=None) as client:  # type: ignore[arg-type]
            assert _call(client, photo) is None  # this thread's connection, open before SIGTERM
            ready.wait(timeout=60)
            for image in (big_photo, photo):  # the first is in flight at SIGTERM, the second comes after
                start = time.monotonic()
                exc = _call(client, image)
                outcomes.append(Outcome(name, start, time.monotonic(), _kind(exc)))
                sigterm.wait(timeout=60)

    def prober() -> None:  # new requests until the server refuses them
        with TritonClient(server.grpc_url, "grpc", retry=None) as client:
            assert _call(client, photo) is None
            ready.wait(timeout=60)
            sigterm.wait(timeout=60)
            while True:
                start = time.monotonic()
                exc = _call(client, photo)
                outcomes.append(Outcome("prober", start, time.monotonic(), _kind(exc)))
                if exc is not None:
                    return

    threads = [threading.Thread(target=two_requests, args=(n,)) for n in names]
    threads.append(threading.Thread(target=prober))
    for thread in threads:
        thread.start()
    ready.wait(timeout=60)
    time.sleep(0.2)
    stopped_at = time.monotonic()
    stop_thread = threading.Thread(target=lambda: outcomes.append(Outcome("stop", 0, 0, str(server.stop()))))
    stop_thread.start()
    sigterm.set()
    for thread in [*threads, stop_thread]:
        thread.join(timeout=GRACE_S + 30)
        assert not thread.is_alive(), "a caller or the stop hung"
    stop_s = time.monotonic() - stopped_at
    sent_before = [o for o in outcomes if o.caller in names and o.start < stopped_at]
    in_flight = [o for o in sent_before if o.end > stopped_at]  # still running when SIGTERM came
    later = [o for o in outcomes if o.caller not in ("stop",) and o.start >= stopped_at]
    with capsys.disabled():
        print(f"\n[SIGTERM] stop() took {stop_s:.1f} s (grace {GRACE_S:.0f} s); in flight at SIGTERM: "
              f"{Counter(o.kind for o in in_flight)} of {len(sent_before)} sent before it, the last finishing "
              f"{max(o.end for o in sent_before) - stopped_at:.1f} s "
              f"after it; sent after SIGTERM: {Counter(o.kind for o in later)}")  # fmt: skip
    # Every request sent before SIGTERM completed, and some of them were in flight when it came (how many
    # depends on this machine's speed: the callers' first requests are big photos, SIGTERM follows at once).
    assert len(sent_before) == len(names) and all(o.kind == "ok" for o in sent_before), sent_before
    assert in_flight, sent_before
    assert {o.kind for o in later} <= {"ok", "unavailable", "reloading", "transport"}, later
    assert any(o.caller == "prober" and o.kind != "ok" for o in later)  # it was refused in the end
    assert all(o.end - o.start < GRACE_S + 5 for o in outcomes if o.caller != "stop")
    assert [o.kind for o in outcomes if o.caller == "stop"] == ["0"]  # tritonserver exited by itself, status 0
    assert stop_s < GRACE_S + 10 and not server.is_running()
    assert not _regions(prefix)


# ---------------------------------------------------------------------------------------------- echo servers


@pytest.mark.server
def test_launcher_key_unload_on_purpose_and_giving_up_after_failed_reloads(
    echo_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No admin key: the launcher guards model control with its own key and the supervisor uses it to reload a
    killed stub; a model an admin unloaded stays unloaded; a model that no longer loads is retried, then the
    supervisor gives up and stops the server. ``open_internal_models``: no key in the server's environment,
    even one inherited from the caller's."""
    repo = tmp_path / "repo"
    shutil.copytree(echo_repo, repo)
    monkeypatch.setenv(INTERNAL_KEY_ENV, "inherited-from-the-parent")
    with TritonServer(repo, Ports(*free_ports(3)), open_internal_models=True, unload_timeout_s=3) as server:
        assert server.pid is not None and server.internal_key is None
        assert INTERNAL_KEY_ENV not in _environ(server.pid)
        assert _post(server, "/v2/repository/models/echo/unload") == 403  # explicit mode, yet not open
        admin = server.admin
        assert admin is not None and admin.apis == ("model-repository",)
        headers = admin.http_headers()

        os.kill(_stub_of(server, "echo"), signal.SIGKILL)
        _wait(lambda: server.restarts == 1, 20, "the supervisor reloading echo with the launcher's key")
        assert _echo(server) == [0.0, 1.0, 2.0]

        assert _post(server, "/v2/repository/models/echo/unload", headers) == 200
        time.sleep(2.0)  # four supervisor rounds
        states = {m["name"]: m["state"] for m in server.loaded_models()}
        assert states["echo"] != "READY" and server.restarts == 1 and server.failure is None

        assert _post(server, "/v2/repository/models/echo/load", headers) == 200
        (repo / "echo" / "1" / "model.py").write_text("this is not python\n")  # from now on it cannot load
        os.kill(_stub_of(server, "echo"), signal.SIGKILL)
        _wait(lambda: not server.is_running(), 60, "the supervisor giving up after failed reloads")
        assert server.failure is not None and "failed 3 times" in server.failure, server.failure
        assert server.restarts == 1


@pytest.mark.server
def test_poll_mode_cannot_reload_so_a_dead_stub_stops_the_server(echo_repo: Path, tmp_path: Path) -> None:
    # The stub writes model.py's __pycache__ into a fresh repository, which a polling server takes for a change
    # and reloads right after its start, racing the kill below: the bytecode is written beforehand.
    repo = tmp_path / "repo"
    shutil.copytree(echo_repo, repo)
    assert compileall.compile_dir(repo, quiet=1)
    server = TritonServer(repo, Ports(*free_ports(3)), poll_secs=3600, unload_timeout_s=3)
    with server:
        prefix = server.shm_prefix
        os.kill(_stub_of(server, "echo"), signal.SIGKILL)
        _wait(lambda: not server.is_running(), 30, "the supervisor stopping the server")
        assert server.failure is not None and "cannot be reloaded" in server.failure
        assert not _regions(prefix)
