"""How much the loss cares about the residual stream at each layer: the diagonal empirical Fisher, one number per
residual point, for the loss-aware allocation (docs/METHOD.md §6.3).

An error ``e`` written into the residual stream ``h`` stays there: every later layer and the final norm read it. To
second order the loss increase it causes is

    ΔL ≈ ½ E_t[eₜᵀ F eₜ] ≈ ½ Σ_c F_c E[e_c²],   F_c = E_t[(∂L/∂h_{t,c})²]   (diagonal empirical Fisher),

``L`` the summed next-token NLL of the dense model on calibration windows. The allocation's predicted errors are sums
of squares over the residual channels, so each layer's curve is weighted by ``f = mean_c F_c`` at the point it is
added: the attention output at the input of the layer's ``post_attention_layernorm`` (``h_mid = x + attn``) and the
MLP output at the layer's output (``x_{l+1}``). Measured (docs/RESULTS.md "the allocation weighted by the loss's own
sensitivity"): one number per point is as good as the per-channel weights, and better than the previous weight
``E[1/ms(h)]`` on both real models.

How it is computed, layer by layer so the streamed export never holds more than one layer (``n`` windows
``[n, T]``, batches ``[B, T]``, ``d`` hidden size):

1. ``X_0`` from the model's own embedding code (:func:`~a3_serve.calibration.sequential.capture_first_layer_inputs`);
2. forward, no graph: ``X_{l+1} = layer_l(X_l)``; each ``X_l`` is handed to ``save(l, X_l)`` (memory or disk);
3. head: ``G_L = ∂L/∂X_L`` through the final norm and the LM head, one window at a time (logits ``[T, vocab]``);
4. reverse: for ``l = L-1 .. 0``, recompute layer ``l`` on ``load(l)`` with a graph and back-propagate ``G_{l+1}``:
   ``f_mlp[l] = Σ G_{l+1}² / (n·T·d)``, the gradient at ``h_mid`` (a tensor hook: every use of it summed) gives
   ``f_attn[l]``, and ``G_l = ∂L/∂X_l``.

Cost: two layer passes and one backward (about four forward passes) over ``n·T`` tokens; the export uses
:data:`FISHER_TOKENS` tokens of its calibration windows, an eighth of the paper's 128 x 256 (docs/RESULTS.md).
Accumulated in float64; a NaN or Inf stops the export.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from a3_serve.calibration.sequential import capture_first_layer_inputs, layer_output
from a3_serve.errors import NumericalError

#: calibration tokens the Fisher is estimated on (the first ``ceil(FISHER_TOKENS / seqlen)`` windows)
FISHER_TOKENS = 4096


def fisher_window_count(nsamples: int, seqlen: int) -> int:
    """How many of the ``nsamples`` calibration windows of ``seqlen`` tokens feed the Fisher pass."""
    return max(1, min(nsamples, math.ceil(FISHER_TOKENS / seqlen)))


def fisher_windows(tokens: torch.Tensor) -> torch.Tensor:
    """The calibration windows ``tokens`` ``[nsamples, seqlen]`` the Fisher pass runs on: the first
    :func:`fisher_window_count` ones."""
    return tokens[:fisher_window_count(tokens.shape[0], tokens.shape[1])]


@dataclass(frozen=True)
class ResidualFisher:
    """Per decoder layer, ``mean_c F_c`` per token at the attention-add (``attn``) and MLP-add (``mlp``) residual
    points (module docstring), over ``tokens`` calibration tokens."""

    attn: tuple[float, ...]
    mlp: tuple[float, ...]
    tokens: int

    def as_dict(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "ResidualFisher":
        return cls(tuple(float(v) for v in d["attn"]), tuple(float(v) for v in d["mlp"]), int(d["tokens"]))


class _Kept:
    """The default store of the layer inputs: in memory."""

    def __init__(self):
        self.items: dict[int, list[torch.Tensor]] = {}

    def save(self, idx: int, hidden: list[torch.Tensor]) -> None:
        self.items[idx] = hidden

    def load(self, idx: int) -> list[torch.Tensor]:
        return self.items.pop(idx)


@contextmanager
def _frozen(module: nn.Module):
    """No parameter of ``module`` requires a gradient inside (only the residual stream's is wanted); restored after."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _sum_squares(tensors) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in tensors))


def _head_gradient(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: list[torch.Tensor],
                   batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂L/∂X_L`` per batch, ``L`` the summed next-token NLL of ``logits_of(X_L)`` (final norm and LM head)."""
    grads = []
    for x, ids in zip(hidden, batches):
        g = torch.empty_like(x)
        for row in range(x.shape[0]):  # one window's logits at a time
            xr = x[row:row + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = logits_of(xr)[0, :-1].float()
                loss = nn.functional.cross_entropy(logits, ids[row, 1:].to(logits.device).long(), reduction="sum")
                loss.backward()
            g[row] = xr.grad[0]
        grads.append(g)
    return grads


def residual_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    *,
    before_layer: Callable[[int], None] | None = None,
    after_layer: Callable[[int], None] | None = None,
    save: Callable[[int, list[torch.Tensor]], None] | None = None,
    load: Callable[[int], list[torch.Tensor]] | None = None,
    progress: Callable[[int], None] | None = None,
    lm_head_weight: torch.Tensor | None = None,
) -> ResidualFisher:
    """The per-layer Fisher of the dense ``model`` over ``windows`` ``[n, T]`` (module docstring).

    ``before_layer(l)`` / ``after_layer(l)`` load and free layer ``l``'s weights (the streamed export; each layer is
    used twice, forward then in reverse order); ``save(l, X_l)`` / ``load(l)`` keep the layer inputs between the two
    (default: in memory). ``progress(1)`` after each of the ``2·L`` layer steps. ``lm_head_weight`` ``[vocab, d]``:
    the LM head's weight when the model's own is not loaded (the streamed skeleton)."""
    layers = model.model.layers
    n_layers, d = len(layers), model.config.hidden_size
    if save is None or load is None:
        kept = _Kept()
        save, load = kept.save, kept.load
    batches = list(windows.split(batch_size))
    hidden, kwargs = capture_first_layer_inputs(model, batches)
    for idx in range(n_layers):
        save(idx, hidden)
        if before_layer is not None:
            before_layer(idx)
        with torch.no_grad():
            hidden = [layer_output(layers[idx](x, **kw)) for x, kw in zip(hidden, kwargs)]
        if after_layer is not None:
            after_layer(idx)
        if progress is not None:
            progress(1)
    norm = model.model.norm
    head = model.get_output_embeddings()
    with _frozen(model):  # the embeddings too: they may be the LM head's weight
        if lm_head_weight is None:
            grads = _head_gradient(lambda x: head(norm(x)), hidden, batches)
        else:
            grads = _head_gradient(lambda x: nn.functional.linear(norm(x), lm_head_weight), hidden, batches)
    del hidden
    scale = 1.0 / (windows.numel() * d)
    f_attn, f_mlp = [0.0] * n_layers, [0.0] * n_layers
    for idx in reversed(range(n_layers)):
        f_mlp[idx] = _sum_squares(grads) * scale
        inputs = load(idx)
        if before_layer is not None:
            before_layer(idx)
        layer = layers[idx]
        mid = torch.zeros((), dtype=torch.float64)

        def grab(g: torch.Tensor) -> None:
            nonlocal mid
            mid = mid + g.detach().double().pow(2).sum()

        def watch(_module, args) -> None:  # h_mid enters post_attention_layernorm
            args[0].register_hook(grab)

        handle = layer.post_attention_layernorm.register_forward_pre_hook(watch)
        new = []
        try:
            with _frozen(layer):
                for x, kw, g in zip(inputs, kwargs, grads):
                    x = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        layer_output(layer(x, **kw)).backward(g)
                    new.append(x.grad)
        finally:
            handle.remove()
        f_attn[idx] = float(mid) * scale
        grads = new
        del inputs
        if after_layer is not None:
            after_layer(idx)
        if progress is not None:
            progress(1)
    if not all(math.isfinite(v) and v >= 0 for v in f_attn + f_mlp):
        raise NumericalError("the loss's gradient at the residual stream is NaN or Inf on the calibration text; the "
                             "model overflows in this dtype: use --dtype float32")
    return ResidualFisher(tuple(f_attn), tuple(f_mlp), int(windows.numel()))
