"""Shared console helpers: progress with an ETA, and logging set-up for the command-line tools.

Progress goes to stderr (stdout stays clean for JSON and paths), in the form the reader can use:

- ``A3_SERVE_NO_PROGRESS=1`` turns all progress off, always; ``force=False`` (a tool's ``--quiet``) too;
- a tqdm bar when stderr is a terminal, or when forced (``force=True`` or ``A3_SERVE_PROGRESS=1``);
- otherwise (stderr is a log file, a pipe, ``nohup``, a container log) plain lines a log can keep
  (:class:`LogProgress`): one at the start, one whenever another :data:`LOG_STEP` of the work is done or
  :data:`LOG_EVERY_S` seconds passed without a line (also while one long step runs), and one at the end, each
  with the count, the elapsed time and the ETA.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


#: a log line whenever this fraction of the work is done since the last line ...
LOG_STEP = 0.1
#: ... or this many seconds passed without one
LOG_EVERY_S = 30.0


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LogProgress:
    """Progress as log lines (module docstring), with tqdm's interface as used here: iteration, ``update(n)``,
    ``set_postfix_str``, ``close`` and the context manager. A daemon thread writes the heartbeat line when a step
    takes longer than :data:`LOG_EVERY_S`."""

    def __init__(self, iterable: Optional[Iterable[T]] = None, *, total: Optional[int] = None,
                 desc: Optional[str] = None, unit: str = "it", initial: int = 0, file=None,
                 every_s: float = LOG_EVERY_S, step: float = LOG_STEP, **_ignored):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n = self.start_n = initial
        self.file = file or sys.stderr
        self.every_s, self.step = every_s, step
        self.postfix = ""
        self.t0 = self.last_t = time.monotonic()
        self.last_n = initial
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._emit("started")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="a3-serve-progress")
        self._thread.start()

    def _line(self, state: str) -> str:
        elapsed = time.monotonic() - self.t0
        unit = self.unit if self.unit.endswith("s") or self.unit == "it" else self.unit + "s"
        count = f"{self.n}/{self.total} {unit}" if self.total else f"{self.n} {unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        done = self.n - self.start_n
        eta = ""
        if self.total and done > 0 and self.n < self.total:
            eta = f", ETA {_fmt_duration(elapsed / done * (self.total - self.n))}"
        post = f" - {self.postfix}" if self.postfix else ""
        return f"[a3-serve] {self.desc}: {count}{pct} {state}, elapsed {_fmt_duration(elapsed)}{eta}{post}"

    def _emit(self, state: str) -> None:
        try:
            print(self._line(state), file=self.file, flush=True)
        except (OSError, ValueError):  # a closed log must never fail the work
            pass
        self.last_t, self.last_n = time.monotonic(), self.n

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.every_s, 5.0)):
            with self._lock:
                if not self.closed and time.monotonic() - self.last_t >= self.every_s:
                    self._emit("running")

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            due = self.total and (self.n - self.last_n) >= self.step * self.total
            if self.total and self.n >= self.total:
                return  # the end line comes with close()
            if due or time.monotonic() - self.last_t >= self.every_s:
                self._emit("done")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = s

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
            self._emit("finished" if not self.total or self.n >= self.total else "stopped")

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_enabled(force: Optional[bool] = None) -> bool:
    """Whether a progress bar should be drawn now (see the module docstring for the rules)."""
    if _env_flag("A3_SERVE_NO_PROGRESS"):
        return False
    if force or _env_flag("A3_SERVE_PROGRESS"):
        return True
    if force is False:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def progress_bar(
    iterable: Optional[Iterable[T]] = None,
    *,
    total: Optional[int] = None,
    desc: Optional[str] = None,
    unit: str = "it",
    force: Optional[bool] = None,
    **kwargs,
) -> "tqdm[T]":
    """Progress on stderr showing count, elapsed time and ETA (module docstring): a tqdm bar on a terminal, log
    lines (:class:`LogProgress`) when stderr is not one, a silent pass-through when disabled.

    Use it like ``tqdm``: ``for x in progress_bar(xs, desc="eval", unit="window"): ...`` or as a context
    manager with ``total=`` and ``.update(n)``.
    """
    if log_progress_wanted(force):
        return LogProgress(iterable, total=total, desc=desc, unit=unit, **kwargs)  # type: ignore[return-value]
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault(
        "bar_format", "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    )
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress_enabled(force), **kwargs)


def log_progress_wanted(force: Optional[bool] = None) -> bool:
    """Whether progress should be written as log lines: not disabled, not a terminal and no bar forced."""
    if _env_flag("A3_SERVE_NO_PROGRESS") or force is False or force or _env_flag("A3_SERVE_PROGRESS"):
        return False
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def setup_logging(verbose: int | bool = 0) -> None:
    """Send the ``a3_serve`` loggers to stderr: warnings by default, info with ``-v``, debug with ``-vv``.

    Idempotent (calling it twice does not duplicate lines). Also quiets transformers' own info chatter and
    progress bars unless ``verbose >= 2`` or bars are enabled.
    """
    level = logging.WARNING if not verbose else (logging.INFO if int(verbose) == 1 else logging.DEBUG)
    logger = logging.getLogger("a3_serve")
    logger.setLevel(level)
    if not any(getattr(h, "_a3_serve", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[a3-serve] %(message)s"))
        handler._a3_serve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if int(verbose) >= 2 else logging.ERROR)
        if progress_enabled():
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: logging set-up must never fail a command
        pass
