"""Per-KV-head RoPE for reduced heads, and the tensor-parallel sharding of ``rope_freq_index``.

Pure torch (no vLLM import) so the math and the sharding rules are unit-testable on their own.

Layout (DESIGN.md, "Config of a compressed checkpoint"): in a reduced head of size ``r``, dims ``[0, r/2)``
are the kept rotate_half "first" dims and ``[r/2, r)`` their partners (vLLM's neox layout on the reduced
head); ``rope_freq_index[j, p]`` is the ORIGINAL frequency index of pair ``p`` of KV head ``j``. Query head
``i`` uses KV row ``i // g``. cos/sin come from the rotary table of the ORIGINAL head size (llama3 scaling
included), whose rows are ``[cos(t*f_0..f_{d/2-1}) | sin(t*f_0..f_{d/2-1})]`` (vLLM's ``cos_sin_cache``).
"""

from __future__ import annotations

import torch


def kv_shard_rows(total_num_kv_heads: int, tp_rank: int, tp_size: int) -> list[int]:
    """Global KV heads held by ``tp_rank``, exactly as vLLM's ``QKVParallelLinear`` shards k/v.

    KV heads >= TP: each rank holds ``total/tp`` consecutive heads. KV heads < TP: heads are replicated,
    rank ``r`` holds head ``r // (tp / total)``.
    """
    if total_num_kv_heads >= tp_size:
        if total_num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads ({total_num_kv_heads}) is not divisible by TP size {tp_size}")
        n = total_num_kv_heads // tp_size
        return list(range(tp_rank * n, (tp_rank + 1) * n))
    if tp_size % total_num_kv_heads:
        raise ValueError(f"TP size {tp_size} is not a multiple of num_key_value_heads ({total_num_kv_heads})")
    replicas = tp_size // total_num_kv_heads
    return [tp_rank // replicas]


def q_head_kv_rows(total_num_heads: int, total_num_kv_heads: int, tp_rank: int, tp_size: int) -> list[int]:
    """For each LOCAL query head of ``tp_rank``, the index of its KV head among the rank's LOCAL KV heads."""
    if total_num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({total_num_heads}) is not divisible by TP size {tp_size}")
    g = total_num_heads // total_num_kv_heads
    n_q = total_num_heads // tp_size
    kv_rows = kv_shard_rows(total_num_kv_heads, tp_rank, tp_size)
    out = []
    for i in range(tp_rank * n_q, (tp_rank + 1) * n_q):
        kv = i // g
        if kv not in kv_rows:  # cannot happen for the sharding above; guards against a changed rule
            raise AssertionError(f"query head {i} on rank {tp_rank} needs KV head {kv}, rank holds {kv_rows}")
        out.append(kv_rows.index(kv))
    return out


def extended_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """``[P, d]`` rows ``[cos | sin]`` (vLLM's ``cos_sin_cache``) -> ``[P, 3d/2]`` rows ``[cos | sin | -sin]``, so that
    one column gather yields both signs the rotation needs. Built once per model (shared by all layers)."""
    half = cos_sin_cache.shape[-1] // 2
    return torch.cat((cos_sin_cache, -cos_sin_cache[..., half:]), dim=-1)


def rope_gather_index(local_index: torch.Tensor, head_rows: list[int], head_dim: int) -> torch.Tensor:
    """Flat column index into an :func:`extended_table` row giving ``[cos2, sin2] x heads x r`` (long ``[2*H*r]``).

    ``local_index``: int ``[n_kv_local, r/2]`` (this rank's rows of ``rope_freq_index``); ``head_rows``: for each
    head to rotate (e.g. the local query heads, then the local KV heads), its row in ``local_index``. For a head
    with kept frequencies ``f``: ``cos2 = [cos f, cos f]`` and ``sin2 = [-sin f, sin f]``, so that
    ``x * cos2 + swap_halves(x) * sin2`` is the rotate_half rotation of the reduced head.
    """
    idx = local_index.to(torch.long)[torch.as_tensor(head_rows, dtype=torch.long)]  # [H, r/2]
    half = head_dim // 2
    cos2 = torch.cat((idx, idx), dim=-1)
    sin2 = torch.cat((idx + 2 * half, idx + half), dim=-1)  # -sin (columns [d, 3d/2)) then sin ([d/2, d))
    return torch.cat((cos2.reshape(-1), sin2.reshape(-1)))


def apply_rope_gathered(x: torch.Tensor, table_rows: torch.Tensor, gather: torch.Tensor,
                        head_size: int) -> torch.Tensor:
    """Rotate ``x`` ``[T, H * r]`` (H heads of size r, e.g. q and k heads side by side) with per-head frequencies.

    ``table_rows``: ``[T, 3d/2]`` rows of :func:`extended_table` at the token positions; ``gather`` from
    :func:`rope_gather_index`. Returns ``[T, H, r]``. One gather, one flip and one multiply-add: no Python loop
    over heads, nothing recomputed but what depends on the positions.
    """
    t = x.shape[0]
    x = x.view(t, -1, head_size)
    g = table_rows.index_select(1, gather).view(t, 2, x.shape[1], head_size)
    swapped = x.view(t, x.shape[1], 2, head_size // 2).flip(2).view_as(x)
    return torch.addcmul(x * g[:, 0], swapped, g[:, 1])


