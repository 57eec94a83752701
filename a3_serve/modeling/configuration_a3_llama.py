"""Configuration of an A3-compressed Llama-family checkpoint (``model_type: a3_llama``).

This file is copied verbatim into every exported checkpoint and loaded by transformers' dynamic-module
machinery (``trust_remote_code=True``) where a3-serve is not installed: it imports only torch/transformers.

Beyond Llama's fields it carries the reduced sizes of A3 (``qk_head_dim``, ``v_head_dim`` and the reduced
``intermediate_size``, optionally per layer), separate q/k/v and o biases, and an ``a3`` provenance block.
``head_dim`` stays the ORIGINAL head size d_h: RoPE frequencies and the softmax scale d_h**-0.5 come from it.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


@strict
class A3LlamaConfig(LlamaConfig):
    r"""
    Config of a Llama-family decoder compressed with A3.

    Args (in addition to [`LlamaConfig`]'s):
        head_dim (`int`): the ORIGINAL head size d_h (RoPE `inv_freq`, incl. `llama3` scaling, and the softmax
            scale `d_h ** -0.5` are computed from it).
        intermediate_size (`int`): the (reduced) MLP width r_int.
        qk_head_dim (`int`, *optional*): reduced q/k head size r_qk (even, `0 < r_qk <= head_dim`); defaults to
            `head_dim`.
        v_head_dim (`int`, *optional*): reduced v head size r_vo (`> 0`); defaults to `head_dim`.
        layer_qk_head_dims / layer_v_head_dims / layer_intermediate_sizes (`list[int]`, *optional*): per-layer
            overrides, each of length `num_hidden_layers`; `None` means uniform.
        qkv_bias (`bool`, *optional*): bias on q/k/v_proj; defaults to `attention_bias`.
        o_bias (`bool`, *optional*): bias on o_proj; defaults to `attention_bias`.
        a3 (`dict`, *optional*): provenance block written by the exporter.
    """

    model_type = "a3_llama"
    # Llama's tensor-parallel plan would shard q/k heads without sharding `rope_freq_index`: not supported here
    # (vLLM shards heads and the index itself).
    base_model_tp_plan = None

    qk_head_dim: int | None = None
    v_head_dim: int | None = None
    layer_qk_head_dims: list[int] | None = None
    layer_v_head_dims: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    a3: dict | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.qk_head_dim is None:
            self.qk_head_dim = self.head_dim
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.qkv_bias is None:
            self.qkv_bias = bool(self.attention_bias)
        if self.o_bias is None:
            self.o_bias = bool(self.attention_bias)
        for name in ("layer_qk_head_dims", "layer_v_head_dims", "layer_intermediate_sizes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                setattr(self, name, [int(v) for v in value])
        super().__post_init__(**kwargs)
        # Every A3 layer is full causal attention. Say so explicitly: a kept source field such as Qwen2's
        # `sliding_window` (set even when `use_sliding_window` is false) must not make transformers' caches
        # infer sliding-window layers.
        if getattr(self, "layer_types", None) is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers

    def validate_architecture(self):
        """Part of `@strict` validation: Llama's checks plus the A3 reduced sizes."""
        super().validate_architecture()
        n = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE.")
        for name in ("layer_qk_head_dims", "layer_v_head_dims", "layer_intermediate_sizes"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(
                    f"{name} has {len(value)} entries but num_hidden_layers is {n}; give one per layer or None."
                )
        layer_types = getattr(self, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"layer_types {sorted(set(layer_types))} is not supported: A3 checkpoints use full attention in every "
                "layer (sliding-window sources are refused at export)."
            )
        for i in range(n):
            r_qk, r_vo, r_int = self.layer_dims(i)
            where = f" (layer {i})" if self._is_per_layer() else ""
            if r_qk % 2 != 0 or not 0 < r_qk <= self.head_dim:
                raise ValueError(
                    f"qk_head_dim{where} is {r_qk}; it must be even and in (0, head_dim={self.head_dim}] because "
                    "A3 keeps whole RoPE pairs."
                )
            if r_vo <= 0:
                raise ValueError(f"v_head_dim{where} is {r_vo}; it must be positive.")
            if r_int <= 0:
                raise ValueError(f"intermediate_size{where} is {r_int}; it must be positive.")

    def _is_per_layer(self) -> bool:
        return any(
            getattr(self, name) is not None
            for name in ("layer_qk_head_dims", "layer_v_head_dims", "layer_intermediate_sizes")
        )

    def layer_dims(self, layer_idx: int) -> tuple[int, int, int]:
        """Return ``(r_qk, r_vo, r_int)`` of layer ``layer_idx`` (:func:`layer_dims`)."""
        return layer_dims(self, layer_idx)


#: the per-layer lists of a compressed config, in ``(r_qk, r_vo, r_int)`` order, and their uniform fallbacks
LAYER_DIM_FIELDS = (
    ("layer_qk_head_dims", "qk_head_dim"),
    ("layer_v_head_dims", "v_head_dim"),
    ("layer_intermediate_sizes", "intermediate_size"),
)


def original_head_dim(config) -> int:
    """The ORIGINAL head size d_h (RoPE table, softmax scale): ``head_dim``, else ``hidden_size // heads``."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def layer_dims(config, layer_idx: int) -> tuple[int, int, int]:
    """``(r_qk, r_vo, r_int)`` of layer ``layer_idx`` of any config object carrying the A3 fields (an
    :class:`A3LlamaConfig` or the config vLLM builds from config.json): the per-layer lists when present, else
    the uniform ``qk_head_dim`` / ``v_head_dim`` / ``intermediate_size`` (head sizes default to ``head_dim``)."""
    if not 0 <= layer_idx < config.num_hidden_layers:
        raise IndexError(f"layer {layer_idx} out of range for {config.num_hidden_layers} layers")
    dims = []
    for list_name, scalar in LAYER_DIM_FIELDS:
        values = getattr(config, list_name, None)
        if values is not None:
            dims.append(int(values[layer_idx]))
        else:
            value = getattr(config, scalar, None)
            dims.append(int(value if value is not None else original_head_dim(config)))
    return dims[0], dims[1], dims[2]


__all__ = ["A3LlamaConfig", "LAYER_DIM_FIELDS", "layer_dims", "original_head_dim"]
