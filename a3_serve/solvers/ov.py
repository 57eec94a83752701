"""A3-OV: shrink the value/output head dim (docs/METHOD.md §3).

Per value head ``j`` (shared by the ``g`` query heads of its GQA group; MHA: ``g = 1``):

* closed form (METHOD.md §3.2/§3.3): whitened SVD in head space, giving a value map ``T`` [d_h, r]
  (new value head ``v T``) and new o_proj row-blocks ``Wo_new`` [g, r, d], one per query head;
* selection baselines: keep the top-r value dims by a score.

Weight convention: ``Wo[j, i]`` is the o_proj row-block ``W_o,i`` [d_h, d] of the i-th query head of group
``j``, i.e. ``o_proj.weight[:, head_block].T``. The head's output is ``o_i W_o,i`` with ``o_i`` its
attention output [d_h]. All math is float64 on the input's device, batched over value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a3_serve.solvers.linalg import as_f64, check_finite, check_rank, psd_sqrt, top_sorted
from a3_serve.solvers.qk import group_sum, selection_matrix

__all__ = [
    "OVFactors",
    "ov_closed_form",
    "ov_select",
    "ov_weight_norm_scores",
    "ov_wanda_scores",
    "group_mean",
    "shrink_moment",
    "ov_output_loss",
    "ov_choose_shrinkage",
]

DEFAULT_BETAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass
class OVFactors:
    """Result of :func:`ov_closed_form` / :func:`ov_select` for ``n`` value heads.

    * ``T`` [n, d_h, r]: new value head ``ṽ = v T`` (``v_proj`` block ← ``Tᵀ @ v_proj`` block).
    * ``Wo_new`` [n, g, r, d]: new o_proj row-block of each query head of the group
      (``o_proj.weight[:, new head block] = Wo_new[j, i].T``).
    * ``sv`` [n, min(d_h, g·d)]: singular values, descending (for ``ov_select``: the scores, descending).
    * ``loss`` [n]: ``Σ_{j>r} σ_j²`` (dropped score mass for ``ov_select``); ``total`` [n]: ``Σ σ_j²``.
    * ``keep`` [n, r] LongTensor (ascending) for ``ov_select``; ``None`` for the closed form.
    """

    T: torch.Tensor
    Wo_new: torch.Tensor
    sv: torch.Tensor
    loss: torch.Tensor
    total: torch.Tensor
    keep: torch.Tensor | None = None


def _check_wo(Wo: torch.Tensor, d_h: int | None = None) -> torch.Tensor:
    Wo = as_f64(Wo)
    if Wo.dim() != 4 or (d_h is not None and Wo.shape[2] != d_h):
        want = f"[n, g, {d_h}, d]" if d_h is not None else "[n, g, d_h, d]"
        raise ValueError(f"Wo must have shape {want}, got {tuple(Wo.shape)}")
    check_finite("the o_proj weights", Wo)
    return Wo


def ov_closed_form(G: torch.Tensor, Wo: torch.Tensor, r: int, eps: float = 1e-6) -> OVFactors:
    """A3-OV head-space, inverse-free closed form (docs/METHOD.md §3.2: MHA 'axkv', GQA joint SVD).

    Objective: for each value head, minimise ``Σ_i E‖o_i (W_o,i − T W̃_o,i)‖²`` over ``T`` [d_h, r] and
    ``W̃_o,i`` [r, d] with one shared ``T`` per group, where ``E[o oᵀ] = G``; equivalently
    ``‖S·[W_o,1 … W_o,g] − S·T·[W̃_o,1 … W̃_o,g]‖_F²`` with ``S = G^{1/2}``. The optimum is ``Σ_{j>r} σ_j²``.

    Closed form: ``S = G^{1/2}`` (damped, :func:`psd_sqrt`); ``SVD(S·[W_o,1 … W_o,g]) = Ũ Σ Ṽᵀ``
    (d_h × g·d); ``T = [W_o,·] Ṽ_r Σ_r^{-1}`` (= ``S^{-1} Ũ_r``, inverse-free); ``W̃_o = Σ_r Ṽ_rᵀ`` split into g
    blocks [r, d]. At ``r = d_h``, ``T @ Wo_new == Wo`` up to float64 rounding.

    ``G`` choices: MHA A3 ``G_o,i = E[o_i o_iᵀ]`` (o_proj input); GQA / 'xkv' ``G_v = E[v vᵀ]``; improved GQA
    variant (§3.4) "head-averaged GQA OV": ``group_mean(G_o, n)`` = ``G_o.reshape(n, g, d_h, d_h).mean(1)``;
    shrunk moments :func:`shrink_moment` (§3.5, β chosen by :func:`ov_choose_shrinkage`, §3.6); plain SVD
    baseline ``W_v W_vᵀ``; any PSD matrix.

    Shapes: ``G`` [n, d_h, d_h]; ``Wo`` [n, g, d_h, d]; ``1 <= r <= min(d_h, g·d)``. Returns
    :class:`OVFactors` (``T`` [n, d_h, r], ``Wo_new`` [n, g, r, d], ``sv`` [n, min(d_h, g·d)], ``loss``/``total`` [n]).
    """
    G = as_f64(G)
    check_finite("the value-side second moments G", G)
    if G.dim() != 3 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must have shape [n, d_h, d_h], got {tuple(G.shape)}")
    n, d_h = G.shape[0], G.shape[-1]
    Wo = _check_wo(Wo, d_h).to(G.device)
    if Wo.shape[0] != n:
        raise ValueError(f"G has {n} value heads but Wo has {Wo.shape[0]}")
    g, d = Wo.shape[1], Wo.shape[3]
    r = check_rank(r, min(d_h, g * d), "value head")
    W_cat = Wo.transpose(1, 2).reshape(n, d_h, g * d)  # [n, d_h, g·d] = [W_o,1 … W_o,g]
    S, _ = psd_sqrt(G, eps)
    _, s, Vh = torch.linalg.svd(S @ W_cat, full_matrices=False)  # s [n, k], Vh [n, k, g·d]
    s_r = s[..., :r]
    floor = (s[..., :1] * torch.finfo(torch.float64).eps).clamp_min(1e-300)
    Vr_t = Vh[..., :r, :]  # Ṽ_rᵀ [n, r, g·d]
    T = (W_cat @ Vr_t.mT) / torch.maximum(s_r, floor).unsqueeze(-2)  # [n, d_h, r]
    Wo_new = (s_r.unsqueeze(-1) * Vr_t).reshape(n, r, g, d).transpose(1, 2).contiguous()  # [n, g, r, d]
    s2 = s.square()
    return OVFactors(T=T, Wo_new=Wo_new, sv=s, loss=s2[..., r:].sum(-1), total=s2.sum(-1))


def ov_select(scores: torch.Tensor, Wo: torch.Tensor, r: int) -> OVFactors:
    """Selection baseline: keep the top-r dims of every value head.

    Objective: none beyond the score (a CUR-style heuristic); ties go to the lower index.

    Closed form: ``keep`` = the r highest ``scores`` per head, ascending; ``T = E`` (0/1 selection matrix,
    ``v T = v[..., keep]``); ``Wo_new[j, i] = Wo[j, i][keep]`` (the kept rows); ``loss``/``total`` are the
    dropped / total score mass; ``sv`` holds the scores sorted descending.

    Shapes: ``scores`` [n, d_h]; ``Wo`` [n, g, d_h, d] -> :class:`OVFactors` with ``T`` [n, d_h, r],
    ``Wo_new`` [n, g, r, d], ``keep`` [n, r].
    """
    scores = as_f64(scores)
    check_finite("the value-dim selection scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [n, d_h], got {tuple(scores.shape)}")
    n, d_h = scores.shape
    Wo = _check_wo(Wo, d_h).to(scores.device)
    g, d = Wo.shape[1], Wo.shape[3]
    r = check_rank(r, d_h, "value head")
    keep = top_sorted(scores, r)  # [n, r]
    T = selection_matrix(keep, d_h)
    idx = keep[:, None, :, None].expand(n, g, r, d)
    Wo_new = torch.gather(Wo, 2, idx)
    total = scores.sum(-1)
    loss = (total - torch.gather(scores, -1, keep).sum(-1)).clamp_min(0.0)
    sv = torch.sort(scores, dim=-1, descending=True).values
    return OVFactors(T=T, Wo_new=Wo_new, sv=sv, loss=loss, total=total, keep=keep)


def ov_weight_norm_scores(Wv: torch.Tensor, Wo: torch.Tensor) -> torch.Tensor:
    """Data-free value-dim score: ``score[j, c] = ‖W_v,j[c, :]‖² · Σ_i ‖W_o,i[c, :]‖²``.

    Shapes: ``Wv`` [n, d_h, d] holds each value head's ``v_proj.weight`` rows (the head's block of
    ``v_proj.weight``, PyTorch ``[out, in]`` layout); ``Wo`` [n, g, d_h, d] as in :func:`ov_closed_form`.
    Returns [n, d_h] float64.
    """
    Wv = as_f64(Wv)
    Wo = _check_wo(Wo, Wv.shape[1] if Wv.dim() == 3 else None).to(Wv.device)
    if Wv.dim() != 3 or Wv.shape[0] != Wo.shape[0]:
        raise ValueError(f"Wv must have shape [n, d_h, d] matching Wo {tuple(Wo.shape)}, got {tuple(Wv.shape)}")
    return Wv.square().sum(-1) * Wo.square().sum(dim=(1, 3))


def ov_wanda_scores(gv_diag: torch.Tensor, Wo: torch.Tensor) -> torch.Tensor:
    """Wanda-like value-dim score: ``score[j, c] = E[v_{j,c}²] · Σ_i ‖W_o,i[c, :]‖²``.

    Shapes: ``gv_diag`` [n, d_h] (the diagonal of ``G_v = E[v vᵀ]``); ``Wo`` [n, g, d_h, d]. Returns [n, d_h].
    """
    gv_diag = as_f64(gv_diag)
    check_finite("the value energies E[v²]", gv_diag)
    Wo = _check_wo(Wo, gv_diag.shape[-1]).to(gv_diag.device)
    return gv_diag * Wo.square().sum(dim=(1, 3))


def group_mean(G: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Average per-query-head moments over GQA groups: ``out[j] = (1/g) Σ_{i: i // g == j} G[i]``.

    This is the moment of the improved GQA OV variant (docs/METHOD.md §3.4): the head-averaged
    attention-weighted moment ``mean_{i∈group} E[o_i o_iᵀ]`` of the o_proj input, used as
    ``ov_closed_form(group_mean(G_o, n), Wo, r)`` (equivalently ``G_o.reshape(n, g, d_h, d_h).mean(1)``).

    Shapes: ``G`` [h_q, ...] (e.g. [h_q, d_h, d_h]) -> [n_groups, ...] float64; ``h_q % n_groups == 0``.
    """
    G = as_f64(G)
    return group_sum(G, n_groups) / (G.shape[0] // n_groups)


def shrink_moment(G_p: torch.Tensor, G_x: torch.Tensor, beta: float) -> torch.Tensor:
    """Shrink an attention-weighted moment toward the (trace-matched) plain value moment (docs/METHOD.md §3.5).

    Closed form: ``(1 − β)·G_p + β·(tr G_p / tr G_x)·G_x`` per matrix; a matrix with ``tr G_x == 0`` is
    returned as ``G_p``. The trace of the result equals ``tr G_p`` for every β. β = 0: A3-OV ``R_P``;
    β = 1: the rescaled xkv moment ``R_X`` (same closed-form solution as ``G_x`` itself).

    Shapes: ``G_p``, ``G_x`` [..., d_h, d_h] (e.g. [n, d_h, d_h]; ``G_p`` = head-averaged ``E[o oᵀ]``,
    ``G_x`` = ``E[v vᵀ]``); ``0 <= beta <= 1``. Returns float64 of ``G_p``'s shape on its device.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the OV shrinkage beta must lie in [0, 1], got {beta}")
    G_p = as_f64(G_p)
    G_x = as_f64(G_x).to(G_p.device)
    if G_p.shape != G_x.shape or G_p.dim() < 2 or G_p.shape[-1] != G_p.shape[-2]:
        raise ValueError(
            f"G_p and G_x must have the same shape [..., d_h, d_h], got {tuple(G_p.shape)} and {tuple(G_x.shape)}"
        )
    check_finite("the OV moments passed to shrink_moment", G_p, G_x)
    tr_p = torch.diagonal(G_p, dim1=-2, dim2=-1).sum(-1)
    tr_x = torch.diagonal(G_x, dim1=-2, dim2=-1).sum(-1)
    ok = tr_x != 0
    scale = torch.where(ok, tr_p / torch.where(ok, tr_x, torch.ones_like(tr_x)), torch.zeros_like(tr_x))
    out = (1.0 - beta) * G_p + beta * scale[..., None, None] * G_x
    return torch.where(ok[..., None, None], out, G_p)


def ov_output_loss(T: torch.Tensor, Wo_new: torch.Tensor, Wo: torch.Tensor, G_out: torch.Tensor) -> torch.Tensor:
    """Exact per-query-head output error of an OV reduction under given head-output moments.

    Objective: the new value head is ``ṽ = v T``; attention weights are unchanged, so the reduced head output
    is ``õ_i = o_i T`` and head i contributes ``o_i T W̃_o,i`` instead of ``o_i W_o,i``. The loss per value
    head is ``Σ_i E‖o_i (W_o,i − T W̃_o,i)‖² = Σ_i tr(ΔW_iᵀ G_out[:, i] ΔW_i)`` with
    ``ΔW_i = Wo[:, i] − T @ Wo_new[:, i]`` and ``G_out[:, i] = E[o_i o_iᵀ]`` (mean over tokens). This is the
    sum of per-head errors (docs/METHOD.md §3.1, §3.6), not the error of their sum.

    Shapes: ``T`` [n, d_h, r]; ``Wo_new`` [n, g, r, d]; ``Wo`` [n, g, d_h, d]; ``G_out`` [n, g, d_h, d_h]
    (query head i of group j at ``[j, i]``; reshape a [h_q, d_h, d_h] moment with ``.reshape(n, g, d_h, d_h)``).
    Returns float64 [n] on ``T``'s device.
    """
    T = as_f64(T)
    dev = T.device
    Wo_new, Wo, G_out = as_f64(Wo_new).to(dev), _check_wo(Wo).to(dev), as_f64(G_out).to(dev)
    n, g, d_h, d = Wo.shape
    if T.dim() != 3 or T.shape[:2] != (n, d_h):
        raise ValueError(f"T must have shape [{n}, {d_h}, r], got {tuple(T.shape)}")
    r = T.shape[2]
    if Wo_new.shape != (n, g, r, d):
        raise ValueError(f"Wo_new must have shape {(n, g, r, d)}, got {tuple(Wo_new.shape)}")
    if G_out.shape != (n, g, d_h, d_h):
        raise ValueError(f"G_out must have shape {(n, g, d_h, d_h)} (per query head), got {tuple(G_out.shape)}")
    check_finite("the OV factors / head-output moments passed to ov_output_loss", T, Wo_new, G_out)
    dW = Wo - T.unsqueeze(1) @ Wo_new  # [n, g, d_h, d]
    return (dW * (G_out @ dW)).sum(dim=(1, 2, 3))


def ov_choose_shrinkage(
    G_p: torch.Tensor,
    G_x: torch.Tensor,
    Wo: torch.Tensor,
    r: int,
    G_val_out: torch.Tensor,
    betas: tuple[float, ...] | list[float] = DEFAULT_BETAS,
    eps: float = 1e-6,
) -> tuple[OVFactors, torch.Tensor, torch.Tensor]:
    """Choose the OV moment shrinkage β per value head on held-out data (docs/METHOD.md §3.6).

    Objective: for each β in ``betas``, fit ``F_β = ov_closed_form(shrink_moment(G_p, G_x, β), Wo, r, eps)``
    on the calibration moments, and score it by the held-out exact output error
    ``L[β, j] = ov_output_loss(F_β.T, F_β.Wo_new, Wo, G_val_out)[j]``. The closed form is independent per
    value head, so β is chosen per head: ``β*_j = argmin_β L[β, j]`` (ties -> the earlier entry of
    ``betas``), and the returned factors take head j from ``F_{β*_j}``.

    Typical inputs: ``G_p = group_mean(G_o_fit, n)`` (head-averaged attention-weighted moment; MHA: ``G_o``
    itself), ``G_x = G_v`` (``E[v vᵀ]``), ``G_val_out = G_o_val.reshape(n, g, d_h, d_h)``. β = 0 with
    ``G_p = group_mean(G_o, n)`` is the "head-averaged GQA OV" variant of docs/METHOD.md §3.4
    (``ov_closed_form(G_o.reshape(n, g, d_h, d_h).mean(1), Wo, r)``); β = 1 is the paper's xkv mode.

    Shapes: ``G_p``, ``G_x`` [n, d_h, d_h]; ``Wo`` [n, g, d_h, d]; ``G_val_out`` [n, g, d_h, d_h]; ``betas``
    non-empty, each in [0, 1]. Returns ``(factors, beta, losses)``: :class:`OVFactors` (``loss``/``total``/``sv``
    are those of each head's chosen fit, i.e. in-sample under the shrunk moment), ``beta`` float64 [n],
    ``losses`` float64 [len(betas), n] (held-out loss table).
    """
    betas = [float(b) for b in betas]
    if not betas:
        raise ValueError("ov_choose_shrinkage needs at least one beta")
    G_p = as_f64(G_p)
    fits = [ov_closed_form(shrink_moment(G_p, G_x, b), Wo, r, eps) for b in betas]
    losses = torch.stack([ov_output_loss(f.T, f.Wo_new, Wo, G_val_out) for f in fits])  # [K, n]
    best = losses.argmin(0)  # [n]; first minimum -> earlier beta on ties
    heads = torch.arange(best.shape[0], device=best.device)

    def pick(name: str) -> torch.Tensor:
        return torch.stack([getattr(f, name) for f in fits])[best, heads]

    factors = OVFactors(T=pick("T"), Wo_new=pick("Wo_new"), sv=pick("sv"), loss=pick("loss"), total=pick("total"))
    beta = torch.tensor(betas, dtype=torch.float64, device=best.device)[best]
    return factors, beta, losses
