"""Choosing a setting by cross-validation over held-out folds (docs/METHOD.md §1.5).

A solver with a data-fitted setting ``s`` (the refit ridge, the OV shrinkage β) is fitted on all folds but ``g`` and
scored on fold ``g``, for every fold: ``L[g][s, ...]`` (one loss per setting, and per independent unit such as a value
head). The folds differ in size and scale (a domain whose activations are larger has larger losses), so each fold's
losses are first divided by that fold's best loss, and the setting is chosen by the mean of these ratios:

    ``R[s, ...] = mean_g  L[g][s, ...] / min_s' L[g][s', ...]``,   ``s* = argmin_s R[s, ...]``   (ties: the earlier s)

``R >= 1``, and ``R[s] = 1`` only for a setting that is best on every fold. A fold whose losses are all zero (the
setting cannot matter there) contributes 1 to every setting. Pure float64 math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from a3_serve.solvers.linalg import as_f64, check_finite

__all__ = ["relative_fold_losses", "choose_setting"]


def relative_fold_losses(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R`` of the module docstring from ``losses`` (one tensor ``[n_settings, ...]`` per fold, all the same shape,
    finite and >= 0). Returns float64 ``[n_settings, ...]``."""
    if not losses:
        raise ValueError("relative_fold_losses needs the losses of at least one fold")
    shape = tuple(losses[0].shape)
    total = None
    for L in losses:
        L = as_f64(L)
        if tuple(L.shape) != shape:
            raise ValueError(f"every fold needs losses of the same shape, got {tuple(L.shape)} and {shape}")
        check_finite("held-out losses", L)
        if bool((L < 0).any()):
            raise ValueError("held-out losses must be >= 0")
        best = L.min(0, keepdim=True).values
        ratio = torch.where(best > 0, L / best.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(L))
        ratio = torch.where((best == 0) & (L > 0), torch.full_like(L, float("inf")), ratio)
        total = ratio if total is None else total + ratio
    return total / len(losses)


def choose_setting(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """``s*`` of the module docstring: LongTensor ``[...]`` (0-dim for per-fold losses of shape ``[n_settings]``),
    the index of the chosen setting for every unit; ties go to the earlier setting."""
    R = relative_fold_losses(losses)
    return R.argmin(0)  # torch.argmin returns the first minimum
