"""The checkpoint folder: its destination rules, its non-weight files, and the atomic write of an in-memory export.

The destination rules and the atomic swap are :mod:`a3_serve.folders`' (shared with every tool that writes a
folder). The in-memory export builds its folder in a hidden temporary folder beside the destination
(``.<name>.a3-partial-<pid>-<id>``, owned through a :class:`a3_serve.folders.FolderLock`) and renames it into place
at the very end, so an interrupted export (Ctrl-C, SIGKILL, a full disk) never leaves a half-written checkpoint at
the destination; the streamed export does the same from its resumable working folder
(:mod:`a3_serve.export.workdir`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from a3_serve import folders
from a3_serve.export.shards import MAX_SHARD_SIZE, save_weights

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
PARTIAL_MARK = ".a3-partial-"


def check_destination(out_dir: Path, overwrite: bool, source_dir: Path) -> Path:
    """Refuse destinations we must not write to (:func:`a3_serve.folders.check_destination`'s rules), before any
    expensive work starts; returns the resolved destination."""
    return folders.check_destination(out_dir, overwrite, sources=(Path(source_dir),))


def _pid_from_name(name: str) -> int | None:
    try:
        return int(name.split(PARTIAL_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> None:
    """Delete temporary folders left by killed exports to the same destination (no living process holds their
    lock; folders of older versions without a lock file: their PID is gone)."""
    out_dir = Path(out_dir)
    for p in out_dir.resolve().parent.glob(f".{out_dir.name}{PARTIAL_MARK}*"):
        abandoned = folders.folder_abandoned(p)
        if abandoned is None:
            pid = _pid_from_name(p.name)
            abandoned = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if abandoned:
            shutil.rmtree(p, ignore_errors=True)


def populate_folder(
    folder: Path, source_dir: Path, config: dict[str, Any], modeling_files: list[Path], model_card: str,
    report: dict[str, Any],
) -> None:
    """Write everything but the weights into ``folder``: config, modeling code, tokenizer files, card, report."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in modeling_files:
        shutil.copy2(f, folder / Path(f).name)
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, folder / name)
    (folder / "README.md").write_text(model_card)
    (folder / "a3_report.json").write_text(json.dumps(report, indent=2) + "\n")


def move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir`` (:func:`a3_serve.folders.swap_into_place`)."""
    folders.swap_into_place(tmp, Path(out_dir), overwrite)


def write_checkpoint(
    out_dir: Path,
    source_dir: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    modeling_files: list[Path],
    model_card: str,
    report: dict[str, Any],
    overwrite: bool = False,
    before_rename: Callable[[Path], None] | None = None,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Build the checkpoint in a temporary folder beside ``out_dir`` and rename it into place.

    ``before_rename(tmp_dir)`` may validate the finished folder (e.g. load it); if it raises, nothing
    reaches ``out_dir``.
    """
    out_dir = Path(out_dir)
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = parent / f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    lock = folders.FolderLock(tmp)
    lock.try_acquire()
    try:
        save_weights(state, tmp, max_shard_size)
        populate_folder(tmp, source_dir, config, modeling_files, model_card, report)
        if before_rename is not None:
            before_rename(tmp)
        lock.path.unlink()  # not part of the checkpoint; we keep the (unlinked) lock until the rename
        move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return out_dir
