"""Tests of the transformers classes for A3-compressed checkpoints (a3_serve.modeling).

Tiny random models in fp32 on CPU. The references are plain transformers ``LlamaForCausalLM`` models:
- r = d_h and the identity RoPE index must reproduce the dense model exactly;
- a kept subset of RoPE pairs must equal the dense model whose q/k rows of the dropped pairs are zeroed;
- a v/o reduction T (v' = v T, per-query-head output rows Wo') must equal the dense model whose v rows are
  T^T W_v padded with zero rows and whose o_proj columns are Wo' padded with zero columns;
plus a hand-written per-head attention reference for one layer.
"""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import a3_serve  # noqa: F401  (registers a3_llama with the Auto classes)
from a3_serve.modeling import (
    AUTO_MAP,
    A3LlamaConfig,
    A3LlamaForCausalLM,
    A3LlamaModel,
    modeling_source_files,
)

from conftest import run_without_a3_serve


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: on a loaded 2-core machine more intra-op threads only spin against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the head_dim=32 frequencies fall in all three llama3 bands
    "original_max_position_embeddings": 64,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------- helpers
def dense_config(rope=DEFAULT_ROPE, kv_heads=2, attention_bias=False, tie=False, attn="eager", **kw):
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=32,
        max_position_embeddings=256,
        rope_parameters=dict(rope),
        attention_bias=attention_bias,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn,
        **kw,
    )


def a3_config_from(dense_cfg: LlamaConfig, attn="eager", **overrides) -> A3LlamaConfig:
    fields = dense_cfg.to_diff_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    fields.update(overrides)
    return A3LlamaConfig(attn_implementation=attn, **fields)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and greedy decoding is not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def make_dense(seed=0, **cfg_kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(dense_config(**cfg_kw)).eval()
    randomize_(model, seed)
    return model


def batch(seed=0, length=12):
    """Two sequences; the second is left-padded by 3 tokens (exercises the attention mask)."""
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(3, 1000, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_close_on_mask(a, b, mask, atol=ATOL):
    valid = mask.bool()
    diff = (a - b).abs()[valid].max().item()
    assert diff <= atol, f"max |diff| = {diff:.3e} > {atol}"


def greedy(model, ids, mask, use_cache=True, n=16):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def pair_columns(keep: torch.Tensor, d_h: int) -> torch.Tensor:
    """[n, p] kept pair indices -> [n, 2p] kept columns in rotate_half order [keep, keep + d_h/2]."""
    return torch.cat([keep, keep + d_h // 2], dim=-1)


def compress(dense: LlamaForCausalLM, keep=None, vo=None, attn="eager"):
    """Build (a3_model, reference_dense_model) from ``dense``.

    keep[l]: LongTensor [h_kv, p] kept RoPE pairs per KV head (sorted) or None (all pairs, identity index).
    vo[l]: (T [h_kv, d_h, r_vo], Wo_new [h_q, r_vo, d]) or None (v/o unchanged).
    The reference is a plain LlamaForCausalLM: dropped q/k rows zeroed, reduced v/o zero-padded to d_h.
    """
    cfg = dense.config
    d, d_h = cfg.hidden_size, cfg.head_dim
    h_q, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = h_q // h_kv
    n_layers = cfg.num_hidden_layers
    keep = keep or [None] * n_layers
    vo = vo or [None] * n_layers
    r_qk = [d_h if k is None else 2 * k.shape[1] for k in keep]
    r_vo = [d_h if v is None else v[0].shape[2] for v in vo]

    a3_cfg = a3_config_from(
        cfg,
        attn=attn,
        qk_head_dim=r_qk[0],
        v_head_dim=r_vo[0],
        layer_qk_head_dims=r_qk if len(set(r_qk)) > 1 else None,
        layer_v_head_dims=r_vo if len(set(r_vo)) > 1 else None,
    )
    a3 = A3LlamaForCausalLM(a3_cfg).eval()
    ref = LlamaForCausalLM(dense_config_like(cfg, attn)).eval()

    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    ref_sd = {k: v.clone() for k, v in sd.items()}
    bias = cfg.attention_bias
    for li in range(n_layers):
        pre = f"model.layers.{li}.self_attn."
        kp = keep[li] if keep[li] is not None else torch.arange(d_h // 2).repeat(h_kv, 1)
        cols = pair_columns(kp, d_h)  # [h_kv, r]
        qcols = cols.repeat_interleave(g, dim=0)  # [h_q, r]
        for name, cols_h, n_h in (("q_proj", qcols, h_q), ("k_proj", cols, h_kv)):
            w = sd[pre + name + ".weight"].view(n_h, d_h, d)
            sd[pre + name + ".weight"] = torch.stack([w[h, cols_h[h]] for h in range(n_h)]).reshape(-1, d)
            zero_rows = torch.ones(n_h, d_h, dtype=torch.bool)
            for h in range(n_h):
                zero_rows[h, cols_h[h]] = False
            wr = ref_sd[pre + name + ".weight"].view(n_h, d_h, d).clone()
            wr[zero_rows] = 0.0
            ref_sd[pre + name + ".weight"] = wr.reshape(-1, d)
            if bias:
                b = sd[pre + name + ".bias"].view(n_h, d_h)
                sd[pre + name + ".bias"] = torch.stack([b[h, cols_h[h]] for h in range(n_h)]).reshape(-1)
                br = ref_sd[pre + name + ".bias"].view(n_h, d_h).clone()
                br[zero_rows] = 0.0
                ref_sd[pre + name + ".bias"] = br.reshape(-1)
        sd[pre + "rope_freq_index"] = kp.to(torch.int32)

        if vo[li] is not None:
            T, wo_new = vo[li]
            r = T.shape[2]
            wv = sd[pre + "v_proj.weight"].view(h_kv, d_h, d)
            wv_new = torch.einsum("jcr,jce->jre", T, wv)  # [h_kv, r, d]
            sd[pre + "v_proj.weight"] = wv_new.reshape(-1, d)
            ref_v = torch.zeros(h_kv, d_h, d)
            ref_v[:, :r] = wv_new
            ref_sd[pre + "v_proj.weight"] = ref_v.reshape(-1, d)
            if bias:
                bv_new = torch.einsum("jcr,jc->jr", T, sd[pre + "v_proj.bias"].view(h_kv, d_h))
                sd[pre + "v_proj.bias"] = bv_new.reshape(-1)
                ref_bv = torch.zeros(h_kv, d_h)
                ref_bv[:, :r] = bv_new
                ref_sd[pre + "v_proj.bias"] = ref_bv.reshape(-1)
            sd[pre + "o_proj.weight"] = wo_new.permute(2, 0, 1).reshape(d, h_q * r)
            ref_o = torch.zeros(d, h_q, d_h)
            ref_o[:, :, :r] = wo_new.permute(2, 0, 1)
            ref_sd[pre + "o_proj.weight"] = ref_o.reshape(d, h_q * d_h)

    a3.load_state_dict(sd, strict=True)
    ref.load_state_dict(ref_sd, strict=True)
    return a3, ref


def dense_config_like(cfg: LlamaConfig, attn: str) -> LlamaConfig:
    fields = cfg.to_diff_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return LlamaConfig(attn_implementation=attn, **fields)


def random_keep(h_kv, d_h, n_pairs, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d_h // 2, generator=g)[:n_pairs].sort().values for _ in range(h_kv)])


def random_vo(h_q, h_kv, d_h, d, r_vo, seed):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(h_kv, d_h, r_vo, generator=g) / d_h**0.5
    wo_new = 0.08 * torch.randn(h_q, r_vo, d, generator=g)
    return T, wo_new


# ------------------------------------------------------------------------------ 1. dense equivalence
EQUIV_CASES = [
    pytest.param({"rope": DEFAULT_ROPE, "kv_heads": 2}, id="gqa-default-rope"),
    pytest.param({"rope": LLAMA3_ROPE, "kv_heads": 2}, id="gqa-llama3-rope"),
    pytest.param({"rope": LLAMA3_ROPE, "kv_heads": 4}, id="mha-llama3-rope"),
    pytest.param({"rope": DEFAULT_ROPE, "kv_heads": 4, "attention_bias": True}, id="mha-attention-bias"),
    pytest.param({"rope": LLAMA3_ROPE, "kv_heads": 2, "tie": True}, id="gqa-tied-embeddings"),
]


@pytest.mark.parametrize("case", EQUIV_CASES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_rank_equals_dense_llama(case, attn):
    dense = make_dense(seed=1, attn=attn, **case)
    a3, _ = compress(dense, attn=attn)
    assert a3.config._attn_implementation == attn
    assert a3.config.qkv_bias == a3.config.o_bias == bool(case.get("attention_bias", False))
    if case.get("tie"):
        assert a3.lm_head.weight.data_ptr() == a3.model.embed_tokens.weight.data_ptr()
    ids, mask = batch(seed=1)
    assert_close_on_mask(logits(a3, ids, mask), logits(dense, ids, mask), mask)

    out_a3 = greedy(a3, ids, mask, use_cache=True)
    out_dense = greedy(dense, ids, mask, use_cache=True)
    assert out_a3.shape == (2, ids.shape[1] + 16)
    assert torch.equal(out_a3, out_dense)


def test_generate_without_cache_matches_cache():
    dense = make_dense(seed=2, rope=LLAMA3_ROPE, kv_heads=2)
    keep = [random_keep(2, 32, 6, seed=20 + li) for li in range(2)]
    vo = [random_vo(4, 2, 32, 128, 12, seed=30 + li) for li in range(2)]
    a3, ref = compress(dense, keep=keep, vo=vo)
    ids, mask = batch(seed=2)
    with_cache = greedy(a3, ids, mask, use_cache=True)
    assert torch.equal(with_cache, greedy(a3, ids, mask, use_cache=False))
    assert torch.equal(with_cache, greedy(ref, ids, mask, use_cache=True))


# --------------------------------------------------------------- 2. pair subsets and v/o reduction
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "kv_heads,attention_bias", [(2, False), (4, True)], ids=["gqa", "mha-attention-bias"]
)
def test_pair_subset_equals_zeroed_dense(attn, kv_heads, attention_bias):
    dense = make_dense(seed=3, rope=LLAMA3_ROPE, kv_heads=kv_heads, attention_bias=attention_bias, attn=attn)
    keep = [random_keep(kv_heads, 32, 5, seed=40 + li) for li in range(2)]
    assert any(not torch.equal(k[0], torch.arange(5)) for k in keep)  # really a non-prefix subset
    a3, ref = compress(dense, keep=keep, attn=attn)
    assert a3.model.layers[0].self_attn.q_proj.weight.shape == (4 * 10, 128)
    assert a3.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 10, 128)
    assert torch.equal(a3.model.layers[1].self_attn.rope_freq_index, keep[1].to(torch.int32))
    ids, mask = batch(seed=3)
    out = logits(a3, ids, mask)
    assert_close_on_mask(out, logits(ref, ids, mask), mask)
    # and it is a real change from the dense model (the test would be vacuous otherwise)
    assert (out - logits(dense, ids, mask)).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_vo_reduction_with_different_head_sizes(attn, kv_heads):
    dense = make_dense(seed=4, rope=LLAMA3_ROPE, kv_heads=kv_heads, attention_bias=True, attn=attn)
    keep = [random_keep(kv_heads, 32, 8, seed=50 + li) for li in range(2)]  # r_qk = 16
    vo = [random_vo(4, kv_heads, 32, 128, 12, seed=60 + li) for li in range(2)]  # r_vo = 12
    a3, ref = compress(dense, keep=keep, vo=vo, attn=attn)
    attn0 = a3.model.layers[0].self_attn
    assert (attn0.qk_head_dim, attn0.v_head_dim) == (16, 12)
    assert attn0.v_proj.weight.shape == (kv_heads * 12, 128)
    assert attn0.o_proj.weight.shape == (128, 4 * 12)
    ids, mask = batch(seed=4)
    assert_close_on_mask(logits(a3, ids, mask), logits(ref, ids, mask), mask)

    # KV cache: post-RoPE K with r_qk dims, V with r_vo dims
    with torch.no_grad():
        out = a3(input_ids=ids, attention_mask=mask, use_cache=True)
    layer0 = out.past_key_values.layers[0]
    assert layer0.keys.shape == (2, kv_heads, ids.shape[1], 16)
    assert layer0.values.shape == (2, kv_heads, ids.shape[1], 12)


def test_attention_matches_hand_written_reference():
    """One attention module against explicit per-head loops (no transformers attention code)."""
    cfg = a3_config_from(
        dense_config(rope=LLAMA3_ROPE, kv_heads=2, attention_bias=True), qk_head_dim=10, v_head_dim=6
    )
    model = A3LlamaModel(cfg).eval()
    randomize_(model, 7)
    att = model.layers[0].self_attn
    idx = random_keep(2, 32, 5, seed=70).to(torch.int32)
    att.rope_freq_index.copy_(idx)

    T = 9
    g = torch.Generator().manual_seed(71)
    x = torch.randn(1, T, 128, generator=g)
    pos = torch.arange(T)[None]
    cos, sin = model.rotary_emb(x, pos)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    additive_mask = torch.zeros(1, 1, T, T).masked_fill(causal, float("-inf"))
    with torch.no_grad():
        out, _ = att(x, position_embeddings=(cos, sin), attention_mask=additive_mask)

    inv_freq = model.rotary_emb.inv_freq  # [d_h/2], llama3-scaled
    q = att.q_proj(x)[0].view(T, 4, 10)
    k = att.k_proj(x)[0].view(T, 2, 10)
    v = att.v_proj(x)[0].view(T, 2, 6)

    def rope(vec, freqs, t):  # vec [r] in [firsts, seconds] layout, freqs [r/2]
        a, b = vec[:5], vec[5:]
        c, s = torch.cos(t * freqs), torch.sin(t * freqs)
        return torch.cat([a * c - b * s, b * c + a * s])

    heads = []
    with torch.no_grad():
        for i in range(4):
            j = i // 2
            freqs = inv_freq[idx[j].long()]
            qi = torch.stack([rope(q[t, i], freqs, t) for t in range(T)])
            kj = torch.stack([rope(k[t, j], freqs, t) for t in range(T)])
            scores = qi @ kj.T / 32**0.5  # ORIGINAL head size in the scale
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, j])
        expected = att.o_proj(torch.cat(heads, dim=-1))
    assert (out[0] - expected).abs().max() <= ATOL


# ------------------------------------------------------------------------------- 3. per-layer dims
def test_per_layer_dims_shapes_and_run():
    cfg = a3_config_from(
        dense_config(rope=LLAMA3_ROPE, kv_heads=2),
        qk_head_dim=16,
        v_head_dim=16,
        intermediate_size=80,
        layer_qk_head_dims=[32, 12],
        layer_v_head_dims=[8, 24],
        layer_intermediate_sizes=[64, 96],
    )
    assert [cfg.layer_dims(i) for i in range(2)] == [(32, 8, 64), (12, 24, 96)]
    model = A3LlamaForCausalLM(cfg).eval()
    randomize_(model, 8)
    for li, (r_qk, r_vo, r_int) in enumerate([(32, 8, 64), (12, 24, 96)]):
        layer = model.model.layers[li]
        a = layer.self_attn
        assert a.q_proj.weight.shape == (4 * r_qk, 128)
        assert a.k_proj.weight.shape == (2 * r_qk, 128)
        assert a.v_proj.weight.shape == (2 * r_vo, 128)
        assert a.o_proj.weight.shape == (128, 4 * r_vo)
        assert a.rope_freq_index.shape == (2, r_qk // 2) and a.rope_freq_index.dtype == torch.int32
        assert torch.equal(a.rope_freq_index[1], torch.arange(r_qk // 2, dtype=torch.int32))
        assert layer.mlp.gate_proj.weight.shape == (r_int, 128)
        assert layer.mlp.up_proj.weight.shape == (r_int, 128)
        assert layer.mlp.down_proj.weight.shape == (128, r_int)
    ids, mask = batch(seed=8)
    eager = logits(model, ids, mask)
    assert torch.isfinite(eager[mask.bool()]).all()
    model.set_attn_implementation("sdpa")
    assert_close_on_mask(logits(model, ids, mask), eager, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.layers[1].keys.shape[-1] == 12
    assert out.past_key_values.layers[1].values.shape[-1] == 24
    assert torch.equal(greedy(model, ids, mask, n=6), greedy(model, ids, mask, use_cache=False, n=6))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"qk_head_dim": 15}, "even"),
        ({"qk_head_dim": 34}, "even and in"),
        ({"qk_head_dim": 0}, "even and in"),
        ({"v_head_dim": 0}, "positive"),
        ({"layer_qk_head_dims": [16]}, "one per layer"),
        ({"layer_v_head_dims": [8, 8, 8]}, "one per layer"),
        ({"layer_intermediate_sizes": [64]}, "one per layer"),
        ({"layer_qk_head_dims": [16, 7]}, r"layer 1"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(Exception, match=match):
        a3_config_from(dense_config(), **overrides)


def test_config_defaults_and_biases():
    cfg = A3LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32)
    assert cfg.head_dim == 16 and cfg.qk_head_dim == 16 and cfg.v_head_dim == 16
    assert cfg.qkv_bias is False and cfg.o_bias is False
    assert cfg.layer_dims(0) == (16, 16, 32)
    cfg = A3LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, attention_bias=True)
    assert cfg.qkv_bias is True and cfg.o_bias is True
    # Qwen2-style: bias on q/k/v only
    cfg = A3LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, qkv_bias=True, o_bias=False)
    model = A3LlamaModel(cfg)
    a = model.layers[0].self_attn
    assert a.q_proj.bias is not None and a.k_proj.bias is not None and a.v_proj.bias is not None
    assert a.o_proj.bias is None
    assert abs(a.scaling - 16**-0.5) < 1e-12


def test_qwen2_style_source_fields_do_not_make_sliding_layers():
    # Qwen2 configs keep `sliding_window` set while `use_sliding_window` is false; A3 layers are all full attention.
    cfg = A3LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
        intermediate_size=32, qk_head_dim=8, v_head_dim=4, qkv_bias=True, o_bias=False,
        sliding_window=4, use_sliding_window=False, max_window_layers=0,
    )
    assert cfg.layer_types == ["full_attention", "full_attention"] and cfg.sliding_window == 4
    model = A3LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert [type(layer).__name__ for layer in out.past_key_values.layers] == ["DynamicLayer", "DynamicLayer"]
    assert out.past_key_values.layers[0].keys.shape[-2] == 9  # nothing dropped beyond the "window" of 4
    with pytest.raises(Exception, match="full attention"):
        A3LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                      layer_types=["full_attention", "sliding_attention"])


# ------------------------------------------------------------------------------- 4. save / load
def _compressed_model(seed=9, tie=True):
    dense = make_dense(seed=seed, rope=LLAMA3_ROPE, kv_heads=2, tie=tie, attention_bias=False)
    keep = [random_keep(2, 32, 6, seed=90 + li) for li in range(2)]
    vo = [random_vo(4, 2, 32, 128, 8, seed=95 + li) for li in range(2)]
    a3, _ = compress(dense, keep=keep, vo=vo)
    a3.config.a3 = {"format_version": 1, "source_model": "tiny-random", "target_cr": 0.5}
    a3.config.source_only_field = "kept"  # an arbitrary extra source field must survive
    return a3


def _export_like(model, path: Path, auto_map=True):
    """What the exporter does: save_pretrained + the two source files + auto_map."""
    model.save_pretrained(path)
    for f in modeling_source_files():
        shutil.copy(f, path / f.name)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if auto_map:
        cfg["auto_map"] = dict(AUTO_MAP)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def test_save_pretrained_round_trip(tmp_path):
    model = _compressed_model()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "a3_llama"
    assert raw["architectures"] == ["A3LlamaForCausalLM"]
    assert raw["head_dim"] == 32 and raw["qk_head_dim"] == 12 and raw["v_head_dim"] == 8
    assert raw["rope_parameters"]["rope_type"] == "llama3"
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.self_attn.rope_freq_index"].dtype == torch.int32
    assert tensors["model.layers.1.self_attn.rope_freq_index"].shape == (2, 6)
    assert "lm_head.weight" not in tensors  # tied

    loaded = A3LlamaForCausalLM.from_pretrained(tmp_path).eval()
    c0, c1 = model.config, loaded.config
    for field in (
        "qk_head_dim", "v_head_dim", "head_dim", "intermediate_size", "rope_parameters", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "qkv_bias", "o_bias", "a3", "layer_qk_head_dims", "max_position_embeddings",
    ):
        assert getattr(c1, field) == getattr(c0, field), field
    assert c1.source_only_field == "kept"
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    ids, mask = batch(seed=9)
    assert_close_on_mask(logits(loaded, ids, mask), logits(model, ids, mask), mask)  # sdpa (loaded) vs eager

    # a lower-precision load keeps the index an integer tensor
    half = A3LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.rope_freq_index.dtype == torch.int32
    assert torch.equal(half.model.layers[0].self_attn.rope_freq_index, sd0["model.layers.0.self_attn.rope_freq_index"])


_ISOLATED_SCRIPT = textwrap.dedent(
    """
    import importlib.util
    result = {"a3_serve_importable": importlib.util.find_spec("a3_serve") is not None}
    try:
        import a3_serve  # noqa: F401
        result["a3_serve_import"] = "ok"
    except ImportError as err:
        result["a3_serve_import"] = type(err).__name__
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    def refusal(call):
        try:
            call()
        except Exception as err:  # noqa: BLE001
            return type(err).__name__ + ": " + str(err)
        return None

    # plain transformers, no trust_remote_code: both folders are refused
    result["refuse_auto_map"] = refusal(lambda: AutoModelForCausalLM.from_pretrained(WITH_AUTO_MAP))
    result["refuse_config_auto_map"] = refusal(lambda: AutoConfig.from_pretrained(WITH_AUTO_MAP))
    result["refuse_no_auto_map"] = refusal(lambda: AutoModelForCausalLM.from_pretrained(NO_AUTO_MAP))
    # and the dense class does not silently mis-load the reduced shapes
    result["refuse_llama_class"] = refusal(lambda: LlamaForCausalLM.from_pretrained(NO_AUTO_MAP))

    model = AutoModelForCausalLM.from_pretrained(WITH_AUTO_MAP, trust_remote_code=True).eval()
    result["class"] = type(model).__module__ + "." + type(model).__name__
    result["a3_serve_in_modules"] = any(m == "a3_serve" or m.startswith("a3_serve.") for m in sys.modules)
    ids, mask = torch.load(BATCH)
    with torch.no_grad():
        torch.save(model(input_ids=ids, attention_mask=mask).logits, OUT)
    result["generate"] = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
    ).tolist()
    print("RESULT=" + __import__("json").dumps(result))
    """
)


def test_trust_remote_code_without_a3_serve(tmp_path):
    model = _compressed_model(seed=10)
    with_map = _export_like(model, tmp_path / "ckpt")
    no_map = _export_like(model, tmp_path / "ckpt_no_auto_map", auto_map=False)
    ids, mask = batch(seed=10)
    torch.save((ids, mask), tmp_path / "batch.pt")
    script = (
        f"WITH_AUTO_MAP = {str(with_map)!r}\nNO_AUTO_MAP = {str(no_map)!r}\n"
        f"BATCH = {str(tmp_path / 'batch.pt')!r}\nOUT = {str(tmp_path / 'logits.pt')!r}\n" + _ISOLATED_SCRIPT
    )
    proc = run_without_a3_serve(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # (the refused loads print transformers' "[y/N]" prompt without a newline, so search, not startswith)
    line = next((ln for ln in proc.stdout.splitlines() if "RESULT=" in ln), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(line.split("RESULT=", 1)[1])

    assert result["a3_serve_importable"] is False
    assert result["a3_serve_import"] in ("ModuleNotFoundError", "ImportError")
    assert result["a3_serve_in_modules"] is False
    # refusals: custom code needs trust_remote_code; without auto_map the model type is unknown
    for key in ("refuse_auto_map", "refuse_config_auto_map"):
        assert result[key] is not None and "trust_remote_code" in result[key], result[key]
    assert result["refuse_no_auto_map"] is not None and "a3_llama" in result["refuse_no_auto_map"]
    assert result["refuse_llama_class"] is not None and "mismatched" in result["refuse_llama_class"]
    # the remote-code class, from the copied file in the checkpoint
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(
        "modeling_a3_llama.A3LlamaForCausalLM"
    )
    remote_logits = torch.load(tmp_path / "logits.pt")
    assert_close_on_mask(remote_logits, logits(model, ids, mask), mask)
    assert result["generate"] == greedy(model, ids, mask, n=4).tolist()


# ------------------------------------------------------------------- 5. bad rope_freq_index at load
def _rewrite_tensors(path: Path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_missing_rope_freq_index_fails(tmp_path, loader):
    _compressed_model(seed=11).save_pretrained(tmp_path)
    _rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.self_attn.rope_freq_index"))
    load = A3LlamaForCausalLM.from_pretrained if loader == "class" else AutoModelForCausalLM.from_pretrained
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.rope_freq_index` is missing"):
        load(tmp_path)


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_misshaped_rope_freq_index_fails(tmp_path, ignore_mismatched_sizes):
    _compressed_model(seed=12).save_pretrained(tmp_path)

    def edit(t):
        key = "model.layers.0.self_attn.rope_freq_index"
        t[key] = t[key][:, :-1].contiguous()

    _rewrite_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.rope_freq_index` has the wrong shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore_mismatched_sizes)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x: x.fill_(16), r"outside \[0, head_dim/2 = 16\)"),
        (lambda x: x.fill_(-1), "outside"),
        (lambda x: x.fill_(3), "not strictly ascending"),
    ],
    ids=["too-large", "negative", "repeated"],
)
def test_invalid_rope_freq_index_values_fail(tmp_path, bad, match):
    _compressed_model(seed=13).save_pretrained(tmp_path)

    def edit(t):
        key = "model.layers.1.self_attn.rope_freq_index"
        t[key] = bad(t[key].clone())

    _rewrite_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        A3LlamaForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------- 6. registered Auto classes (a3_serve imported)
@pytest.mark.parametrize("auto_map", [True, False], ids=["with-auto-map", "without-auto-map"])
def test_auto_model_after_import_a3_serve(tmp_path, auto_map):
    model = _compressed_model(seed=14)
    path = _export_like(model, tmp_path / "ckpt", auto_map=auto_map)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()  # no trust_remote_code
    assert type(loaded) is A3LlamaForCausalLM
    ids, mask = batch(seed=14)
    assert_close_on_mask(logits(loaded, ids, mask), logits(model, ids, mask), mask)
