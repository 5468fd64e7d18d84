"""Restart dead Python-backend stubs of a running ``tritonserver`` (issue 12, fault tolerance).

Why it exists: in Triton 2.51 a Python-backend stub that dies (OOM killer, a segfault in native code, a stray
``kill -9``) leaves its model broken for good. Every request answers INTERNAL "Stub process '<instance>' is
not healthy", there is no automatic restart, and ``/v2/health/ready`` keeps answering 200, so nothing outside
notices. The :class:`Supervisor` runs in a daemon thread of the process that launched the server
(:class:`imgpipe.server.TritonServer`, ``imgpipe serve``):

- **Detection** (every ``poll_s``, 0.5 s): the stubs are children of the ``tritonserver`` process, found in
  ``/proc`` (stdlib only). Their command line names the model file (``<repo>/<model>/<version>/model.py``)
  and the instance (``<model>_<group>_<index>``; the short-lived stub Triton starts while loading a model is
  named after the model alone and is ignored). For each model the supervisor remembers the instance names of
  its current generation of stubs (a generation starts when a stub appears while none of the model's known
  stubs is alive: a load by anyone). An instance of that generation with no live stub (gone, or a zombie:
  Triton does not reap a stub it did not stop) while the model is ``READY`` in the repository index is a dead
  stub; this also catches a stub killed before the supervisor ever saw it, as long as an earlier generation
  of the model was seen. A model in any other state was unloaded on purpose (by an admin, by Triton on its way
  out) and is left alone, and looked at again every ``recheck_s``. One known false alarm: a model reloaded in
  place with fewer instances looks like it lost one, and is reloaded once more.
- **Repair**: ``unload`` then ``load`` through the model-repository API, with the admin key when the API is
  restricted. A plain ``load`` of a loaded model whose files did not change is a no-op in 2.51 (it keeps the
  dead stub), hence the unload. Ensembles over the model are unloaded with it and loaded again with it, so a
  pipeline answers "has no available versions" (NOT_FOUND) for the second or two of the reload; the client
  retries that. Measured on this repository's ``remove_background`` on 2 CPU cores: the kill is detected
  within 0.5 s and the pipeline answers again about 3-4 s after the kill.
- **Giving up**: ``max_failures`` (3) failed reloads within ``window_s`` (300 s), or more than
  ``max_restarts`` (5) restarts of one model within that window (a crash loop: reloading does not fix it),
  call ``give_up(reason)``; :class:`~imgpipe.server.TritonServer` then stops the server and ``imgpipe serve``
  exits non-zero, so that an orchestrator restarts the pod (and its restart backoff shows the crash loop).
- **Poll or none model-control mode**: Triton refuses load/unload requests there, so a dead stub cannot be
  repaired in place; the supervisor gives up at once (stop, non-zero exit) rather than serve a broken model
  behind a green readiness probe.

Known leftovers of Triton 2.51: if a request reached the dead stub before the reload, Triton never finishes
unloading that old model version (its zombie stub and its ``/dev/shm`` region stay until the server exits, and
the server's shutdown waits for it), which :meth:`imgpipe.server.TritonServer.stop` handles.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: its pid, its model and its instance name."""

    pid: int
    model: str
    instance: str


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) from ``/proc/<pid>/stat``; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in parentheses may hold spaces
    return int(fields[1]), fields[0]


def stub_processes(server_pid: int) -> dict[int, Stub]:
    """The live (not zombie) instance stubs among the children of ``server_pid``."""
    found: dict[int, Stub] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        info = _parent_and_state(pid)
        if info is None or info[0] != server_pid or info[1] in ("Z", "X"):
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # stub <repo>/<model>/<version>/model.py <shm region> <sizes...> <parent pid> <backend dir> <n> <instance> ..
        if len(argv) < 9 or not argv[0].decode(errors="replace").endswith(STUB_BINARY):
            continue
        model = Path(argv[1].decode(errors="replace")).parent.parent.name
        instance = argv[8].decode(errors="replace")
        if instance.startswith(f"{model}_"):  # not the model-level stub Triton runs while loading
            found[pid] = Stub(pid, model, instance)
    return found


@dataclass
class Supervisor:
    """Watches the stubs of one ``tritonserver`` process and reloads a model whose stub died.

    ``server_pid``: the ``tritonserver`` process; ``http_url``: ``host:port`` of its HTTP endpoint;
    ``headers``: sent with every model-repository call (the admin key); ``can_reload``: False when the server
    runs in poll or none model-control mode (then a dead stub makes it give up at once); ``give_up(reason)``:
    called once, from the supervisor's thread, when repairs fail (see the module docstring)."""

    server_pid: int
    http_url: str
    give_up: Callable[[str], None]
    headers: Mapping[str, str] = field(default_factory=dict)
    can_reload: bool = True
    poll_s: float = 0.5
    max_failures: int = 3
    max_restarts: int = 5
    window_s: float = 300.0
    load_timeout_s: float = 300.0
    retry_pause_s: float = 5.0
    recheck_s: float = 2.0
    restarts: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    _generation: dict[str, dict[int, str]] = field(default_factory=dict, init=False, repr=False)  # model -> pids
    _instances: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)  # model -> names
    _dormant: dict[str, float] = field(default_factory=dict, init=False, repr=False)  # not READY: look again at
    _pending: set[str] = field(default_factory=set, init=False, repr=False)
    _failing: dict[str, float] = field(default_factory=dict, init=False, repr=False)  # model -> next try
    _failed_at: deque[float] = field(default_factory=deque, init=False, repr=False)
    _restarted_at: dict[str, deque[float]] = field(default_factory=dict, init=False, repr=False)
    _halt: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> Supervisor:
        if not Path("/proc/self/stat").is_file():  # pragma: no cover - Linux only, as the server binary
            log.warning("no /proc on this system: the supervisor is off")
            return self
        watched = self._observe(stub_processes(self.server_pid))
        self._thread = threading.Thread(target=self._run, name="imgpipe-supervisor", daemon=True)
        self._thread.start()
        log.info("supervisor watching %d stub(s) of tritonserver pid %d", len(watched), self.server_pid)
        return self

    def halt(self) -> None:
        """Stop watching (before the server is stopped on purpose); waits a while for a repair in progress unless
        called from the supervisor's own thread. A repair that outlasts the wait ends without giving up."""
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                if not self.check():
                    return
            except Exception:  # never let a bug in the watcher kill the thread silently
                log.exception("supervisor check failed")

    # -- one round --------------------------------------------------------------------------------------------

    def check(self) -> bool:
        """One round: find dead stubs, repair their models. False once the supervisor gave up or the server
        is gone."""
        server = _parent_and_state(self.server_pid)
        if server is None or server[1] in ("Z", "X"):  # the server itself exited
            return False
        alive = stub_processes(self.server_pid)
        live = self._observe(alive)
        now = time.monotonic()
        for model, names in self._instances.items():
            missing = names - live
            if missing and model not in self._pending and now >= self._dormant.get(model, 0.0):
                log.info("no live stub for %s of %s", ", ".join(sorted(missing)), model)
                self._pending.add(model)
        if not self._pending:
            return True
        try:
            states = self._states()
        except (OSError, RuntimeError, ValueError) as exc:  # the server busy or going down: next round
            log.warning("repository index unavailable (%s); retrying", exc)
            return True
        for model in sorted(self._pending):
            if self._halt.is_set():
                return False
            if model in self._failing:  # our own unload made it not READY: keep trying, with a pause
                if time.monotonic() < self._failing[model]:
                    continue
            elif states.get(model) != "READY":
                log.info("%s is %s, not READY: unloaded on purpose, not restarted", model, states.get(model))
                self._pending.discard(model)
                self._dormant[model] = time.monotonic() + self.recheck_s
                continue
            if not self.can_reload:
                return self._give_up(
                    f"the stub of model '{model}' died and Triton's model-control mode is not explicit "
                    "(--poll-secs or --model-control-mode=none), so it cannot be reloaded in place"
                )
            log.warning("a stub of %s died: reloading it", model)
            if not self._repair(model):
                return False
        return True

    def _repair(self, model: str) -> bool:
        started = time.monotonic()
        try:
            self._post(f"/v2/repository/models/{urllib.parse.quote(model)}/unload")
            self._post(f"/v2/repository/models/{urllib.parse.quote(model)}/load", timeout_s=self.load_timeout_s)
            state = self._states().get(model)
            if state != "READY":
                raise RuntimeError(f"state {state} after the load")
        except (OSError, RuntimeError, ValueError) as exc:
            self.failures += 1
            now = time.monotonic()
            self._failed_at.append(now)
            while self._failed_at and now - self._failed_at[0] > self.window_s:
                self._failed_at.popleft()
            log.error("reloading %s failed (%d in %.0f s): %s", model, len(self._failed_at), self.window_s, exc)
            self._failing[model] = now + self.retry_pause_s
            if len(self._failed_at) >= self.max_failures:
                return self._give_up(
                    f"reloading model '{model}' failed {len(self._failed_at)} times within {self.window_s:.0f} s: "
                    f"{str(exc)[:300]}"
                )
            return True
        self._pending.discard(model)
        self._failing.pop(model, None)
        self.restarts += 1
        now = time.monotonic()
        recent = self._restarted_at.setdefault(model, deque())
        recent.append(now)
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        log.warning("restarted %s in %.1f s (restart %d of this server)", model, now - started, self.restarts)
        self._observe(stub_processes(self.server_pid))  # the new generation, at once
        if len(recent) > self.max_restarts:
            return self._give_up(
                f"model '{model}' needed {len(recent)} restarts within {self.window_s:.0f} s (a crash loop)"
            )
        return True

    def _observe(self, alive: dict[int, Stub]) -> set[str]:
        """Update each model's generation from the live stubs; the live instance names."""
        by_model: dict[str, dict[int, str]] = {}
        for stub in alive.values():
            by_model.setdefault(stub.model, {})[stub.pid] = stub.instance
        for model, stubs in by_model.items():
            known = self._generation.get(model, {})
            if known.keys() & stubs.keys():  # the same generation, maybe with instances that started since
                known.update(stubs)
                self._instances[model] |= set(stubs.values())
            else:  # a new generation: the model was (re)loaded
                self._generation[model] = dict(stubs)
                self._instances[model] = set(stubs.values())
            self._dormant.pop(model, None)
        return {stub.instance for stub in alive.values()}

    def _give_up(self, reason: str) -> bool:
        if self._halt.is_set():  # halted: the server is being stopped on purpose, this is no failure
            return False
        log.error("supervisor gives up: %s", reason)
        self._halt.set()
        self.give_up(reason)
        return False

    # -- Triton's model-repository API ------------------------------------------------------------------------

    def _post(self, path: str, timeout_s: float = 30.0) -> bytes:
        request = urllib.request.Request(
            f"http://{self.http_url}{path}", data=b"{}", headers=dict(self.headers), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:  # Triton's refusal: its message is in the body
            body = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{path}: HTTP {exc.code} {body}") from None

    def _states(self) -> dict[str, str]:
        """model -> READY if any version is READY, else the state of one of its versions."""
        states: dict[str, str] = {}
        for entry in json.loads(self._post("/v2/repository/index") or b"[]"):
            name, state = entry.get("name", ""), entry.get("state", "")
            if states.get(name) != "READY":
                states[name] = state
        return states
