"""The resumable working folder of a streamed export.

A streamed export builds its checkpoint in a hidden folder beside ``--out``, named after the export's arguments:
``.<out name>.a3-resume-<key>`` with ``key`` = a hash of everything that determines the result (source model,
its config, CR, recipe and methods, calibration source and size, seed, dtypes, damping, a3-serve version).
Besides the finished layers' shards it holds:

* ``state.json``: which pass is running (``alloc``: the allocation pass, ``solve``), how many layers of it are
  finished, whether the solve reads cached statistics (``cached_stats``), the per-layer reports and timings, and
  the allocated per-layer dims once known;
* ``hidden.pt``: the calibration activations entering the next unfinished layer (one ``[B, T, d]`` tensor per
  batch), so a resumed run continues exactly where the killed one stopped;
* ``curves.pt``: the allocation pass's per-layer loss curves so far;
* ``stats-<layer>.pt``: when the allocation pass also gathers the solve's statistics (one calibration pass,
  :mod:`a3_serve.export.passes`), each layer's statistics in compact form
  (:func:`a3_serve.calibration.stats.stats_to_tensors`) until that layer is solved;
* ``fisher-inputs-<layer>.pt``: during the Fisher pass (``--allocation loss``), the inputs of each layer on the
  Fisher windows, kept between its forward and its reverse half; its result goes into ``state.json`` (``fisher``)
  and a killed Fisher pass starts over;
* ``lock``: held with ``flock`` by the export using the folder (:class:`a3_serve.folders.FolderLock`; a second
  export to the same ``--out`` is refused, and a dead export's lock disappears with its process).

Every file is replaced atomically (write to ``*.tmp``, then ``os.replace``), so a kill at any instant leaves
either the old or the new version. Re-running the same command finds the folder by its key and resumes; a
folder with another key (the arguments changed) belongs to a different export and is discarded when its
process is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from a3_serve.errors import InputError
from a3_serve.folders import FolderLock, folder_abandoned

log = logging.getLogger("a3_serve.export")

RESUME_MARK = ".a3-resume-"
STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.pt"
CURVES_FILE = "curves.pt"
LOCK_FILE = "lock"
STATS_PREFIX = "stats-"
FISHER_PREFIX = "fisher-inputs-"
#: files of the working folder that are not part of the checkpoint (besides the per-layer statistics)
WORK_FILES = (STATE_FILE, HIDDEN_FILE, CURVES_FILE, LOCK_FILE)


def fisher_inputs_file(layer: int) -> str:
    """The working folder's file name for decoder layer ``layer``'s inputs during the Fisher pass."""
    return f"{FISHER_PREFIX}{layer:05d}.pt"


def stats_file(layer: int) -> str:
    """The working folder's file name for decoder layer ``layer``'s cached statistics."""
    return f"{STATS_PREFIX}{layer:05d}.pt"


def export_key(fields: dict[str, Any]) -> str:
    """A short stable hash of the fields that determine an export's result (JSON, sorted keys)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class WorkDir:
    """A resumable working folder (module docstring); ``state`` is the parsed ``state.json``."""

    def __init__(self, out_dir: Path, key: str, resume: bool = True):
        out_dir = Path(out_dir)
        self.parent = out_dir.resolve().parent
        self.path = self.parent / f".{out_dir.name}{RESUME_MARK}{key}"
        self.key = key
        self.parent.mkdir(parents=True, exist_ok=True)
        self._lock: FolderLock | None = None
        self._discard_others(out_dir.name)
        if self.path.exists():
            self._take_lock()
            if resume and (self.path / STATE_FILE).is_file():
                self.state = json.loads((self.path / STATE_FILE).read_text())
                self.resumed = True
                return
            log.info("starting over in %s (--no-resume)", self.path)
            self.release()
            shutil.rmtree(self.path)
        self.path.mkdir()
        self._take_lock()
        self.state = {"key": key, "pass": None, "done": 0, "reports": [], "plan": None, "timings": {}}
        self.resumed = False
        self.save_state()

    # -- locking and cleanup -------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        lock = FolderLock(self.path, LOCK_FILE)
        if not lock.try_acquire():
            raise InputError(f"another a3-export (pid {lock.holder()}) is writing the same checkpoint to this --out; "
                             "wait for it to finish or stop it")
        self._lock = lock

    def release(self) -> None:
        """Give up the folder's lock (the export is over, or the folder is about to be removed)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _discard_others(self, name: str) -> None:
        """Remove working folders of the same --out left by finished processes with different arguments."""
        for p in self.parent.glob(f".{name}{RESUME_MARK}*"):
            if p == self.path or not p.is_dir() or folder_abandoned(p, LOCK_FILE) is False:
                continue
            log.info("discarding an unfinished export to the same --out with different arguments (%s)", p.name)
            shutil.rmtree(p, ignore_errors=True)

    # -- state ---------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        text = json.dumps(self.state, indent=1)
        _atomic_write_bytes(self.path / STATE_FILE, lambda t: t.write_text(text))

    def save_tensors(self, name: str, obj: Any) -> None:
        _atomic_write_bytes(self.path / name, lambda t: torch.save(obj, t))

    def load_tensors(self, name: str) -> Any:
        return torch.load(self.path / name, weights_only=True)

    def finish_layer(self, pass_name: str, idx: int, hidden: list[torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
        """Record that layer ``idx`` of ``pass_name`` is done: activations first, then the state that points at them."""
        self.save_tensors(HIDDEN_FILE, [h.detach().cpu() for h in hidden])
        self.state.update(extra or {})
        self.state["pass"], self.state["done"] = pass_name, idx + 1
        self.save_state()

    def clear_work_files(self) -> None:
        """Remove everything that is not part of the checkpoint (before the folder is moved to --out)."""
        for name in WORK_FILES:
            (self.path / name).unlink(missing_ok=True)
            (self.path / (name + ".tmp")).unlink(missing_ok=True)
        for prefix in (STATS_PREFIX, FISHER_PREFIX):
            for p in self.path.glob(f"{prefix}*.pt*"):
                p.unlink(missing_ok=True)
