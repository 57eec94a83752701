"""A3-MLP: neuron (intermediate channel) selection (A3_METHOD.md section 6).

Keeping neuron ``i`` keeps row ``i`` of gate_proj/up_proj and column ``i`` of down_proj; the kept
activations are unchanged because the non-linearity is element-wise. Pure float64 math on the input's
device.
"""

from __future__ import annotations

import torch

from a3_serve.errors import BudgetError
from a3_serve.solvers.linalg import as_f64, check_finite
from a3_serve.solvers.qk import _top_sorted

__all__ = ["MLP_SCORE_METHODS", "mlp_scores", "select_neurons", "dropped_fraction"]

MLP_SCORE_METHODS = ("a3", "rxx", "wanda", "weight-norm")


def mlp_scores(
    method: str,
    h2: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor | None,
) -> torch.Tensor:
    """Per-neuron importance scores for MLP width reduction (higher = keep).

    Objective (A3, section 6.1): choose a 0/1 selector ``U`` minimising ``E‖h (U − I) W_downᵀ‖²``
    (``h`` = down_proj input). Methods and closed forms:

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
    return _top_sorted(scores, int(r))


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
