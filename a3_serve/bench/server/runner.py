"""The run queue and the worker: one benchmark at a time, each in its own ``python -m a3_serve.bench`` process.

The worker's stdout carries JSON events (contract in :mod:`a3_serve.bench`); they update the run's progress in
the store. Its stderr goes to ``worker.log`` in the run's folder; when it fails, the last ``error: ...`` line
(else the last line) is the run's error. The worker starts a new session, and every process it starts (its
engine subprocesses live in sessions of their own) inherits ``A3_BENCH_RUN_ID``: cancelling, a timeout and
shutting down signal the worker's process group AND every process carrying that marker (SIGTERM, then SIGKILL
after the grace period), so nothing of a run outlives it. A service that was killed outright finds the
leftovers of its interrupted runs the same way at its next start and kills them.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional

from a3_serve.bench.server.models import CLI_FLAGS, RunCreate, RunStatus
from a3_serve.bench.server.settings import TOKEN_ENV, Settings
from a3_serve.bench.server.store import Store

log = logging.getLogger("a3_serve.bench.server")

RUN_MARKER = "A3_BENCH_RUN_ID"
WORKER_LOG = "worker.log"
EVENTS_LOG = "events.jsonl"
REPORT_JSON = "throughput.json"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_POLL_S = 0.2


class QueueFull(Exception):
    """The queue holds ``--queue-size`` runs already."""


def _field(doc: dict[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


_DEFAULTS = RunCreate(dense="-", compressed="-").model_dump(mode="json")


def build_command(settings: Settings, request: dict[str, Any], run_dir: Path) -> list[str]:
    """``[python, -m, a3_serve.bench, --dense D, --compressed C, --engine E, <the other flags of CLI_FLAGS whose
    value differs from the default>, --out-dir RUN_DIR, --events]``."""
    cmd = [settings.python, "-m", "a3_serve.bench", "--dense", request["dense"], "--compressed", request["compressed"]]
    for name, flag in CLI_FLAGS.items():
        value = _field(request, name)
        if value is None or value is False or (name != "engine" and value == _field(_DEFAULTS, name)):
            continue
        if value is True:
            cmd.append(flag)
        else:
            cmd += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return cmd + ["--out-dir", str(run_dir), "--events"]


def marked_pids(run_id: str) -> list[int]:
    """Processes whose environment carries ``A3_BENCH_RUN_ID=run_id`` (Linux /proc; empty elsewhere)."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(name))
    return found


def signal_run(run_id: str, pgid: Optional[int], sig: int) -> int:
    """Send ``sig`` to the run's process group and to every process carrying its marker; how many were hit."""
    hit = 0
    if pgid:
        try:
            os.killpg(pgid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            pass
    for pid in marked_pids(run_id):
        try:
            os.kill(pid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            pass
    return hit


def reap_leftovers(run_id: str, pgid: Optional[int], grace: float = 3.0) -> int:
    """Stop what is left of a run whose service died: SIGTERM, then SIGKILL after ``grace`` s. Returns processes
    found."""
    found = len(marked_pids(run_id))
    if not found:
        return 0
    signal_run(run_id, None, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and marked_pids(run_id):
        time.sleep(0.1)
    signal_run(run_id, None, signal.SIGKILL)
    return found


def last_error_line(path: Path, limit: int = 65536) -> Optional[str]:
    """The last ``error: ...`` line of a log (without the prefix), else its last non-empty line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [_ANSI.sub("", ln).strip() for ln in text.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    line = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1])
    line = line.removeprefix("error:").strip()
    return line[:1000]


@dataclass
class _Active:
    run_id: str
    run_dir: Path
    proc: Optional[subprocess.Popen] = None
    cancel: bool = False
    timed_out: bool = False
    report: Optional[str] = None
    term_at: Optional[float] = None
    killed: bool = False
    events: int = 0
    reader: Optional[threading.Thread] = field(default=None, repr=False)


class Runner:
    """A bounded FIFO of run ids and the thread that works through it, one run at a time."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self._queue: collections.deque[str] = collections.deque()
        self._cv = threading.Condition()
        self._wake = threading.Event()
        self._current: Optional[_Active] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="a3-bench-runner", daemon=True)

    # -- the service's side --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._current is not None

    def enqueue(self, create: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Call ``create()`` (which stores the run) and queue its id, unless the queue is full (QueueFull)."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the service is shutting down")
            if len(self._queue) >= self.settings.queue_size:
                raise QueueFull(f"the queue is full ({len(self._queue)} runs waiting, --queue-size "
                                f"{self.settings.queue_size}); retry when a run has finished")
            run = create()
            self._queue.append(run["id"])
            self._cv.notify_all()
            return run

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued run at once, or ask the running one to stop; False if the run is not active here."""
        with self._cv:
            if run_id in self._queue:
                self._queue.remove(run_id)
                self.store.finish(run_id, RunStatus.cancelled, error="cancelled before it started",
                                  message="cancelled")
                return True
            act = self._current
            if act is None or act.run_id != run_id:
                return False
            act.cancel = True
        self.store.update(run_id, message="cancelling: stopping the worker")
        self._wake.set()
        return True

    def stop(self, reason: str = "the service stopped") -> None:
        """Stop taking runs, mark queued ones interrupted, stop the running worker; waits for the runner thread."""
        with self._cv:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for run_id in queued:
            self.store.finish(run_id, RunStatus.interrupted,
                              error=f"{reason} while the run was queued; submit it again")
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.kill_grace + 10)

    # -- the runner thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                run_id = self._queue.popleft()
                run = self.store.get(run_id)
                if run is None:
                    continue
                act = self._current = _Active(run_id, Path(run["run_dir"]))
            try:
                self._execute(run, act)
            except Exception as err:  # a bug here must not take the service down
                log.exception("run %s: the runner failed", run_id)
                if act.proc is not None:
                    signal_run(run_id, act.proc.pid, signal.SIGKILL)
                self.store.finish(run_id, RunStatus.failed,
                                  error=f"internal error of the service: {type(err).__name__}: {err}")
            finally:
                with self._cv:
                    self._current = None
                self._wake.clear()

    def _execute(self, run: dict[str, Any], act: _Active) -> None:
        run_id, run_dir = run["id"], act.run_dir
        request = run["request"]
        timeout = float(request.get("timeout_s") or self.settings.run_timeout)
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # the service's token stays with the service
        env.update({RUN_MARKER: run_id, "PYTHONUNBUFFERED": "1", "A3_SERVE_NO_PROGRESS": "1"})
        with self._cv:
            if act.cancel or self._stopping:
                status = RunStatus.cancelled if act.cancel else RunStatus.interrupted
                self.store.finish(run_id, status, error="cancelled before it started" if act.cancel else
                                  "the service stopped before the run started; submit it again")
                return
            with open(run_dir / WORKER_LOG, "wb") as errf:
                act.proc = subprocess.Popen(run["command"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=errf, cwd=str(run_dir), env=env, start_new_session=True)
        proc = act.proc
        log.info("run %s: started worker pid %d", run_id, proc.pid)
        self.store.update(run_id, status=RunStatus.running, started=time.time(), pgid=proc.pid,
                          message="starting the worker")
        act.reader = threading.Thread(target=self._read_events, args=(act, proc.stdout), daemon=True,
                                      name=f"a3-bench-events-{run_id}")
        act.reader.start()
        deadline = time.monotonic() + timeout
        grace = self.settings.kill_grace
        while not _exited(proc.pid):
            now = time.monotonic()
            if act.term_at is None:
                if act.cancel or self._stopping:
                    self._terminate(act, signal.SIGTERM)
                elif now >= deadline:
                    act.timed_out = True
                    self.store.update(run_id, message=f"timed out after {timeout:g} s: stopping the worker")
                    self._terminate(act, signal.SIGTERM)
            elif not act.killed and now >= act.term_at + (min(grace, 3.0) if self._stopping else grace):
                act.killed = True
                signal_run(run_id, proc.pid, signal.SIGKILL)
            self._wake.wait(_POLL_S)
            self._wake.clear()
        # the leader has exited but is not reaped yet, so its group id cannot be reused: clear out stragglers
        signal_run(run_id, proc.pid, signal.SIGKILL)
        rc = proc.wait()
        act.reader.join(timeout=5)
        self._finish(run, act, rc, timeout)

    def _terminate(self, act: _Active, sig: int) -> None:
        act.term_at = time.monotonic()
        signal_run(act.run_id, act.proc.pid if act.proc else None, sig)

    def _read_events(self, act: _Active, stream: IO[bytes]) -> None:
        try:
            with open(act.run_dir / EVENTS_LOG, "ab") as out:
                for raw in stream:
                    out.write(raw)
                    out.flush()
                    self._event(act, raw)
        except Exception:  # a broken pipe or a bad event must not kill the runner
            log.exception("run %s: reading worker events failed", act.run_id)
        finally:
            stream.close()

    def _event(self, act: _Active, raw: bytes) -> None:
        try:
            ev = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            return  # the contract says stdout carries only events; anything else is ignored (kept in events.jsonl)
        if not isinstance(ev, dict):
            return
        act.events += 1
        kind = ev.get("event")
        total = ev.get("total") if isinstance(ev.get("total"), int) else None
        if kind == "start":
            self.store.update(act.run_id, done=0, total=total, message="worker started")
        elif kind == "progress":
            fields: dict[str, Any] = {"message": str(ev.get("message", ""))[:500]}
            if isinstance(ev.get("done"), int):
                fields["done"] = ev["done"]
            if total is not None:
                fields["total"] = total
            self.store.update(act.run_id, **fields)
        elif kind == "done":
            act.report = ev.get("report") if isinstance(ev.get("report"), str) else None
            self.store.update(act.run_id, message="writing the report")

    def _report(self, act: _Active) -> dict[str, Any]:
        path = act.run_dir / REPORT_JSON
        if act.report:  # the worker writes into --out-dir; a path elsewhere is not trusted
            given = Path(act.report).resolve()
            if given.parent == act.run_dir.resolve():
                path = given
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "models" not in doc:
            raise ValueError(f"{path.name} is not a throughput report")
        return doc

    def _finish(self, run: dict[str, Any], act: _Active, rc: int, timeout: float) -> None:
        run_id = run["id"]
        reason = last_error_line(act.run_dir / WORKER_LOG)
        if act.cancel:
            self.store.finish(run_id, RunStatus.cancelled, exit_code=rc, error="cancelled by request",
                              message="cancelled")
        elif act.timed_out:
            self.store.finish(run_id, RunStatus.failed, exit_code=rc, message="timed out",
                              error=f"timed out after {timeout:g} s (timeout_s / --run-timeout); the worker was killed")
        elif self._stopping:
            self.store.finish(run_id, RunStatus.interrupted, exit_code=rc, message="interrupted",
                              error="the service stopped while the run was running; submit it again")
        elif rc == 0:
            try:
                doc = self._report(act)
            except (OSError, ValueError) as err:
                self.store.finish(run_id, RunStatus.failed, exit_code=rc, message="no report",
                                  error=f"the worker exited 0 but left no readable {REPORT_JSON}: {err}")
                return
            cur = self.store.get(run_id) or {}
            total = cur.get("total") or cur.get("done") or 0
            self.store.finish(run_id, RunStatus.succeeded, exit_code=0, results=doc, done=total, total=total,
                              message="finished")
        else:
            if rc < 0:
                try:
                    name = signal.Signals(-rc).name
                except ValueError:
                    name = f"signal {-rc}"
                why = f"the worker was killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
                reason = f"{why}; last log line: {reason}" if reason else why
            self.store.finish(run_id, RunStatus.failed, exit_code=rc, message="failed",
                              error=reason or f"the worker exited with code {rc} and printed nothing")
        log.info("run %s: worker exited with %s", run_id, rc)


def _exited(pid: int) -> bool:
    """Whether the child has exited, WITHOUT reaping it (so its process-group id stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
