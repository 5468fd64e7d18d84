"""Locust users for imgpipe's pipelines: ``locust -f imgpipe/loadtest/locustfile.py --pipeline NAME``.

Run through ``imgpipe loadtest`` (headless, bounded, with reports and metrics), or directly with
Locust's own command line and web UI. Every request is a Locust event named ``PIPELINE:OUTCOME``
(``remove_background:ok``, ``remove_background:queue_full``, …; request type ``grpc`` or ``http``) with
its latency and the bytes received; a failure carries Triton's status and message.

Each user is a closed loop (no think time unless ``--think-ms``): the user count is the concurrency.
The load shape (``--shape``): ``constant`` (all users for the duration), ``ramp`` (1 → users, linearly,
over the duration), ``step`` (``--step-users`` more every ``--step-seconds``, up to users). Every run
stops by itself: at ``--run-seconds`` and after ``--max-requests`` requests, whichever comes first.
"""

from __future__ import annotations

import time
from typing import Any

import gevent

# gRPC's C core blocks gevent's loop unless told to cooperate (Locust monkeypatches the rest).
import grpc.experimental.gevent as grpc_gevent
from locust import LoadTestShape, User, between, constant, events, task

from imgpipe.loadtest import scenarios

grpc_gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser  # Locust's own parser: its options show in the web UI where include_in_web_ui
    group.add_argument("--pipeline", choices=scenarios.PIPELINES, default="remove_background", include_in_web_ui=True)
    group.add_argument("--protocol", choices=("grpc", "http"), default="grpc", include_in_web_ui=True)
    group.add_argument("--sizes", default=scenarios.DEFAULT_SIZES, help="WIDTHxHEIGHT[:WEIGHT],...",
                       include_in_web_ui=True)  # fmt: skip
    group.add_argument("--shape", choices=scenarios.SHAPES, default="constant", include_in_web_ui=False)
    group.add_argument("--run-seconds", type=float, default=60.0, include_in_web_ui=False)
    group.add_argument("--step-users", type=int, default=1, include_in_web_ui=False)
    group.add_argument("--step-seconds", type=float, default=10.0, include_in_web_ui=False)
    group.add_argument("--max-requests", type=int, default=100_000, include_in_web_ui=False)
    group.add_argument("--think-ms", type=float, default=0.0, include_in_web_ui=True)
    group.add_argument("--request-timeout", type=float, default=60.0, include_in_web_ui=False)
    group.add_argument("--requests-log", default="", help="CSV of every request (time, name, ms, bytes)",
                       include_in_web_ui=False)  # fmt: skip


_sent = 0
_log: Any = None


@events.test_start.add_listener
def _open_log(environment: Any, **_: Any) -> None:
    global _log
    path = environment.parsed_options.requests_log
    if path and _log is None:
        _log = open(path, "w", buffering=1)  # line-buffered: every request is on disk at once
        _log.write("time,name,ms,bytes\n")


@events.request.add_listener
def _record(name: str, response_time: float, response_length: int, **_: Any) -> None:
    """Every request in the log (exact latencies and times: Locust's own CSV rounds them), and the
    request budget: stop the run once ``--max-requests`` requests were made."""
    global _sent
    _sent += 1
    if _log is not None:
        _log.write(f"{time.time():.4f},{name},{response_time:.3f},{response_length}\n")
    environment = PipelineUser.environment
    options = getattr(environment, "parsed_options", None) if environment else None
    if options is not None and _sent == options.max_requests and environment.runner is not None:
        gevent.spawn(environment.runner.quit)


@events.quitting.add_listener
def _close_log(**_: Any) -> None:
    if _log is not None:
        _log.close()


class PipelineUser(User):
    """One caller: its own connection, the pipeline's requests one after the other."""

    wait_time = constant(0)
    environment: Any = None

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        from imgpipe.clients.triton import TritonClient

        PipelineUser.environment = environment
        options = environment.parsed_options
        self.pipeline = options.pipeline
        self.protocol = options.protocol
        if options.think_ms > 0:
            self.wait_time = between(0, 2 * options.think_ms / 1000)  # mean think_ms
        # retry=None: a load test reports what the server answered (queue full, unavailable), not a retried success
        self.client = TritonClient(self.host, options.protocol, timeout_s=options.request_timeout, retry=None)
        self.call = scenarios.request_for(self.pipeline, _photos(options.pipeline, options.sizes))
        self.count = 0

    @task
    def request(self) -> None:
        start = time.perf_counter()
        exception: BaseException | None = None
        length = 0
        try:
            length = self.call(self.client, self.count)
        except Exception as exc:  # every failure becomes an event; the user goes on
            exception = exc
        self.count += 1
        kind = scenarios.outcome(exception)
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=f"{self.pipeline}:{kind}",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={"pipeline": self.pipeline, "outcome": kind},
        )

    def on_stop(self) -> None:
        self.client.close()


_PHOTOS: dict[tuple[str, str], list[bytes]] = {}


def _photos(pipeline: str, sizes: str) -> list[bytes]:
    """The encoded photos, made once per process (every user sends the same set)."""
    key = (pipeline, sizes)
    if key not in _PHOTOS:
        _PHOTOS[key] = scenarios.photos(pipeline, scenarios.parse_sizes(sizes))
    return _PHOTOS[key]


class PipelineShape(LoadTestShape):
    """constant / ramp / step over ``--run-seconds`` (Locust's ``-u`` and ``-r`` give users and spawn rate)."""

    def tick(self) -> tuple[int, float] | None:
        o = self.runner.environment.parsed_options
        users = scenarios.users_at(
            o.shape, self.get_run_time(), o.num_users or 1, o.run_seconds, o.step_users, o.step_seconds
        )
        return None if users is None else (users, max(0.1, o.spawn_rate or 1.0))
