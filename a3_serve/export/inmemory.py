"""The in-memory export (``--in-memory``, and sources without safetensors files): load the whole dense model, run
the calibration passes :mod:`a3_serve.export.passes` decided (the Fisher pass first, when the allocation needs it),
solve every layer, write the folder atomically.

It is the reference the streamed export is tested against (same checkpoint, bit for bit), and
:func:`compress_model` / :func:`build_a3_model` let ``benchmarks/quality.py`` solve many recipes from one
calibration without writing anything.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM

from a3_serve.calibration.sequential import sequential_calibrate
from a3_serve.calibration.stats import CompactStatsList, HeldOut, collect_stats
from a3_serve.errors import InputError, NumericalError
from a3_serve.export.architectures import SourceArch
from a3_serve.export.card import render_model_card
from a3_serve.export.compress_layer import compress_layer_into, compressed_layer
from a3_serve.export.folder import write_checkpoint
from a3_serve.export.loss_curves import allocate_plan, fisher_pass
from a3_serve.export.methods import Methods
from a3_serve.export.report import (
    build_report,
    compressed_config,
    count_params,
    finish_report,
    timings,
)
from a3_serve.export.verify import heldout_windows, perplexity, verify_and_measure
from a3_serve.modeling import A3LlamaConfig, A3LlamaForCausalLM, modeling_source_files
from a3_serve.modeling.modeling_a3_llama import ROPE_INDEX_NAME, rope_digest
from a3_serve.progress import progress_bar
from a3_serve.provenance import source_fingerprint
from a3_serve.solvers.linalg import all_finite

log = logging.getLogger("a3_serve.export")


def check_weights_finite(model: torch.nn.Module) -> None:
    """Refuse a source whose weights hold NaN or Inf (a corrupt download or conversion)."""
    for name, p in model.named_parameters():
        if not all_finite(p):
            raise NumericalError(f"source weight {name} contains NaN or Inf; the checkpoint is corrupt: re-download or "
                                 "re-convert it")


def compress_model(
    model: torch.nn.Module,
    stats: list | None,
    arch: SourceArch,
    r_qk: int | Sequence[int],
    r_vo: int | Sequence[int],
    r_int: int | Sequence[int],
    methods: Methods,
    damp: float = 1e-6,
    progress: bool = False,
    batches: list[torch.Tensor] | None = None,
    stats_mode: str = "original",
    a3_config: dict[str, Any] | None = None,
    heldout: HeldOut | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Solve every layer of a loaded dense model; returns (compressed state dict, per-layer reports).

    ``r_qk``/``r_vo``/``r_int`` are one size for every layer or one per layer.
    With ``stats`` (one LayerStats per layer, from :func:`collect_stats`), every layer is solved from those
    original-model statistics. With ``stats=None``, ``batches`` of calibration tokens are run layer by layer
    (:mod:`a3_serve.calibration.sequential`) in ``stats_mode`` ``"original"`` or ``"propagated"`` (the latter needs
    ``a3_config``, the compressed config dict, to build each compressed layer); ``heldout`` gives the held-out
    fold of every token of each batch (:meth:`a3_serve.calibration.folds.WindowFolds.batches`).

    The state dict uses the checkpoint's tensor names (embeddings, norms and an untied lm_head are
    carried over unchanged; a tied lm_head is left out). The dense model is not modified, so several
    recipes can be solved from one set of statistics.
    """
    new_state: dict[str, torch.Tensor] = {}
    reports = []
    layers = model.model.layers
    per_layer = [r if isinstance(r, (list, tuple)) else [r] * len(layers) for r in (r_qk, r_vo, r_int)]

    def dims_of(i: int) -> tuple[int, int, int]:
        return per_layer[0][i], per_layer[1][i], per_layer[2][i]

    desc = "solving" if stats is not None else f"calibrating + solving ({stats_mode} statistics)"
    with progress_bar(total=arch.num_layers, desc=desc, unit="layer", force=None if progress else False) as bar:
        if stats is not None:
            for i, layer in enumerate(layers):
                reports.append(compress_layer_into(new_state, layer, i, stats[i], arch, dims_of(i), methods, damp))
                bar.update(1)
        else:
            if batches is None:
                raise ValueError("compress_model needs either stats or calibration batches")
            if stats_mode == "propagated" and a3_config is None:
                raise ValueError("propagated statistics need the compressed config (a3_config)")

            def solve_fn(i: int, st) -> torch.nn.Module | None:
                reports.append(compress_layer_into(new_state, layers[i], i, st, arch, dims_of(i), methods, damp))
                return compressed_layer(layers[i], a3_config, i, new_state) if stats_mode == "propagated" else None

            sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, solve_fn,
                                 mode=stats_mode, request=methods.stats_request(), progress=bar.update,
                                 heldout=heldout)
    for k, v in model.state_dict().items():  # embeddings, norms, lm_head
        if ".self_attn." in k or ".mlp." in k:
            continue
        if arch.tie_word_embeddings and k == "lm_head.weight":
            continue
        new_state[k] = v
    return new_state, reports


def build_a3_model(config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An in-memory A3LlamaForCausalLM from a compressed config dict and state dict (for quality checks)."""
    cfg = A3LlamaConfig.from_dict(config)
    model = A3LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"compressed state does not match the A3 model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _load_dense(job) -> torch.nn.Module:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=job.dtype)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"cannot load the model weights of {str(job.model_dir)!r}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}; re-download or re-convert the "
                         "model") from None
    model.to(job.device).eval()
    check_weights_finite(model)
    return model


def _first_pass(job, model: torch.nn.Module, progress: bool) -> list | None:
    """The first calibration pass (:class:`~a3_serve.export.passes.CalibrationPasses`): every layer's statistics."""
    passes, arch = job.passes, job.arch
    force = None if progress else False
    if passes.first_request is None:
        return None
    if passes.first_whole_model:
        desc = "calibrating" if passes.solve_from_first else "calibrating (allocation pass)"
        with progress_bar(total=job.opts.nsamples, desc=desc, unit="seq", force=force) as bar:
            return collect_stats(model, job.batches, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                 progress=bar.update, request=passes.first_request, heldout=job.heldout)
    kept = CompactStatsList()
    with progress_bar(total=arch.num_layers, desc="calibrating (all statistics)", unit="layer", force=force) as bar:
        sequential_calibrate(model, job.batches, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                             lambda _i, st: kept.append(st), mode="original", request=passes.first_request,
                             progress=bar.update, heldout=job.heldout)
    return kept


def run_in_memory(job, progress: bool = True) -> dict[str, Any]:
    """Load, calibrate, solve and write ``job`` (an :class:`~a3_serve.export.job.ExportJob`); returns the report."""
    opts, arch, passes = job.opts, job.arch, job.passes
    t0 = time.perf_counter()
    model = _load_dense(job)
    t_load = time.perf_counter() - t0
    src_params = count_params(model.state_dict(), arch.tie_word_embeddings)

    t0 = time.perf_counter()
    fisher = fisher_pass(job, model, progress) if passes.fisher else None
    stats = _first_pass(job, model, progress)
    t_first = time.perf_counter() - t0
    plan = job.plan
    if passes.allocate:
        plan = allocate_plan(model, stats, arch, opts.cr, opts.methods, tuple(opts.components),
                             opts.head_multiple, opts.damp, kv_cr=job.kv_cr, mlp_multiple=opts.mlp_multiple,
                             fisher=fisher)
        job.check_serving(plan, "the loss-aware allocation's dims")
    dims = plan.dim_lists(arch.num_layers)
    t0 = time.perf_counter()
    if passes.solve_from_first:
        new_state, layer_reports = compress_model(model, stats, arch, *dims, opts.methods, opts.damp, progress=progress)
        t_solve = time.perf_counter() - t0
        t_calib = t_first
    else:
        # one layer at a time over cached hidden states: needed for propagated statistics, and bounds memory when a
        # method needs the d_int x d_int MLP moment (one layer's statistics alive at a time, not all of them)
        new_state, layer_reports = compress_model(
            model, None, arch, *dims, opts.methods, opts.damp, progress=progress, batches=job.batches,
            stats_mode=opts.stats, a3_config=compressed_config(job.src_cfg, arch, plan, {}, job.dtype),
            heldout=job.heldout,
        )
        t_solve = sum(r["seconds"] for r in layer_reports)
        t_calib = time.perf_counter() - t0 - t_solve + t_first

    new_state = {k: (v.to(job.save_dtype) if v.is_floating_point() else v).detach().cpu() for k, v in new_state.items()}
    digest = rope_digest(arch.head_dim,
                         [new_state[f"model.layers.{i}.self_attn.{ROPE_INDEX_NAME}"] for i in range(arch.num_layers)])
    config, report = build_report(job, plan, layer_reports, src_params,
                                  count_params(new_state, arch.tie_word_embeddings), digest,
                                  source_fingerprint(job.model_dir, job.src_cfg), fisher)
    eval_windows = dense_ppl = None
    if opts.eval_tokens:
        eval_windows = heldout_windows(job)
        dense_ppl = perplexity(model, eval_windows, opts.batch_size)
    del model, stats
    report["timings"] = timings(t_load, t_calib, t_solve, job.tokens.numel())

    t0 = time.perf_counter()
    out = write_checkpoint(
        job.out_dir, job.model_dir, config, new_state, modeling_source_files(), render_model_card(report), report,
        overwrite=opts.overwrite, max_shard_size=opts.max_shard_size,
        before_rename=lambda tmp: verify_and_measure(tmp, job, report, eval_windows, dense_ppl, full=True),
    )
    return finish_report(report, Path(out), t0, job.t_start, job.device)
