"""Loss-aware allocation, export side: calibration statistics + dense weights -> per-layer loss curves -> dims.

For every layer, each component's predicted output error at every size is read from the same statistics and
scores the solvers use (:mod:`a3_serve.solvers.allocate` holds the allocation itself; docs/METHOD.md §6 the math):

* OV: the closed form's singular values with the group-averaged attention-weighted moment ``mean_i E[o_i o_iᵀ]``
  (``Σ_{k>r} σ_k²`` is the attention-output error at rank ``r``, in residual units, for every OV method);
* QK: the recipe's own pair scores (paper score or exact RoPE energy), as the dropped fraction per KV group,
  weighted by that group's attention-output energy ``Σ_k σ_k²``;
* MLP: the paper's score ``E[h_i²]·‖W_down[:, i]‖²`` (diagonal output error of dropping neuron ``i``).

Each curve is in residual units; :func:`weighted_curves` turns it into a predicted LOSS increase by one weight per
residual point (:func:`layer_weights`):

* ``--allocation loss`` (the default recipes): the diagonal empirical Fisher of the residual stream where the error
  is added, ``mean_c E[(∂L/∂h_c)²]`` (:mod:`a3_serve.calibration.fisher`): ``ΔL ≈ ½ Σ_c F_c E[e_c²]``. An error
  stays in the residual stream and every later layer reads it; this weight counts all of them.
* ``--allocation loss-rms`` (a3-serve 0.1): ``E[1/ms(h)]`` (``ms`` = mean square over features;
  ``LayerStats.inv_ms_attn`` / ``inv_ms_mlp``): only the next RMSNorm's division by the residual's RMS. Measured on
  SmolLM2, no weight at all gutted layers 0-3 (CR 0.1 perplexity 61.2 against 23.7 uniform); this one fixed that
  but falls 250x over Qwen2.5-Coder-0.5B's depth, so its last layers looked free and the allocation lost to the
  paper's uniform cut on prose; the Fisher falls ~10x there (docs/RESULTS.md).
"""

from __future__ import annotations

import logging

import torch

from a3_serve.calibration.fisher import ResidualFisher, fisher_windows, residual_fisher
from a3_serve.calibration.stats import LayerStats
from a3_serve.export.architectures import SourceArch
from a3_serve.export.compress_layer import layer_tensors, qk_pair_scores, wo_per_group
from a3_serve.export.methods import Methods
from a3_serve.progress import progress_bar
from a3_serve.solvers import mlp as mlp_solver
from a3_serve.solvers import ov as ov_solver
from a3_serve.solvers.allocate import (
    LayerCurves,
    allocate_dims,
    drop_curve,
    pair_drop_curve,
    tail_curve,
)
from a3_serve.solvers.budget import DimPlan

log = logging.getLogger("a3_serve.export")

#: the smallest per-layer head size the allocation picks: vLLM's CPU attention runs multiples of 16 from 32 up
#: (docs/VLLM.md); a 16-dim head in one layer makes the whole checkpoint unservable there
MIN_HEAD_DIM = 32


def layer_curves(w: dict, st: LayerStats, arch: SourceArch, methods: Methods, eps: float = 1e-6) -> LayerCurves:
    """Predicted output error, in residual units, of one layer's QK, OV and MLP at every kept size (module
    docstring)."""
    hkv, dh = arch.num_kv_heads, arch.head_dim
    full = ov_solver.ov_closed_form(ov_solver.group_mean(st.Go, hkv), wo_per_group(w["o_w"], arch), dh, eps)
    # the selection baselines' QK scores are not energies: their allocation uses the paper's pair score
    qk_scores = qk_pair_scores(w, st, arch, "a3" if methods.qk in ("wanda", "weight-norm") else methods.qk)
    mlp_scores = mlp_solver.mlp_scores("a3", st.h2, w["gate_w"], w["up_w"], w["down_w"])
    return LayerCurves(
        qk=pair_drop_curve(qk_scores, full.total),
        ov=tail_curve(full.sv, dh),
        mlp=drop_curve(mlp_scores),
    )


def layer_weights(methods: Methods, st: LayerStats, fisher: ResidualFisher | None, idx: int) -> tuple[float, float]:
    """The (attention, MLP) weights of layer ``idx``'s curves for ``methods.allocation`` (module docstring)."""
    if methods.needs_fisher:
        if fisher is None:
            raise ValueError("--allocation loss weights the curves by the residual Fisher: pass it")
        return fisher.attn[idx], fisher.mlp[idx]
    return (float(st.inv_ms_attn) if st.inv_ms_attn is not None else 1.0,
            float(st.inv_ms_mlp) if st.inv_ms_mlp is not None else 1.0)


def weighted_curves(curves: LayerCurves, attn: float, mlp: float) -> LayerCurves:
    """One layer's curves as predicted loss increases: QK and OV errors times ``attn``, MLP errors times ``mlp``."""
    return LayerCurves(qk=curves.qk * attn, ov=curves.ov * attn, mlp=curves.mlp * mlp)


def allocate_plan(
    model: torch.nn.Module,
    stats: list[LayerStats],
    arch: SourceArch,
    cr: float,
    methods: Methods,
    components=("qk", "ov", "mlp"),
    head_multiple: int = 16,
    eps: float = 1e-6,
    min_head_dim: int = MIN_HEAD_DIM,
    kv_cr: float = 0.0,
    mlp_multiple: int = 1,
    fisher: ResidualFisher | None = None,
) -> DimPlan:
    """Per-layer dims for ``cr`` by loss-aware allocation over the loaded dense ``model``'s layers and ``stats``
    (``fisher``: the residual Fisher, needed by ``--allocation loss``)."""
    curves = [weighted_curves(layer_curves(layer_tensors(layer), st, arch, methods, eps),
                              *layer_weights(methods, st, fisher, i))
              for i, (layer, st) in enumerate(zip(model.model.layers, stats))]
    return plan_from_curves(curves, arch, cr, components, head_multiple, min_head_dim, kv_cr, mlp_multiple)


def fisher_pass(job, model: torch.nn.Module, progress: bool, **streaming) -> ResidualFisher:
    """The Fisher pass (:mod:`a3_serve.calibration.fisher`) over ``job``'s first calibration windows, with a progress
    bar and a log line; ``streaming``: :func:`~a3_serve.calibration.fisher.residual_fisher`'s layer callbacks."""
    windows = fisher_windows(job.tokens)
    with progress_bar(total=2 * job.arch.num_layers, desc="Fisher pass (loss sensitivity)", unit="layer",
                      force=None if progress else False) as bar:
        fisher = residual_fisher(model, windows.to(job.device), job.opts.batch_size, progress=bar.update, **streaming)
    log.info("residual Fisher over %d calibration tokens: attention %.3g..%.3g, MLP %.3g..%.3g per layer",
             fisher.tokens, min(fisher.attn), max(fisher.attn), min(fisher.mlp), max(fisher.mlp))
    return fisher


def plan_from_curves(
    curves: list[LayerCurves],
    arch: SourceArch,
    cr: float,
    components=("qk", "ov", "mlp"),
    head_multiple: int = 16,
    min_head_dim: int = MIN_HEAD_DIM,
    kv_cr: float = 0.0,
    mlp_multiple: int = 1,
) -> DimPlan:
    """Per-layer dims for ``cr`` and the KV-cache target ``kv_cr`` from per-layer loss curves (:func:`layer_curves`,
    one per layer, in order)."""
    plan = allocate_dims(arch, curves, cr, components=components, head_multiple=head_multiple,
                         min_head_dim=min(min_head_dim, arch.head_dim), kv_cr=kv_cr, mlp_multiple=mlp_multiple)
    heads, _, widths = plan.dim_lists(arch.num_layers)
    log.info("loss-aware allocation: head dims per layer %s; MLP widths %d..%d (achieved CR %.4f, KV cache %.4f)",
             heads, min(widths), max(widths), plan.achieved_cr, plan.achieved_kv_cr(arch))
    return plan
