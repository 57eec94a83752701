"""CR -> dims (a3_serve.solvers.budget): known shapes, rounding, re-solving the MLP, and error messages."""

from __future__ import annotations

import math

import pytest

from a3_serve.errors import BudgetError, InputError
from a3_serve.solvers.budget import DimPlan, ModelShape, plan_dims

SMOLLM2 = ModelShape(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
LLAMA2_7B = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                       intermediate_size=11008)
LLAMA31_8B = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        intermediate_size=14336)
LLAMA31_70B = ModelShape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                         intermediate_size=28672)
SHAPES = {"smollm2": SMOLLM2, "llama2-7b": LLAMA2_7B, "llama3.1-8b": LLAMA31_8B, "llama3.1-70b": LLAMA31_70B}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_param_and_kv_counts():
    s = SMOLLM2
    # q 576·64·9, k/v 576·64·3 each, o 64·9·576, gate/up/down 576·1536
    per_layer = 576 * 64 * 9 * 2 + 576 * 64 * 3 * 2 + 3 * 576 * 1536
    assert s.layer_linear_params() == per_layer == 3538944
    assert s.linear_params() == 30 * per_layer
    assert s.layer_linear_params(48, 32, 1000) == 576 * 48 * 12 + 576 * 32 * 12 + 3 * 576 * 1000
    assert s.kv_bytes_per_token() == 30 * 3 * 128 * 2
    assert s.kv_bytes_per_token(48, 48, bytes_per_elem=4) == 30 * 3 * 96 * 4
    # Llama-2-7B: 32 layers × 202,375,168 linear parameters ≈ 6.48 B
    assert LLAMA2_7B.linear_params() == 32 * 202375168


def test_smollm2_cr_0_1():
    plan = plan_dims(SMOLLM2, 0.1)
    assert isinstance(plan, DimPlan)
    assert (plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size) == (48, 48, 1459)
    assert plan.components == ("qk", "ov", "mlp") and plan.target_cr == 0.1
    expected = 1 - SMOLLM2.layer_linear_params(48, 48, 1459) / SMOLLM2.layer_linear_params()
    assert math.isclose(plan.achieved_cr, expected, rel_tol=1e-12)
    assert 0.1 <= plan.achieved_cr < 0.1 + 1e-3
    assert plan.notes


def test_llama2_7b_cr_0_2_multiple_8_by_hand():
    # r = floor(0.8·128/8)·8 = floor(12.8)·8 = 96
    # r_int = floor((0.8·202375168 − 4096·96·128) / (3·4096)) = floor(111568486.4 / 12288) = floor(9079.3) = 9079
    plan = plan_dims(LLAMA2_7B, 0.2, head_multiple=8)
    assert (plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size) == (96, 96, 9079)
    assert abs(plan.achieved_cr - 0.2) < 1e-4


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("cr", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("m", [16, 8])
def test_achieved_cr_meets_target(name, cr, m):
    shape = SHAPES[name]
    plan = plan_dims(shape, cr, head_multiple=m)
    r, r_int = plan.qk_head_dim, plan.intermediate_size
    assert plan.v_head_dim == r and r % m == 0 and r <= shape.head_dim
    assert r == math.floor((1 - cr) * shape.head_dim / m + 1e-9) * m  # rounded DOWN to the multiple
    assert 1 <= r_int <= shape.intermediate_size
    assert abs(plan.achieved_cr - cr) <= 0.01 * cr
    assert plan.achieved_cr >= cr - 1e-12  # r_int is floored, so we never compress less than asked
    # one more MLP neuron would break the budget
    one_more = 1 - shape.layer_linear_params(r, r, r_int + 1) / shape.layer_linear_params()
    assert one_more < cr


def test_cr_zero_returns_original_dims():
    for shape in SHAPES.values():
        for comps in (("qk", "ov", "mlp"), ("mlp",), ("qk",)):
            plan = plan_dims(shape, 0.0, components=comps)
            assert (plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size) == (
                shape.head_dim,
                shape.head_dim,
                shape.intermediate_size,
            )
            assert plan.achieved_cr == 0.0


def test_heads_raised_when_rounding_overshoots():
    # cr 0.02: heads round down 62.72 -> 48, which alone removes more than 2%; r + 16 = 64 is used instead
    plan = plan_dims(SMOLLM2, 0.02)
    assert plan.qk_head_dim == 64 and plan.intermediate_size <= SMOLLM2.intermediate_size
    assert abs(plan.achieved_cr - 0.02) <= 0.01 * 0.02
    # m = 64: the heads can only be 0 or 64 dims -> error (below the minimum)
    with pytest.raises(BudgetError):
        plan_dims(SMOLLM2, 0.02, head_multiple=64)


def test_mlp_capped_with_note_when_target_exceeded():
    # d_h = 80, m = 32, cr 0.05: 76 -> 64 and 64 + 32 > 80, so the heads stay at 64; they alone remove
    # 5.9% > 5%: r_int = floor(1555.2) > 1536 is capped and the plan says so
    shape = ModelShape(hidden_size=576, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=80, intermediate_size=1536)
    plan = plan_dims(shape, 0.05, head_multiple=32)
    assert (plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size) == (64, 64, 1536)
    assert math.isclose(plan.achieved_cr,
                        1 - (576 * 64 * 24 + 3 * 576 * 1536) / shape.layer_linear_params(), rel_tol=1e-12)
    assert plan.achieved_cr > 0.05
    assert any("exceeds the target" in n for n in plan.notes)
    # attention-heavy layer with a 2-neuron MLP: 57.6 -> 32; 32 + 32 = 64 would leave the MLP below one
    # neuron, so the heads stay at 32 and the MLP is capped at its original width
    shape2 = ModelShape(hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=2)
    plan2 = plan_dims(shape2, 0.1, head_multiple=32)
    assert (plan2.qk_head_dim, plan2.intermediate_size) == (32, 2)
    assert plan2.achieved_cr > 0.1
    assert any("exceeds the target" in n for n in plan2.notes)


def test_component_subsets():
    s = SMOLLM2
    attn_only = plan_dims(s, 0.1, components=("qk", "ov"))
    assert (attn_only.qk_head_dim, attn_only.v_head_dim, attn_only.intermediate_size) == (48, 48, 1536)
    assert attn_only.components == ("qk", "ov")
    assert 0 < attn_only.achieved_cr < 0.1
    qk_only = plan_dims(s, 0.1, components=["qk"])
    assert (qk_only.qk_head_dim, qk_only.v_head_dim, qk_only.intermediate_size) == (48, 64, 1536)
    ov_only = plan_dims(s, 0.1, components="ov")
    assert (ov_only.qk_head_dim, ov_only.v_head_dim, ov_only.intermediate_size) == (64, 48, 1536)
    mlp_only = plan_dims(s, 0.1, components=("mlp",))
    assert (mlp_only.qk_head_dim, mlp_only.v_head_dim, mlp_only.intermediate_size) == (64, 64, math.floor(0.9 * 1536))
    assert mlp_only.notes
    qk_mlp = plan_dims(s, 0.1, components="mlp,qk")  # not all three: each component cut by cr, no re-solve
    assert qk_mlp.components == ("qk", "mlp")
    assert (qk_mlp.qk_head_dim, qk_mlp.v_head_dim, qk_mlp.intermediate_size) == (48, 64, 1382)
    # MLP-only plans work even where attention could not shrink
    assert plan_dims(s, 0.8, components=("mlp",)).intermediate_size == math.floor(0.2 * 1536 + 1e-9)


def test_error_cases_raise_one_line_budget_errors():
    for bad_cr in (1.0, 1.5, -0.1, float("nan"), "abc"):
        with pytest.raises(BudgetError) as ei:
            plan_dims(SMOLLM2, bad_cr)
        assert "--cr" in one_line(ei)
    with pytest.raises(BudgetError) as ei:
        plan_dims(SMOLLM2, 0.8)
    msg = one_line(ei)
    assert msg == (
        "--cr 0.80 shrinks attention heads from 64 to 12.8 dims, below the 16-dim minimum; use a smaller --cr, "
        "a smaller --head-multiple, or compress only the MLP (--components mlp)"
    )
    for bad_m in (7, 0, -16, 2.0, True):
        with pytest.raises(BudgetError) as ei:
            plan_dims(SMOLLM2, 0.1, head_multiple=bad_m)
        assert "--head-multiple" in one_line(ei)
    with pytest.raises(BudgetError) as ei:
        plan_dims(SMOLLM2, 0.1, components=("qk", "attn"))
    assert "attn" in one_line(ei)
    with pytest.raises(BudgetError):
        plan_dims(SMOLLM2, 0.1, components=())
    # the MLP would shrink below one neuron (contrived shape: d_int = 1)
    tiny = ModelShape(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=1)
    with pytest.raises(BudgetError) as ei:
        plan_dims(tiny, 0.75)  # heads 64 -> 16 exactly, MLP re-solved to floor(0.25) = 0
    assert "MLP" in one_line(ei)
    with pytest.raises(BudgetError) as ei:
        plan_dims(tiny, 0.5, components=("mlp",))
    assert "MLP" in one_line(ei)


def test_model_shape_validation():
    with pytest.raises(InputError):
        ModelShape(hidden_size=64, num_layers=1, num_heads=6, num_kv_heads=4, head_dim=16, intermediate_size=8)
    with pytest.raises(InputError):
        ModelShape(hidden_size=0, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=8)
