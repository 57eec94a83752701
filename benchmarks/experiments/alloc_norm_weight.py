"""Experiment (issue 18, negative result): the loss-aware allocation with every residual write's predicted error
weighted, channel by channel, by the RMSNorm weight ``g`` of the layer that reads it next.

The shipped allocation (docs/METHOD.md §6.3) scales each layer's predicted error ``‖e‖²`` by ``E[1/ms(h)]`` of the
residual stream it is added to. What the next layer actually reads is ``g ⊙ (h + e) / rms(h)``, so the error it
sees is ``E[1/ms]·Σ_c g_c² e_c²``: this script weights the attention output (read by the same layer's
``post_attention_layernorm``) and the MLP output (read by the next layer's ``input_layernorm``; the last layer's by
``model.norm``) that way, by scaling the rows of ``o_proj`` / ``down_proj`` by ``g`` before the loss curves are
built (the solvers are unchanged). It replaces ``a3_serve.export.loss_curves.allocate_plan`` for one run of
``benchmarks/quality.py`` and takes that script's arguments:

    G_MODE=channel python benchmarks/experiments/alloc_norm_weight.py --crs 0.1,0.2 --recipes paper,paper+alloc \
        --eval wiki:heldout --eval austen:heldout --eval pydoc:heldout --eval py-stdlib-source.txt \
        --nsamples 64 --eval-tokens 8192 --out-dir /tmp/alloc-g

``G_MODE=off`` runs the shipped curves through the same path. Result (docs/RESULTS.md, "Weighting the allocation
by the next norm's weight"): worse than the paper recipe on every text of SmolLM2, so not adopted.
"""

import os
import runpy
import sys
from pathlib import Path

import a3_serve.export.loss_curves as lc
from a3_serve.export.compress_layer import layer_tensors

BENCH = Path(__file__).resolve().parents[1]
MODE = os.environ.get("G_MODE", "channel")  # channel | off


def allocate_plan_g(model, stats, arch, cr, methods, components=("qk", "ov", "mlp"), head_multiple=16, eps=1e-6,
                    min_head_dim=lc.MIN_HEAD_DIM, kv_cr=0.0, mlp_multiple=1):
    """:func:`a3_serve.export.loss_curves.allocate_plan` with ``o_w`` / ``down_w`` rows scaled by their reader's g."""
    layers = model.model.layers
    curves = []
    for i, (layer, st) in enumerate(zip(layers, stats)):
        w = dict(layer_tensors(layer))
        if MODE == "channel":
            ga = layer.post_attention_layernorm.weight.detach()
            gm = (layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else model.model.norm.weight).detach()
            w["o_w"] = w["o_w"] * ga.to(w["o_w"])[:, None]
            w["down_w"] = w["down_w"] * gm.to(w["down_w"])[:, None]
        curves.append(lc.layer_curves(w, st, arch, methods, eps))
    return lc.plan_from_curves(curves, arch, cr, components, head_multiple, min_head_dim, kv_cr, mlp_multiple)


if __name__ == "__main__":
    lc.allocate_plan = allocate_plan_g
    sys.argv = [str(BENCH / "quality.py")] + sys.argv[1:]
    sys.path.insert(0, str(BENCH))
    runpy.run_path(str(BENCH / "quality.py"), run_name="__main__")
