"""Loss-aware allocation, export side: calibration statistics + dense weights -> per-layer loss curves -> dims.

For every layer, each component's predicted output error at every size is read from the same statistics and
scores the solvers use (:mod:`a3_serve.solvers.allocate` holds the allocation itself; docs/METHOD.md §6 the math):

* OV: the closed form's singular values with the group-averaged attention-weighted moment ``mean_i E[o_i o_iᵀ]``
  (``Σ_{k>r} σ_k²`` is the attention-output error at rank ``r``, in residual units, for every OV method);
* QK: the recipe's own pair scores (paper score or exact RoPE energy), as the dropped fraction per KV group,
  weighted by that group's attention-output energy ``Σ_k σ_k²``;
* MLP: the paper's score ``E[h_i²]·‖W_down[:, i]‖²`` (diagonal output error of dropping neuron ``i``).

Each curve is then made RELATIVE to the residual stream it is added to, by ``E[1/ms(h)]`` (``ms`` = mean square
over features; ``LayerStats.inv_ms_attn`` / ``inv_ms_mlp``): the next RMSNorm divides every token by its RMS, so an
error of a given size matters far more in the early layers, where the residual stream is small, than in the late
ones. Measured on SmolLM2: without this scale the allocation gutted layers 0-3 (MLP widths down to 166 of 1536)
and CR 0.1 perplexity rose from 23.7 (uniform) to 61.2.
"""

from __future__ import annotations

import logging

import torch

from a3_serve.calibration.stats import LayerStats
from a3_serve.export.architectures import SourceArch
from a3_serve.export.compress_layer import layer_tensors, qk_pair_scores, wo_per_group
from a3_serve.export.methods import Methods
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
    """Predicted output error of one layer's QK, OV and MLP at every kept size (see the module docstring)."""
    hkv, dh = arch.num_kv_heads, arch.head_dim
    full = ov_solver.ov_closed_form(ov_solver.group_mean(st.Go, hkv), wo_per_group(w["o_w"], arch), dh, eps)
    # the selection baselines' QK scores are not energies: their allocation uses the paper's pair score
    qk_scores = qk_pair_scores(w, st, arch, "a3" if methods.qk in ("wanda", "weight-norm") else methods.qk)
    mlp_scores = mlp_solver.mlp_scores("a3", st.h2, w["gate_w"], w["up_w"], w["down_w"])
    attn_scale = float(st.inv_ms_attn) if st.inv_ms_attn is not None else 1.0
    mlp_scale = float(st.inv_ms_mlp) if st.inv_ms_mlp is not None else 1.0
    return LayerCurves(
        qk=pair_drop_curve(qk_scores, full.total) * attn_scale,
        ov=tail_curve(full.sv, dh) * attn_scale,
        mlp=drop_curve(mlp_scores) * mlp_scale,
    )


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
) -> DimPlan:
    """Per-layer dims for ``cr`` by loss-aware allocation over the loaded dense ``model``'s layers and ``stats``."""
    curves = [layer_curves(layer_tensors(layer), st, arch, methods, eps)
              for layer, st in zip(model.model.layers, stats)]
    return plan_from_curves(curves, arch, cr, components, head_multiple, min_head_dim, kv_cr, mlp_multiple)


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
