"""Write a compressed checkpoint (the DESIGN.md contract), atomically.

The folder is built in a hidden temporary folder beside the destination
(``.<name>.a3-partial-<pid>``) and renamed into place at the very end, so an interrupted export
(Ctrl-C, SIGKILL, a full disk) never leaves a half-written checkpoint at the destination. With
``overwrite``, the old folder is moved aside first and deleted only after the rename succeeded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from a3_serve.errors import InputError

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
MAX_SHARD_SIZE = "5GB"


def check_destination(out_dir: Path, overwrite: bool, source_dir: Path) -> None:
    """Refuse destinations we must not write to, before any expensive work starts."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(source_dir).resolve():
        raise InputError("--out is the source model folder; write the compressed checkpoint to a new folder")
    if Path(source_dir).resolve() in out_dir.resolve().parents:
        raise InputError("--out lies inside the source model folder; choose a folder outside it")
    if out_dir.exists() and not overwrite:
        raise InputError(f"output folder {str(out_dir)!r} already exists; choose another --out or pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {str(out_dir)!r} is a file; choose a folder path")
    # the parent may not exist yet (it is created only when the checkpoint is written); the nearest
    # existing ancestor must be a writable folder
    ancestor = out_dir.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise InputError(f"cannot create --out {str(out_dir)!r}: {str(ancestor)!r} is not a writable folder; choose a writable location")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> None:
    """Delete temporary folders left by killed exports to the same destination (their process is gone)."""
    out_dir = Path(out_dir)
    for p in out_dir.resolve().parent.glob(f".{out_dir.name}{PARTIAL_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000`` (decimal units as in ``save_pretrained``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise InputError(f"--max-shard-size {text!r} must be positive; e.g. 5GB")
    return n


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = MAX_SHARD_SIZE) -> list[str]:
    """Save tensors as safetensors, sharded above ``max_shard_size`` with the standard index file."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=parse_size(max_shard_size))
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def populate_folder(
    folder: Path, source_dir: Path, config: dict[str, Any], modeling_files: list[Path], model_card: str, report: dict[str, Any],
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
    """Rename the finished folder ``tmp`` to ``out_dir`` (an existing one only with ``overwrite``; the old folder
    is moved aside first and deleted after the rename)."""
    parent = out_dir.resolve().parent
    if out_dir.exists():
        if not overwrite:  # appeared while we were working
            raise InputError(f"output folder {str(out_dir)!r} appeared during the export; pass --overwrite or choose another --out")
        old = parent / f".{out_dir.name}.a3-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


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
    try:
        save_weights(state, tmp, max_shard_size)
        populate_folder(tmp, source_dir, config, modeling_files, model_card, report)
        if before_rename is not None:
            before_rename(tmp)
        move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
