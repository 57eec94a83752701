"""Per-layer calibration statistics in head space, accumulated in float64 with forward hooks.

Every A3 closed form depends on the data only through ``d_h x d_h`` second moments of head
activations (A3_METHOD.md section 3), so we never form ``d x d`` autocorrelations:

==========  ======================  ====================================================
name        shape                   definition (mean over calibration tokens)
==========  ======================  ====================================================
``Gq``      ``[h_q, d_h, d_h]``     ``E[q_i q_iᵀ]``, q_proj output per query head, pre-RoPE, bias included
``Gk``      ``[h_kv, d_h, d_h]``    ``E[k_j k_jᵀ]``, k_proj output per KV head, pre-RoPE
``Gv``      ``[h_kv, d_h, d_h]``    ``E[v_j v_jᵀ]``, v_proj output per KV head (the "xkv" moment)
``Go``      ``[h_q, d_h, d_h]``     ``E[o_i o_iᵀ]``, o_proj input per head = attention-weighted values
``x2``      ``[d]``                 ``E[x²]`` of the q/k/v input (RMSNorm output), for Wanda-like scores
``h2``      ``[d_int]``             ``E[h²]`` of the down_proj input (the A3-MLP score)
==========  ======================  ====================================================

Products are formed in float64 from the model's activations (float32 on CPU, bf16 on GPU); the
result is checked for NaN/Inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from a3_serve.errors import NumericalError


@dataclass
class LayerStats:
    """Mean second moments of one decoder layer (see the module docstring for shapes)."""

    n_tokens: int
    Gq: torch.Tensor
    Gk: torch.Tensor
    Gv: torch.Tensor
    Go: torch.Tensor
    x2: torch.Tensor
    h2: torch.Tensor


@dataclass
class _Accumulator:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0

    def add_head_moment(self, name: str, act: torch.Tensor, n_heads: int) -> None:
        """act [..., n_heads * d_h] -> adds sum over tokens of a_h a_hᵀ, shape [n_heads, d_h, d_h]."""
        a = act.reshape(-1, n_heads, act.shape[-1] // n_heads).to(torch.float64).transpose(0, 1)  # [h, N, d_h]
        m = torch.bmm(a.transpose(1, 2), a)
        self.sums[name] = self.sums[name] + m if name in self.sums else m

    def add_square(self, name: str, act: torch.Tensor) -> None:
        s = act.reshape(-1, act.shape[-1]).to(torch.float64).square().sum(0)
        self.sums[name] = self.sums[name] + s if name in self.sums else s

    def finish(self, layer_idx: int) -> LayerStats:
        if self.n_tokens == 0:
            raise RuntimeError(f"layer {layer_idx}: no calibration tokens reached this layer")
        means = {k: v / self.n_tokens for k, v in self.sums.items()}
        for name, t in means.items():
            if not torch.isfinite(t).all():
                raise NumericalError(
                    f"calibration statistic {name} of layer {layer_idx} contains NaN or Inf; the model overflows on the "
                    "calibration text: use --dtype float32, check the source weights, or use different calibration text"
                )
        return LayerStats(n_tokens=self.n_tokens, **means)


def _attach(layer: nn.Module, acc: _Accumulator) -> list[torch.utils.hooks.RemovableHandle]:
    attn, mlp = layer.self_attn, layer.mlp
    hq, hkv = acc.num_heads, acc.num_kv_heads

    def on_q_in(_mod, args):
        x = args[0]
        acc.n_tokens += x.shape[:-1].numel()
        acc.add_square("x2", x)

    return [
        attn.q_proj.register_forward_pre_hook(on_q_in),
        attn.q_proj.register_forward_hook(lambda _m, _a, out: acc.add_head_moment("Gq", out, hq)),
        attn.k_proj.register_forward_hook(lambda _m, _a, out: acc.add_head_moment("Gk", out, hkv)),
        attn.v_proj.register_forward_hook(lambda _m, _a, out: acc.add_head_moment("Gv", out, hkv)),
        attn.o_proj.register_forward_pre_hook(lambda _m, args: acc.add_head_moment("Go", args[0], hq)),
        mlp.down_proj.register_forward_pre_hook(lambda _m, args: acc.add_square("h2", args[0])),
    ]


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    progress=None,
) -> list[LayerStats]:
    """Run ``model`` (a Llama-style causal LM) over token batches and return one LayerStats per layer.

    ``batches`` yields LongTensors ``[B, T]`` of calibration tokens (no padding). Statistics are those
    of the ORIGINAL model at every layer (the paper's protocol). Only the decoder runs (``model.model``):
    the LM head's logits are not needed. ``progress`` is an optional callable ``progress(n_sequences)``
    called after each batch.
    """
    layers = model.model.layers
    accs = [_Accumulator(num_heads, num_kv_heads, head_dim) for _ in layers]
    handles = [h for layer, acc in zip(layers, accs) for h in _attach(layer, acc)]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model.model(input_ids=batch.to(device), use_cache=False)
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
    return [acc.finish(i) for i, acc in enumerate(accs)]
