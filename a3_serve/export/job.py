"""The export job: every input checked and prepared once, before the expensive steps.

:func:`prepare_job` turns :class:`~a3_serve.export.options.ExportOptions` into an :class:`ExportJob`, checking
everything a user can get wrong in this order: option values, the source folder and its architecture (config
fields and weight names), the dimension budget, the destination, the calibration text. Nothing is loaded but
the config, the weight files' headers and the tokenizer. The streamed and in-memory runs, the dry run, the report
and the verification all read the job instead of taking long parameter lists.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer

from a3_serve.calibration.folds import WindowFolds, folds_line, heldout_folds
from a3_serve.calibration.sources import (
    calibration_windows,
    describe_source,
    sources_overlap,
    uses_self,
)
from a3_serve.calibration.stats import HeldOut
from a3_serve.errors import InputError
from a3_serve.export.architectures import (
    SourceArch,
    check_source_tensors,
    inspect_architecture,
)
from a3_serve.export.folder import check_destination
from a3_serve.export.lazy import SafetensorsSource
from a3_serve.export.options import ExportOptions, resolve_kv_cr, resolve_save_dtype, validate_options
from a3_serve.export.passes import CalibrationPasses, plan_passes
from a3_serve.export.report import compressed_config
from a3_serve.export.serving import ServingTarget, check_plan, serving_target, with_serving_multiples
from a3_serve.runtime import (
    ModelSource,
    check_context_length,
    read_config,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from a3_serve.solvers.budget import DimPlan, plan_dims, plan_per_layer

log = logging.getLogger("a3_serve.export")


@dataclass
class ExportJob:
    """One export, ready to run. ``plan`` is the uniform (or explicit per-layer) plan; the loss-aware allocation
    replaces it after its calibration pass. ``tokens`` [nsamples, seqlen] are the calibration windows."""

    opts: ExportOptions
    source: ModelSource
    src_cfg: dict[str, Any]
    arch: SourceArch
    plan: DimPlan
    tokens: torch.Tensor
    tokenizer: Any
    calibration: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype
    streamed: bool
    passes: CalibrationPasses
    t_start: float
    serving: Optional[ServingTarget] = None  # --quant-scheme / --kv-cache-dtype: sizes the kernels must accept
    folds: Optional[WindowFolds] = None  # held-out folds of the windows (None: one fold)

    def check_serving(self, plan: DimPlan, what: str) -> None:
        """One-line :class:`InputError` if ``plan`` cannot be quantized and served as ``--quant-scheme`` says."""
        _check_serving(self.serving, self.src_cfg, self.arch, plan, what)

    @property
    def kv_cr(self) -> float:
        """The KV-cache target (:func:`~a3_serve.export.options.resolve_kv_cr`)."""
        return resolve_kv_cr(self.opts)

    @property
    def model_dir(self) -> Path:
        return self.source.path

    @property
    def out_dir(self) -> Path:
        return Path(self.opts.out)

    @property
    def batches(self) -> list[torch.Tensor]:
        """The calibration tokens in forward-pass batches ``[batch_size, seqlen]``."""
        return list(self.tokens.split(self.opts.batch_size))

    @property
    def heldout(self) -> HeldOut | None:
        """The held-out folds of :attr:`batches` (the fold of every token), or None with one fold."""
        if self.folds is None:
            return None
        return self.folds.batches(self.tokens, self.opts.batch_size)[1]

    @property
    def tokens_digest(self) -> str:
        """SHA-256 of the calibration tokens (part of the resume key: another text never resumes a run)."""
        return hashlib.sha256(self.tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _check_serving(serving: Optional[ServingTarget], src_cfg: dict[str, Any], arch: SourceArch, plan: DimPlan,
                   what: str) -> None:
    """``plan``'s compressed config checked against the ``--quant-scheme`` target's size rules (nothing without one)."""
    if serving is not None:
        check_plan(serving, compressed_config(src_cfg, arch, plan, {}, torch.float32), what)


def _check_lengths(opts: ExportOptions, src_cfg: dict[str, Any]) -> None:
    """Calibration and evaluation windows must fit the model's context."""
    check_context_length(src_cfg, opts.seqlen, "--seqlen")
    if opts.eval_tokens:
        check_context_length(src_cfg, opts.eval_seqlen, "--eval-seqlen")


def _check_weight_names(model_dir: Path, arch: SourceArch) -> bool:
    """Whether the source has safetensors files; if so, that they hold nothing config.json does not declare."""
    if not any(model_dir.glob("*.safetensors")):
        return False
    check_source_tensors(arch, SafetensorsSource(model_dir).names())
    return True


def prepare_job(opts: ExportOptions) -> ExportJob:
    """Check every input and prepare the job (module docstring); raises one-line :class:`InputError` s."""
    t_start = time.perf_counter()
    validate_options(opts)
    serving = serving_target(opts.quant_scheme, opts.quant_group_size, opts.quant_backend, opts.kv_cache_dtype)
    source = resolve_model(opts.model)
    src_cfg = read_config(source.path)
    arch = inspect_architecture(src_cfg)
    if serving is not None:
        opts = with_serving_multiples(opts, serving, src_cfg, arch.head_dim)
        log.info("sizes for %s: head sizes multiples of %d, MLP widths multiples of %d", serving.describe(),
                 opts.head_multiple, opts.mlp_multiple)
    _check_lengths(opts, src_cfg)
    has_safetensors = _check_weight_names(source.path, arch)
    if opts.layer_dims is not None:
        plan = plan_per_layer(arch, opts.layer_dims, head_multiple=opts.head_multiple, mlp_multiple=opts.mlp_multiple)
    else:
        plan = plan_dims(arch, opts.cr, components=tuple(opts.components), head_multiple=opts.head_multiple,
                         kv_cr=resolve_kv_cr(opts), mlp_multiple=opts.mlp_multiple)
    _check_serving(serving, src_cfg, arch, plan, "the planned dims")
    check_destination(Path(opts.out), opts.overwrite, source.path)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    log.info(
        "%s (%s, %d layers, %d/%d heads of %d, MLP %d) -> heads %d/%d, MLP %d (target CR %.3f, achieved %.4f; "
        "KV cache target %.3f, achieved %.4f)",
        source.describe(), arch.model_type, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim,
        arch.intermediate_size, plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size, opts.cr, plan.achieved_cr,
        plan.target_kv_cr, plan.achieved_kv_cr(arch),
    )
    if opts.methods.loss_aware and opts.layer_dims is None:
        log.info("those are the uniform dims; the loss-aware allocation replaces them with per-layer dims after "
                 "calibration")

    # calibration text -> tokens (fails fast on too little text, before loading the model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is a broken folder for the user
        raise InputError(f"cannot load the tokenizer of {source.describe()!r} ({type(err).__name__}); the folder needs "
                         "tokenizer files") from None
    if opts.dry_run and uses_self(opts.calib):  # nothing is sampled in a dry run: shapes only
        tokens = torch.zeros((opts.nsamples, opts.seqlen), dtype=torch.long)
    else:
        tokens = calibration_windows(tokenizer, opts.calib, opts.calib_split, opts.nsamples, opts.seqlen, opts.seed,
                                     model_dir=source.path)
    calib_desc = describe_source(opts.calib, opts.calib_split)
    if opts.eval_tokens and sources_overlap(opts.calib, opts.calib_split, opts.eval_data, None):
        raise InputError(f"--eval-data {opts.eval_data} is the calibration text; evaluate on held-out text such as "
                         "wiki:heldout")

    streamed = opts.stream and has_safetensors
    if opts.stream and not streamed and not opts.dry_run:
        log.info("the source has no safetensors files: loading the whole model (the streamed export reads safetensors "
                 "lazily)")
    calibration = {"source": opts.calib, "split": opts.calib_split, "description": calib_desc,
                   "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": opts.seed,
                   "n_tokens": int(tokens.numel()), "statistics": opts.stats}
    folds = None
    if opts.methods.stats_request().heldout:  # the folds a fitted choice is scored on (leave-one-domain-out, ...)
        folds = heldout_folds(opts.heldout_folds, tokenizer, opts.calib, opts.calib_split, opts.nsamples, opts.seqlen,
                              opts.seed, opts.batch_size)
        calibration["heldout_folds"] = folds.describe()
        log.info("held-out folds for the fitted choices (refit ridge, OV shrinkage): %s",
                 folds_line(calibration["heldout_folds"]))
    # the dry run estimates the streamed export's passes, whatever the source format
    passes = plan_passes(opts.methods, opts.layer_dims is not None, arch, folds.n_folds if folds else 1, opts.stats,
                         streamed or opts.dry_run, disk_free=_free_bytes(Path(opts.out)))
    return ExportJob(opts=opts, source=source, src_cfg=src_cfg, arch=arch, plan=plan, tokens=tokens,
                     tokenizer=tokenizer, calibration=calibration, device=device, dtype=dtype,
                     save_dtype=resolve_save_dtype(opts, src_cfg), streamed=streamed, passes=passes, t_start=t_start,
                     serving=serving, folds=folds)


def _free_bytes(out: Path) -> int | None:
    """Free bytes on the disk that will hold ``out`` (and the streamed export's working folder beside it)."""
    import shutil

    for p in [out, *out.resolve().parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
