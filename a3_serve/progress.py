"""Shared console helpers: progress bars with an ETA, and logging set-up for the command-line tools.

Progress bars go to stderr (stdout stays clean for JSON and paths) and are shown only where someone can
see them:

- ``A3_SERVE_NO_PROGRESS=1`` turns every bar off, always;
- otherwise a bar is shown when stderr is a terminal, or when forced (``force=True`` or
  ``A3_SERVE_PROGRESS=1``, e.g. to watch a job whose stderr goes to a log file).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


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
    """A tqdm bar on stderr showing count, elapsed time, ETA and rate; a silent pass-through when disabled.

    Use it like ``tqdm``: ``for x in progress_bar(xs, desc="eval", unit="window"): ...`` or as a context
    manager with ``total=`` and ``.update(n)``.
    """
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault(
        "bar_format", "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    )
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress_enabled(force), **kwargs)


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
