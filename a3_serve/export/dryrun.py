"""`a3-export --dry-run`: the planned dims, parameter and KV-cache savings, and the estimated memory and time.

Nothing is computed but a short matrix-multiply probe of the machine's speed (about a quarter of a second).

Time model (``N`` calibration tokens, ``P`` decoder linear parameters, ``L`` layers, ``T`` seqlen, ``d`` hidden,
``d_int`` MLP width; a multiply-add = 2 FLOPs):

* one dense forward pass: ``F = 2·N·P + 4·N·T·h_q·d_h·L/2`` (projections + causal attention scores and values);
* calibration passes: one for the statistics, one more for the loss-aware allocation unless one pass can keep
  every layer's statistics (:mod:`a3_serve.export.passes`, as the streamed export runs them), and with propagated
  statistics the compressed layers run too (about ``(1 - CR)·F``); the statistics hooks cost
  ``STATS_OVERHEAD`` of a pass (measured on SmolLM2, benchmarks/results/export-time);
* the MLP refit (recipes with ``a3-refit``): accumulating ``E[h hᵀ]`` costs ``2·N·d_int²`` per layer and each
  ridge candidate one Cholesky solve ``d_int³/3``;

divided by the probed matmul speed in the compute dtype on the chosen device. Memory (streamed): one layer's
weights and two copies of the activations in the compute dtype, the embeddings, and one layer's statistics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from a3_serve.calibration.fisher import fisher_window_count
from a3_serve.calibration.folds import folds_line
from a3_serve.export.passes import cached_stats_bytes
from a3_serve.folders import fmt_bytes
from a3_serve.runtime import dtype_name
from a3_serve.solvers.mlp import DEFAULT_RIDGES

#: extra cost of the float64 statistics hooks relative to a plain forward pass (export-time benchmark: 1.27x)
STATS_OVERHEAD = 0.3


def probe_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Sustained matmul FLOP/s of ``device`` in ``dtype`` (square 1024 products for about ``seconds``)."""
    n = 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b).sum().item()  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        c = a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        el = time.perf_counter() - t0
        if el >= seconds:
            break
    del c
    return 2.0 * n**3 * reps / el


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def dry_run_report(job) -> dict[str, Any]:
    """The dry-run report of ``job`` (an :class:`~a3_serve.export.job.ExportJob`; module docstring): plain numbers for
    ``--json`` and ``lines`` for people."""
    opts, src_cfg, arch, shape, plan, tokens = job.opts, job.src_cfg, job.arch, job.arch, job.plan, job.tokens
    calib_desc, device, dtype = job.calibration["description"], job.device, job.dtype
    L, d, dh, hq, hkv, dint = (arch.num_layers, arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                               arch.intermediate_size)
    N, T = int(tokens.numel()), int(tokens.shape[1])
    save_dtype = job.save_dtype
    bpe = torch.finfo(save_dtype).bits // 8
    cbe = torch.finfo(dtype).bits // 8
    vocab = int(src_cfg.get("vocab_size", 0))
    tied = bool(arch.tie_word_embeddings)
    lin_before = shape.linear_params(dh, dh, dint)
    lin_after = plan.linear_params(shape)
    other = vocab * d * (1 if tied else 2) + d * (2 * L + 1)
    allocate = job.passes.allocate
    req = job.passes.solve_request

    F = 2.0 * N * lin_before + 4.0 * N * T * hq * dh * L / 2
    passes = (1 + STATS_OVERHEAD) * job.passes.count + ((1 - plan.achieved_cr) if opts.stats == "propagated" else 0)
    if job.passes.fisher:  # two layer passes and a backward (~2 forwards) over the Fisher windows
        passes += 4.0 * fisher_window_count(opts.nsamples, opts.seqlen) * T / N
    flops = F * passes
    n_folds = n_folds_of(job)
    # a one-pass streamed export writes every layer's full statistics into its working folder
    kept = cached_stats_bytes(arch, req, n_folds) if job.passes.one_pass else 0
    n_scored = job.folds.n_scored if req.heldout and job.folds is not None else 0  # one ridge search per held-out set
    if req.mlp_moment:
        flops += L * (2.0 * N * dint**2 + (n_scored * len(DEFAULT_RIDGES) + 1) * dint**3 / 3)
    speed = probe_flops(device, dtype)
    est_s = flops / speed

    layer_bytes = (lin_before / L) * cbe
    act_bytes = 2 * N * d * cbe
    stats_bytes = ((n_folds + 1) * dint**2 * 8 if req.mlp_moment else 0) + 8 * (hq + 2 * hkv) * dh * dh * 2
    mem_stream = layer_bytes + vocab * d * cbe + act_bytes + stats_bytes

    kv_before = shape.kv_bytes_per_token(dh, dh, bpe)
    kv_after = plan.kv_bytes_per_token(shape, bpe)
    dims = (f"QK head {dh} -> {plan.qk_head_dim}, VO head {dh} -> {plan.v_head_dim}, "
            f"MLP {dint} -> {plan.intermediate_size}")
    rep = {
        "dry_run": True,
        "source": job.source.describe(), "out": str(opts.out),
        "recipe": opts.recipe, "methods": opts.methods.as_dict(), "allocation": opts.methods.allocation,
        "target_cr": opts.cr, "achieved_cr": plan.achieved_cr,
        "dims": {"qk_head_dim": plan.qk_head_dim, "v_head_dim": plan.v_head_dim,
                 "intermediate_size": plan.intermediate_size, "per_layer_after_calibration": allocate},
        "linear_params_before": lin_before, "linear_params_after": lin_after,
        "params_before": lin_before + other, "params_after": lin_after + other,
        "weight_bytes_after": (lin_after + other) * bpe, "save_dtype": dtype_name(save_dtype),
        "kv_bytes_per_token_before": kv_before, "kv_bytes_per_token_after": kv_after,
        "target_kv_cr": plan.target_kv_cr, "achieved_kv_cr": plan.achieved_kv_cr(arch),
        "kv_capacity_ratio": kv_before / kv_after,
        "calibration": {"description": calib_desc, "nsamples": opts.nsamples, "seqlen": opts.seqlen, "n_tokens": N,
                        "statistics": opts.stats, "heldout_folds": job.calibration.get("heldout_folds")},
        "size_rules": job.serving.record() if job.serving else None,
        "device": str(device), "compute_dtype": dtype_name(dtype),
        "estimate": {"flops": flops, "probe_flops_per_s": speed, "seconds": est_s, "calibration_passes": passes,
                     "statistics_on_disk_bytes": kept,
                     "streamed_peak_memory_bytes": mem_stream},
    }
    rep["lines"] = [
        f"a3-export dry run: {job.source.describe()} -> {opts.out} (nothing computed, nothing written)",
        f"  dims        {dims}" + (" (uniform; the loss-aware allocation sets per-layer dims meeting the same budgets "
                                   "after its calibration pass)" if allocate else ""),
        f"  params      decoder linear {lin_before:,} -> {lin_after:,} (CR {plan.achieved_cr:.4f}); all "
        f"{lin_before + other:,} -> {lin_after + other:,}; {fmt_bytes((lin_after + other) * bpe)} as "
        f"{dtype_name(save_dtype)}",
        f"  KV cache    {kv_before:,} -> {kv_after:,} bytes/token, x{kv_before / kv_after:.2f} more tokens per GB "
        f"(target >= {plan.target_kv_cr:.3f} removed, planned {plan.achieved_kv_cr(arch):.4f}"
        + ("; the allocation meets the target with per-layer heads)" if allocate else ")"),
        *([f"  sizes       for {job.serving.describe()}: head sizes multiples of {opts.head_multiple}, MLP widths "
            f"multiples of {opts.mlp_multiple} (the planned sizes pass every rule)"] if job.serving else []),
        f"  calibration {opts.nsamples} x {opts.seqlen} tokens from {calib_desc} ({opts.stats} statistics), "
        f"{passes:.1f} forward-pass equivalents"
        + (f" (with the Fisher pass over the first {fisher_window_count(opts.nsamples, opts.seqlen) * T:,} tokens)"
           if job.passes.fisher else "")
        + (f"; one pass keeps every layer's statistics on disk ({fmt_bytes(kept)})" if kept else ""),
        *([f"  held-out    folds for the fitted choices: {folds_line(job.calibration['heldout_folds'])}"]
          if job.calibration.get("heldout_folds") else []),
        f"  estimate    {_fmt_s(est_s)} on {device} in {dtype_name(dtype)} ({flops / 1e12:.2f} TFLOP at a probed "
        f"{speed / 1e9:.0f} GFLOP/s); streamed peak memory about {fmt_bytes(mem_stream)}",
    ]
    return rep


def n_folds_of(job) -> int:
    """The held-out folds the job's statistics are kept in (1 without)."""
    heldout = job.passes.solve_request.heldout and job.folds is not None
    return job.folds.n_folds if heldout and job.folds.n_folds >= 2 else 1
