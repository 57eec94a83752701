"""The options of an export (everything ``a3-export`` takes) and the checks that need no file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from a3_serve.calibration.folds import HELDOUT_RULES
from a3_serve.calibration.sequential import MODES as STATS_MODES
from a3_serve.errors import InputError
from a3_serve.export.methods import (
    ALLOCATIONS,
    DEFAULT_RECIPE,
    MLP_METHODS,
    OV_METHODS,
    QK_METHODS,
    RECIPES,
    Methods,
)
from a3_serve.export.shards import parse_size
from a3_serve.runtime import DTYPES

COMPONENTS = ("qk", "ov", "mlp")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportOptions:
    """Everything `a3-export` takes; see `a3-export --help` for the meaning of each field."""

    model: Path
    out: Path
    cr: float
    calib: str = "mix"
    calib_split: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "auto"
    head_multiple: int = 16
    mlp_multiple: int = 1  # reduced MLP widths are multiples of this (a quantization kernel's rule)
    components: tuple[str, ...] = COMPONENTS
    methods: Methods = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE][0])
    recipe: str | None = DEFAULT_RECIPE  # the named recipe the methods came from (None: hand-picked)
    damp: float = 1e-6
    overwrite: bool = False
    eval_data: str = "wiki:heldout"
    eval_tokens: int = 0
    eval_seqlen: int = 512
    layer_dims: tuple | None = None  # Python API: explicit per-layer (r_qk, r_vo, r_int), overriding cr
    kv_cr: float | None = None  # KV-cache bytes per token removed, at least; None: the same as cr (0 frees it)
    stats: str = "original"  # "original" (the paper) or "propagated" (through the compressed earlier layers)
    heldout_folds: str = "batches"  # what the fitted choices are scored on (a3_serve.calibration.folds.HELDOUT_RULES)
    verify: bool = True  # load the written folder and run a forward pass before it is renamed into place
    allow_zero_cr: bool = False  # Python API only: CR 0 runs the whole pipeline without removing anything
    stream: bool = True  # layer by layer from the safetensors files (False: load the whole model, the reference path)
    resume: bool = True  # continue an interrupted streamed export with the same arguments
    dry_run: bool = False  # validate and print the plan and the estimated cost; compute nothing
    max_shard_size: str = "5GB"  # safetensors shard limit, as transformers' save_pretrained
    # sizes for a quantized deployment (a3_serve.export.serving): every size passes this scheme's kernel rules
    quant_scheme: str | None = None  # a3-quantize --scheme (w8a8, w4a16, w8a16)
    quant_group_size: str | None = None  # a3-quantize --group-size (None: the scheme's default)
    quant_backend: str = "auto"  # cpu, gpu, all (every backend the scheme runs on) or auto (this machine's)
    kv_cache_dtype: str | None = None  # the KV-cache dtype it will be served with (fp8 on CPU: heads % 32)


def validate_options(opts: ExportOptions) -> None:
    """One-line errors for option values that can never work."""
    kv_mode = opts.kv_cr is not None and opts.kv_cr > 0
    lo_ok = opts.cr >= 0 if (opts.allow_zero_cr or opts.layer_dims is not None or kv_mode) else opts.cr > 0
    if opts.kv_cr is not None and not 0 <= opts.kv_cr < 1:
        raise InputError(f"--kv-cr must be in [0, 1), got {opts.kv_cr:g}; e.g. --kv-cr 0.25 removes a quarter of the "
                         "KV-cache bytes per token (1.33x more tokens in the same memory)")
    if opts.layer_dims is not None and kv_mode:
        raise InputError("explicit per-layer dims (layer_dims) fix the KV cache themselves; drop kv_cr")
    if not (lo_ok and opts.cr < 1):
        raise InputError(
            f"--cr must be between 0 and 1 (exclusive), got {opts.cr:g}; e.g. --cr 0.1 removes 10% of the decoder's "
            "linear-layer parameters"
        )
    if opts.nsamples < 1 or opts.seqlen < 2:
        raise InputError(f"--nsamples ({opts.nsamples}) must be >= 1 and --seqlen ({opts.seqlen}) >= 2; e.g. "
                         "--nsamples 64 --seqlen 512")
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.heldout_folds not in HELDOUT_RULES:
        raise InputError(f"--heldout-folds must be one of {', '.join(HELDOUT_RULES)}, got {opts.heldout_folds!r}")
    if isinstance(opts.mlp_multiple, bool) or not isinstance(opts.mlp_multiple, int) or opts.mlp_multiple < 1:
        raise InputError(f"--mlp-multiple must be a positive integer, got {opts.mlp_multiple}; e.g. 32, or 128 for "
                         "INT4 with groups of 128 (docs/QUANTIZATION.md)")
    if opts.head_multiple < 2 or opts.head_multiple % 2:
        raise InputError(
            f"--head-multiple must be an even number >= 2 (RoPE dims come in pairs), got {opts.head_multiple}; use 16 "
            "for vLLM on CPU, 8 for GPU"
        )
    bad = [c for c in opts.components if c not in COMPONENTS]
    if bad or not opts.components:
        raise InputError("--components takes a comma-separated subset of qk,ov,mlp, got "
                         f"{','.join(opts.components) or 'nothing'}")
    for comp, table, value in (("qk", QK_METHODS, opts.methods.qk), ("ov", OV_METHODS, opts.methods.ov),
                               ("mlp", MLP_METHODS, opts.methods.mlp)):
        if value not in table:
            raise InputError(f"--{comp}-method {value!r} is unknown; choose one of {', '.join(table)}")
    if opts.methods.allocation not in ALLOCATIONS:
        raise InputError(f"--allocation {opts.methods.allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}")
    if opts.save_dtype != "auto" and opts.save_dtype not in SAVE_DTYPES:
        raise InputError(f"--save-dtype {opts.save_dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    if opts.eval_tokens < 0:
        raise InputError(f"--eval-tokens must be >= 0, got {opts.eval_tokens}")
    if opts.stats not in STATS_MODES:
        raise InputError(f"--stats {opts.stats!r} is unknown; use original (the paper) or propagated")
    parse_size(opts.max_shard_size)
    if opts.damp <= 0:
        raise InputError(f"--damp must be > 0, got {opts.damp:g}; the default 1e-6 is a good start")


def resolve_save_dtype(opts: ExportOptions, src_cfg: dict[str, Any]) -> torch.dtype:
    """The dtype of the written weights: the source checkpoint's unless asked otherwise."""
    if opts.save_dtype == "auto":
        name = str(src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "float32")
        return DTYPES.get(name, torch.float32)
    return DTYPES[opts.save_dtype]


def resolve_kv_cr(opts: ExportOptions) -> float:
    """The KV-cache target of an export: ``kv_cr`` when given, else ``cr`` (the default never trades the KV cache
    away: the cache shrinks at least as much as the parameters) when both head sizes are compressed; none with
    explicit per-layer dims."""
    if opts.layer_dims is not None:
        return 0.0
    if opts.kv_cr is None:
        return float(opts.cr) if {"qk", "ov"} <= set(opts.components) else 0.0
    return float(opts.kv_cr)
