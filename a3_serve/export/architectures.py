"""Which source checkpoints A3 export accepts, and their shapes in one normalised form.

Supported: Llama 1/2 (MHA + RoPE), Llama 3.x (GQA + RoPE, ``llama3`` scaling), Mistral (without a
sliding window), SmolLM/SmolLM2 and TinyLlama (Llama configs), Qwen2/2.5 (q/k/v bias). Everything
else is refused with an :class:`UnsupportedArchitectureError` naming the feature A3 does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a3_serve.errors import InputError, UnsupportedArchitectureError
from a3_serve.solvers.budget import ModelShape

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


@dataclass(frozen=True, kw_only=True)
class SourceArch(ModelShape):
    """The shapes (:class:`ModelShape`: hidden size, layers, heads, head size, MLP width) and the features of a
    supported dense source model, in Llama terms."""

    model_type: str
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


def _bad_field(key: str, value: Any, want: str) -> InputError:
    return InputError(f"config.json field {key!r} is {value!r}, not {want}; fix or re-download the model's config.json")


def _int_field(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int | None:
    """``cfg[key]`` as an int >= ``minimum`` (``default`` when absent or null); one-line error otherwise."""
    value = cfg.get(key)
    if value is None:
        if default is None and key not in OPTIONAL_INT_FIELDS:
            raise InputError(f"config.json lacks a valid {key!r} field; fix or re-download the model's config.json")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise _bad_field(key, value, f"an integer >= {minimum}")
    return int(value)


def _bool_field(cfg: dict[str, Any], key: str) -> bool:
    """``cfg[key]`` as a bool (absent or null: False); one-line error for anything but true/false."""
    value = cfg.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad_field(key, value, "true or false")
    return value


#: integer fields that may be absent (``None`` then)
OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters block (``rope_parameters``, or the older ``rope_scaling``), checked to be an object."""
    for key in ("rope_parameters", "rope_scaling"):
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise _bad_field(key, value, "a JSON object (e.g. {\"rope_type\": \"default\", \"rope_theta\": 10000.0})")
        if value:
            return value
    return {}


def _rope_type(cfg: dict[str, Any]) -> str:
    params = _rope_params(cfg)
    return str(params.get("rope_type") or params.get("type") or "default")


def inspect_architecture(cfg: dict[str, Any]) -> SourceArch:
    """Validate a source ``config.json`` dict and return its normalised shapes.

    Raises :class:`UnsupportedArchitectureError` naming the first feature A3 export cannot handle.
    """
    mtype = cfg.get("model_type")
    if mtype == "a3_llama":
        raise InputError("the model is already A3-compressed (model_type a3_llama); export from the original dense "
                         "checkpoint")
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
    max_pos = _int_field(cfg, "max_position_embeddings", 0, minimum=0)
    if mtype == "qwen2":
        if _bool_field(cfg, "use_sliding_window"):
            refuse(f"sliding-window attention (use_sliding_window=true, sliding_window={cfg.get('sliding_window')})")
        layer_types = cfg.get("layer_types") or []
        if not isinstance(layer_types, list):
            raise _bad_field("layer_types", layer_types, "a list of layer kinds")
        if any(t != "full_attention" for t in layer_types):
            refuse("sliding-window layers (layer_types contains 'sliding_attention')")
    else:
        window = _int_field(cfg, "sliding_window", None, minimum=0)
        if window is not None and (not max_pos or window < max_pos):
            refuse(f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos})")
    if cfg.get("position_embedding_type") not in (None, "rope", "rotary"):
        refuse(f"position embeddings of type {cfg.get('position_embedding_type')!r}")
    rope = _rope_type(cfg)
    if rope not in SUPPORTED_ROPE_TYPES:
        refuse(f"RoPE scaling type {rope!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = _rope_params(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse(f"partial rotary embeddings (partial_rotary_factor={partial})")

    hidden = _int_field(cfg, "hidden_size")
    n_heads = _int_field(cfg, "num_attention_heads")
    n_layers = _int_field(cfg, "num_hidden_layers")
    inter = _int_field(cfg, "intermediate_size")
    n_kv = _int_field(cfg, "num_key_value_heads", n_heads)
    head_dim = _int_field(cfg, "head_dim", hidden // n_heads)
    if n_heads % n_kv:
        raise InputError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}; the config "
                         "is invalid")
    if head_dim % 2:
        refuse(f"an odd head size ({head_dim}), which RoPE pairs cannot split")

    if mtype == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = _bool_field(cfg, "attention_bias")
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
        mlp_bias=_bool_field(cfg, "mlp_bias"),
        rope_type=rope,
        tie_word_embeddings=_bool_field(cfg, "tie_word_embeddings"),
    )


#: tensors a checkpoint may carry that the export derives itself (old Llama conversions saved RoPE tables)
DERIVED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(arch: SourceArch) -> set[str]:
    """The checkpoint tensor names a source of shape ``arch`` consists of (a tied LM head may be absent)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    biases = {"q_proj": arch.qkv_bias, "k_proj": arch.qkv_bias, "v_proj": arch.qkv_bias, "o_proj": arch.o_bias,
              "gate_proj": arch.mlp_bias, "up_proj": arch.mlp_bias, "down_proj": arch.mlp_bias}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj, bias in biases.items():
            mod = p + ("self_attn." if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + proj
            names.add(mod + ".weight")
            if bias:
                names.add(mod + ".bias")
    return names


def check_source_tensors(arch: SourceArch, names: list[str]) -> None:
    """Refuse a checkpoint whose weight files hold tensors its config.json does not declare (e.g. per-head q/k
    norms under a Llama config): the export would drop them silently and ship a different model."""
    expected = expected_tensors(arch)
    extra = sorted(n for n in names if n not in expected and not n.endswith(DERIVED_TENSOR_SUFFIXES))
    if extra:
        raise UnsupportedArchitectureError(
            f"the weights hold {len(extra)} tensor(s) that config.json ({arch.model_type}) does not declare, e.g. "
            f"{extra[0]!r}; A3 export would drop them: use the config that matches these weights "
            f"(a feature such as q/k norms is not covered by A3 export yet)"
        )
