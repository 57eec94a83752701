"""`a3-quantize` as one job, read top to bottom: :func:`run_quantize` = check every input (nothing expensive yet) →
calibration tokens (the serving environment's a3_serve.calibration, as a3-export) → the quantizer in its own
environment (driver.py → worker.py) → the folder finished (checkpoint.py) → loaded back here (verify.py) → renamed
into place.

The work happens in a hidden folder beside ``--out`` (``.<out>.a3-quantize-<pid>-<id>``, owned through an
``flock``), renamed to ``--out`` only when complete: a failed, interrupted or killed run leaves nothing at
``--out``. A failure removes the folder; one left by a killed run is removed by the next run for the same
``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import a3_serve
from a3_serve.errors import InputError
from a3_serve.folders import FolderLock, check_destination, folder_abandoned, swap_into_place
from a3_serve.progress import progress_bar
from a3_serve.provenance import describe_quantization, quantization_info
from a3_serve.runtime import check_context_length, default_cache_root, read_config, resolve_model

from . import checkpoint, driver, rules
from .schemes import BACKENDS, Scheme, default_backend, get_scheme, parse_group_size, serve_command
from .verify import verify_folder

#: model types a3-quantize knows the linear layers of (the A3 exporter's sources and its output)
DENSE_TYPES = ("llama", "mistral", "qwen2")
A3_TYPE = "a3_llama"
WORK_TAG = ".a3-quantize-"
#: SmoothQuant's (balance layers, smoothed norm) pairs: the Llama layout, which A3 keeps (module names unchanged)
SMOOTHQUANT_MAPPINGS = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
                        [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]]
#: decoder-layer class llm-compressor quantizes one at a time, per model type
DECODER_LAYERS = {"a3_llama": "A3LlamaDecoderLayer", "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
                  "qwen2": "Qwen2DecoderLayer"}


@dataclass
class QuantizeOptions:
    model: Path | str
    out: Path
    scheme: str
    group_size: Optional[str] = None
    backend: str = "auto"
    calib: str = "mix"
    calib_split: Optional[str] = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    smoothing_strength: Optional[float] = None
    dampening_frac: float = 0.01
    overwrite: bool = False
    verify: bool = True
    threads: int = 0


def check_options(opts: QuantizeOptions) -> tuple[Scheme, Optional[int], str]:
    scheme = get_scheme(opts.scheme)
    group = parse_group_size(scheme, opts.group_size)
    backend = default_backend() if opts.backend == "auto" else opts.backend
    if backend not in BACKENDS:
        raise InputError(f"--backend {opts.backend!r}: use auto, cpu or gpu")
    for flag, value in (("--nsamples", opts.nsamples), ("--seqlen", opts.seqlen)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value!r}")
    if opts.smoothing_strength is not None:
        if scheme.smoothquant is None:
            raise InputError(f"--smoothing-strength applies to --scheme w8a8 only (SmoothQuant balances activations "
                             f"for INT8 inputs); leave it out for {scheme.name}")
        if not 0 < opts.smoothing_strength < 1:
            raise InputError(f"--smoothing-strength must lie in (0, 1), got {opts.smoothing_strength}")
    if not 0 < opts.dampening_frac < 1:
        raise InputError(f"--dampening-frac must lie in (0, 1), got {opts.dampening_frac}")
    return scheme, group, backend


def check_source(path: Path, cfg: dict[str, Any]) -> str:
    """The model type, after refusing what a3-quantize cannot take."""
    if checkpoint.is_quantized(cfg):
        info = quantization_info(path) or {}
        raise InputError(f"{str(path)!r} is already quantized ({info.get('method')}: {describe_quantization(info)}); "
                         "quantize the unquantized checkpoint it came from instead")
    mtype = cfg.get("model_type")
    if mtype not in DENSE_TYPES + (A3_TYPE,):
        raise InputError(f"{str(path)!r} has model_type {mtype!r}; a3-quantize takes A3 exports (a3_llama) and the "
                         f"dense models a3-export reads ({', '.join(DENSE_TYPES)})")
    if not checkpoint.has_tokenizer(path):
        raise InputError(f"{str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json), which calibration "
                         "and serving need; copy the tokenizer files of the model it came from into it")
    return mtype


def check_out(out: Path, overwrite: bool, source: Path) -> Path:
    """a3_serve.folders' destination rules; an existing a3-quantize output (``a3_quantize.json``) may be replaced with
    ``--overwrite`` like an a3-export output (rule 4 of that module knows only the latter)."""
    given = Path(out).expanduser()
    try:
        return check_destination(given, overwrite, (source,))
    except InputError as err:
        ours = (overwrite and given.is_dir() and not given.is_symlink()
                and (given / checkpoint.REPORT_NAME).is_file() and "is not an a3-serve output" in str(err))
        if not ours:
            raise
        if not os.access(given.resolve().parent, os.W_OK):
            raise InputError(f"cannot replace --out {str(out)!r}: its folder is not writable") from None
        return given.resolve()


def _clean_abandoned(out: Path) -> None:
    for old in out.parent.glob(f".{out.name}{WORK_TAG}*"):
        if old.is_dir() and folder_abandoned(old):
            shutil.rmtree(old, ignore_errors=True)


def _log_path() -> Path:
    logs = default_cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return logs / f"a3-quantize-{stamp}-{os.getpid()}.log"


def _tokens(src: Path, opts: QuantizeOptions, dest: Path) -> tuple[Path, str]:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from a3_serve.calibration.sources import calibration_windows, describe_source

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    ids = calibration_windows(tokenizer, opts.calib, opts.calib_split, opts.nsamples, opts.seqlen, opts.seed,
                              model_dir=src)
    path = dest / "calibration_tokens.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path, describe_source(opts.calib, opts.calib_split)


def run_quantize(opts: QuantizeOptions, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    scheme, group, backend = check_options(opts)
    source = resolve_model(opts.model)
    src = source.path
    cfg = read_config(src)
    mtype = check_source(src, cfg)
    check_context_length(cfg, opts.seqlen)
    problems = rules.size_problems(cfg, scheme, backend, group)
    if problems:
        more = f" (and {len(problems) - 1} more size problem(s))" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    out = check_out(Path(opts.out), opts.overwrite, src)
    python = driver.quantizer_python()
    _clean_abandoned(out)

    work = out.parent / f".{out.name}{WORK_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    lock = FolderLock(work)
    lock.try_acquire()
    log = _log_path()
    ok = False
    try:
        t_cal = time.perf_counter()
        tokens, calib_desc = _tokens(src, opts, work)
        calibration_s = time.perf_counter() - t_cal
        ckpt = work / "checkpoint"
        request = {
            "model": str(src), "out": str(ckpt), "tokens": str(tokens),
            "weights": scheme.weight_args(group), "input_activations": scheme.activation_args(),
            "smoothquant": (opts.smoothing_strength or scheme.smoothquant) if scheme.smoothquant else None,
            "smoothquant_mappings": SMOOTHQUANT_MAPPINGS, "dampening_frac": opts.dampening_frac,
            "ignore": ["lm_head"], "trust_remote_code": mtype == A3_TYPE,
            "sequential_targets": [DECODER_LAYERS[mtype]], "device": "cpu", "dtype": "float32",
            "threads": opts.threads,
        }
        n_layers = int(cfg.get("num_hidden_layers") or 0)
        bar = progress_bar(total=n_layers, desc=f"a3-quantize {scheme.name}", unit="layer", force=None if progress
                           else False)
        state = {"layers": 0}

        def on_event(event: dict) -> None:  # layer i starting means layers 0..i-1 are quantized
            if event.get("event") in ("layer", "done"):
                finished = n_layers if event["event"] == "done" else int(event["index"])
                if finished > state["layers"]:
                    bar.update(finished - state["layers"])
                    state["layers"] = finished

        t_q = time.perf_counter()
        try:
            done = driver.run_worker(request, work, log, on_event, python=python)
        finally:
            bar.close()
        log.unlink(missing_ok=True)  # kept only when the quantizer fails (the error line names it)
        worker_s = time.perf_counter() - t_q

        before, after = checkpoint.weight_bytes(src), checkpoint.weight_bytes(ckpt)
        record = {
            "scheme": scheme.name, "description": scheme.describe(group), "group_size": group,
            "format": "compressed-tensors", "backend": backend,
            "smoothquant": request["smoothquant"], "gptq_dampening_frac": opts.dampening_frac,
            "calibration": {"source": opts.calib, "split": opts.calib_split, "description": calib_desc,
                            "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": opts.seed},
            "versions": done.get("versions", {}), "a3_serve_version": a3_serve.__version__,
        }
        report = {
            "tool": "a3-quantize", "output": str(out), "serve": serve_command(str(out), scheme, backend),
            "source": {"path": str(src), "model_type": mtype, "hub_id": source.repo_id, "revision": source.revision,
                       "a3": mtype == A3_TYPE},
            "quantization": record,
            "sizes": {"weight_bytes_before": before, "weight_bytes_after": after,
                      "ratio": (before / after) if after else None},
            "timings": {"calibration_tokens_s": calibration_s, "quantizer_s": worker_s,
                        "quantize_s": done.get("quantize_s"), "save_s": done.get("save_s")},
        }
        title = f"{Path(str(src)).name} quantized with a3-quantize ({scheme.name})"
        checkpoint.finish_folder(src, ckpt, cfg, record, report, title)
        t_v = time.perf_counter()
        report["verified"] = verify_folder(ckpt, after) if opts.verify else {"skipped": True}
        report["timings"]["verify_s"] = time.perf_counter() - t_v
        report["timings"]["total_s"] = time.perf_counter() - t0
        (ckpt / checkpoint.REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        swap_into_place(ckpt, out, opts.overwrite, may_replace=checkpoint.is_quantize_output)
        ok = True
        return report
    finally:
        lock.release()
        shutil.rmtree(work, ignore_errors=True)
        if ok or (log.is_file() and log.stat().st_size == 0):
            log.unlink(missing_ok=True)
