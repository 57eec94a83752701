"""PSD linear algebra shared by the A3 solvers (float64, batched, device-agnostic; docs/METHOD.md §7).

Everything here works on torch tensors of any float dtype, computes in float64 on the input's device,
and batches over leading dimensions (heads, groups) with single ``torch.linalg`` calls.
"""

from __future__ import annotations

import torch

from a3_serve.errors import BudgetError, InputError, NumericalError

__all__ = ["as_f64", "check_finite", "psd_sqrt", "psd_floor"]

# Absolute eigenvalue floor used when a whole matrix is zero (mean eigenvalue 0) or when eps == 0: it keeps
# the inverse square root finite (1/sqrt(1e-30) = 1e15) without touching any realistic statistic.
ABS_FLOOR = 1e-30


def as_f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float64 tensor on its own device (no copy if it already is one)."""
    t = torch.as_tensor(t)
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """True iff every element of ``t`` is finite (non-float tensors always are).

    Fast path: a finite sum proves every element finite (a NaN or ±Inf makes the sum NaN or ±Inf), and a sum is
    one allocation-free pass, ~8x faster than ``isfinite(t).all()`` on a [1536, 1536] float64 matrix. Only a
    non-finite sum (a bad element, or finite values whose sum overflows) takes the exact elementwise check.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def gram(a: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``aᵀa`` for ``a`` [N, n]: the symmetric [n, n] Gram matrix, computing only its upper block triangle.

    The columns are split into ``blocks`` ranges ``c_0 < c_1 < ...``; block row ``i`` is ``a[:, c_i]ᵀ a[:, c_i:]``
    and the block below the diagonal is its transpose, so ``(blocks + 1) / (2·blocks)`` of the multiply-adds of the
    full product are done (5/8 with 4 blocks). Every entry is a dot product over the N rows, as in ``a.T @ a``
    (equal up to the summation order the BLAS kernel picks for each block shape). Small ``n`` (< 256) uses the
    plain product.
    """
    n = a.shape[-1]
    if n < 256 or blocks <= 1:
        return a.T @ a
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    edges = [n * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = a[:, lo:hi].T @ a[:, lo:]  # [hi - lo, n - lo]
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo:].T
    return out


def check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    """Raise :class:`NumericalError` if any of ``tensors`` (``None`` entries are skipped) holds NaN or Inf.

    ``name`` says what the tensors are (e.g. ``"layer 3 Gq"``); the message is one line naming the
    problem and the fix.
    """
    for t in tensors:
        if t is None:
            continue
        t = torch.as_tensor(t)
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if not all_finite(t):
            n_bad = int((~torch.isfinite(t)).sum())
            raise NumericalError(
                f"{name} contains NaN or Inf ({n_bad} of {t.numel()} values); check the source weights for "
                "NaN/Inf and recalibrate (statistics are accumulated in float64, so overflow usually means "
                "corrupt weights or inputs)"
            )


def psd_floor(lam: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-matrix eigenvalue floor ``max(eps * mean(λ), tiny)`` for eigenvalues ``lam`` [..., n] (λ >= 0).

    Returns a tensor of shape [..., 1]. A matrix whose eigenvalues are all zero gets an absolute floor of
    1e-30 so that its inverse square root stays finite.
    """
    mean = lam.mean(-1, keepdim=True)
    floor = eps * mean
    return torch.where(mean > 0, floor, torch.full_like(floor, ABS_FLOOR)).clamp_min(
        torch.finfo(torch.float64).tiny
    )


def psd_sqrt(G: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped symmetric square root and inverse square root of PSD matrices.

    Objective: a stable ``G^{1/2}`` / ``G^{-1/2}`` for (possibly rank-deficient) second-moment matrices.

    Closed form: symmetrise ``G ← (G + Gᵀ)/2``; eigendecompose ``G = Q diag(λ) Qᵀ`` in float64; clamp
    ``λ ← max(λ, 0)`` and then ``λ ← max(λ, eps·mean(λ))`` per matrix (a tiny absolute floor, 1e-30, when
    ``mean(λ) == 0``); return ``S = Q diag(√λ) Qᵀ`` and ``S_inv = Q diag(1/√λ) Qᵀ``.

    Shapes: ``G`` [..., n, n] (any leading batch dims, e.g. [heads, d_h, d_h]); returns two float64 tensors
    of the same shape on ``G``'s device. ``S @ S_inv == I`` up to rounding, for every input.
    """
    if eps < 0 or eps != eps:
        raise InputError(f"the PSD damping eps must be >= 0 (got {eps}); use a value in [1e-8, 1e-2] (default 1e-6)")
    G = as_f64(G)
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"psd_sqrt needs square matrices [..., n, n], got shape {tuple(G.shape)}")
    check_finite("a second-moment matrix passed to psd_sqrt", G)
    G = 0.5 * (G + G.mT)
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(0.0)
    lam = torch.maximum(lam, psd_floor(lam, eps))
    s = lam.sqrt()
    S = (Q * s.unsqueeze(-2)) @ Q.mT
    S_inv = (Q * s.reciprocal().unsqueeze(-2)) @ Q.mT
    return S, S_inv


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row (ties -> lower index), sorted ascending. [..., m] -> [..., k]."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def check_rank(r: int, full: int, what: str) -> int:
    """``r`` as an int in ``[1, full]``, else :class:`BudgetError` naming the ``what`` being reduced."""
    if isinstance(r, bool) or int(r) != r or not 1 <= int(r) <= full:
        raise BudgetError(f"cannot reduce a {full}-dim {what} to {r} dims; the reduced dim must be between 1 and "
                          f"{full}")
    return int(r)
