"""The residual Fisher that weights the loss-aware allocation (a3_serve.calibration.fisher, METHOD.md §6.3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from a3_serve.calibration.fisher import ResidualFisher, fisher_window_count, residual_fisher
from a3_serve.calibration.stats import collect_stats
from a3_serve.export.architectures import inspect_architecture
from a3_serve.export.compress_layer import layer_tensors
from a3_serve.export.loss_curves import layer_curves, layer_weights, plan_from_curves, weighted_curves
from a3_serve.export.methods import RECIPES
from a3_serve.runtime import read_config


def whole_model_fisher(model, windows: torch.Tensor) -> tuple[list[float], list[float]]:
    """Reference: one autograd graph over the whole model; the gradients of the residual stream after each attention
    block (input of post_attention_layernorm) and of each layer's output, kept with retain_grad."""
    mids, outs = [], []
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args: (args[0].retain_grad(), mids.append(args[0]))[-1] and None))
        hooks.append(layer.register_forward_hook(
            lambda _m, _a, out: ((out[0] if isinstance(out, tuple) else out).retain_grad(),
                                 outs.append(out[0] if isinstance(out, tuple) else out))[-1] and None))
    L, d = len(model.model.layers), model.config.hidden_size
    f_attn, f_mlp = [0.0] * L, [0.0] * L
    try:
        for row in windows:
            mids.clear()
            outs.clear()
            emb = model.get_input_embeddings()(row[None]).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[0, :-1].double()
            torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").backward()
            for i in range(L):
                f_attn[i] += float(mids[i].grad.double().pow(2).sum())
                f_mlp[i] += float(outs[i].grad.double().pow(2).sum())
    finally:
        for h in hooks:
            h.remove()
    n = windows.numel() * d
    return [v / n for v in f_attn], [v / n for v in f_mlp]


@pytest.mark.parametrize("kind", ["llama2-mha", "qwen2-bias"])
def test_layer_by_layer_fisher_equals_the_whole_model_gradient(kind, random_models):
    """The reverse pass over stored layer inputs (what the streamed export runs) gives the Fisher of one backward
    pass through the whole model, at both residual points of every layer, to float32 rounding."""
    model = AutoModelForCausalLM.from_pretrained(str(random_models[kind]), dtype=torch.float32).eval()
    windows = torch.randint(3, 5000, (3, 24), generator=torch.Generator().manual_seed(5))
    got = residual_fisher(model, windows, batch_size=2)
    # the parameters are left as they were (no gradient kept, requires_grad restored)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    want_attn, want_mlp = whole_model_fisher(model, windows)
    assert got.tokens == 72
    assert list(got.attn) == pytest.approx(want_attn, rel=1e-4)
    assert list(got.mlp) == pytest.approx(want_mlp, rel=1e-4)
    assert all(v > 0 for v in got.attn + got.mlp)
    # a different batching of the same windows: the same sums
    again = residual_fisher(model, windows, batch_size=3)
    assert list(again.attn) == pytest.approx(list(got.attn), rel=1e-5)


def test_fisher_windows_cover_the_stated_token_count():
    assert fisher_window_count(128, 2048) == 2
    assert fisher_window_count(64, 512) == 8
    assert fisher_window_count(3, 512) == 3  # never more windows than there are
    assert fisher_window_count(128, 8192) == 1


def test_allocation_keeps_more_where_the_loss_is_more_sensitive(random_models):
    """The same raw curves in every layer: the layer whose residual Fisher is 100x the others' keeps at least as
    much of every component as any other layer and more in total; loss-rms reads E[1/ms] from the statistics
    instead."""
    src = random_models["llama3-gqa"]
    arch = inspect_architecture(read_config(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    batches = list(torch.randint(3, 5000, (4, 32), generator=torch.Generator().manual_seed(1)).split(2))
    stats = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    methods = RECIPES["paper+alloc"][0]
    raw = layer_curves(layer_tensors(model.model.layers[0]), stats[0], arch, methods)
    L = arch.num_layers
    sensitive = 1
    fisher = ResidualFisher(attn=tuple(100.0 if i == sensitive else 1.0 for i in range(L)),
                            mlp=tuple(100.0 if i == sensitive else 1.0 for i in range(L)), tokens=128)
    curves = [weighted_curves(raw, *layer_weights(methods, stats[i], fisher, i)) for i in range(L)]
    plan = plan_from_curves(curves, arch, 0.3, head_multiple=16)
    dims = [plan.layer_dims(i) for i in range(L)]
    for other in range(L):
        assert all(a >= b for a, b in zip(dims[sensitive], dims[other]))
    assert sum(dims[sensitive]) > max(sum(dims[i]) for i in range(L) if i != sensitive)

    rms = dataclasses.replace(methods, allocation="loss-rms")
    assert layer_weights(rms, stats[0], fisher, 0) == (float(stats[0].inv_ms_attn), float(stats[0].inv_ms_mlp))
    with pytest.raises(ValueError, match="Fisher"):
        layer_weights(methods, stats[0], None, 0)
