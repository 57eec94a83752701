"""Loss-aware allocation: the loss curves against brute force, the greedy against exhaustive search, the budget
and engine constraints, and the end-to-end export with per-layer dims chosen from real statistics."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import a3_serve  # noqa: F401
from a3_serve.errors import BudgetError
from a3_serve.export.architectures import inspect_architecture
from a3_serve.export.methods import RECIPES
from a3_serve.export.pipeline import ExportOptions, run_export
from a3_serve.runtime import read_config
from a3_serve.solvers.allocate import (
    LayerCurves,
    allocate_dims,
    drop_curve,
    greedy_allocate,
    lower_hull,
    pair_drop_curve,
    tail_curve,
)
from a3_serve.solvers.budget import ModelShape, plan_dims

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_curves_equal_brute_force_sums():
    g = gen(0)
    sv = torch.rand(3, 8, generator=g, dtype=F64)
    tc = tail_curve(sv, 10)
    for r in range(11):
        want = sum(float(row.sort(descending=True).values[r:].square().sum()) for row in sv)
        assert tc[r].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    scores = torch.rand(12, generator=g, dtype=F64)
    dc = drop_curve(scores)
    for n in range(13):
        assert dc[n].item() == pytest.approx(float(scores.sort().values[: 12 - n].sum()), rel=1e-12, abs=1e-15)
    pair, weight = torch.rand(2, 5, generator=g, dtype=F64), torch.tensor([2.0, 0.5], dtype=F64)
    pc = pair_drop_curve(pair, weight)
    for p in range(6):
        want = sum(float(w * (1 - row.sort(descending=True).values[:p].sum() / row.sum()))
                   for row, w in zip(pair, weight))
        assert pc[p].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert pc[0].item() == pytest.approx(2.5) and pc[-1].item() == 0.0


def test_lower_hull_drops_non_convex_points():
    params = [10, 8, 6, 4, 2]
    assert lower_hull(params, [0.0, 1.0, 2.0, 3.0, 4.0]) == [0, 1, 2, 3, 4]  # linear: every point is on the hull
    assert lower_hull(params, [0.0, 0.1, 0.3, 0.7, 1.5]) == [0, 1, 2, 3, 4]  # convex
    assert lower_hull(params, [0.0, 1.0, 1.1, 1.2, 5.0]) == [0, 3, 4]  # a concave start is jumped over
    with pytest.raises(ValueError):
        lower_hull([4, 4, 2], [0.0, 1.0, 2.0])


def _random_convex_item(g: torch.Generator, n_opts: int, step: int) -> tuple[list[int], list[float]]:
    marg = torch.rand(n_opts - 1, generator=g, dtype=F64).sort().values  # increasing marginal loss -> convex
    losses = [0.0] + marg.cumsum(0).mul(step).tolist()
    return [step * (n_opts - 1 - k) + 1 for k in range(n_opts)], losses


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_optimal_up_to_one_step(seed):
    """Each state of the greedy cut sequence is a Lagrangian optimum, and the refill only lowers the loss, so the
    result is within the budget and at least as good as the exhaustive optimum with one largest step less budget;
    and it is never worse than the pure cut sequence (exhaustive search over 4 items of 3-5 options)."""
    g = gen(seed)
    items = [_random_convex_item(g, n, s) for n, s in ((4, 3), (5, 2), (3, 5), (4, 4))]
    full = sum(p[0] for p, _ in items)
    floor = sum(p[-1] for p, _ in items)
    max_step = max(p[0] - p[1] for p, _ in items)
    combos = [(sum(items[k][0][i] for k, i in enumerate(c)), sum(items[k][1][i] for k, i in enumerate(c)))
              for c in itertools.product(*(range(len(p)) for p, _ in items))]
    for budget in range(floor, full + 1):
        pick = greedy_allocate(items, budget)
        used = sum(items[k][0][i] for k, i in enumerate(pick))
        loss = sum(items[k][1][i] for k, i in enumerate(pick))
        assert used <= budget
        optimum = min(lo for pa, lo in combos if pa <= budget)
        weaker = min(lo for pa, lo in combos if pa <= max(floor, budget - max_step))
        assert optimum - 1e-12 <= loss <= weaker + 1e-12


def test_greedy_refuses_an_impossible_budget():
    with pytest.raises(BudgetError, match="smaller --cr"):
        greedy_allocate([([4, 2], [0.0, 1.0]), ([4, 2], [0.0, 1.0])], 3)


SHAPE = ModelShape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256)


def _curves(scale_attn: list[float], scale_mlp: list[float]) -> list[LayerCurves]:
    """Convex curves: attention loss ∝ dropped dims², MLP ∝ dropped neurons² (per-layer scales)."""
    out = []
    for a, m in zip(scale_attn, scale_mlp):
        pairs = torch.arange(32, -1, -1, dtype=F64)
        dims = torch.arange(64, -1, -1, dtype=F64)
        neurons = torch.arange(256, -1, -1, dtype=F64)
        out.append(LayerCurves(qk=a * pairs.square(), ov=a * dims.square() / 4, mlp=m * neurons.square() / 16))
    return out


@pytest.mark.parametrize("cr", [0.1, 0.2, 0.3, 0.5])
def test_allocation_meets_the_budget_and_engine_constraints(cr):
    plan = allocate_dims(SHAPE, _curves([1, 4, 0.25, 1], [1, 1, 4, 0.25]), cr, head_multiple=16)
    orig = SHAPE.linear_params()
    assert cr <= plan.achieved_cr <= cr + 0.01  # meets the budget within 1% (one attention step here is ~1.6%/4 layers)
    assert plan.linear_params(SHAPE) <= (1 - cr) * orig + 1
    for r_qk, r_vo, r_int in (plan.layer_dims(i) for i in range(SHAPE.num_layers)):
        assert r_qk == r_vo and r_qk % 16 == 0 and 32 <= r_qk <= 64 and 1 <= r_int <= 256  # vLLM CPU: heads >= 32


def test_allocation_cuts_cheap_layers_more():
    plan = allocate_dims(SHAPE, _curves([1, 100, 1, 1], [1, 1, 1, 100]), 0.3, head_multiple=16)
    dims = [plan.layer_dims(i) for i in range(4)]
    assert dims[1][0] >= max(d[0] for d in dims) and dims[1][0] > min(d[0] for d in dims)  # expensive attention kept
    assert dims[3][2] > max(dims[i][2] for i in (0, 1, 2))  # expensive MLP kept wider


def test_allocation_with_equal_layers_is_close_to_uniform():
    """With identical layers, the allocation gives (nearly) the same dims to every layer."""
    plan = allocate_dims(SHAPE, _curves([1] * 4, [1] * 4), 0.2, head_multiple=16)
    dims = [plan.layer_dims(i) for i in range(4)]
    assert len({d[0] for d in dims}) == 1
    assert max(d[2] for d in dims) - min(d[2] for d in dims) <= 1


def test_untied_qk_and_ov_and_partial_components():
    cur = _curves([1, 1, 1, 1], [1, 1, 1, 1])
    cur = [LayerCurves(qk=c.qk * 100, ov=c.ov, mlp=c.mlp) for c in cur]  # QK 100x more expensive than OV
    plan = allocate_dims(SHAPE, cur, 0.2, head_multiple=16, tie_qk_ov=False)
    assert all(plan.layer_dims(i)[0] > plan.layer_dims(i)[1] for i in range(4))
    mlp_only = allocate_dims(SHAPE, cur, 0.2, components=("mlp",), head_multiple=16)
    assert all(mlp_only.layer_dims(i)[:2] == (64, 64) for i in range(4))
    mlp_params = sum(mlp_only.layer_dims(i)[2] for i in range(4)) * 3 * SHAPE.hidden_size
    # CR on the MLP
    assert 0.79 * 4 * 3 * SHAPE.hidden_size * 256 <= mlp_params <= 0.8 * 4 * 3 * SHAPE.hidden_size * 256


def _attn_loss(curves: list[LayerCurves], plan) -> float:
    return sum(float(c.qk[plan.layer_dims(i)[0] // 2] + c.ov[plan.layer_dims(i)[1]]) for i, c in enumerate(curves))


def _total_loss(curves: list[LayerCurves], plan) -> float:
    return _attn_loss(curves, plan) + sum(float(c.mlp[plan.layer_dims(i)[2]]) for i, c in enumerate(curves))


@pytest.mark.parametrize("kv_cr", [0.1, 0.25, 0.4])
def test_kv_mode_meets_the_kv_target_with_heads_only(kv_cr):
    """`--kv-cr` alone: only head sizes change, at least kv_cr of the KV bytes go, and no head is cut that the
    target does not need (giving any one layer its next head size back would miss the target)."""
    curves = _curves([1, 4, 0.25, 1], [1, 1, 4, 0.25])
    plan = allocate_dims(SHAPE, curves, 0.0, head_multiple=16, kv_cr=kv_cr)
    dims = [plan.layer_dims(i) for i in range(4)]
    assert all(d[2] == 256 and d[0] == d[1] and d[0] % 16 == 0 and d[0] >= 32 for d in dims)
    assert plan.achieved_kv_cr(SHAPE) >= kv_cr and plan.target_kv_cr == kv_cr
    budget = (1 - kv_cr) * 4 * 64
    assert all(sum(d[0] for d in dims) + 16 > budget for i in range(4) if dims[i][0] < 64)
    # the cheapest attention (layer 2, scale 0.25) is cut at least as much as the dearest (layer 1, scale 4)
    assert dims[2][0] <= dims[1][0]


def test_kv_mode_is_optimal_among_head_choices():
    """Exhaustive search over every head-size combination that meets the KV target: the greedy's attention loss is
    the optimum (attention curves are convex here, and the KV budget is a budget on Σ r)."""
    curves = _curves([1, 4, 0.25, 1], [1, 1, 1, 1])
    sizes = (64, 48, 32)
    for kv_cr in (0.1, 0.2, 0.3, 0.45):
        plan = allocate_dims(SHAPE, curves, 0.0, head_multiple=16, kv_cr=kv_cr)
        best = min(sum(float(c.qk[r // 2] + c.ov[r]) for c, r in zip(curves, combo))
                   for combo in itertools.product(sizes, repeat=4) if sum(combo) <= (1 - kv_cr) * 4 * 64 + 1e-9)
        assert _attn_loss(curves, plan) <= best + 1e-9


@pytest.mark.parametrize("cr, kv_cr", [(0.1, 0.3), (0.2, 0.2), (0.3, 0.1), (0.2, 0.5)])
def test_joint_mode_meets_both_budgets(cr, kv_cr):
    curves = _curves([1, 4, 0.25, 1], [1, 1, 4, 0.25])
    plan = allocate_dims(SHAPE, curves, cr, head_multiple=16, kv_cr=kv_cr)
    assert plan.achieved_kv_cr(SHAPE) >= kv_cr
    assert plan.achieved_cr >= cr and plan.linear_params(SHAPE) <= (1 - cr) * SHAPE.linear_params() + 1
    free = allocate_dims(SHAPE, curves, cr, head_multiple=16)
    if free.achieved_kv_cr(SHAPE) >= kv_cr:  # the KV target does not bind: the same plan as without it
        assert [plan.layer_dims(i) for i in range(4)] == [free.layer_dims(i) for i in range(4)]
    else:  # it binds: at most one head step beyond it, and the predicted loss can only be higher
        assert plan.achieved_kv_cr(SHAPE) < kv_cr + 16 / (4 * 64) + 1e-9
        assert _total_loss(curves, plan) >= _total_loss(curves, free) - 1e-9


def test_impossible_kv_targets_name_the_fix():
    curves = _curves([1] * 4, [1] * 4)
    with pytest.raises(BudgetError, match="32-dim minimum.*smaller --kv-cr"):
        allocate_dims(SHAPE, curves, 0.0, head_multiple=16, kv_cr=0.6)
    with pytest.raises(BudgetError, match="add qk,ov to --components"):
        allocate_dims(SHAPE, curves, 0.2, components=("mlp",), head_multiple=16, kv_cr=0.2)
    with pytest.raises(BudgetError, match="minimum.*smaller --kv-cr"):
        plan_dims(SHAPE, 0.0, head_multiple=16, kv_cr=0.8)
    with pytest.raises(BudgetError, match="add qk,ov"):
        plan_dims(SHAPE, 0.2, components="mlp", kv_cr=0.1)


def test_uniform_plan_with_a_kv_target():
    kv_only = plan_dims(SHAPE, 0.0, head_multiple=16, kv_cr=0.25)
    assert (kv_only.qk_head_dim, kv_only.v_head_dim, kv_only.intermediate_size) == (48, 48, 256)
    joint = plan_dims(SHAPE, 0.1, head_multiple=16, kv_cr=0.45)  # heads 64 -> 32 for the KV target; MLP re-solved
    assert joint.qk_head_dim == 32 and joint.achieved_kv_cr(SHAPE) == 0.5
    assert joint.intermediate_size == 256 and joint.achieved_cr > 0.1  # the heads alone remove more than --cr
    both = plan_dims(SHAPE, 0.3, head_multiple=16, kv_cr=0.1)  # --cr's heads already meet the KV target
    assert both.qk_head_dim == plan_dims(SHAPE, 0.3, head_multiple=16).qk_head_dim


@pytest.mark.parametrize("k", [32, 64])
def test_mlp_multiple_rounds_every_reduced_width(k):
    """`--mlp-multiple k` (a quantization kernel's rule): every reduced MLP width is a multiple of k, in the loss-aware
    allocation and in the uniform plan, and both still meet the budget."""
    curves = _curves([1, 4, 0.25, 1], [1, 1, 4, 0.25])
    for cr in (0.1, 0.3):
        plan = allocate_dims(SHAPE, curves, cr, head_multiple=16, mlp_multiple=k)
        widths = [plan.layer_dims(i)[2] for i in range(4)]
        assert all(w == 256 or w % k == 0 for w in widths) and plan.achieved_cr >= cr
        uniform = plan_dims(SHAPE, cr, head_multiple=16, mlp_multiple=k)
        assert uniform.intermediate_size % k == 0 and uniform.achieved_cr >= cr
    with pytest.raises(BudgetError, match="multiple of 32"):
        from a3_serve.solvers.budget import plan_per_layer

        plan_per_layer(SHAPE, [(64, 64, 200)] * 4, mlp_multiple=32)


def test_allocation_on_real_statistics_beats_uniform_on_its_own_objective(random_models, tmp_path):
    """End to end on a random GQA model: the exporter's loss-aware plan has a smaller total predicted loss than the
    uniform plan at the same CR, meets the budget within 1%, and the checkpoint records and serves its per-layer
    dims."""
    from a3_serve.calibration.fisher import residual_fisher
    from a3_serve.calibration.stats import collect_stats
    from a3_serve.export.compress_layer import layer_tensors
    from a3_serve.export.loss_curves import allocate_plan, layer_curves, layer_weights, weighted_curves

    src = random_models["llama3-gqa"]
    arch = inspect_architecture(read_config(src))
    shape = arch
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    batches = list(torch.randint(3, 5000, (8, 32), generator=gen(1)).split(2))
    stats = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    methods = RECIPES["paper+alloc"][0]
    fisher = residual_fisher(model, torch.cat(batches)[:4], 2)
    curves = [weighted_curves(layer_curves(layer_tensors(layer), st, arch, methods),
                              *layer_weights(methods, st, fisher, i))
              for i, (layer, st) in enumerate(zip(model.model.layers, stats))]

    def predicted(plan) -> float:
        total = 0.0
        for c, (r_qk, r_vo, r_int) in zip(curves, (plan.layer_dims(i) for i in range(shape.num_layers))):
            total += float(c.qk[r_qk // 2] + c.ov[r_vo] + c.mlp[r_int])
        return total

    for cr in (0.2, 0.3):
        uniform = plan_dims(shape, cr, head_multiple=16)
        alloc = allocate_plan(model, stats, arch, cr, methods, head_multiple=16, fisher=fisher)
        assert cr <= alloc.achieved_cr <= cr + 0.01
        assert predicted(alloc) <= predicted(uniform) * (1 + 1e-9)
        assert all(c.qk[-1] == 0 and c.ov[-1] == 0 and c.mlp[-1] == 0 for c in curves)
        assert all(math.isfinite(float(c.qk[0])) and c.qk[0] > 0 and c.ov[0] > 0 and c.mlp[0] > 0 for c in curves)

    out = tmp_path / "alloc"
    rep = run_export(ExportOptions(model=src, out=out, cr=0.3, nsamples=8, seqlen=32, batch_size=2, device="cpu",
                                   dtype="float32", methods=methods, recipe="paper+alloc"), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["a3"]["allocation"] == "loss" and rep["allocation"] == "loss"
    assert len(rep["residual_fisher"]["attn"]) == arch.num_layers and rep["residual_fisher"]["tokens"] == 8 * 32
    assert 0.3 <= cfg["a3"]["achieved_cr"] <= 0.31
    if cfg["layer_qk_head_dims"] is not None:  # per-layer lists when the layers differ
        assert cfg["layer_qk_head_dims"] == cfg["layer_v_head_dims"] and all(r % 16 == 0
                                                                             for r in cfg["layer_qk_head_dims"])
    small = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.isfinite(small(input_ids=batches[0]).logits).all()


def test_residual_scale_statistics_match_the_hidden_states(random_models):
    """inv_ms_mlp of layer l is E[1/mean_j h_j²] over the decoder layer's output tokens (= the model's hidden state
    l+1)."""
    from a3_serve.calibration.stats import collect_stats

    src = random_models["llama2-mha"]
    arch = inspect_architecture(read_config(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    batches = list(torch.randint(3, 5000, (4, 16), generator=gen(2)).split(2))
    stats = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    with torch.no_grad():
        hs = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    for layer in range(arch.num_layers - 1):  # the last hidden state is after the final norm
        h = torch.cat([x[layer + 1].reshape(-1, arch.hidden_size) for x in hs]).to(F64)
        want = (1.0 / h.square().mean(-1)).mean()
        assert float(stats[layer].inv_ms_mlp) == pytest.approx(float(want), rel=1e-6)
        assert float(stats[layer].inv_ms_attn) > 0
