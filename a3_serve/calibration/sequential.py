"""Layer-by-layer calibration: statistics of the original model or propagated through compressed layers.

The whole-model pass (:func:`a3_serve.calibration.stats.collect_stats`) gives every layer the statistics
of the ORIGINAL model (the paper). Here the decoder runs one layer at a time over cached hidden states,
as GPTQ-style sequential calibration does:

1. run the embeddings once and capture the first layer's inputs ``X_0`` ``[B, T, d]`` per batch, with the
   keyword arguments the model passes to every layer (causal mask, RoPE ``(cos, sin)``, positions);
2. for layer ``l``: run the dense layer on ``X_l`` with the statistics hooks, solve it (``solve_fn``), then
   ``X_{l+1}`` = the dense layer's output (``mode="original"``: identical statistics to the whole-model
   pass) or the COMPRESSED layer's output (``mode="propagated"``: layer ``l+1`` is calibrated on the
   activations it will really see, so it can compensate for the error of the layers before it).

Memory: the hidden states of all calibration tokens (``nsamples·seqlen·d`` floats) plus one layer's
statistics at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from a3_serve.calibration.stats import (
    HeldOut,
    LayerStats,
    StatsCollector,
    StatsRequest,
    rope_inv_freq,
)

MODES = ("original", "propagated")


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering layer 0 and the layer keyword arguments, per batch (the model's own code
    computes them: embeddings, causal mask, rotary ``(cos, sin)``)."""
    layer0 = model.model.layers[0]
    hidden, kwargs = [], []

    def grab(_mod, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                model.model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's return value (a tensor, or a tuple whose first item is one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential_calibrate(
    model: nn.Module,
    batches: list[torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    solve_fn: Callable[[int, LayerStats], nn.Module | None],
    mode: str = "propagated",
    request: StatsRequest = StatsRequest(),
    progress: Callable[[int], None] | None = None,
    *,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    before_layer: Callable[[int], None] | None = None,
    after_layer: Callable[[int, list[torch.Tensor]], None] | None = None,
    heldout: HeldOut | None = None,
) -> None:
    """Calibrate and solve layer by layer (module docstring).

    ``solve_fn(layer_idx, stats)`` solves one layer and returns the compressed decoder layer as a module
    callable like the dense one (needed for ``mode="propagated"``; may return None in ``"original"`` mode).
    ``progress(1)`` is called after each layer.

    Streaming and resuming (used by :mod:`a3_serve.export.streamed`): ``before_layer(idx)`` runs before layer ``idx`` is
    used (load its weights), ``after_layer(idx, hidden)`` after it is solved, with ``hidden`` = the inputs of layer
    ``idx + 1`` (free the weights, checkpoint the activations). ``start``/``hidden`` resume at layer ``start``
    from saved inputs ``hidden`` (one ``[B, T, d]`` tensor per batch) instead of the embeddings' output.
    ``heldout`` gives the held-out fold of every token of each batch
    (:class:`~a3_serve.calibration.stats.StatsCollector`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown statistics mode {mode!r}; use one of {', '.join(MODES)}")
    if (start > 0) != (hidden is not None):
        raise ValueError("resuming at a later layer needs that layer's saved inputs (and only then)")
    first, kwargs = capture_first_layer_inputs(model, batches)
    hidden = first if hidden is None else [h.to(first[0].device, first[0].dtype) for h in hidden]
    del first
    inv_freq = rope_inv_freq(model) if request.rope_energy else None
    for idx in range(start, len(model.model.layers)):
        if before_layer is not None:
            before_layer(idx)
        layer = model.model.layers[idx]
        route = StatsCollector(1, num_heads, num_kv_heads, head_dim, request, heldout)  # one layer's slot
        handles = route.attach(layer, 0, inv_freq)
        dense_out = []
        try:
            for b, (x, kw) in enumerate(zip(hidden, kwargs)):
                route.start_batch(b)
                dense_out.append(layer_output(layer(x, **kw)))
        finally:
            for h in handles:
                h.remove()
        compressed = solve_fn(idx, route.finish(0, layer_idx=idx))
        if mode == "propagated":
            if compressed is None:
                raise ValueError("mode='propagated' needs solve_fn to return the compressed layer")
            hidden = [layer_output(compressed(x, **kw)) for x, kw in zip(hidden, kwargs)]
            del dense_out
        else:
            hidden = dense_out
        del compressed
        if after_layer is not None:
            after_layer(idx, hidden)
        if progress is not None:
            progress(1)
