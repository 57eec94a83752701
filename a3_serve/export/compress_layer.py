"""Compress one decoder layer: calibration statistics + dense weights -> compressed weights.

This is the glue between :mod:`a3_serve.calibration.stats` and the pure solvers (:mod:`a3_serve.solvers`): it
picks the moments each method (:mod:`a3_serve.export.methods`) needs, calls the solver, and applies the factors
to the PyTorch weights. :func:`solve_layer` works on a dict of tensors; :func:`compress_layer_into` does it for a
loaded HF decoder layer and puts the results under their checkpoint names, and :func:`compressed_layer` builds
the compressed layer as a module (to propagate calibration activations through it).

Weight layout (PyTorch ``[out, in]``), per layer, ``d`` = hidden size:

* ``q [h_q*d_h, d]``, ``k/v [h_kv*d_h, d]``, ``o [d, h_q*d_h]``, ``gate/up [d_int, d]``, ``down [d, d_int]``
  and optional biases. Query head ``i`` uses KV head ``i // g``.
* QK (RoPE): keep ``r_qk/2`` frequency pairs per KV group; the reduced head's dims are
  ``[kept firsts, kept partners]``, so the new q/k rows are a gather of the old ones and
  ``rope_freq_index[j]`` lists the kept frequencies of KV head ``j``.
* OV: a value head ``v`` becomes ``v T`` (``T [d_h, r_vo]``), i.e. ``v_proj ← Tᵀ v_proj`` per head, and the
  o_proj columns of each query head become ``Wo_newᵀ``. The o_proj bias is unchanged.
* MLP: keep ``r_int`` neurons: rows of gate/up, columns of down.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from a3_serve.calibration.stats import LayerStats
from a3_serve.errors import NumericalError
from a3_serve.export.architectures import SourceArch
from a3_serve.export.methods import (
    DEFAULT_RIDGE,
    DEFAULT_SHRINKAGE,
    REFIT_METHODS,
    Methods,
)
from a3_serve.modeling import A3LlamaConfig
from a3_serve.modeling.modeling_a3_llama import ROPE_INDEX_NAME, A3LlamaDecoderLayer
from a3_serve.solvers import crossval
from a3_serve.solvers import mlp as mlp_solver
from a3_serve.solvers import ov as ov_solver
from a3_serve.solvers import qk as qk_solver
from a3_serve.solvers.linalg import all_finite

LAYER_TENSORS = ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "o_b", "gate_w", "gate_b", "up_w", "up_b", "down_w",
                 "down_b")


#: the norm weights of a decoder layer, copied unchanged into the compressed checkpoint
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")

# short name -> module path inside an HF Llama-style decoder layer
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """The projection weights/biases of an HF Llama-style decoder layer, keyed as in LAYER_TENSORS."""
    out: dict[str, torch.Tensor | None] = {}
    for name, path in PROJECTIONS.items():
        mod = layer.get_submodule(path)
        out[f"{name}_w"] = mod.weight.detach()
        out[f"{name}_b"] = mod.bias.detach() if mod.bias is not None else None
    return out


def _per_dim_energy(method: str, G: torch.Tensor, W: torch.Tensor, x2: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-head, per-dim energy [n_heads, d_h] of a projection for the QK pair scores."""
    if method == "a3":
        return torch.diagonal(G, dim1=-2, dim2=-1)
    Wh = W.to(torch.float64).reshape(n_heads, -1, W.shape[-1])  # [h, d_h, d]
    if method == "wanda":
        return (Wh.square() * x2.to(Wh)).sum(-1)
    if method == "weight-norm":
        return Wh.square().sum(-1)
    raise ValueError(f"unknown QK method {method!r}")


def _gather_heads(W: torch.Tensor, cols: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a head-blocked weight/bias: W [n_heads*d_h, ...], cols [n_heads, r] -> [n_heads*r, ...]."""
    Wh = W.reshape(n_heads, -1, *W.shape[1:])
    idx = cols.reshape(n_heads, -1, *([1] * (W.dim() - 1))).expand(-1, -1, *W.shape[1:])
    return torch.gather(Wh, 1, idx.to(W.device)).reshape(-1, *W.shape[1:])


def qk_pair_scores(w: dict, st: LayerStats, arch: SourceArch, method: str) -> torch.Tensor:
    """The RoPE frequency-pair scores [h_kv, d_h/2] of a QK method (higher = keep)."""
    hq, hkv, g, dh = arch.num_heads, arch.num_kv_heads, arch.group_size, arch.head_dim
    if method in ("energy", "energy-causal"):
        scores = st.E_rope if method == "energy" else st.E_rope_c
        if scores is None:
            raise ValueError(f"QK method {method!r} needs RoPE energies: collect stats with Methods.stats_request()")
        return scores
    eq = _per_dim_energy(method, st.Gq, w["q_w"], st.x2, hq).reshape(hkv, g, dh).sum(1)
    ek = _per_dim_energy(method, st.Gk, w["k_w"], st.x2, hkv)
    return qk_solver.rope_pair_scores(eq, ek)


def solve_qk(w: dict, st: LayerStats, arch: SourceArch, r: int, method: str) -> tuple[dict, torch.Tensor, dict]:
    """Pair selection for RoPE attention; returns (new q/k tensors, rope_freq_index [h_kv, r/2], report)."""
    hq, hkv, g, dh = arch.num_heads, arch.num_kv_heads, arch.group_size, arch.head_dim
    sel = qk_solver.select_pairs_by_score(qk_pair_scores(w, st, arch, method), r // 2)
    cols = qk_solver.pair_columns(sel.keep, dh)  # [h_kv, r]
    q_cols = cols.repeat_interleave(g, dim=0)  # [h_q, r]
    new = {
        "q_w": _gather_heads(w["q_w"], q_cols, hq),
        "q_b": _gather_heads(w["q_b"], q_cols, hq) if w["q_b"] is not None else None,
        "k_w": _gather_heads(w["k_w"], cols, hkv),
        "k_b": _gather_heads(w["k_b"], cols, hkv) if w["k_b"] is not None else None,
    }
    report = {"loss": sel.loss.sum().item(), "total": sel.total.sum().item()}
    return new, sel.keep.to(torch.int32), report


def wo_per_group(o_w: torch.Tensor, arch: SourceArch) -> torch.Tensor:
    """o_proj weight [d, h_q·d_h] -> float64 [h_kv, g, d_h, d]: the output rows of every query head, by KV group."""
    hq, hkv, g, dh, d = arch.num_heads, arch.num_kv_heads, arch.group_size, arch.head_dim, arch.hidden_size
    return o_w.to(torch.float64).reshape(d, hq, dh).permute(1, 2, 0).reshape(hkv, g, dh, d)


def solve_ov(w: dict, st: LayerStats, arch: SourceArch, r: int, method: str, eps: float) -> tuple[dict, dict]:
    """Shrink each value head to r dims; returns (new v/o tensors, report)."""
    hq, hkv, g, dh, d = arch.num_heads, arch.num_kv_heads, arch.group_size, arch.head_dim, arch.hidden_size
    dtype = w["v_w"].dtype
    Wv = w["v_w"].to(torch.float64).reshape(hkv, dh, d)  # per value head [d_h, d]
    Wo = wo_per_group(w["o_w"], arch)
    extra: dict = {}
    if method == "a3" and g == 1:
        res = ov_solver.ov_closed_form(st.Go, Wo, r, eps)
    elif method == "a3-avg":
        res = ov_solver.ov_closed_form(ov_solver.group_mean(st.Go, hkv), Wo, r, eps)
    elif method == "a3-shrink":
        beta = _choose_shrinkage(st, Wo, hkv, r, eps)
        res = ov_solver.ov_closed_form(_shrink_per_head(ov_solver.group_mean(st.Go, hkv), st.Gv, beta), Wo, r, eps)
        extra = {"shrinkage": [round(float(b), 3) for b in beta]}
    elif method in ("a3", "xkv"):
        res = ov_solver.ov_closed_form(st.Gv, Wo, r, eps)
    elif method == "svd":
        res = ov_solver.ov_closed_form(Wv @ Wv.transpose(1, 2), Wo, r, eps)
    elif method == "wanda":
        res = ov_solver.ov_select(ov_solver.ov_wanda_scores(torch.diagonal(st.Gv, dim1=-2, dim2=-1), Wo), Wo, r)
    elif method == "weight-norm":
        res = ov_solver.ov_select(ov_solver.ov_weight_norm_scores(Wv, Wo), Wo, r)
    else:
        raise ValueError(f"unknown OV method {method!r}")
    T = res.T  # [h_kv, d_h, r]
    new_v = (T.transpose(1, 2) @ Wv).reshape(hkv * r, d)
    new_vb = None
    if w["v_b"] is not None:
        new_vb = (T.transpose(1, 2) @ w["v_b"].to(torch.float64).reshape(hkv, dh, 1)).reshape(hkv * r)
    new_o = res.Wo_new.reshape(hq, r, d).permute(2, 0, 1).reshape(d, hq * r)
    new = {"v_w": new_v.to(dtype), "v_b": new_vb.to(dtype) if new_vb is not None else None,
           "o_w": new_o.to(dtype), "o_b": w["o_b"]}
    return new, {"loss": res.loss.sum().item(), "total": res.total.sum().item(), **extra}


def _shrink_per_head(Gp: torch.Tensor, Gx: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """:func:`ov_solver.shrink_moment` with one β per value head (Gp, Gx [n, d_h, d_h]; beta [n])."""
    return torch.stack([ov_solver.shrink_moment(Gp[j], Gx[j], float(b)) for j, b in enumerate(beta)])


def _choose_shrinkage(st: LayerStats, Wo: torch.Tensor, hkv: int, r: int, eps: float) -> torch.Tensor:
    """β per value head with the least held-out output error over the calibration folds (each fold scored by a fit
    on the others; :func:`crossval.choose_setting`), or :data:`DEFAULT_SHRINKAGE` without folds."""
    if not st.folds:
        return torch.full((hkv,), DEFAULT_SHRINKAGE, dtype=torch.float64)
    g = Wo.shape[1]
    losses = []
    for fit, val in st.held_out_pairs():
        G_val = val.Go.reshape(hkv, g, *val.Go.shape[1:])
        _, _, L = ov_solver.ov_choose_shrinkage(ov_solver.group_mean(fit.Go, hkv), fit.Gv, Wo, r, G_val, eps=eps)
        losses.append(L)  # [n_betas, h_kv]
    betas = torch.tensor(ov_solver.DEFAULT_BETAS, dtype=torch.float64)
    return betas[crossval.choose_setting(losses)]


def solve_mlp(w: dict, st: LayerStats, r_int: int, method: str) -> tuple[dict, dict]:
    """Keep r_int intermediate neurons; returns (new gate/up/down tensors, report)."""
    d_int = w["down_w"].shape[1]
    refit = method in REFIT_METHODS and r_int < d_int  # nothing dropped: nothing to refit
    report: dict = {}
    if refit and st.H is None:
        raise ValueError(f"MLP method {method!r} needs E[h hᵀ]: collect stats with Methods.stats_request()")
    score_method = "a3" if method in REFIT_METHODS else method
    h2 = st.h2
    if method == "a3-refit-shrunk" and refit and st.folds:  # energies shrunk toward weight-only, α by cross-validation
        losses = [torch.tensor(mlp_solver.mlp_selection_losses(fit.h2, val.H, w["down_w"], r_int))
                  for fit, val in st.held_out_pairs()]
        alpha = mlp_solver.DEFAULT_SCORE_SHRINKAGES[int(crossval.choose_setting(losses))]
        h2 = mlp_solver.shrink_energies(st.h2, alpha)
        report["score_shrinkage"] = alpha
    scores = mlp_solver.mlp_scores(score_method, h2, w["gate_w"], w["up_w"], w["down_w"])
    if method == "greedy-refit" and refit:
        keep = mlp_solver.mlp_greedy_select(st.H, w["down_w"], r_int, DEFAULT_RIDGE)
    else:
        keep = mlp_solver.select_neurons(scores, r_int)
    keep = keep.to(w["gate_w"].device)
    plain_down = w["down_w"][:, keep]
    down = plain_down
    if refit:
        ridge = DEFAULT_RIDGE
        if st.folds:  # the ridge with the least held-out error over the folds (each scored by a fit on the others)
            losses = [torch.tensor(mlp_solver.mlp_ridge_losses(fit.H, val.H, keep, w["down_w"]))
                      for fit, val in st.held_out_pairs()]
            ridge = mlp_solver.DEFAULT_RIDGES[int(crossval.choose_setting(losses))]
        plain = mlp_solver.mlp_objective(st.H, w["down_w"], keep, plain_down)  # the dropped columns only: cheap
        loss = plain
        if ridge != float("inf"):  # inf: plain selection won on the held-out fold
            down, loss = mlp_solver.mlp_refit_with_loss(st.H, keep, w["down_w"], ridge)
            down = down.to(w["down_w"])
        report["ridge"] = None if ridge == float("inf") else float(ridge)  # None: plain selection kept
        report["refit_gain"] = plain / max(loss, 1e-300)  # in-sample error before / after the refit
    new = {
        "gate_w": w["gate_w"][keep], "up_w": w["up_w"][keep], "down_w": down,
        "gate_b": w["gate_b"][keep] if w["gate_b"] is not None else None,
        "up_b": w["up_b"][keep] if w["up_b"] is not None else None,
        "down_b": w["down_b"],
    }
    return new, {"dropped_score_fraction": float(mlp_solver.dropped_fraction(scores, keep.cpu())), **report}


def solve_layer(
    w: dict[str, torch.Tensor | None],
    st: LayerStats,
    arch: SourceArch,
    r_qk: int,
    r_vo: int,
    r_int: int,
    methods: Methods,
    eps: float = 1e-6,
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, dict[str, Any]]:
    """Compress one layer. Returns (new tensors keyed like LAYER_TENSORS, rope_freq_index, report).

    Components whose target equals the original size are still solved (at full rank the factors are
    exact), so the CR-0 export exercises the same code path as a real one.
    """
    new: dict[str, torch.Tensor | None] = {}
    qk_new, rope_index, qk_rep = solve_qk(w, st, arch, r_qk, methods.qk)
    ov_new, ov_rep = solve_ov(w, st, arch, r_vo, methods.ov, eps)
    mlp_new, mlp_rep = solve_mlp(w, st, r_int, methods.mlp)
    new.update(qk_new)
    new.update(ov_new)
    new.update(mlp_new)
    report = {
        "qk": {"method": methods.qk, "dim": r_qk, **qk_rep},
        "ov": {"method": methods.ov, "dim": r_vo, **ov_rep},
        "mlp": {"method": methods.mlp, "dim": r_int, **mlp_rep},
    }
    for k in ("qk", "ov"):
        tot = report[k]["total"]
        report[k]["relative_loss"] = report[k]["loss"] / tot if tot > 0 else 0.0
    return new, rope_index, report


def compress_layer_into(
    new_state: dict[str, torch.Tensor], layer: torch.nn.Module, i: int, st: LayerStats, arch: SourceArch,
    dims: tuple[int, int, int], methods: Methods, damp: float,
) -> dict[str, Any]:
    """Solve decoder layer ``i`` (a loaded HF layer) at ``dims = (r_qk, r_vo, r_int)`` and put its compressed
    projections and ``rope_freq_index`` into ``new_state`` under their checkpoint names; returns the layer's
    report (per-component losses, ``layer``, ``seconds``). Raises :class:`NumericalError` on a non-finite result."""
    tl = time.perf_counter()
    new, rope_index, rep = solve_layer(layer_tensors(layer), st, arch, *dims, methods, damp)
    prefix = f"model.layers.{i}."
    for key in LAYER_TENSORS:
        t = new[key]
        if t is None:
            continue
        if not all_finite(t):
            raise NumericalError(f"layer {i}: solved {key} contains NaN/Inf; raise --damp (e.g. 1e-4) or use more "
                                 "calibration text")
        base, kind = key.split("_")
        new_state[prefix + PROJECTIONS[base] + (".weight" if kind == "w" else ".bias")] = t
    new_state[prefix + "self_attn." + ROPE_INDEX_NAME] = rope_index
    rep["layer"] = i
    rep["seconds"] = round(time.perf_counter() - tl, 4)
    return rep


def compressed_layer(dense: torch.nn.Module, a3_config: dict[str, Any], i: int,
                     new_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The compressed decoder layer ``i`` as an A3 module on the dense layer's device and dtype, with the dense
    layer's norms (for propagating calibration activations; ``a3_config`` is the compressed config dict)."""
    cfg = A3LlamaConfig.from_dict(a3_config)
    cfg._attn_implementation = dense.self_attn.config._attn_implementation
    p = next(dense.parameters())
    layer = A3LlamaDecoderLayer(cfg, i).to(device=p.device, dtype=p.dtype).eval()
    prefix = f"model.layers.{i}."
    sd = {k[len(prefix):]: v for k, v in new_state.items() if k.startswith(prefix)}
    for name in NORMS:
        sd[name] = dense.get_parameter(name)
    layer.load_state_dict(sd, strict=True)
    return layer
