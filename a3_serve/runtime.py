"""Shared plumbing of the command-line tools: devices, dtypes, model folders, one-line CLI errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Union

import torch

from a3_serve.errors import A3Error, InputError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


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
        raise InputError(f"model path {str(model_dir)!r} is a file, not a folder; pass the Hugging Face model folder that contains config.json")
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
            f"{str(model_dir)!r} has a config.json but no weights (*.safetensors); download or save the full model first"
        )
    return cfg


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (``error: ...; see `prog --help```) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def run_cli(command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a CLI body: an A3Error becomes one ``error:`` line and its exit code (2); Ctrl-C exits 130."""
    try:
        return command()
    except A3Error as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
