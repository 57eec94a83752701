"""vLLM model class for A3-compressed Llama-family checkpoints.

Built from vLLM's own Llama by injection: ``A3LlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with
``layer_type=A3LlamaDecoderLayer``, which is vLLM's ``LlamaDecoderLayer`` with a per-layer config view (the
layer's reduced MLP width) and ``attn_layer_type=A3LlamaAttention``. Only the attention differs from Llama:

- q/k heads have ``r_qk`` dims and v/o heads ``r_vo`` dims (``QKVParallelLinear(..., v_head_size=r_vo)``);
- vLLM's ``Attention`` gets the reduced head size, so the paged KV cache is sized for ``r_qk``/``r_vo``;
- the softmax scale stays ``head_dim ** -0.5`` of the ORIGINAL head size;
- RoPE uses the rotary table of the ORIGINAL head size (vLLM's ``get_rope``: llama3 scaling included) and
  gathers each head's kept frequencies with one precomputed index (``rope_freq_index`` of the checkpoint,
  sharded for tensor parallelism like the k/v heads).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionType

from a3_serve.errors import A3Error
from a3_serve.modeling.configuration_a3_llama import layer_dims, original_head_dim
from a3_serve.modeling.modeling_a3_llama import (
    ROPE_INDEX_NAME,
    default_rope_freq_index,
    rope_digest_problem,
    rope_index_problem,
)

from .rope import apply_rope_gathered, extended_table, kv_shard_rows, q_head_kv_rows, rope_gather_index

# Head sizes vLLM's CPU attention kernel runs (PLATFORM.md: multiples of 16 from 32 to 256; 40/56 crash).
CPU_HEAD_SIZES = tuple(range(32, 257, 16)) + (512,)


class A3CheckpointError(A3Error, ValueError):
    """The checkpoint cannot be served as it is (bad ``rope_freq_index``, head size the backend cannot run)."""


def check_backend_head_sizes(r_qk: int, r_vo: int, layer_idx: int, platform=None) -> None:
    """Fail at load, with the fix, for head sizes the attention backend of this platform cannot run."""
    platform = platform or current_platform
    if platform.is_cpu():
        if r_qk != r_vo:
            raise A3CheckpointError(
                f"layer {layer_idx} has K head size {r_qk} but V head size {r_vo}; vLLM's CPU attention needs equal K "
                "and V head sizes. Re-export with equal QK and VO dims (a3-export --components qk,ov,mlp with the "
                "default budget gives equal sizes) or serve on a GPU (FLASH_ATTN_DIFFKV / TRITON_ATTN_DIFFKV backends)."
            )
        if r_qk not in CPU_HEAD_SIZES:
            raise A3CheckpointError(
                f"layer {layer_idx} has head size {r_qk}, which vLLM's CPU attention cannot run (it needs a multiple "
                "of 16 from 32 to 256). Re-export the checkpoint with `a3-export ... --head-multiple 16`."
            )
    elif r_qk % 8 or r_vo % 8:
        raise A3CheckpointError(
            f"layer {layer_idx} has head sizes qk={r_qk}, v={r_vo}; GPU attention backends need multiples of 8. "
            "Re-export the checkpoint with `a3-export ... --head-multiple 8` (or 16)."
        )


class _RopeTable(nn.Module):
    """``[max_pos, 3d/2]`` rows ``[cos | sin | -sin]`` of the ORIGINAL head size, one per rotary embedding, shared
    by every layer (like vLLM shares its rotary module)."""

    _shared: dict = {}

    def __init__(self, rotary_emb: nn.Module):
        super().__init__()
        self.register_buffer("table", extended_table(rotary_emb.cos_sin_cache), persistent=False)

    @classmethod
    def for_rotary(cls, rotary_emb: nn.Module) -> "_RopeTable":
        key = id(rotary_emb)
        entry = cls._shared.get(key)
        if entry is None or entry[0] is not rotary_emb:
            entry = cls._shared[key] = (rotary_emb, cls(rotary_emb))
        return entry[1]


class _LayerConfig:
    """Read-only view of the model config with one layer's overrides (vLLM's Llama layer reads
    ``config.intermediate_size``; A3 layers may each have their own)."""

    def __init__(self, config, **overrides):
        self.__dict__["_config"] = config
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_config"], name)


class A3LlamaAttention(nn.Module):
    """Drop-in ``attn_layer_type`` for vLLM's ``LlamaDecoderLayer`` (same constructor signature as
    ``LlamaAttention``) with reduced q/k and v/o head sizes and per-KV-head RoPE frequencies."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        self.layer_idx = extract_layer_index(prefix)
        self.prefix = prefix
        r_qk, r_vo, _ = layer_dims(config, self.layer_idx)
        check_backend_head_sizes(r_qk, r_vo, self.layer_idx)
        self.hidden_size = hidden_size
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.kv_rows = kv_shard_rows(num_kv_heads, self.tp_rank, self.tp_size)
        self.q_kv_rows = q_head_kv_rows(num_heads, num_kv_heads, self.tp_rank, self.tp_size)
        self.num_heads = num_heads // self.tp_size
        self.num_kv_heads = len(self.kv_rows)

        self.head_dim = original_head_dim(config)  # ORIGINAL d_h: RoPE table and softmax scale
        self.qk_head_dim, self.v_head_dim = r_qk, r_vo
        self.q_size = self.num_heads * r_qk
        self.k_size = self.num_kv_heads * r_qk
        self.v_size = self.num_kv_heads * r_vo
        self.scaling = self.head_dim**-0.5
        qkv_bias = bool(getattr(config, "qkv_bias", bias))
        o_bias = bool(getattr(config, "o_bias", bias_o_proj))

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=r_qk,
            total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads,
            bias=qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            v_head_size=r_vo,
        )
        self.o_proj = RowParallelLinear(
            input_size=num_heads * r_vo,
            output_size=hidden_size,
            bias=o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        # The rotary table of the ORIGINAL head size; get_rope caches it, so all layers share one table.
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=max_position_embeddings,
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        # This rank's rows of the checkpoint's rope_freq_index (loaded by vLLM's loader through weight_loader).
        self.register_buffer(ROPE_INDEX_NAME, default_rope_freq_index(self.num_kv_heads, r_qk), persistent=True)
        self.rope_freq_index.weight_loader = self._load_rope_freq_index
        self.rope_index_loaded = False
        self.rope_table = _RopeTable.for_rotary(self.rotary_emb)
        # Precomputed gather index into a rope_table row for the local q heads then the local k heads.
        self.register_buffer("rope_gather", torch.empty(0, dtype=torch.long), persistent=False)
        self._build_rope_gather()

        self.attn = Attention(
            self.num_heads,
            r_qk,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
            head_size_v=None if r_vo == r_qk else r_vo,
        )

    def _build_rope_gather(self) -> None:
        idx = self.rope_freq_index.detach().to("cpu")
        rows = list(self.q_kv_rows) + list(range(self.num_kv_heads))
        self.rope_gather = rope_gather_index(idx, rows, self.head_dim).to(self.rope_freq_index.device)

    def _load_rope_freq_index(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        name = f"{self.prefix}.{ROPE_INDEX_NAME}"
        problem = rope_index_problem(loaded, (self.total_num_kv_heads, self.qk_head_dim // 2), self.head_dim)
        if problem is not None:
            raise A3CheckpointError(
                f"A3 checkpoint tensor `{name}` {problem}; it must match config.json (qk_head_dim="
                f"{self.qk_head_dim}, num_key_value_heads={self.total_num_kv_heads}, head_dim={self.head_dim}). "
                "Re-export the checkpoint with a3-export."
            )
        rows = loaded[torch.as_tensor(self.kv_rows, dtype=torch.long)].to(torch.int32)
        param.data.copy_(rows.to(param.device))
        self._build_rope_gather()
        self.rope_index_loaded = True
        self.rope_index_full = loaded.detach().to("cpu", torch.int32).clone()  # all KV heads, for the digest check

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        qk, v = qkv.split([self.q_size + self.k_size, self.v_size], dim=-1)
        rows = self.rope_table.table.index_select(0, positions.flatten())
        if rows.dtype != qk.dtype:
            rows = rows.to(qk.dtype)
        qk = apply_rope_gathered(qk, rows, self.rope_gather, self.qk_head_dim)
        q = qk[:, : self.num_heads].reshape(qk.shape[0], self.q_size)
        k = qk[:, self.num_heads:].reshape(qk.shape[0], self.k_size)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, qk_head_dim={self.qk_head_dim}, "
                f"v_head_dim={self.v_head_dim}, head_dim(original)={self.head_dim}")


class A3LlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with the layer's reduced MLP width and the A3 attention."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, attn_layer_type=A3LlamaAttention):
        config = config or vllm_config.model_config.hf_config
        _, _, r_int = layer_dims(config, extract_layer_index(prefix))
        super().__init__(vllm_config, prefix=prefix, config=_LayerConfig(config, intermediate_size=r_int),
                         attn_layer_type=attn_layer_type)


class A3LlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` with A3 decoder layers; checks that every ``rope_freq_index`` was loaded."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = A3LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        missing = [m.prefix for m in self.modules() if isinstance(m, A3LlamaAttention) and not m.rope_index_loaded]
        if missing:
            raise A3CheckpointError(
                f"A3 checkpoint tensor `{missing[0]}.{ROPE_INDEX_NAME}` is missing ({len(missing)} layer(s) affected): "
                f"every layer needs an int tensor `model.layers.N.self_attn.{ROPE_INDEX_NAME}` of shape "
                "[num_key_value_heads, qk_head_dim // 2]. Re-export the checkpoint with a3-export."
            )
        attns = [m for m in self.modules() if isinstance(m, A3LlamaAttention)]
        problem = rope_digest_problem(self.config, [m.rope_index_full for m in attns])
        for m in attns:
            del m.rope_index_full
        if problem is not None:
            raise A3CheckpointError(f"A3 checkpoint: {problem}.")
        return loaded
