"""Which source checkpoints A3 export accepts, and their shapes in one normalised form.

Supported: Llama 1/2 (MHA + RoPE), Llama 3.x (GQA + RoPE, ``llama3`` scaling), Mistral (without a
sliding window), SmolLM/SmolLM2 and TinyLlama (Llama configs), Qwen2/2.5 (q/k/v bias). Everything
else is refused with an :class:`UnsupportedArchitectureError` naming the feature A3 does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a3_serve.errors import InputError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_SUPPORTED_HUMAN = "Llama 1/2/3, Mistral, Qwen2/2.5, SmolLM/SmolLM2, TinyLlama"

# model_type -> the feature that stops A3 export (checked before the generic message)
_KNOWN_UNSUPPORTED = {
    "qwen3": "per-head q/k RMSNorm (Qwen3)",
    "olmo2": "per-head q/k RMSNorm (OLMo-2)",
    "gemma3": "per-head q/k RMSNorm and sliding-window layers (Gemma-3)",
    "gemma3_text": "per-head q/k RMSNorm and sliding-window layers (Gemma-3)",
    "gemma2": "attention-logit soft-capping and sliding-window layers (Gemma-2)",
    "mixtral": "mixture-of-experts MLP (Mixtral)",
    "qwen2_moe": "mixture-of-experts MLP (Qwen2-MoE)",
    "qwen3_moe": "mixture-of-experts MLP and q/k norms (Qwen3-MoE)",
    "deepseek_v3": "multi-head latent attention and mixture-of-experts (DeepSeek-V3)",
    "mpt": "ALiBi position biases (MPT)",
    "bloom": "ALiBi position biases (BLOOM)",
    "falcon": "parallel attention/MLP blocks (Falcon)",
    "gpt2": "learned absolute position embeddings and a 2-layer GELU MLP (GPT-2)",
    "opt": "learned absolute position embeddings (OPT)",
    "gpt_neox": "partial rotary embeddings and parallel residual (GPT-NeoX/Pythia)",
    "phi": "partial rotary embeddings (Phi-1/2)",
    "phi3": "fused qkv/gate_up projections (Phi-3)",
}


@dataclass(frozen=True)
class SourceArch:
    """The shapes and features of a supported dense source model, in Llama terms."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_type: str
    tie_word_embeddings: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_kind(self) -> str:
        return "MHA-RoPE" if self.group_size == 1 else "GQA-RoPE"


def _rope_type(cfg: dict[str, Any]) -> str:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        return "default"
    return str(params.get("rope_type") or params.get("type") or "default")


def inspect_architecture(cfg: dict[str, Any]) -> SourceArch:
    """Validate a source ``config.json`` dict and return its normalised shapes.

    Raises :class:`UnsupportedArchitectureError` naming the first feature A3 export cannot handle.
    """
    mtype = cfg.get("model_type")
    if mtype == "a3_llama":
        raise InputError("the model is already A3-compressed (model_type a3_llama); export from the original dense checkpoint")
    if mtype in _KNOWN_UNSUPPORTED:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {mtype!r}: {_KNOWN_UNSUPPORTED[mtype]} is not covered by A3 export yet; "
            f"supported: {_SUPPORTED_HUMAN}"
        )
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {mtype!r} (architectures={cfg.get('architectures')}); "
            f"A3 export supports {_SUPPORTED_HUMAN}"
        )

    def refuse(feature: str) -> None:
        raise UnsupportedArchitectureError(
            f"unsupported feature in this {mtype} checkpoint: {feature}; A3 export supports dense full-attention "
            f"RoPE decoders ({_SUPPORTED_HUMAN})"
        )

    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if cfg.get(key):
            refuse(f"mixture-of-experts MLP ({key}={cfg[key]})")
    if cfg.get("qk_norm") or cfg.get("use_qk_norm"):
        refuse("per-head q/k RMSNorm")
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    if mtype == "qwen2":
        if cfg.get("use_sliding_window"):
            refuse(f"sliding-window attention (use_sliding_window=true, sliding_window={cfg.get('sliding_window')})")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            refuse("sliding-window layers (layer_types contains 'sliding_attention')")
    else:
        window = cfg.get("sliding_window")
        if window is not None and (not max_pos or int(window) < max_pos):
            refuse(f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos})")
    if cfg.get("position_embedding_type") not in (None, "rope", "rotary"):
        refuse(f"position embeddings of type {cfg.get('position_embedding_type')!r}")
    rope = _rope_type(cfg)
    if rope not in SUPPORTED_ROPE_TYPES:
        refuse(f"RoPE scaling type {rope!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse(f"partial rotary embeddings (partial_rotary_factor={partial})")

    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_layers = int(cfg["num_hidden_layers"])
        inter = int(cfg["intermediate_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"config.json lacks a valid {err} field; fix or re-download the model's config.json") from None
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise InputError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}; the config is invalid")
    if head_dim % 2:
        refuse(f"an odd head size ({head_dim}), which RoPE pairs cannot split")

    if mtype == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    return SourceArch(
        model_type=mtype,
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_type=rope,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
