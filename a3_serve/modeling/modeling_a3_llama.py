"""Transformers model for A3-compressed Llama-family checkpoints (``model_type: a3_llama``).

This file is copied verbatim into every exported checkpoint and loaded by transformers' dynamic-module
machinery (``trust_remote_code=True``) where a3-serve is not installed: it imports only torch, transformers
and ``configuration_a3_llama`` beside it.

Differences from ``LlamaForCausalLM`` (a3-serve's docs/METHOD.md §2.7 and §9):
- per layer i, q/k heads have ``r_qk`` dims, v/o heads ``r_vo`` dims and the MLP ``r_int`` neurons
  (``config.layer_dims(i)``);
- each attention module holds ``rope_freq_index`` (int32 ``[h_kv, r_qk // 2]``): the ORIGINAL RoPE frequency
  index kept by each KV head. The model-level rotary embedding is computed for the original ``head_dim`` and
  each attention gathers its kept frequencies (HF rotate_half layout: reduced dims ``[0, r/2)`` are the kept
  "first" dims and ``[r/2, r)`` their partners); query head ``i`` uses row ``i // g``;
- the softmax scale stays ``head_dim ** -0.5`` of the ORIGINAL head size;
- separate ``qkv_bias`` / ``o_bias``.

It also owns the checkpoint contract that the exporter and the vLLM plugin import: the index tensor's name
(:data:`ROPE_INDEX_NAME`), its default, its validation (:func:`rope_index_problem`) and the digest that ties it
and ``head_dim`` to the export (:func:`rope_digest`); per-layer sizes come from ``A3LlamaConfig.layer_dims``.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    repeat_kv,
    rotate_half,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_a3_llama import A3LlamaConfig

# --- the checkpoint contract (this file is its owner: the exporter and the vLLM plugin import these) ----------
#: name of each attention module's kept-frequency index, ``model.layers.N.self_attn.rope_freq_index``
ROPE_INDEX_NAME = "rope_freq_index"
#: key of ``config.a3`` holding :func:`rope_digest` of the checkpoint as written
ROPE_DIGEST_KEY = "rope_digest"


def default_rope_freq_index(num_key_value_heads: int, qk_head_dim: int) -> torch.Tensor:
    """The identity/prefix index: every KV head keeps frequencies ``0 .. r_qk/2 - 1``. int32 ``[h_kv, r_qk/2]``."""
    return torch.arange(qk_head_dim // 2, dtype=torch.int32).unsqueeze(0).repeat(num_key_value_heads, 1)


def rope_index_problem(index: torch.Tensor, expected_shape: tuple[int, int], head_dim: int) -> str | None:
    """What is wrong with one layer's ``rope_freq_index`` (None if valid): shape ``[h_kv, r_qk/2]``, an integer
    dtype, values in ``[0, head_dim/2)``, strictly ascending within each KV head (as the exporter writes it)."""
    if tuple(index.shape) != tuple(expected_shape):
        return (f"has shape {list(index.shape)}, expected {list(expected_shape)} "
                "([num_key_value_heads, qk_head_dim // 2])")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        return f"has dtype {index.dtype}, expected an integer dtype (int32)"
    if index.device.type != "meta" and index.numel():
        if int(index.min()) < 0 or int(index.max()) >= head_dim // 2:
            return f"has values outside [0, head_dim/2 = {head_dim // 2})"
        if bool((index.diff(dim=-1) <= 0).any()):
            return "is not strictly ascending within a KV head (a repeated or reordered frequency)"
    return None


def rope_digest(head_dim: int, indexes: list[torch.Tensor]) -> str:
    """SHA-256 of the original head size and every layer's ``rope_freq_index`` (in layer order).

    The exporter records it as ``config.a3.rope_digest``; loaders recompute it, so a config whose ``head_dim``
    (the RoPE table and softmax scale) or an index whose rows were changed after the export is refused instead
    of serving a different model."""
    import hashlib

    h = hashlib.sha256(f"a3-rope-v1:head_dim={int(head_dim)}".encode())
    for idx in indexes:
        t = idx.detach().to("cpu", torch.int64).contiguous()
        h.update(f";{list(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def rope_digest_problem(config, indexes: list[torch.Tensor]) -> str | None:
    """Why the checkpoint's RoPE contract does not match ``config.a3.rope_digest`` (None: matches, or an older
    checkpoint without a recorded digest)."""
    a3 = getattr(config, "a3", None)
    recorded = a3.get(ROPE_DIGEST_KEY) if isinstance(a3, dict) else None
    if not recorded:
        return None
    if rope_digest(config.head_dim, indexes) != recorded:
        return (f"config.json's head_dim ({config.head_dim}) or a layer's {ROPE_INDEX_NAME} differs from what "
                "a3-export wrote (a3.rope_digest does not match); the folder was edited or mixed with another export: "
                "re-export it")
    return None


def gather_rope(
    cos: torch.Tensor, sin: torch.Tensor, freq_index: torch.Tensor, num_key_value_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head RoPE constants for reduced heads.

    ``cos``/``sin``: ``[B, T, d_h]`` of the ORIGINAL head size (rotate_half layout: first half == second half).
    ``freq_index``: ``[h_kv, r/2]`` integer. Returns ``(cos_q, sin_q, cos_k, sin_k)`` with shapes
    ``[B, h_q, T, r]`` and ``[B, h_kv, T, r]``; query head ``i`` uses KV row ``i // num_key_value_groups``.
    """
    idx = freq_index.to(device=cos.device, dtype=torch.long)
    cos_k = cos[..., idx]  # [B, T, h_kv, r/2]
    sin_k = sin[..., idx]
    cos_k = torch.cat((cos_k, cos_k), dim=-1).transpose(1, 2)  # [B, h_kv, T, r]
    sin_k = torch.cat((sin_k, sin_k), dim=-1).transpose(1, 2)
    cos_q = repeat_kv(cos_k, num_key_value_groups)  # [B, h_q, T, r]
    sin_q = repeat_kv(sin_k, num_key_value_groups)
    return cos_q, sin_q, cos_k, sin_k


class A3LlamaMLP(nn.Module):
    def __init__(self, config: A3LlamaConfig, intermediate_size: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class A3LlamaAttention(nn.Module):
    """Llama attention with reduced q/k (``r_qk``) and v/o (``r_vo``) head sizes and per-KV-head RoPE frequencies."""

    def __init__(self, config: A3LlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.qk_head_dim, self.v_head_dim, _ = config.layer_dims(layer_idx)
        self.head_dim = config.head_dim  # original d_h: RoPE table and softmax scale
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.v_head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.o_bias)
        self.register_buffer(
            ROPE_INDEX_NAME, default_rope_freq_index(self.num_key_value_heads, self.qk_head_dim), persistent=True
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]

        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        cos_q, sin_q, cos_k, sin_k = gather_rope(cos, sin, self.rope_freq_index, self.num_key_value_groups)
        query_states = query_states * cos_q + rotate_half(query_states) * sin_q
        key_states = key_states * cos_k + rotate_half(key_states) * sin_k

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, qk_head_dim={self.qk_head_dim}, "
            f"v_head_dim={self.v_head_dim}, head_dim(original)={self.head_dim}"
        )


class A3LlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: A3LlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = A3LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = A3LlamaMLP(config, config.layer_dims(layer_idx)[2])
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class A3LlamaPreTrainedModel(PreTrainedModel):
    config: A3LlamaConfig
    config_class = A3LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["A3LlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # K and V may have different head sizes (r_qk != r_vo): only kernels that allow that are declared.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_sdpa = True
    _can_record_outputs = {
        "hidden_states": A3LlamaDecoderLayer,
        "attentions": A3LlamaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, A3LlamaAttention):
            init.copy_(
                module.rope_freq_index,
                default_rope_freq_index(module.num_key_value_heads, module.qk_head_dim).to(
                    module.rope_freq_index.device
                ),
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint whose ``rope_freq_index`` is missing,
        mis-shaped or out of range instead of letting transformers initialise it silently."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _raise_on_bad_rope_index_keys(info.get("missing_keys"), info.get("mismatched_keys"))
        model.check_rope_freq_index()
        return (model, info) if want_info else model

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # Checked here too (transformers' private hook, before its own loading report) so that a mis-shaped index
        # gets this message rather than the generic "ignore_mismatched_sizes" RuntimeError. from_pretrained above
        # repeats the check through the public loading info, in case a transformers version renames this hook.
        _raise_on_bad_rope_index_keys(
            getattr(loading_info, "missing_keys", None), getattr(loading_info, "mismatched_keys", None)
        )
        return PreTrainedModel._finalize_model_loading(model, load_config, loading_info)

    def check_rope_freq_index(self) -> None:
        """Raise ``ValueError`` if any layer's ``rope_freq_index`` breaks the contract (:func:`rope_index_problem`)
        or the set of them and ``head_dim`` differ from the export's record (:func:`rope_digest_problem`)."""
        indexes = []
        for name, module in self.named_modules():
            if not isinstance(module, A3LlamaAttention):
                continue
            idx = module.rope_freq_index
            problem = rope_index_problem(idx, (module.num_key_value_heads, module.qk_head_dim // 2),
                                         self.config.head_dim)
            if problem is not None:
                raise ValueError(
                    f"A3 checkpoint tensor `{name}.{ROPE_INDEX_NAME}` {problem}. Re-export the checkpoint."
                )
            indexes.append(idx)
        if indexes and indexes[0].device.type != "meta":
            problem = rope_digest_problem(self.config, indexes)
            if problem is not None:
                raise ValueError(f"A3 checkpoint: {problem}.")


def _raise_on_bad_rope_index_keys(missing_keys, mismatched_keys) -> None:
    """Raise ``ValueError`` if a ``rope_freq_index`` tensor was missing from the checkpoint or had the wrong shape."""
    for what, keys in (("is missing", missing_keys), ("has the wrong shape", mismatched_keys)):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (keys or ()))
        bad = [name for name in names if name.endswith(ROPE_INDEX_NAME)]
        if bad:
            raise ValueError(
                f"A3 checkpoint tensor `{bad[0]}` {what} ({len(bad)} layer(s) affected): every layer needs an int "
                f"tensor `model.layers.N.self_attn.{ROPE_INDEX_NAME}` of shape [num_key_value_heads, "
                "qk_head_dim // 2] matching config.json. Re-export the checkpoint with a3-export."
            )


class A3LlamaModel(A3LlamaPreTrainedModel):
    def __init__(self, config: A3LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [A3LlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # RoPE table of the ORIGINAL head size (config.head_dim); attentions gather their kept frequencies.
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class A3LlamaForCausalLM(A3LlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: A3LlamaConfig):
        super().__init__(config)
        self.model = A3LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["A3LlamaForCausalLM", "A3LlamaModel", "A3LlamaPreTrainedModel"]
