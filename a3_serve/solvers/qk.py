"""A3-QK: shrink the query/key head dim (docs/METHOD.md §2).

Two solvers:

* RoPE models (Llama family): whole RoPE frequency pairs are kept or dropped (CUR selection,
  METHOD.md §2.4; exact post-RoPE pair energy §2.5). In the HF ``rotate_half`` layout dim ``p`` pairs with
  dim ``p + d_h/2``; a reduced head stores the kept "first" dims then their partners, and RoPE runs on it
  with the gathered ``inv_freq``.
* NoPE models: the head-space closed form (METHOD.md §2.2/§2.3), an oblique rank-r projector ``A Bᵀ``
  inserted between q and k.

All functions are pure math on float64 torch tensors (inputs of any float dtype are converted; results
live on the input's device) and batch over heads / KV groups without Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a3_serve.errors import BudgetError
from a3_serve.solvers.linalg import as_f64, check_finite, check_rank, psd_sqrt, top_sorted

__all__ = [
    "PairSelection",
    "QKFactors",
    "group_sum",
    "rope_pair_scores",
    "rope_complex",
    "rope_pair_energy",
    "select_pairs_by_score",
    "select_rope_pairs",
    "pair_columns",
    "selection_matrix",
    "qk_closed_form",
]


@dataclass
class PairSelection:
    """Result of :func:`select_rope_pairs` for ``n`` heads (or KV groups).

    * ``keep``: LongTensor [n, n_pairs], kept frequency indices ``p`` (in ``[0, d_h/2)``), ascending per row.
    * ``scores``: [n, d_h/2] float64 pair scores.
    * ``loss``: [n] dropped score mass (sum of the scores not kept).
    * ``total``: [n] total score mass.
    """

    keep: torch.Tensor
    scores: torch.Tensor
    loss: torch.Tensor
    total: torch.Tensor


@dataclass
class QKFactors:
    """Result of :func:`qk_closed_form` for ``n`` heads (or KV groups).

    * ``A`` [n, d_h, r]: new query head ``q̃ = q A`` (applied to every query head of a GQA group).
    * ``B`` [n, d_h, r]: new key head ``k̃ = k B``.
    * ``sv`` [n, d_h]: all singular values of ``G_q^{1/2} G_k^{1/2}``, descending.
    * ``loss`` [n]: ``Σ_{j>r} σ_j²`` (the optimal objective), ``total`` [n]: ``Σ_j σ_j²``.
    """

    A: torch.Tensor
    B: torch.Tensor
    sv: torch.Tensor
    loss: torch.Tensor
    total: torch.Tensor


def group_sum(G: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum per-query-head moments over GQA groups.

    Objective/closed form: ``out[j] = Σ_{i: i // g == j} G[i]`` with ``g = n_heads / n_groups`` (HF
    ``repeat_kv`` mapping: query head ``i`` uses KV head ``i // g``).

    Shapes: ``G`` [n_heads, ...] -> [n_groups, ...] (float64, same device). Works for second moments
    [h_q, d_h, d_h] and for per-dim energies [h_q, d_h].
    """
    G = as_f64(G)
    n_heads = G.shape[0]
    if n_groups < 1 or n_heads % n_groups:
        raise ValueError(f"cannot split {n_heads} query heads into {n_groups} equal KV groups")
    return G.reshape(n_groups, n_heads // n_groups, *G.shape[1:]).sum(1)


def _check_head_energies(eq: torch.Tensor, ek: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eq, ek = as_f64(eq), as_f64(ek)
    if eq.shape != ek.shape or eq.dim() < 1:
        raise ValueError(f"eq and ek must have the same shape [n, d_h], got {tuple(eq.shape)} and {tuple(ek.shape)}")
    if eq.shape[-1] % 2:
        raise ValueError(f"RoPE heads need an even head dim, got d_h = {eq.shape[-1]}")
    check_finite("the q/k per-dim energies used for RoPE pair scores", eq, ek)
    return eq, ek.to(eq.device)


def rope_pair_scores(eq: torch.Tensor, ek: torch.Tensor) -> torch.Tensor:
    """The paper's RoPE pair score in the HF ``rotate_half`` layout.

    Closed form: ``score[p] = eq[p]·ek[p] + eq[p + d_h/2]·ek[p + d_h/2]`` for ``p < d_h/2`` (dim ``p`` and dim
    ``p + d_h/2`` are rotated together by frequency ``θ_p``). ``eq[c]``/``ek[c]`` are per-dim energies,
    e.g. ``E[q_c²]`` (the diagonal of the group-summed ``G_q``) and ``E[k_c²]``.

    Shapes: ``eq``, ``ek`` [n, d_h] (any leading dims) -> [n, d_h/2] float64.
    """
    eq, ek = _check_head_energies(eq, ek)
    half = eq.shape[-1] // 2
    return eq[..., :half] * ek[..., :half] + eq[..., half:] * ek[..., half:]


def select_pairs_by_score(scores: torch.Tensor, n_keep: int) -> PairSelection:
    """Keep the ``n_keep`` highest-scoring RoPE frequency pairs of every head / KV group, given the scores.

    Objective: keep the pairs with the largest (precomputed) scores, e.g. :func:`rope_pair_scores` (paper)
    or :func:`rope_pair_energy` (exact all-pairs energy); ties go to the lower index. ``loss`` is the
    dropped score mass ``Σ_{p∉keep} score[p]``, ``total = Σ_p score[p]``.

    Shapes: ``scores`` [n, P] (``P = d_h/2``; any leading dims); ``1 <= n_keep <= P``. Returns
    :class:`PairSelection` with ``keep`` [n, n_keep] (ascending), ``scores`` [n, P] float64,
    ``loss``/``total`` [n].
    """
    scores = as_f64(scores)
    if scores.dim() < 1:
        raise ValueError(f"pair scores must have shape [n, d_h/2], got {tuple(scores.shape)}")
    check_finite("the RoPE pair scores", scores)
    half = scores.shape[-1]
    if isinstance(n_keep, bool) or int(n_keep) != n_keep or not 1 <= int(n_keep) <= half:
        raise BudgetError(
            f"cannot keep {n_keep} RoPE pairs of a {2 * half}-dim head (1..{half} pairs); "
            "choose an even reduced head dim between 2 and the original head dim"
        )
    keep = top_sorted(scores, int(n_keep))
    total = scores.sum(-1)
    loss = total - torch.gather(scores, -1, keep).sum(-1)
    return PairSelection(keep=keep, scores=scores, loss=loss.clamp_min(0.0), total=total)


def select_rope_pairs(eq: torch.Tensor, ek: torch.Tensor, n_pairs: int) -> PairSelection:
    """Keep the ``n_pairs`` highest-scoring RoPE frequency pairs of every head / KV group.

    Objective: CUR pair selection (A3 'rxx-w-rxx'); keep the pairs with the largest
    :func:`rope_pair_scores` (ties broken by the lower index) and report the dropped score mass.
    Same as ``select_pairs_by_score(rope_pair_scores(eq, ek), n_pairs)``.

    Shapes: ``eq``, ``ek`` [n, d_h]; returns :class:`PairSelection` with ``keep`` [n, n_pairs] (ascending),
    ``scores`` [n, d_h/2], ``loss``/``total`` [n].
    """
    return select_pairs_by_score(rope_pair_scores(eq, ek), n_pairs)


def rope_complex(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Post-RoPE complex coordinates of q or k in the HF ``rotate_half`` layout.

    Closed form: ``u[..., m, p] = (x[..., m, p] + i·x[..., m, p + d_h/2]) · exp(i·θ_p·pos_m)`` with
    ``θ_p = inv_freq[p]``. HF RoPE ``x_rot = x·cos + rotate_half(x)·sin`` (angles ``cat(θ·pos, θ·pos)``)
    gives ``x_rot[p] + i·x_rot[p + d_h/2] = u[p]``, hence for a query ``u`` and a key ``v``
    ``q_rot · k_rot = Σ_p Re(u_p · conj(v_p))`` (each pair's contribution to the pre-softmax score).

    Shapes: ``x`` real [..., T, d_h] (``d_h`` even); ``inv_freq`` [d_h/2] (already scaled, e.g. llama3
    rope_scaling); ``positions`` [T] (long or float). Returns complex128 [..., T, d_h/2] on ``x``'s device.
    """
    x = as_f64(x)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape [..., T, d_h] with an even d_h, got {tuple(x.shape)}")
    half, T = x.shape[-1] // 2, x.shape[-2]
    inv_freq = as_f64(inv_freq).to(x.device)
    positions = as_f64(positions).to(x.device)
    if inv_freq.shape != (half,):
        raise ValueError(f"inv_freq must have shape [{half}] for d_h = {2 * half}, got {tuple(inv_freq.shape)}")
    if positions.shape != (T,):
        raise ValueError(f"positions must have shape [{T}] (one per token), got {tuple(positions.shape)}")
    check_finite("the q/k activations passed to rope_complex", x)
    check_finite("the RoPE inv_freq / positions", inv_freq, positions)
    angle = positions[:, None] * inv_freq[None, :]  # [T, P]
    rot = torch.polar(torch.ones_like(angle), angle)  # e^{iθ_p pos_m}, complex128
    return torch.complex(x[..., :half], x[..., half:]) * rot


def rope_pair_energy(u: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Exact energy of each RoPE pair's contribution to the attention scores (docs/METHOD.md §2.5).

    Objective: with ``s_p(m, t) = Re(u_m,p · conj(v_t,p))`` the pair-p part of the pre-softmax score
    ``q_rot,m · k_rot,t``, return ``E[p] = Σ_{b, query head} Σ_{(m, t)} s_p(m, t)²`` over all token pairs
    (``causal=False``) or over ``t <= m`` (``causal=True``), i.e. the squared score error caused by dropping
    pair p alone. Use as pair scores for :func:`select_pairs_by_score`.

    Closed form (O(T) per pair): ``Re(z)² = ½(|z|² + Re(z²))``, so per sequence and KV group

    * non-causal: ``½[(Σ_{i,m}|u_{i,m}|²)(Σ_t|v_t|²) + Re(conj(Σ_{i,m} u_{i,m}²)·Σ_t v_t²)]`` (the sum over the
      group's query heads ``i`` goes inside ``Σ_m`` because each term is a product of per-sequence sums);
    * causal: ``Σ_{i,m} ½(|u_{i,m}|²·C1_m + Re(u_{i,m}²·conj(C2_m)))`` with the prefix sums
      ``C1_m = Σ_{t<=m}|v_t|²``, ``C2_m = Σ_{t<=m} v_t²``.

    Shapes: ``u`` complex [B, n, g, T, P] (post-RoPE queries from :func:`rope_complex`, the g query heads of
    each of n KV groups; MHA: g = 1); ``v`` complex [B, n, T, P] (post-RoPE keys). Returns float64 [n, P]
    (summed over the B sequences), on ``u``'s device.
    """
    return rope_pair_energies(u, v)[1 if causal else 0]


def rope_pair_energies(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both :func:`rope_pair_energy` results, ``(all pairs, causal pairs)``, from one set of intermediates.

    The group's query heads enter both closed forms only through ``Σ_i |u_{i,m}|²`` and ``Σ_i u_{i,m}²``, so those
    sums are taken first (``[B, n, T, P]``, ``g`` times smaller) and shared by the two energies;
    ``|z|² = Re(z)² + Im(z)²`` avoids the square root of ``abs``. Same shapes and checks as :func:`rope_pair_energy`.
    """
    u, v = torch.as_tensor(u), torch.as_tensor(v)
    if not (u.is_complex() and v.is_complex()):
        raise ValueError("rope_pair_energy needs complex u and v (use rope_complex on the q/k activations)")
    u, v = u.to(torch.complex128), v.to(torch.complex128).to(u.device)
    if u.dim() != 5 or v.dim() != 4 or u.shape[:2] != v.shape[:2] or u.shape[3:] != v.shape[2:]:
        raise ValueError(
            f"u must be [B, n, g, T, P] and v [B, n, T, P] with matching B, n, T, P; "
            f"got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    check_finite("the post-RoPE q/k coordinates passed to rope_pair_energy", u, v)
    u_abs2 = torch.view_as_real(u).square().sum(-1).sum(2)  # Σ_i |u_i|²  [B, n, T, P]
    u_sq = u.square().sum(2)  # Σ_i u_i²  [B, n, T, P]
    v_abs2, v_sq = torch.view_as_real(v).square().sum(-1), v.square()  # [B, n, T, P]
    e_all = 0.5 * (u_abs2.sum(2) * v_abs2.sum(2) + (u_sq.sum(2).conj() * v_sq.sum(2)).real)  # [B, n, P]
    C1, C2 = v_abs2.cumsum(2), v_sq.cumsum(2)
    e_causal = 0.5 * (u_abs2 * C1 + (u_sq * C2.conj()).real)  # [B, n, T, P]
    return e_all.sum(0), e_causal.sum(dim=(0, 2))


def pair_columns(keep: torch.Tensor, d_h: int) -> torch.Tensor:
    """Original head dims of the reduced head, in its column order.

    Closed form: ``cols = cat(keep, keep + d_h/2)`` per row: the kept rotate_half "first" dims, then their
    partners. The reduced q (or k) head is ``q[..., cols]`` and RoPE runs on it with ``inv_freq[keep]``.

    Shapes: ``keep`` LongTensor [n, n_pairs] -> LongTensor [n, 2·n_pairs] (same device).
    """
    if d_h % 2:
        raise ValueError(f"RoPE heads need an even head dim, got d_h = {d_h}")
    keep = torch.as_tensor(keep).long()
    return torch.cat([keep, keep + d_h // 2], dim=-1)


def selection_matrix(cols: torch.Tensor, d_h: int) -> torch.Tensor:
    """0/1 column-selection matrices, so that a reduced head is ``q @ E``.

    Closed form: ``E[i, cols[i, j], j] = 1``, all other entries 0.

    Shapes: ``cols`` LongTensor [n, r] -> float64 [n, d_h, r] on ``cols``' device.
    """
    cols = torch.as_tensor(cols).long()
    E = torch.zeros(*cols.shape[:-1], d_h, cols.shape[-1], dtype=torch.float64, device=cols.device)
    E.scatter_(-2, cols.unsqueeze(-2), 1.0)
    return E


def _inv_sqrt_sv(s: torch.Tensor, s_all: torch.Tensor) -> torch.Tensor:
    """``s^{-1/2}`` with tiny singular values clamped to ``σ_max·eps_machine`` (or 1e-300 if all are zero)."""
    floor = (s_all[..., :1] * torch.finfo(torch.float64).eps).clamp_min(1e-300)
    return torch.maximum(s, floor).rsqrt()


def qk_closed_form(Gq: torch.Tensor, Gk: torch.Tensor, r: int, eps: float = 1e-6) -> QKFactors:
    """A3-QK head-space, balanced, inverse-free closed form (docs/METHOD.md §2.2; GQA §2.3).

    Objective: for each head (or KV group), over all calibration token pairs, minimise
    ``E‖q (I − A Bᵀ) kᵀ‖² = ‖G_q^{1/2} (I − A Bᵀ) G_k^{1/2}‖_F²`` over rank-r ``A Bᵀ``; this equals the paper's
    ``‖R^{1/2}(W_qk − W̃_qk)R^{1/2}‖_F²`` and its optimum is the Eckart–Young tail ``Σ_{j>r} σ_j²``.

    Closed form: ``S_q = G_q^{1/2}``, ``S_k = G_k^{1/2}`` (damped, :func:`psd_sqrt`);
    ``SVD(S_q S_k) = U Σ Vᵀ``; ``A = S_k V_r Σ_r^{-1/2}``, ``B = S_q U_r Σ_r^{-1/2}`` (σ clamped away from 0).
    New heads: ``q̃ = q A``, ``k̃ = k B``, so ``q̃ k̃ᵀ = q (A Bᵀ) kᵀ``. For GQA pass the group-summed
    ``G_q`` (:func:`group_sum`) and apply ``A`` to every query head of the group.

    Shapes: ``Gq``, ``Gk`` [n, d_h, d_h] (pre-RoPE second moments, means over tokens); ``1 <= r <= d_h``.
    Returns :class:`QKFactors` (``A``, ``B`` [n, d_h, r]; ``sv`` [n, d_h]; ``loss``, ``total`` [n]).
    """
    Gq, Gk = as_f64(Gq), as_f64(Gk)
    if Gq.shape != Gk.shape:
        raise ValueError(f"Gq and Gk must have the same shape [n, d_h, d_h], got {tuple(Gq.shape)} and "
                         f"{tuple(Gk.shape)}")
    check_finite("the query second moments Gq", Gq)
    check_finite("the key second moments Gk", Gk)
    r = check_rank(r, Gq.shape[-1], "query/key head")
    Gk = Gk.to(Gq.device)
    Sq, _ = psd_sqrt(Gq, eps)
    Sk, _ = psd_sqrt(Gk, eps)
    U, s, Vh = torch.linalg.svd(Sq @ Sk)
    w = _inv_sqrt_sv(s[..., :r], s).unsqueeze(-2)  # [n, 1, r]
    A = (Sk @ Vh[..., :r, :].mT) * w
    B = (Sq @ U[..., :r]) * w
    s2 = s.square()
    total = s2.sum(-1)
    loss = s2[..., r:].sum(-1)
    return QKFactors(A=A, B=B, sv=s, loss=loss, total=total)
