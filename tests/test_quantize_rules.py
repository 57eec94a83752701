"""Size rules of a3-quantize (a3_serve/quantize/rules.py): what they refuse, that round_for's multiples always pass, and
that they say what vLLM 0.32's own kernel-selection code says (its can_implement checks, run in a subprocess: no
engine)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from a3_serve.errors import InputError
from a3_serve.quantize import rules
from a3_serve.quantize.schemes import get_scheme, parse_group_size

# Published shapes (config.json fields the rules read): SmolLM2-135M, a Llama-2-7B and a Qwen2-0.5B shape, and the
# tests' tiny random GQA model.
SMOL = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, head_dim=64,
            intermediate_size=1536)
LLAMA7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=2, head_dim=128,
               intermediate_size=11008)
QWEN05B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=2, head_dim=64,
               intermediate_size=4864)
TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, head_dim=64,
            intermediate_size=512)


def a3(base: dict, dims) -> dict:
    """An A3 config with per-layer (r_qk, r_vo, r_int)."""
    cfg = dict(base, model_type="a3_llama", num_hidden_layers=len(dims))
    cfg.update(layer_qk_head_dims=[d[0] for d in dims], layer_v_head_dims=[d[1] for d in dims],
               layer_intermediate_sizes=[d[2] for d in dims])
    return cfg


def test_smollm2_group_128_is_refused_with_the_fix():
    """The issue's observation: hidden 576 and an MLP width of 890 are not multiples of 128."""
    probs = rules.size_problems(a3(SMOL, [(64, 64, 890)] * 30), "w4a16", "cpu")
    assert probs[0].startswith("model.layers.0.self_attn.q_proj has input size 576, not a multiple of the group size "
                               "128"), probs[0]
    assert "--group-size" in probs[0]
    assert any("mlp.down_proj has input size 890" in p for p in probs)
    with pytest.raises(InputError, match="hidden size 576 .* use --group-size 64"):
        rules.round_for(SMOL, "w4a16", "cpu")


def test_cpu_int4_names_the_fused_layer():
    """SmolLM2 at CR 0.1 with 48-dim heads: vLLM fuses q/k/v into 15 x 48 = 720 outputs, not a multiple of 32."""
    probs = rules.size_problems(a3(SMOL, [(48, 48, 1472)] * 30), "w4a16", "cpu", group_size=None)
    assert probs and probs[0].startswith("model.layers.0.self_attn.qkv_proj (vLLM's fused layer) has output size 720, "
                                         "not a multiple of 32 (vLLM's CPU INT4 kernel, CPUWNA16)"), probs
    assert "head sizes that are multiples of 32" in probs[0]
    assert rules.size_problems(a3(SMOL, [(48, 48, 1472)] * 30), "w8a8", "cpu") == []


def test_w8a16_is_refused_on_cpu_only():
    probs = rules.size_problems(TINY, "w8a16", "cpu")
    assert len(probs) == 1 and "no kernel for 8-bit weight-only" in probs[0] and "--backend gpu" in probs[0]
    assert rules.size_problems(TINY, "w8a16", "gpu") == []


def test_fp8_kv_cache_needs_heads_of_32_on_cpu():
    cfg = a3(SMOL, [(48, 48, 1536)] * 30)
    assert rules.size_problems(cfg, "w8a8", "cpu") == []
    probs = rules.size_problems(cfg, "w8a8", "cpu", kv_cache_dtype="fp8")
    assert len(probs) == 30 and "head size 48; an FP8 KV cache on CPU needs a multiple of 32" in probs[0]
    assert rules.round_for(SMOL, "w8a8", "cpu", kv_cache_dtype="fp8") == (32, 1)


def test_group_size_parsing():
    assert parse_group_size(get_scheme("w4a16"), None) == 128
    assert parse_group_size(get_scheme("w4a16"), "channel") is None
    assert parse_group_size(get_scheme("w8a16"), None) is None
    for bad, msg in (("7", "even"), ("abc", "not a number")):
        with pytest.raises(InputError, match=msg):
            parse_group_size(get_scheme("w4a16"), bad)
    with pytest.raises(InputError, match="does not apply"):
        parse_group_size(get_scheme("w8a8"), "64")
    with pytest.raises(InputError, match="w8a8, w4a16, w8a16"):
        get_scheme("fp4")


CASES = [(base, scheme, backend, group, kv)
         for base in (SMOL, LLAMA7B, QWEN05B, TINY)
         for scheme, backend, group in (("w8a8", "cpu", None), ("w8a8", "gpu", None), ("w4a16", "cpu", 128),
                                        ("w4a16", "cpu", 64), ("w4a16", "cpu", 32), ("w4a16", "gpu", 128),
                                        ("w4a16", "gpu", 32), ("w8a16", "gpu", None), ("w8a16", "gpu", 128))
         for kv in (None, "fp8")]


@pytest.mark.parametrize("base, scheme, backend, group, kv", CASES)
def test_round_for_sizes_pass_every_rule(base, scheme, backend, group, kv):
    """What the a3-export option promises: every export whose head sizes (K = V) are multiples of round_for's head
    multiple and whose MLP widths are multiples of its MLP multiple passes size_problems; when round_for refuses, no
    reduced head size passes (or the hidden size itself breaks the rule)."""
    d_h = base["head_dim"]
    lo = 32 if backend == "cpu" else 8
    try:
        h, m = rules.round_for(base, scheme, backend, group, kv_cache_dtype=kv)
    except InputError as err:
        if "hidden size" in str(err):
            assert rules.size_problems(base, scheme, backend, group, kv_cache_dtype=kv)
            return
        for r in range(lo, d_h + 1, 8):
            assert rules.size_problems(a3(base, [(r, r, base["intermediate_size"])]), scheme, backend, group,
                                       kv_cache_dtype=kv), r
        return
    heads = [r for r in range(h, d_h + 1, h) if r >= lo]
    widths = [m * k for k in (1, 3, 7)] + [m * (base["intermediate_size"] // m)]
    assert heads, (h, d_h)
    for r, w in itertools.product(heads, widths):
        cfg = a3(base, [(r, r, w), (heads[0], heads[0], widths[0])])
        assert rules.size_problems(cfg, scheme, backend, group, kv_cache_dtype=kv) == [], (r, w)


VLLM_PROBE = r"""
import json, sys, torch
from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
from vllm.scalar_type import scalar_types
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
req = json.loads(sys.argv[1])
out = {"int4": [], "fp8_heads": [], "int8_weight_only": None}
for k, n in req["shapes"]:
    c = MPLinearLayerConfig(full_weight_shape=(k, n), partition_weight_shape=(k, n), weight_type=scalar_types.uint4b8,
                            act_type=torch.float32, group_size=-1, zero_points=False)
    out["int4"].append(CPUWNA16LinearKernel.can_implement(c)[0])
for h in req["heads"]:
    try:
        _get_attn_isa(torch.float32, 32, h, "fp8")
        out["fp8_heads"].append("ok")
    except NotImplementedError as e:
        out["fp8_heads"].append(str(e))
try:
    choose_mp_linear_kernel(MPLinearLayerConfig(full_weight_shape=(256, 256), partition_weight_shape=(256, 256),
                            weight_type=scalar_types.uint8b128, act_type=torch.float32, group_size=-1,
                            zero_points=False))
    out["int8_weight_only"] = "kernel found"
except ValueError as e:
    out["int8_weight_only"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.environ.get("A3_SERVE_SKIP_VLLM") == "1", reason="A3_SERVE_SKIP_VLLM=1")
def test_rules_agree_with_vllm_kernel_selection():
    """vLLM 0.32's own checks, on the fused shapes of several A3 checkpoints: the CPU INT4 kernel accepts a layer
    exactly when our rule does; an FP8 KV cache refuses exactly the head sizes our rule refuses (head sizes % 32; the
    ISA check behind it needs AVX-512 or AMX, which this CPU may lack); 8-bit weight-only layers find no CPU kernel."""
    configs = [a3(SMOL, [(48, 48, 1472), (64, 64, 1536), (32, 32, 1440)]), a3(TINY, [(64, 64, 384), (32, 32, 448)]),
               a3(QWEN05B, [(48, 48, 4800), (32, 32, 4864)])]
    shapes = sorted({(lin.in_features, lin.out_features) for c in configs for lin in rules.served_shapes(c)})
    heads = [32, 48, 64, 80, 96, 112, 128]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    proc = subprocess.run([sys.executable, "-c", VLLM_PROBE, json.dumps({"shapes": shapes, "heads": heads})],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [k % 32 == 0 and n % 32 == 0 for k, n in shapes]
    assert got["int4"] == ours, list(zip(shapes, got["int4"], ours))
    for h, verdict in zip(heads, got["fp8_heads"]):
        refused_by_us = bool(rules.head_problems(rules.model_shape(a3(TINY, [(h, h, 512)])), "cpu", "fp8"))
        if h % 32:
            assert refused_by_us and "head_size divisible by 32" in verdict, (h, verdict)
        else:
            assert not refused_by_us and (verdict == "ok" or "AVX-512 or AMX" in verdict), (h, verdict)
    assert "uint8b128" in got["int8_weight_only"] and "CPUWNA16" in got["int8_weight_only"]
