"""Loss-aware allocation of the parameter budget across components and layers (docs/METHOD.md §6;
docs/DESIGN.md, 'Loss-aware allocation').

The uniform plan (:func:`a3_serve.solvers.budget.plan_dims`) cuts every layer and component by the same ratio.
Here each compressible *item* (one layer's attention heads, one layer's MLP) has a list of *options*, each a
``(params, loss)`` pair, where ``loss`` is the solver's own predicted output error of that option in residual-
stream units (closed-form tails, dropped score mass). We pick one option per item to

    minimise  Σ_items loss(option)   subject to   Σ_items params(option) <= budget

by the classic greedy on the lower convex hull of each item's (params, loss) curve: start from the full model
and repeatedly take the cut with the smallest marginal loss per removed parameter. On convex curves this
is optimal up to the last step (a Lagrangian / rate-distortion argument); the hull makes it well defined on
non-convex ones.

Loss curves (all in residual units, so items are comparable across components and layers):

* OV: ``L_ov(r) = Σ_heads Σ_{k>r} σ_k²``, the closed form's optimum (:func:`tail_curve` of the singular values).
* QK: the dropped fraction of each KV group's pair-score mass, times that group's attention-output energy
  (``Σ_k σ_k²`` of the OV problem): a perturbed logit pattern spoils the attention output in proportion to how
  much of the score energy is gone (:func:`pair_drop_curve`). This is a first-order proxy, not a closed form.
* MLP: ``L_mlp(n) = Σ`` of the ``d_int − n`` smallest scores ``E[h_i²]·‖W_down[:, i]‖²`` (the diagonal of the
  plain-selection output error, :func:`drop_curve`).

Pure math: torch / Python numbers in, Python lists out; no models, no I/O.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from a3_serve.errors import BudgetError
from a3_serve.solvers.budget import DimPlan, ModelShape, check_kv_cr, check_mlp_multiple, plan_per_layer
from a3_serve.solvers.linalg import as_f64, check_finite

__all__ = ["LayerCurves", "tail_curve", "drop_curve", "pair_drop_curve", "lower_hull",
           "greedy_allocate", "allocate_dims"]


@dataclass(frozen=True)
class LayerCurves:
    """Predicted output error of one layer's components as a function of the kept size (residual units).

    ``qk`` [d_h/2 + 1]: loss when keeping ``p`` RoPE pairs per KV head (``p = 0..d_h/2``);
    ``ov`` [d_h + 1]: loss when keeping ``r`` value dims per head; ``mlp`` [d_int + 1]: loss when keeping
    ``n`` neurons. Each is non-increasing and ends at 0 (nothing removed).
    """

    qk: torch.Tensor
    ov: torch.Tensor
    mlp: torch.Tensor


def _sum_tails(rows: torch.Tensor) -> torch.Tensor:
    """``c[r] = Σ_n Σ_{k>=r} rows[n, k]`` for ``r = 0..P``: rows [n, P] (each sorted descending) -> float64 [P + 1]."""
    out = torch.zeros(rows.shape[-1] + 1, dtype=torch.float64, device=rows.device)
    out[:-1] = rows.flip(-1).cumsum(-1).flip(-1).sum(0)
    return out


def tail_curve(sv: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``c[r] = Σ_n Σ_{k>=r} sv[n, k]²`` for ``r = 0..size``: the OV closed form's optimum at every rank.

    ``sv`` [n, K] singular values per head (sorted descending per row first); ``size`` (default ``K``) may exceed
    ``K`` (then ``c[r] = 0`` for ``r >= K``). Returns float64 [size + 1].
    """
    s2 = as_f64(sv).reshape(-1, sv.shape[-1]).square().sort(dim=-1, descending=True).values
    check_finite("the OV singular values", s2)
    size = s2.shape[-1] if size is None else int(size)
    if size > s2.shape[-1]:
        s2 = torch.nn.functional.pad(s2, (0, size - s2.shape[-1]))
    return _sum_tails(s2)[: size + 1]


def drop_curve(scores: torch.Tensor) -> torch.Tensor:
    """``c[n] = Σ`` of the ``P − n`` smallest entries of ``scores`` [P] (the mass dropped keeping the top ``n``).

    Returns float64 [P + 1]; ``c[P] = 0``, ``c[0] = Σ scores``.
    """
    s = as_f64(scores).flatten()
    check_finite("the allocation scores", s)
    return _sum_tails(s.sort(descending=True).values.unsqueeze(0))


def pair_drop_curve(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``c[p] = Σ_j weight[j] · (1 − top_p(scores[j]) / Σ scores[j])``: the relative pair-score mass dropped per KV
    group when keeping its ``p`` best pairs, weighted by the group's attention-output energy.

    ``scores`` [h_kv, P] non-negative pair scores (any QK method), ``weight`` [h_kv]. Returns float64 [P + 1].
    """
    s = as_f64(scores).clamp_min(0.0)
    check_finite("the RoPE pair scores", s)
    w = as_f64(weight).to(s.device)
    if s.dim() != 2 or w.shape != s.shape[:1]:
        raise ValueError(f"scores must be [h_kv, P] and weight [h_kv], got {tuple(s.shape)} and {tuple(w.shape)}")
    total = s.sum(-1, keepdim=True)
    frac = torch.where(total > 0, s / total.clamp_min(1e-300), torch.zeros_like(s))
    return _sum_tails(frac.sort(dim=-1, descending=True).values * w.unsqueeze(-1))


def lower_hull(params: list[int], losses: list[float]) -> list[int]:
    """Indices of the options on the lower convex hull of a (params, loss) curve, from the most params down.

    ``params`` strictly decreasing (option 0 = the full size). The hull keeps option 0 and the option with the
    fewest params; between them, only options whose marginal loss per removed parameter increases.
    """
    if any(b >= a for a, b in zip(params, params[1:])):
        raise ValueError("options must be ordered by strictly decreasing parameter count")
    hull: list[int] = []
    for i in range(len(params)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # slope a->b must be <= slope b->i (marginal cost non-decreasing), else b is not on the hull
            s_ab = (losses[b] - losses[a]) / (params[a] - params[b])
            s_bi = (losses[i] - losses[b]) / (params[b] - params[i])
            if s_ab > s_bi:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_allocate(
    items: list[tuple[list[int], list[float]]], budget: int, start: list[int] | None = None
) -> list[int]:
    """Pick one option per item minimising the summed loss with ``Σ params <= budget``.

    ``items``: per item ``(params, losses)``, options ordered by strictly decreasing params (option 0 is the
    full size). Greedy on each item's :func:`lower_hull`: repeatedly move the item whose next hull option
    has the smallest ``Δloss / Δparams`` until the budget is met; then undo cuts that fit in the overshoot (largest
    loss saved per parameter first), so the result lies within one smallest step of the budget when small steps
    exist (MLP neurons). ``start`` (hull options, e.g. an earlier allocation's result) is where each item begins and
    the largest option the undo may return it to. Returns the chosen option index per item.
    Raises :class:`BudgetError` when even the smallest options exceed the budget.
    """
    floor = sum(p[-1] for p, _ in items)
    if floor > budget:
        raise BudgetError(f"the smallest allowed sizes still need {floor:,} parameters, over the budget of {budget:,}; "
                          "use a smaller --cr")
    hulls = [lower_hull(p, losses) for p, losses in items]
    if start is None:
        pos = [0] * len(items)
    else:
        if any(s not in h for s, h in zip(start, hulls)):
            raise ValueError("start options must lie on their items' lower hulls")
        pos = [h.index(s) for s, h in zip(start, hulls)]
    lowest = list(pos)
    total = sum(p[h[k]] for (p, _), h, k in zip(items, hulls, pos))
    heap: list[tuple[float, int, int]] = []

    def push(k: int) -> None:
        h = hulls[k]
        if pos[k] + 1 < len(h):
            p, losses = items[k]
            a, b = h[pos[k]], h[pos[k] + 1]
            slope = (losses[b] - losses[a]) / (p[a] - p[b])
            heapq.heappush(heap, (slope, k, b))

    for k in range(len(items)):
        push(k)
    while total > budget:
        _, k, b = heapq.heappop(heap)
        p = items[k][0]
        total -= p[hulls[k][pos[k]]] - p[b]
        pos[k] += 1
        push(k)
    # the last cut may overshoot (a whole head step): give back the slack, best loss saved per parameter first
    while True:
        best = None
        for k, (p, losses) in enumerate(items):
            if pos[k] == lowest[k]:
                continue
            a, b = hulls[k][pos[k] - 1], hulls[k][pos[k]]
            cost = p[a] - p[b]
            if total + cost <= budget:
                gain = (losses[b] - losses[a]) / cost
                if best is None or gain > best[0]:
                    best = (gain, k, cost)
        if best is None:
            break
        _, k, cost = best
        pos[k] -= 1
        total += cost
    return [hulls[k][pos[k]] for k in range(len(items))]


def allocate_dims(
    shape: ModelShape,
    curves: list[LayerCurves],
    cr: float,
    components=("qk", "ov", "mlp"),
    head_multiple: int = 16,
    min_head_dim: int = 32,
    tie_qk_ov: bool = True,
    kv_cr: float = 0.0,
    mlp_multiple: int = 1,
) -> DimPlan:
    """Per-layer ``(r_qk, r_vo, r_int)`` meeting ``cr`` (on decoder linear parameters) and ``kv_cr`` (on KV-cache
    bytes per token) with the least predicted loss.

    Options per layer: head dims ``r ∈ {max(min_head_dim, m), …, d_h}`` in steps of ``m = head_multiple``; the
    default minimum 32 is the smallest head vLLM's CPU attention runs (a uniform plan never goes that low at the CRs
    people use, but a per-layer plan would, in its least sensitive layers). With ``tie_qk_ov`` QK and OV share
    ``r``, as vLLM's CPU attention needs K and V of one size; otherwise they are separate items. MLP widths ``n ∈
    [1, d_int]`` (any integer; with ``mlp_multiple`` ``k``: ``d_int`` and the multiples of ``k``). Components not in
    ``components`` keep their size. Parameters per layer: ``d·r_qk·(h_q + h_kv) + d·r_vo·(h_kv + h_q) + n_mlp·d·n``.
    The budget is ``floor((1 − cr) · P)`` with ``P`` the original parameters of the compressed components (the whole
    decoder when all three are); the result meets it, overshooting by at most one step (``≤ d·m·2(h_q + h_kv)``
    parameters). Returns a :class:`DimPlan` (``layers`` set unless all layers agree).

    The KV-cache target (``kv_cr > 0``, docs/METHOD.md §6.6): a layer's KV bytes and its attention parameters are both
    proportional to ``r_qk + r_vo``, so "at least ``kv_cr`` of the KV bytes removed" is a budget on the attention
    items alone. It is met first (the greedy over the attention items with that budget: the least loss for the KV
    target), then the parameter budget from there (attention items may be cut further, never given back above the
    KV allocation). On convex loss curves this is the optimum of both constraints: all attention items end at one
    marginal loss per parameter, the larger of the two budgets' thresholds. ``cr == 0`` with ``kv_cr > 0`` is the
    KV-cache-compression mode: only head sizes change.
    """
    if len(curves) != shape.num_layers:
        raise ValueError(f"need one LayerCurves per layer ({shape.num_layers}), got {len(curves)}")
    if not 0.0 <= float(cr) < 1.0 or math.isnan(float(cr)):
        raise BudgetError(f"--cr must be in [0, 1), got {cr!r}")
    kv = check_kv_cr(kv_cr, components)
    d, hq, hkv, dh, d_int = (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                             shape.intermediate_size)
    m = head_multiple
    lo = max(min_head_dim, m)
    if lo > dh:
        raise BudgetError(f"head dim {dh} is smaller than the minimum reduced size {lo}; use a smaller --head-multiple")
    # the full size, then multiples of m
    head_sizes = sorted({dh, *range(m * math.ceil(lo / m), dh + 1, m)}, reverse=True)
    k_mlp = check_mlp_multiple(mlp_multiple)  # MLP widths: the original, then the multiples of k below it
    mlp_sizes = [d_int] + [n for n in range((d_int - 1) // k_mlp * k_mlp, 0, -k_mlp)]
    per_head = d * (hq + hkv)
    comps = set(components)

    items: list[tuple[list[int], list[float]]] = []
    slots: list[tuple[int, str, list[int]]] = []  # (layer, what, sizes)
    for li, c in enumerate(curves):
        qk_curve, ov_curve = c.qk.tolist(), c.ov.tolist()  # Python floats once, not one tensor index per option
        qk = [qk_curve[r // 2] for r in head_sizes]
        ov = [ov_curve[r] for r in head_sizes]
        if tie_qk_ov and {"qk", "ov"} <= comps:
            items.append(([2 * per_head * r for r in head_sizes], [a + b for a, b in zip(qk, ov)]))
            slots.append((li, "attn", head_sizes))
        else:
            for name, loss in (("qk", qk), ("ov", ov)):
                if name in comps:
                    items.append(([per_head * r for r in head_sizes], loss))
                    slots.append((li, name, head_sizes))
        if "mlp" in comps:
            mlp_curve = c.mlp.tolist()
            items.append(([shape.n_mlp_mats * d * n for n in mlp_sizes], [mlp_curve[n] for n in mlp_sizes]))
            slots.append((li, "mlp", mlp_sizes))
    for _, losses in items:
        if not all(math.isfinite(x) for x in losses):
            raise BudgetError("the allocation losses contain NaN or Inf; check the calibration statistics")

    attn_items = [k for k, (_, what, _) in enumerate(slots) if what != "mlp"]
    start = None
    if kv > 0:
        attn = [items[k] for k in attn_items]
        kv_budget = math.floor((1.0 - kv) * sum(p[0] for p, _ in attn) + 1e-6)
        smallest = sum(p[-1] for p, _ in attn)
        if smallest > kv_budget:
            raise BudgetError(f"--kv-cr {kv:g} (its default is --cr) needs heads below the {head_sizes[-1]}-dim "
                              "minimum the serving backend runs; use a smaller --kv-cr")
        start = [0] * len(items)
        for k, option in zip(attn_items, greedy_allocate(attn, kv_budget)):
            start[k] = option
    if float(cr) == 0.0:  # the KV-cache mode: nothing else is cut
        choice = start if start is not None else [0] * len(items)
    else:
        # CR applies to the compressed components (all of them: the whole decoder), as in plan_dims
        budget = math.floor((1.0 - float(cr)) * sum(p[0] for p, _ in items) + 1e-6)
        choice = greedy_allocate(items, budget, start)
    dims = [[dh, dh, d_int] for _ in range(shape.num_layers)]
    for (li, what, sizes), k in zip(slots, choice):
        size = sizes[k]
        if what == "attn":
            dims[li][0] = dims[li][1] = size
        else:
            dims[li][{"qk": 0, "ov": 1, "mlp": 2}[what]] = size
    plan = plan_per_layer(shape, dims, head_multiple=m, target_cr=float(cr), target_kv_cr=kv, mlp_multiple=k_mlp)
    plan.notes.append("loss-aware allocation across layers and components"
                      + (f" under a KV-cache target (at least {kv:g} removed)" if kv > 0 else ""))
    return plan
