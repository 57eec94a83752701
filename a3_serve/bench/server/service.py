"""The service object of one a3-bench-server instance: the data-dir lock, the run store and the runner."""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Optional

from a3_serve.bench.server.runner import Runner, reap_leftovers
from a3_serve.bench.server.settings import Settings
from a3_serve.bench.server.store import Store

log = logging.getLogger("a3_serve.bench.server")


class DataDirBusy(RuntimeError):
    pass


class Service:
    """The store, the runner and the data-dir lock of one service instance."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Optional[Store] = None
        self.runner: Optional[Runner] = None
        self._lock_file = None
        self.recovered: list[str] = []
        self._closed = False

    def open(self) -> None:
        """Lock the data dir, open the database, mark runs left queued/running as interrupted (killing leftovers)."""
        if self.store is not None:
            return
        data = self.settings.data_dir
        (data / "runs").mkdir(parents=True, exist_ok=True)
        lock = open(data / "server.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise DataDirBusy(f"data dir {data} is in use by another a3-bench-server (pid {holder}); stop it or pass "
                              "another --data-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        self.store = Store(data / "runs.sqlite3")
        left = self.store.active()
        for run in left:
            n = reap_leftovers(run["id"], run.get("pgid"))
            if n:
                log.warning("run %s: killed %d leftover worker process(es) of the previous service", run["id"], n)
        self.store.mark_interrupted(left, "the service stopped")
        self.recovered = [r["id"] for r in left]
        self.runner = Runner(self.store, self.settings)

    def start(self) -> None:
        self.open()
        assert self.runner is not None
        self.runner.start()

    def close(self) -> None:
        """Stop the runner (marking its runs interrupted), close the database, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.runner is not None:
            self.runner.stop()
        if self.store is not None:
            self.store.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
