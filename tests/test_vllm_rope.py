"""Unit tests of the vLLM plugin's RoPE gather and tensor-parallel sharding (pure torch, no engine).

Sharding is checked against vLLM's rules (QKVParallelLinear: KV heads split when h_kv >= TP, replicated
rank // (TP / h_kv) otherwise; the attention kernel pairs local query head j with local KV head
j // (h_q_local / h_kv_local)) by simulating every rank and comparing with the unsharded rotation.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from a3_serve.modeling.modeling_a3_llama import gather_rope, rope_digest, rope_index_problem
from a3_serve.vllm_plugin.rope import (
    apply_rope_gathered,
    extended_table,
    kv_shard_rows,
    q_head_kv_rows,
    rope_gather_index,
)


def _table(d_h: int, n_pos: int, theta: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h)
    f = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat((f.cos(), f.sin()), dim=-1)  # vLLM cos_sin_cache layout [pos, cos(d/2) | sin(d/2)]


def _rotate(q, k, table_rows, idx, q_rows, r, d_h):
    """What the plugin's attention does: q and k heads side by side, one gather, one multiply-add."""
    T = q.shape[0]
    n_q = q.shape[1] // r
    rows = list(q_rows) + list(range(idx.shape[0]))
    out = apply_rope_gathered(torch.cat((q, k), dim=-1), table_rows, rope_gather_index(idx, rows, d_h), r)
    return out[:, :n_q].reshape(T, -1), out[:, n_q:].reshape(T, -1)


def _random_index(h_kv: int, r: int, d_h: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d_h // 2, generator=g)[: r // 2].sort().values for _ in range(h_kv)]).int()


@pytest.mark.parametrize("h_q, h_kv", [(4, 4), (8, 2), (9, 3), (4, 1)])
def test_reduced_rope_matches_transformers_reference(h_q, h_kv):
    d_h, r, T = 64, 48, 7
    idx = _random_index(h_kv, r, d_h)
    table = _table(d_h, 32)
    pos = torch.tensor([0, 3, 4, 9, 17, 30, 31])
    q = torch.randn(T, h_q * r, dtype=torch.float64)
    k = torch.randn(T, h_kv * r, dtype=torch.float64)
    rows = q_head_kv_rows(h_q, h_kv, 0, 1)
    cs = table.index_select(0, pos)
    q_v, k_v = _rotate(q, k, extended_table(table).index_select(0, pos), idx, rows, r, d_h)
    # the reference: HF tables [B, T, d_h] (cos|cos, sin|sin) and gather_rope + rotate_half
    cos_hf = torch.cat((cs[:, : d_h // 2],) * 2, dim=-1)[None]
    sin_hf = torch.cat((cs[:, d_h // 2:],) * 2, dim=-1)[None]
    cq, sq, ck, sk = gather_rope(cos_hf, sin_hf, idx, h_q // h_kv)
    qh = q.view(1, T, h_q, r).transpose(1, 2)
    kh = k.view(1, T, h_kv, r).transpose(1, 2)
    q_ref = (qh * cq + rotate_half(qh) * sq).transpose(1, 2).reshape(T, -1)
    k_ref = (kh * ck + rotate_half(kh) * sk).transpose(1, 2).reshape(T, -1)
    torch.testing.assert_close(q_v, q_ref)
    torch.testing.assert_close(k_v, k_ref)


@pytest.mark.parametrize("h_q, h_kv, tp", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 2, 8), (9, 3, 3), (4, 1, 2), (4, 1, 4),
                                           (32, 8, 2), (32, 8, 16)])
def test_tensor_parallel_sharding_reproduces_unsharded(h_q, h_kv, tp):
    d_h, r, T = 64, 32, 5
    idx = _random_index(h_kv, r, d_h, seed=tp)
    cs = extended_table(_table(d_h, 16)).index_select(0, torch.tensor([1, 2, 5, 8, 15]))
    q = torch.randn(T, h_q, r, dtype=torch.float64)
    k = torch.randn(T, h_kv, r, dtype=torch.float64)
    q_full, k_full = _rotate(q.reshape(T, -1), k.reshape(T, -1), cs, idx, q_head_kv_rows(h_q, h_kv, 0, 1), r, d_h)
    q_full, k_full = q_full.view(T, h_q, r), k_full.view(T, h_kv, r)
    n_q = h_q // tp
    for rank in range(tp):
        kv_rows = kv_shard_rows(h_kv, rank, tp)
        # vLLM's QKVParallelLinear: split when h_kv >= tp, else replicate (rank // replicas)
        if h_kv >= tp:
            assert kv_rows == list(range(rank * h_kv // tp, (rank + 1) * h_kv // tp))
        else:
            assert kv_rows == [rank // (tp // h_kv)]
        local_idx = idx[kv_rows]  # what the plugin's weight loader keeps on this rank
        q_rows = q_head_kv_rows(h_q, h_kv, rank, tp)
        # the attention kernel pairs local query head j with local KV head j // (n_q / n_kv)
        assert q_rows == [j // (n_q // len(kv_rows)) for j in range(n_q)]
        q_local = q[:, rank * n_q:(rank + 1) * n_q].reshape(T, -1)
        k_local = k[:, kv_rows].reshape(T, -1)
        q_out, k_out = _rotate(q_local, k_local, cs, local_idx, q_rows, r, d_h)
        q_out, k_out = q_out.view(T, n_q, r), k_out.view(T, -1, r)
        torch.testing.assert_close(q_out, q_full[:, rank * n_q:(rank + 1) * n_q])
        torch.testing.assert_close(k_out, k_full[:, kv_rows])


def test_sharding_refuses_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        kv_shard_rows(6, 0, 4)
    with pytest.raises(ValueError, match="multiple"):
        kv_shard_rows(3, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        q_head_kv_rows(9, 3, 0, 2)


def test_rope_index_validation_messages():
    """The contract's validation (owned by the modeling file, used by transformers and the vLLM plugin)."""
    good = _random_index(3, 48, 64)  # each row ascending, as the exporter writes it
    assert rope_index_problem(good, (3, 24), 64) is None
    assert "has shape [3, 23], expected [3, 24]" in rope_index_problem(good[:, :-1], (3, 24), 64)
    assert "dtype" in rope_index_problem(good.float(), (3, 24), 64)
    bad = good.clone()
    bad[0, -1] = 32
    assert "outside [0, head_dim/2 = 32)" in rope_index_problem(bad, (3, 24), 64)
    bad = good.clone()
    bad[1, 1] = bad[1, 0]
    assert "not strictly ascending" in rope_index_problem(bad, (3, 24), 64)
    bad = good.clone()
    bad[2, [0, 1]] = bad[2, [1, 0]]  # a reordered row
    assert "not strictly ascending" in rope_index_problem(bad, (3, 24), 64)


def test_rope_digest_covers_head_dim_and_every_row():
    idx = [_random_index(3, 48, 64, seed=s) for s in range(2)]
    ref = rope_digest(64, idx)
    assert rope_digest(64, [t.clone() for t in idx]) == ref
    assert rope_digest(64, [t.to(torch.int64) for t in idx]) == ref  # dtype-independent
    assert rope_digest(80, idx) != ref  # an edited head_dim
    swapped = [idx[0][[1, 0, 2]], idx[1]]  # two KV heads' rows exchanged: each row still valid
    assert rope_index_problem(swapped[0], (3, 24), 64) is None and rope_digest(64, swapped) != ref
    assert rope_digest(64, idx[::-1]) != ref  # layers exchanged
