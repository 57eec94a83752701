"""SQLite persistence of runs (stdlib sqlite3, one file ``runs.sqlite3`` in the data dir).

One row per run: the request, the worker's command line, status, progress, error, exit code, the worker's
process-group id while it runs, and the report document once it succeeded. Every change bumps the row's
``revision`` so that readers (the SSE stream, the dashboard) can tell whether anything moved.
Writes are serialised by one lock; the database runs in WAL mode so a crash never leaves it half-written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from a3_serve.bench.server.models import ACTIVE, RunStatus

SCHEMA_VERSION = 1

_COLUMNS = ("id", "seq", "created", "started", "finished", "status", "label", "request", "command", "run_dir",
            "done", "total", "message", "error", "exit_code", "pgid", "results", "revision")
_JSON = ("request", "command", "results")

_CREATE = """
CREATE TABLE IF NOT EXISTS runs (
    id        TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    status    TEXT NOT NULL,
    label     TEXT,
    request   TEXT NOT NULL,
    command   TEXT NOT NULL,
    run_dir   TEXT NOT NULL,
    done      INTEGER NOT NULL DEFAULT 0,
    total     INTEGER,
    message   TEXT NOT NULL DEFAULT '',
    error     TEXT,
    exit_code INTEGER,
    pgid      INTEGER,
    results   TEXT,
    revision  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_seq ON runs (seq);
"""


class Store:
    """Runs in one SQLite file; safe to call from any thread."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path} was written by a newer a3-bench-server (schema {version}); "
                                   "upgrade a3-serve or use another --data-dir")
            self._db.executescript(_CREATE)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading -------------------------------------------------------------------------------------------
    @staticmethod
    def _row(row: Optional[sqlite3.Row]) -> Optional[dict[str, Any]]:
        if row is None:
            return None
        out = dict(row)
        for key in _JSON:
            if out.get(key) is not None:
                out[key] = json.loads(out[key])
        return out

    def get(self, run_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            return self._row(self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())

    def revision(self, run_id: str) -> Optional[int]:
        with self._lock:
            row = self._db.execute("SELECT revision FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else row[0]

    def list(self, status: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        sql, args = "SELECT * FROM runs", []
        if status is not None:
            sql += " WHERE status = ?"
            args.append(status)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            return [self._row(r) for r in self._db.execute(sql, args).fetchall()]  # type: ignore[misc]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in RunStatus}
        with self._lock:
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
                out[status] = n
        return out

    # -- writing -------------------------------------------------------------------------------------------
    def create(self, run_id: str, *, request: dict[str, Any], command: list[str], run_dir: str,
               label: Optional[str]) -> dict[str, Any]:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs").fetchone()[0]
            self._db.execute(
                "INSERT INTO runs (id, seq, created, status, label, request, command, run_dir, message) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, seq, time.time(), RunStatus.queued.value, label, json.dumps(request), json.dumps(command),
                 run_dir, "waiting for the worker"))
            return self.get(run_id)  # type: ignore[return-value]

    def update(self, run_id: str, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown run columns {sorted(unknown)}")
        values = [json.dumps(v) if k in _JSON and v is not None else (v.value if isinstance(v, RunStatus) else v)
                  for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE runs SET {sets}, revision = revision + 1 WHERE id = ?", (*values, run_id))

    def finish(self, run_id: str, status: RunStatus, **fields: Any) -> None:
        self.update(run_id, status=status, finished=time.time(), pgid=None, **fields)

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM runs WHERE status IN ({', '.join('?' for _ in ACTIVE)}) ORDER BY seq",
                [s.value for s in ACTIVE]).fetchall()
        return [self._row(r) for r in rows]  # type: ignore[misc]

    def mark_interrupted(self, runs: Iterable[dict[str, Any]], reason: str) -> None:
        for run in runs:
            self.finish(run["id"], RunStatus.interrupted,
                        error=f"{reason} while the run was {run['status']}; submit it again")
