"""Experiment (issue 18): the loss-aware allocation with every residual write's predicted error weighted, channel by
channel, by the empirical Fisher information of the residual stream it is added to, instead of by ``E[1/ms(h)]``.

The shipped allocation (docs/METHOD.md §6.3) scales each layer's predicted error ``‖e‖²`` by ``E[1/ms(h)]``: the
next RMSNorm divides by the residual's RMS. That models one reader. An error written to the residual stream stays
there and every later layer and the final norm read it; to second order the loss increase it causes is

    ΔL ≈ ½ E_t[eₜᵀ F eₜ] ≈ ½ Σ_c F_c E[e_c²],   F_c = E_t[(∂L/∂h_{t,c})²]   (diagonal empirical Fisher)

where ``h`` is the residual stream at the point the error is added: the attention output's (the input of the
layer's ``post_attention_layernorm``) and the MLP output's (the layer's output). One backward pass of the dense
model over calibration windows gives every ``F`` (the sum of the next-token losses; only ratios between layers
matter). The curves are then built as the shipped ones with the rows of ``o_proj`` / ``down_proj`` scaled by
``sqrt(F)`` and no ``E[1/ms]`` scale (the solvers are unchanged; only the per-layer dims change).

It replaces ``a3_serve.export.loss_curves.allocate_plan`` for one run of ``benchmarks/quality.py`` and takes that
script's arguments; ``F_WINDOWS`` (default 16) calibration windows feed the backward pass; ``F_MODE=scalar`` uses
one number per residual point instead (the shipped curves scaled by ``mean_c F_c`` in place of ``E[1/ms]``):

    python benchmarks/experiments/alloc_fisher.py --crs 0.1,0.2 --recipes paper+alloc,best \
        --eval wiki:heldout --eval austen:heldout --eval pydoc:heldout --eval py-stdlib-source.txt \
        --nsamples 64 --eval-tokens 8192 --out-dir /tmp/alloc-fisher

Result (docs/RESULTS.md, "Tried: the allocation weighted by the loss's own sensitivity"): better than the paper
recipe on every text of SmolLM2 and Qwen2.5-Coder-0.5B at CR 0.1 and 0.2, where the shipped allocation is worse
than the paper on Qwen2.5's prose. The scalar form is the default since a3-serve 0.2 (``--allocation loss``,
``a3_serve/calibration/fisher.py``; docs/RESULTS.md "Adopted: the residual Fisher"); this script stays for the
per-channel variant.
"""

import dataclasses
import os
import runpy
import sys
import time
from pathlib import Path

import torch

import a3_serve.calibration.sources as sources
import a3_serve.export.loss_curves as lc
from a3_serve.export.compress_layer import layer_tensors

BENCH = Path(__file__).resolve().parents[1]
F_WINDOWS = int(os.environ.get("F_WINDOWS", "16"))
#: ``channel``: rows scaled by sqrt(F_c); ``scalar``: the shipped curves (no ``E[1/ms]``) times the mean of F
F_MODE = os.environ.get("F_MODE", "channel")
_last_tokens: list = []
_fisher_cache: dict = {}


def _record_windows(*args, **kwargs):
    tokens = _calibration_windows(*args, **kwargs)
    _last_tokens[:] = [tokens]
    return tokens


def residual_fisher(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, ``F_c = Σ_t (∂L/∂h_{t,c})²`` (float64, ``[d]``) at the attention-add and the MLP-add residual
    points, ``L`` the summed next-token NLL of the dense ``model`` over ``tokens`` ``[n, seqlen]``."""
    layers = model.model.layers
    d = model.config.hidden_size
    f_attn = [torch.zeros(d, dtype=torch.float64) for _ in layers]
    f_mlp = [torch.zeros(d, dtype=torch.float64) for _ in layers]

    def grab(acc, i):
        def hook(g):
            acc[i] += g.detach().double().pow(2).sum(dim=(0, 1))
        return hook

    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, i=i):
            args[0].register_hook(grab(f_attn, i))
        def post(mod, args, out, i=i):
            (out[0] if isinstance(out, tuple) else out).register_hook(grab(f_mlp, i))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True)))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for row in tokens:
                ids = row[None].long()
                logits = model(input_ids=ids).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return f_attn, f_mlp


def allocate_plan_fisher(model, stats, arch, cr, methods, components=("qk", "ov", "mlp"), head_multiple=16,
                         eps=1e-6, min_head_dim=lc.MIN_HEAD_DIM, kv_cr=0.0, mlp_multiple=1):
    """:func:`a3_serve.export.loss_curves.allocate_plan` with Fisher-weighted output rows (module docstring)."""
    tokens = _last_tokens[0][:F_WINDOWS]
    key = (id(model), tokens.data_ptr(), tuple(tokens.shape))
    if key not in _fisher_cache:
        t0 = time.perf_counter()
        _fisher_cache[key] = residual_fisher(model, tokens)
        per_layer = ", ".join(f"{float(a.sum()):.3g}/{float(m.sum()):.3g}" for a, m in zip(*_fisher_cache[key]))
        print(f"Fisher over {tokens.numel():,} tokens: {time.perf_counter() - t0:.1f} s; per layer (attn/mlp, sum over "
              f"channels): {per_layer}", flush=True)
    f_attn, f_mlp = _fisher_cache[key]
    curves = []
    for layer, st, fa, fm in zip(model.model.layers, stats, f_attn, f_mlp):
        w = dict(layer_tensors(layer))
        if F_MODE == "scalar":  # one number per residual point: what the streamed pass could apply afterwards
            st = dataclasses.replace(st, inv_ms_attn=fa.mean(), inv_ms_mlp=fm.mean())
        else:
            w["o_w"] = w["o_w"] * fa.sqrt().to(w["o_w"])[:, None]
            w["down_w"] = w["down_w"] * fm.sqrt().to(w["down_w"])[:, None]
            st = dataclasses.replace(st, inv_ms_attn=None, inv_ms_mlp=None)
        curves.append(lc.layer_curves(w, st, arch, methods, eps))
    return lc.plan_from_curves(curves, arch, cr, components, head_multiple, min_head_dim, kv_cr, mlp_multiple)


if __name__ == "__main__":
    _calibration_windows = sources.calibration_windows
    sources.calibration_windows = _record_windows
    lc.allocate_plan = allocate_plan_fisher
    sys.argv = [str(BENCH / "quality.py")] + sys.argv[1:]  # runpy names quality.py in the report's "command"
    sys.path.insert(0, str(BENCH))
    runpy.run_path(str(BENCH / "quality.py"), run_name="__main__")
