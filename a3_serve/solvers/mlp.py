"""A3-MLP: neuron (intermediate channel) selection (docs/METHOD.md §4).

Keeping neuron ``i`` keeps row ``i`` of gate_proj/up_proj and column ``i`` of down_proj; the kept
activations are unchanged because the non-linearity is element-wise. Pure float64 math on the input's
device.

Besides the paper's score rule, this module has the least-squares refit of down_proj on the kept set
(docs/METHOD.md §4.4), greedy selection on the refit objective (§4.5) and a held-out choice of the refit
ridge (§4.6). Their statistics: ``H = E[h hᵀ]`` [d_int, d_int], the full second moment (mean over tokens)
of the down_proj input ``h``; ``Wd = down_proj.weight`` [d, d_int] (PyTorch layout, output ``h Wdᵀ``).
"""

from __future__ import annotations

import torch

from a3_serve.errors import BudgetError
from a3_serve.solvers.linalg import ABS_FLOOR, as_f64, check_finite, top_sorted

__all__ = [
    "MLP_SCORE_METHODS",
    "mlp_scores",
    "select_neurons",
    "dropped_fraction",
    "mlp_objective",
    "mlp_refit",
    "mlp_refit_with_loss",
    "mlp_greedy_select",
    "mlp_ridge_losses",
    "mlp_choose_ridge",
    "shrink_energies",
    "mlp_selection_losses",
]

MLP_SCORE_METHODS = ("a3", "rxx", "wanda", "weight-norm")
DEFAULT_RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 0.3, 1.0, 3.0, float("inf"))  # inf: plain selection
#: shrinkage α of the activation energies toward their mean (:func:`shrink_energies`; 1: weights only)
DEFAULT_SCORE_SHRINKAGES = (0.0, 0.1, 0.3, 0.5, 1.0)
# Relative damping added even at ridge == 0, so that (H_SS + δI) stays invertible for dead/duplicate neurons.
_MIN_RIDGE = 1e-12


def mlp_scores(
    method: str,
    h2: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor | None,
) -> torch.Tensor:
    """Per-neuron importance scores for MLP width reduction (higher = keep).

    Objective (A3, docs/METHOD.md §4.1; scores §4.2-§4.3): choose a 0/1 selector ``U`` minimising
    ``E‖h (U − I) W_downᵀ‖²`` (``h`` = down_proj input). Methods and closed forms:

    * ``"a3"`` (paper 'rxx-w'): ``λ_i = E[h_i²]·‖W_down[:, i]‖²`` — equal to the paper's
      ``‖col_i(R^{1/2})‖²·‖w_i‖²`` because ``(R^{1/2}R^{1/2})_ii = R_ii``;
    * ``"rxx"``: ``E[h_i²]``;
    * ``"wanda"`` (structured Wanda-sp): ``sqrt(E[h_i²])·‖W_down[:, i]‖₁``;
    * ``"weight-norm"`` (no data): ``‖w_gate[i]‖² + ‖w_up[i]‖² + ‖W_down[:, i]‖²``.

    Shapes: ``h2`` [d_int] (``E[h_i²]``, mean over tokens); ``w_gate``, ``w_up`` [d_int, d] (nn.Linear
    weights; only "weight-norm" reads them); ``w_down`` [d, d_int]. Returns [d_int] float64 on ``h2``'s device.
    """
    if method not in MLP_SCORE_METHODS:
        raise ValueError(f"unknown MLP score method {method!r}; valid methods: {', '.join(MLP_SCORE_METHODS)}")
    h2 = as_f64(h2)
    check_finite("the MLP activation energies E[h²]", h2)
    if h2.dim() != 1:
        raise ValueError(f"h2 must have shape [d_int], got {tuple(h2.shape)}")
    d_int, dev = h2.shape[0], h2.device
    if method == "rxx":
        return h2.clone()
    Wd = as_f64(w_down).to(dev)
    if Wd.dim() != 2 or Wd.shape[1] != d_int:
        raise ValueError(f"w_down must have shape [d, {d_int}], got {tuple(Wd.shape)}")
    check_finite("the down_proj weights", Wd)
    if method == "a3":
        return h2 * Wd.square().sum(0)
    if method == "wanda":
        return h2.clamp_min(0.0).sqrt() * Wd.abs().sum(0)
    # weight-norm
    out = Wd.square().sum(0)
    for name, W in (("gate_proj", w_gate), ("up_proj", w_up)):
        W = as_f64(W).to(dev)
        if W.dim() != 2 or W.shape[0] != d_int:
            raise ValueError(f"{name} weight must have shape [{d_int}, d], got {tuple(W.shape)}")
        check_finite(f"the {name} weights", W)
        out = out + W.square().sum(1)
    return out


def select_neurons(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` highest-scoring neurons (ties -> lower index), ascending.

    Shapes: ``scores`` [d_int] -> LongTensor [r] on ``scores``' device.
    """
    scores = as_f64(scores)
    check_finite("the MLP neuron scores", scores)
    d_int = scores.shape[-1]
    if isinstance(r, bool) or int(r) != r or not 1 <= int(r) <= d_int:
        raise BudgetError(
            f"cannot keep {r} of {d_int} MLP neurons; the reduced intermediate size must be between 1 and {d_int}"
        )
    return top_sorted(scores, int(r))


def dropped_fraction(scores: torch.Tensor, keep: torch.Tensor) -> float:
    """Fraction of the total score mass not kept: ``1 − Σ_{i∈keep} s_i / Σ_i s_i`` (0.0 if the total is 0).

    Shapes: ``scores`` [d_int]; ``keep`` LongTensor [r] (any device). Returns a Python float.
    """
    scores = as_f64(scores)
    keep = torch.as_tensor(keep).long().to(scores.device)
    total = float(scores.sum())
    if total == 0.0:
        return 0.0
    return max(0.0, 1.0 - float(scores[keep].sum()) / total)


def _check_H(H: torch.Tensor) -> torch.Tensor:
    H = as_f64(H)
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square second moment [d_int, d_int], got shape {tuple(H.shape)}")
    check_finite("the down_proj input second moment H", H)
    return 0.5 * (H + H.T)


def _check_Wd(Wd: torch.Tensor, d_int: int, device: torch.device) -> torch.Tensor:
    Wd = as_f64(Wd).to(device)
    if Wd.dim() != 2 or Wd.shape[1] != d_int:
        raise ValueError(f"Wd (down_proj.weight) must have shape [d, {d_int}], got {tuple(Wd.shape)}")
    check_finite("the down_proj weights", Wd)
    return Wd


def _check_keep(keep: torch.Tensor, d_int: int, device: torch.device) -> torch.Tensor:
    keep = torch.as_tensor(keep).long().to(device)
    if keep.dim() != 1 or keep.numel() < 1:
        raise ValueError(f"keep must be a non-empty 1-D index tensor, got shape {tuple(keep.shape)}")
    if int(keep.min()) < 0 or int(keep.max()) >= d_int or torch.unique(keep).numel() != keep.numel():
        raise ValueError(f"keep must hold distinct neuron indices in [0, {d_int})")
    return keep


def _check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not ridge >= 0.0 or ridge == float("inf"):
        raise ValueError(f"the down_proj refit ridge must be a finite number >= 0, got {ridge}")
    return ridge


def _ridge_delta(diag_mean: torch.Tensor, ridge: float) -> torch.Tensor:
    """Absolute ridge ``δ = max(ridge, 1e-12)·diag_mean`` (at least 1e-30 so that an all-zero H stays solvable)."""
    return (max(ridge, _MIN_RIDGE) * diag_mean).clamp_min(ABS_FLOOR)


def _spd_solve(A: torch.Tensor, rhs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``A^{-1} rhs`` for symmetric PD ``A`` via Cholesky; eigenvalue-clamped (λ >= floor) fallback otherwise."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    lam, Q = torch.linalg.eigh(A)
    return (Q / torch.maximum(lam, floor).unsqueeze(0)) @ (Q.T @ rhs)


def _spd_inverse(A: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``A^{-1}`` for symmetric PD ``A``: ``L^{-T} L^{-1}`` (triangular solve; ``cholesky_inverse`` is ~6x slower
    on CPU); eigenvalue-clamped (λ >= floor) fallback if ``A`` is not numerically PD."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        Li = torch.linalg.solve_triangular(L, torch.eye(A.shape[0], dtype=A.dtype, device=A.device), upper=False)
        return Li.mT @ Li
    lam, Q = torch.linalg.eigh(A)
    return (Q / torch.maximum(lam, floor).unsqueeze(0)) @ Q.T


def mlp_objective(H: torch.Tensor, Wd: torch.Tensor, keep: torch.Tensor, Wd_new: torch.Tensor) -> float:
    """A3-MLP output error of a pruned (and possibly refit) down_proj, per token (mean over tokens).

    Objective: ``E‖h Wdᵀ − h_S Wd_newᵀ‖² = tr(Wd H Wdᵀ) − 2 tr(Wd_new H[S, :] Wdᵀ) + tr(Wd_new H[S, S] Wd_newᵀ)``
    with ``S = keep``. Computed without cancellation as ``tr(Δ H Δᵀ)``, where ``Δ = Wd − Wd_new·E_Sᵀ`` is
    ``Wd`` with ``Wd_new`` subtracted from its kept columns. Plain selection is ``Wd_new = Wd[:, keep]``.

    Shapes: ``H`` [d_int, d_int]; ``Wd`` [d, d_int]; ``keep`` LongTensor [r] (distinct); ``Wd_new`` [d, r].
    Returns a Python float.
    """
    H = _check_H(H)
    d_int, dev = H.shape[0], H.device
    Wd = _check_Wd(Wd, d_int, dev)
    keep = _check_keep(keep, d_int, dev)
    Wd_new = as_f64(Wd_new).to(dev)
    if Wd_new.shape != (Wd.shape[0], keep.numel()):
        raise ValueError(f"Wd_new must have shape {(Wd.shape[0], keep.numel())}, got {tuple(Wd_new.shape)}")
    check_finite("the refit down_proj weights", Wd_new)
    D = Wd.clone()
    D[:, keep] -= Wd_new
    # only the columns where D is non-zero contribute (plain selection: just the dropped neurons, a small block)
    nz = D.ne(0).any(dim=0).nonzero().squeeze(1)
    if nz.numel() < d_int:
        D, H = D[:, nz], H[nz][:, nz]
    return float(((D @ H) * D).sum())


def mlp_refit(H: torch.Tensor, keep: torch.Tensor, Wd: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares refit of down_proj on the kept neurons (docs/METHOD.md §4.4); :func:`mlp_refit_with_loss`
    without the loss.

    Objective: ``min_W E‖h Wdᵀ − h_S Wᵀ‖² + δ‖W − W_S‖_F²`` over ``W`` [d, r] (``S = keep``), where
    ``W_S = Wd[:, keep]`` is the plain selection: the ridge shrinks the refit TOWARD the paper's solution
    (not toward zero), so a large ridge recovers plain selection and a small one the exact refit.

    Closed form: ``Wd_newᵀ = (H_SS + δ·I)^{-1} (H_{S,:} Wdᵀ + δ·W_Sᵀ)`` with the relative ridge
    ``δ = max(ridge, 1e-12) · mean(diag(H_SS))`` (so a tiny damping remains at ``ridge == 0``). Solved by
    Cholesky (``cholesky_ex`` + ``cholesky_solve``); if the matrix is not numerically PD, by an eigensolve with
    eigenvalues clamped to ``>= δ``. At ``ridge -> 0`` this is the exact minimiser of :func:`mlp_objective`
    for the fixed set S, hence never worse in-sample than plain selection ``Wd[:, keep]``.

    Shapes: ``H`` [d_int, d_int]; ``keep`` LongTensor [r]; ``Wd`` [d, d_int]; ``ridge >= 0``.
    Returns ``Wd_new`` float64 [d, r] on ``H``'s device (down_proj.weight of the pruned MLP).
    """
    return mlp_refit_with_loss(H, keep, Wd, ridge)[0]


def mlp_refit_with_loss(H: torch.Tensor, keep: torch.Tensor, Wd: torch.Tensor,
                        ridge: float) -> tuple[torch.Tensor, float]:
    """:func:`mlp_refit` and its in-sample error ``mlp_objective(H, Wd, keep, Wd_new)``, from the dropped columns.

    Closed form: with ``D`` the ``m`` dropped neurons, the normal equations' right side is
    ``H_{S,:} Wdᵀ + δ W_Sᵀ = (H_SS + δI) W_Sᵀ + H_SD W_Dᵀ``, so

        ``Wd_new = W_S + W_D Yᵀ``,   ``Y = (H_SS + δI)^{-1} H_SD``  [r, m]

    and the error is :func:`mlp_ridge_losses`' form with ``V = H``. One Cholesky of ``H_SS + δI`` with ``m``
    right-hand sides and ``O(r²·m)`` products, instead of ``d`` right-hand sides, the ``r x d_int x d`` product
    ``H_{S,:} Wdᵀ`` and the ``d x d_int²`` error (at Llama-2-7B's MLP and CR 0.1, ``m ≈ 1,100`` against
    ``d = 4,096``). Where more neurons are dropped than ``d``, ``Z = (H_SS + δI)^{-1} H_SD W_Dᵀ`` [r, d] is solved
    instead (``Wd_new = W_S + Zᵀ``) and the error is :func:`mlp_objective`. Equal to the direct closed form up to
    float64 rounding (tested).

    Shapes as :func:`mlp_refit`. Returns (``Wd_new`` float64 [d, r], error >= 0).
    """
    H = _check_H(H)
    d_int, dev = H.shape[0], H.device
    Wd = _check_Wd(Wd, d_int, dev)
    keep = _check_keep(keep, d_int, dev)
    ridge = _check_ridge(ridge)
    drop = _dropped(keep, d_int)
    W_S = Wd[:, keep]
    if drop.numel() == 0:
        return W_S.clone(), 0.0  # nothing dropped: the selection is exact
    H_SS, H_SD, W_D = H[keep][:, keep], H[keep][:, drop], Wd[:, drop]
    delta = _ridge_delta(torch.diagonal(H_SS).mean(), ridge)
    A = H_SS + delta * torch.eye(H_SS.shape[0], dtype=torch.float64, device=dev)
    if drop.numel() <= Wd.shape[0]:
        Y = _spd_solve(A, H_SD, delta)  # [r, m]
        K = W_D.T @ W_D
        loss = _dropped_loss(Y, H_SS, H_SD, K, float((H[drop][:, drop] * K).sum()))
        return (W_S + W_D @ Y.T).contiguous(), loss
    W = (W_S + _spd_solve(A, H_SD @ W_D.T, delta).T).contiguous()
    return W, mlp_objective(H, Wd, keep, W)


def _dropped(keep: torch.Tensor, d_int: int) -> torch.Tensor:
    """The indices [m] of the neurons not in ``keep``, ascending."""
    mask = torch.ones(d_int, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def _dropped_loss(Y: torch.Tensor, V_SS: torch.Tensor, V_SD: torch.Tensor, K: torch.Tensor, c_DD: float) -> float:
    """``Σ (Yᵀ V_SS Y) ∘ K − 2 Σ (Yᵀ V_SD) ∘ K + c_DD``, clamped at 0 (:func:`mlp_ridge_losses`): the error of the
    refit ``Y`` [r, m] under the moments ``V``; a quadratic form, so only rounding can take the sum below 0."""
    return max(float(((Y.T @ (V_SS @ Y)) * K).sum() - 2.0 * ((Y.T @ V_SD) * K).sum()) + c_DD, 0.0)


def _drop_neuron(P: torch.Tensor, B: torch.Tensor, c: int) -> None:
    """In-place backward-elimination downdate after removing neuron ``c`` from the kept set.

    With ``P = (A_SS)^{-1}`` and ``B = P M_S``: ``P ← P − P[:, c] P[c, :] / P_cc``,
    ``B ← B − P[:, c] B[c, :] / P_cc``; row/column ``c`` become (and are set to) zero, and the remaining
    rows/columns equal ``(A_{S∖c, S∖c})^{-1}`` and ``(A_{S∖c,S∖c})^{-1} M_{S∖c}``. ``P`` [m, m], ``B`` [m, d].
    """
    p = P[:, c].clone()
    pcc = float(p[c])
    bc = B[c].clone()
    P.addr_(p, p, alpha=-1.0 / pcc)
    B.addr_(p, bc, alpha=-1.0 / pcc)
    P[c, :] = 0.0
    P[:, c] = 0.0
    B[c, :] = 0.0


def mlp_greedy_select(
    H: torch.Tensor, Wd: torch.Tensor, r: int, ridge: float, direction: str = "auto"
) -> torch.Tensor:
    """Greedy neuron selection on the refit objective (docs/METHOD.md §4.5).

    Objective: choose ``S``, ``|S| = r``, to minimise the refit error ``min_W E‖h Wdᵀ − h_S Wᵀ‖² + δ‖W‖²``
    ``= tr(Wd H Wdᵀ) − tr(M_Sᵀ A_SS^{-1} M_S)`` with ``M = H Wdᵀ`` [d_int, d], ``A = H + δI`` and the fixed
    ``δ = max(ridge, 1e-12)·mean(diag(H))`` (relative to the full set; :func:`mlp_refit` uses the kept set's
    mean, which differs only by that scale). Refit the result with :func:`mlp_refit`.

    Closed forms (Schur complements; ``direction="auto"`` picks backward iff ``d_int − r <= r``):

    * backward elimination from the full set: ``P = A_SS^{-1}``, ``B = P M_S`` (the current refit); removing
      neuron c raises the objective by ``‖B_c‖² / P_cc``; remove the argmin, then downdate
      ``P ← P − P[:, c] P[c, :] / P_cc``, ``B ← B − P[:, c] B[c, :] / P_cc`` (drop row/col c);
    * forward selection (pivoted-Cholesky style): residuals ``A_res = A − A_{:,S} A_SS^{-1} A_{S,:}``,
      ``M_res = M − A_{:,S} A_SS^{-1} M_S``; adding c lowers the objective by ``‖M_res,c‖² / A_res,cc``; add the
      argmax, then ``A_res ← A_res − A_res[:, c] A_res[c, :] / A_res,cc``,
      ``M_res ← M_res − A_res[:, c] M_res,c / A_res,cc``.

    Ties go to the lower index (forward) / remove the lower index first (backward). Cost: one
    O(d_int²) rank-1 update per step (``d_int − r`` steps backward, ``r`` forward) plus an O(d_int³)
    Cholesky inverse for backward; memory O(d_int²). Use a ridge >= ~1e-8 for badly conditioned H (backward
    works with ``A^{-1}``).

    Shapes: ``H`` [d_int, d_int]; ``Wd`` [d, d_int]; ``1 <= r <= d_int``; ``direction`` in
    {"auto", "forward", "backward"}. Returns LongTensor [r] (ascending) on ``H``'s device.
    """
    H = _check_H(H)
    d_int, dev = H.shape[0], H.device
    Wd = _check_Wd(Wd, d_int, dev)
    ridge = _check_ridge(ridge)
    if isinstance(r, bool) or int(r) != r or not 1 <= int(r) <= d_int:
        raise BudgetError(
            f"cannot keep {r} of {d_int} MLP neurons; the reduced intermediate size must be between 1 and {d_int}"
        )
    r = int(r)
    if direction not in ("auto", "forward", "backward"):
        raise ValueError(f"direction must be 'auto', 'forward' or 'backward', got {direction!r}")
    if r == d_int:
        return torch.arange(d_int, device=dev)
    backward = (d_int - r <= r) if direction == "auto" else direction == "backward"
    delta = _ridge_delta(torch.diagonal(H).mean(), ridge)
    A = H + delta * torch.eye(d_int, dtype=torch.float64, device=dev)
    M = H @ Wd.T  # [d_int, d]
    if backward:
        P = _spd_inverse(A, delta)
        B = P @ M
        alive = torch.ones(d_int, dtype=torch.bool, device=dev)
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
        for _ in range(d_int - r):
            cost = (torch.linalg.vector_norm(B, dim=1).square()
                    / torch.diagonal(P).clamp_min(torch.finfo(torch.float64).tiny))
            c = int(torch.where(alive, cost, inf).argmin())
            _drop_neuron(P, B, c)
            alive[c] = False
        return torch.nonzero(alive).flatten()
    Ares, Mres = A.clone(), M.clone()
    chosen = torch.zeros(d_int, dtype=torch.bool, device=dev)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    for _ in range(r):
        gain = Mres.square().sum(1) / torch.diagonal(Ares).clamp_min(delta)
        c = int(torch.where(chosen, ninf, gain).argmax())
        a = Ares[:, c].clone()
        acc = max(float(a[c]), float(delta))
        mc = Mres[c].clone()
        Ares.addr_(a, a, alpha=-1.0 / acc)
        Mres.addr_(a, mc, alpha=-1.0 / acc)
        chosen[c] = True
    return torch.nonzero(chosen).flatten()


def mlp_ridge_losses(
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    keep: torch.Tensor,
    Wd: torch.Tensor,
    ridges: tuple[float, ...] | list[float] = DEFAULT_RIDGES,
) -> list[float]:
    """Held-out error of the down_proj refit at every ridge, without forming any refit (docs/METHOD.md §4.6).

    Objective: ``L_ρ = mlp_objective(H_val, Wd, keep, W_ρ)`` with ``W_ρ = mlp_refit(H_fit, keep, Wd, ρ)`` (``ρ = inf``:
    plain selection ``Wd[:, keep]``). Closed form: with ``S = keep`` (``r`` neurons), ``D`` the ``m`` dropped ones, fit
    moments ``H``, ``δ = max(ρ, 1e-12)·mean(diag(H_SS))``, the refit moves the kept columns by
    ``Δ_S = Wd_S − W_ρ = −Wd_D Yᵀ`` with ``Y = (H_SS + δI)^{-1} H_SD`` [r, m]. With held-out moments ``V`` and
    ``K = Wd_Dᵀ Wd_D`` [m, m]:

        ``L_ρ = Σ (Yᵀ V_SS Y) ∘ K − 2 Σ (Yᵀ V_SD) ∘ K + Σ V_DD ∘ K``      (plain selection: ``Y = 0``)

    so every ridge costs one Cholesky factorisation of ``H_SS + δI`` and ``O(r²·m)`` products with the ``m`` dropped
    neurons' columns (usually ``m << d``), instead of a solve with ``d`` right-hand sides and an objective over all
    ``d`` outputs. Equal to the direct computation up to float64 rounding (tested).

    Shapes: ``H_fit``, ``H_val`` [d_int, d_int]; ``keep`` LongTensor [r]; ``Wd`` [d, d_int]. Returns one float per
    ridge.
    """
    ridges = [float(x) if float(x) == float("inf") else _check_ridge(x) for x in ridges]
    if not ridges:
        raise ValueError("mlp_ridge_losses needs at least one ridge value")
    H = _check_H(H_fit)
    d_int, dev = H.shape[0], H.device
    Wd = _check_Wd(Wd, d_int, dev)
    keep = _check_keep(keep, d_int, dev)
    V = _check_H(as_f64(H_val).to(dev))
    drop = _dropped(keep, d_int)
    if drop.numel() == 0:
        return [0.0 for _ in ridges]  # nothing dropped: every refit is exact
    Wd_D = Wd[:, drop]
    K = Wd_D.T @ Wd_D  # [m, m]
    c_DD = float((V[drop][:, drop] * K).sum())
    H_SS, H_SD = H[keep][:, keep], H[keep][:, drop]
    V_SS, V_SD = V[keep][:, keep], V[keep][:, drop]
    diag_mean = torch.diagonal(H_SS).mean()
    eye = torch.eye(H_SS.shape[0], dtype=torch.float64, device=dev)
    out = []
    for rho in ridges:
        if rho == float("inf"):
            out.append(c_DD)
            continue
        delta = _ridge_delta(diag_mean, rho)
        Y = _spd_solve(H_SS + delta * eye, H_SD, delta)  # [r, m]
        out.append(_dropped_loss(Y, V_SS, V_SD, K, c_DD))
    return out


def mlp_choose_ridge(
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    keep: torch.Tensor,
    Wd: torch.Tensor,
    ridges: tuple[float, ...] | list[float] = DEFAULT_RIDGES,
) -> tuple[torch.Tensor, float, list[float]]:
    """Choose the down_proj refit ridge on held-out data (docs/METHOD.md §4.6).

    Objective: for each ``ridge`` in ``ridges``, ``W_ρ = mlp_refit(H_fit, keep, Wd, ρ)`` and its held-out error
    ``L_ρ = mlp_objective(H_val, Wd, keep, W_ρ)`` (:func:`mlp_ridge_losses`); return the ``W_ρ`` with the smallest
    ``L_ρ`` (ties -> the earlier entry of ``ridges``). ``ridge = inf`` stands for plain selection ``Wd[:, keep]`` (the
    limit of the refit, which shrinks toward it), so the refit is used only where it beats plain selection on
    held-out data.

    Shapes: ``H_fit``, ``H_val`` [d_int, d_int] (second moments of disjoint token sets); ``keep`` LongTensor
    [r]; ``Wd`` [d, d_int]. Returns ``(Wd_new [d, r] float64, best ridge (float), held-out losses (list of
    floats, one per ridge))``.
    """
    ridges = [float(x) for x in ridges]
    losses = mlp_ridge_losses(H_fit, H_val, keep, Wd, ridges)
    best = min(range(len(ridges)), key=lambda i: (losses[i], i))
    keep = torch.as_tensor(keep).long()
    if ridges[best] == float("inf"):
        return as_f64(Wd)[:, keep.to(as_f64(Wd).device)].clone(), ridges[best], losses
    return mlp_refit(H_fit, keep, Wd, ridges[best]), ridges[best], losses


def shrink_energies(h2: torch.Tensor, alpha: float) -> torch.Tensor:
    """The activation energies shrunk toward data-free ones (docs/METHOD.md §4.8): ``(1 − α)·E[h_i²] + α·mean_j
    E[h_j²]``. With the paper's score ``E[h_i²]·‖W_down[:, i]‖²``, α = 0 is the paper's selection and α = 1 ranks the
    neurons by ``‖W_down[:, i]‖²`` alone (isotropic inputs: what the weights say without data).

    Shapes: ``h2`` [d_int]; ``0 <= alpha <= 1``. Returns float64 [d_int]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the energy shrinkage must be in [0, 1], got {alpha}")
    h2 = as_f64(h2)
    return (1.0 - alpha) * h2 + alpha * h2.mean()


def mlp_selection_losses(
    h2_fit: torch.Tensor,
    H_val: torch.Tensor,
    Wd: torch.Tensor,
    r: int,
    alphas: tuple[float, ...] | list[float] = DEFAULT_SCORE_SHRINKAGES,
) -> list[float]:
    """Held-out error of the paper's selection at every energy shrinkage α (docs/METHOD.md §4.8).

    Objective: ``S_α = select_neurons(mlp_scores("a3", shrink_energies(h2_fit, α), ..., Wd), r)`` from the fit data,
    scored by the plain selection's error on held-out moments ``V``:
    ``L_α = mlp_objective(V, Wd, S_α, Wd[:, S_α]) = tr(Wd_D V_DD Wd_Dᵀ)`` (``D`` the dropped neurons).

    Shapes: ``h2_fit`` [d_int]; ``H_val`` [d_int, d_int]; ``Wd`` [d, d_int]; ``1 <= r <= d_int``. Returns one float per
    α."""
    V = _check_H(H_val)
    d_int, dev = V.shape[0], V.device
    Wd = _check_Wd(Wd, d_int, dev)
    norms = Wd.square().sum(0)
    out = []
    for alpha in alphas:
        keep = select_neurons(shrink_energies(as_f64(h2_fit).to(dev), alpha) * norms, r)
        out.append(mlp_objective(V, Wd, keep, Wd[:, keep]))
    return out
