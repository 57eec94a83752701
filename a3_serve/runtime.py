"""Shared plumbing of the command-line tools: devices, dtypes, model folders, one-line CLI errors."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from a3_serve.errors import A3Error, InputError, SystemFailure

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_cache_root() -> Path:
    """a3-serve's cache (demo model, corpora, token streams): ``$A3_SERVE_CACHE`` or ``~/.cache/a3-serve``."""
    env = os.environ.get("A3_SERVE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/a3-serve").expanduser()


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses cuda on a machine without it."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA GPU is available here; use --device cpu")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU (bf16 matmuls are very slow there), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not supported; use float32, bfloat16, float16 or auto")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: a Hugging Face Hub model id, optionally ``@revision`` (a branch, tag or commit)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: what a dense checkpoint needs from a Hub repository (not its other weight formats, images or remote code)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """A model folder on disk, and the Hub id and resolved commit it came from (None for a local folder)."""

    path: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.path)


def resolve_model(spec: Union[str, Path], flag: str = "--model", local_only: bool = False) -> ModelSource:
    """A local folder as it is; otherwise a Hub id (``org/name`` or ``org/name@revision``) resolved as transformers
    does: the local cache first (``HF_HOME`` / ``HF_HUB_CACHE``), a download (with progress) when the network is
    allowed, nothing but the cache with ``HF_HUB_OFFLINE=1``. Unknown, gated or uncached ids get one line naming
    the fix (:class:`InputError`). ``local_only``: never download (the cache or nothing, as with HF_HUB_OFFLINE=1;
    the bench service, whose requests must not start downloads)."""
    local = Path(str(spec)).expanduser()
    m = HUB_ID.match(str(spec))
    if local.exists() or m is None:
        return ModelSource(local)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    repo, rev = m.group("repo"), m.group("rev")
    offline = bool(constants.HF_HUB_OFFLINE) or local_only
    where = f"{repo}@{rev}" if rev else repo
    try:
        folder = snapshot_download(repo, revision=rev, allow_patterns=HUB_FILES, local_files_only=offline)
    except hub_errors.GatedRepoError:
        raise InputError(f"{flag} {where}: the repository is gated; accept its terms on huggingface.co and run "
                         "`huggingface-cli login` (or set HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise InputError(f"{flag} {where}: no such model on the Hugging Face Hub (or it is private: run "
                         "`huggingface-cli login`); check the id, or pass a local folder") from None
    except hub_errors.RevisionNotFoundError:
        raise InputError(f"{flag} {where}: the repository has no revision {rev!r}; check the branch, tag or "
                         "commit") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        how = ("this tool does not download" if local_only else "HF_HUB_OFFLINE=1 is set" if offline
               else "the Hub cannot be reached")
        raise InputError(f"{flag} {where}: not a local folder and not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}), and {how}; download it first "
                         f"(`huggingface-cli download {repo}`) or pass a local folder") from None
    except hub_errors.HfHubHTTPError as err:
        raise InputError(f"{flag} {where}: the Hugging Face Hub answered {str(err).splitlines()[0][:160]}; retry, or "
                         "pass a local folder") from None
    path = Path(folder)
    return ModelSource(path, repo, path.name)


def read_config(model_dir: Union[str, Path]) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder, with one-line errors for the usual mistakes.

    Also refuses a folder with a config but no weights (``*.safetensors`` / ``*.bin``).
    """
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise InputError(
            f"model path {str(model_dir)!r} does not exist; pass a local Hugging Face model folder "
            "(config.json + *.safetensors), e.g. the one printed by `a3-demo-model`"
        )
    if not path.is_dir():
        raise InputError(f"model path {str(model_dir)!r} is a file, not a folder; pass the Hugging Face model folder "
                         "that contains config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(
            f"{str(model_dir)!r} is not a Hugging Face model folder (no config.json); pass the folder that "
            "holds config.json and the *.safetensors weights"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {cfg_file}: {err}; fix or re-download the model's config.json") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_file} does not hold a JSON object; fix or re-download the model's config.json")
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise InputError(
            f"{str(model_dir)!r} has a config.json but no weights (*.safetensors); download or save the full model "
            "first"
        )
    return cfg


def check_context_length(cfg: dict[str, Any], seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``): positions the model never
    saw would shape the statistics or the score without a word."""
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos < 1:
        return
    if seqlen > max_pos:
        raise InputError(f"{flag} {seqlen} exceeds the model's context (max_position_embeddings={max_pos}); "
                         f"use {flag} {max_pos} or less")


#: errno -> what the user can do about it
OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk or write to another one",
    errno.EDQUOT: "free space within your quota or write to another disk",
    errno.EACCES: "check the permissions, or choose a folder you can write to",
    errno.EPERM: "check the permissions, or choose a folder you can write to",
    errno.EROFS: "the filesystem is read-only: choose a writable location",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder where a file was expected: fix the path",
    errno.EBUSY: "the path is in use (a mount point or the current folder?): choose another path",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
    errno.EFBIG: "a file size limit was hit (`ulimit -f`, or the filesystem's largest file): raise it, or write "
                 "smaller shards with --max-shard-size",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EXDEV: "the destination is on another filesystem than its working folder: choose a path on one filesystem",
}


def describe_os_error(err: OSError, note: str | None = None) -> A3Error:
    """One line for an ``OSError``: what failed, on which path, and the fix (and ``note``, e.g. where the
    unfinished work is kept)."""
    what = err.strerror or type(err).__name__
    path = f" on {err.filename!r}" if err.filename else ""
    fix = OS_ERROR_FIXES.get(err.errno, "check the path and the disk")
    return SystemFailure(f"{what}{path}: {fix}" + (f"; {note}" if note else ""))


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (``error: ...; see `prog --help```) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def run_cli(command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a CLI body: an A3Error becomes one ``error:`` line and its exit code (2), an OSError one line naming
    the path and the fix (exit 1); Ctrl-C exits 130."""
    try:
        return command()
    except A3Error as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        err2 = describe_os_error(err)
        print(f"error: {err2}", file=sys.stderr)
        return err2.exit_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
