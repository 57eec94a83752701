"""A3-OV: shrink the value/output head dim (A3_METHOD.md section 5).

Per value head ``j`` (shared by the ``g`` query heads of its GQA group; MHA: ``g = 1``):

* closed form (sections 5.2/5.3): whitened SVD in head space, giving a value map ``T`` [d_h, r]
  (new value head ``v T``) and new o_proj row-blocks ``Wo_new`` [g, r, d], one per query head;
* selection baselines: keep the top-r value dims by a score.

Weight convention: ``Wo[j, i]`` is the o_proj row-block ``W_o,i`` [d_h, d] of the i-th query head of group
``j``, i.e. ``o_proj.weight[:, head_block].T``. The head's output is ``o_i W_o,i`` with ``o_i`` its
attention output [d_h]. All math is float64 on the input's device, batched over value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a3_serve.solvers.linalg import as_f64, check_finite, psd_sqrt
from a3_serve.solvers.qk import _check_rank, _top_sorted, selection_matrix

__all__ = ["OVFactors", "ov_closed_form", "ov_select", "ov_weight_norm_scores", "ov_wanda_scores"]


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
    """A3-OV head-space, inverse-free closed form (A3_METHOD.md 5.2 MHA 'axkv', 5.3 GQA joint SVD).

    Objective: for each value head, minimise ``Σ_i E‖o_i (W_o,i − T W̃_o,i)‖²`` over ``T`` [d_h, r] and
    ``W̃_o,i`` [r, d] with one shared ``T`` per group, where ``E[o oᵀ] = G``; equivalently
    ``‖S·[W_o,1 … W_o,g] − S·T·[W̃_o,1 … W̃_o,g]‖_F²`` with ``S = G^{1/2}``. The optimum is ``Σ_{j>r} σ_j²``.

    Closed form: ``S = G^{1/2}`` (damped, :func:`psd_sqrt`); ``SVD(S·[W_o,1 … W_o,g]) = Ũ Σ Ṽᵀ``
    (d_h × g·d); ``T = [W_o,·] Ṽ_r Σ_r^{-1}`` (= ``S^{-1} Ũ_r``, inverse-free); ``W̃_o = Σ_r Ṽ_rᵀ`` split into g
    blocks [r, d]. At ``r = d_h``, ``T @ Wo_new == Wo`` up to float64 rounding.

    ``G`` choices: MHA A3 ``G_o,i = E[o_i o_iᵀ]`` (o_proj input); GQA / 'xkv' ``G_v = E[v vᵀ]``; plain SVD
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
    r = _check_rank(r, min(d_h, g * d), "value head")
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
    r = _check_rank(r, d_h, "value head")
    keep = _top_sorted(scores, r)  # [n, r]
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
