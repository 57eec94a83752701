#!/usr/bin/env python
"""Where an export's time goes, per decoder layer: the plain layer forward vs the statistics hooks vs the solve.

Runs the first ``--layers`` decoder layers of the dense model one at a time over the calibration tokens (the
streamed export's loop, :mod:`a3_serve.calibration.sequential`) and times, for each layer, over all batches:

* ``forward``: the layer alone (no hooks);
* ``stats_light``: with the hooks the recipe needs except the MLP moment ``E[h hᵀ]``;
* ``stats_full``: with all the hooks the recipe needs (``Methods.stats_request()``);
* ``solve_qk`` / ``solve_ov`` / ``solve_mlp``: the recipe's solvers on that layer at the uniform dims for ``--cr``.

So ``stats_full - forward`` is the statistics' cost and ``stats_full - stats_light`` the MLP moment's. Sums over
the profiled layers go to ``<out-dir>/export_layer_profile.json`` and are printed as a table.

    python benchmarks/export_layer_profile.py --nsamples 32 --seqlen 512 --layers 6 --recipe best
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="dense model folder (default: the built-in SmolLM2 demo model)")
    p.add_argument("--recipe", default="best")
    p.add_argument("--cr", type=float, default=0.1)
    p.add_argument("--calib", default="mix")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", type=int, default=6, help="how many of the first decoder layers to profile")
    p.add_argument("--out-dir", default="benchmarks/results/export-layer-profile")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from a3_serve.calibration.folds import heldout_folds, single_fold
    from a3_serve.calibration.sequential import capture_first_layer_inputs, layer_output
    from a3_serve.calibration.sources import calibration_windows
    from a3_serve.calibration.stats import StatsCollector, rope_inv_freq
    from a3_serve.export.architectures import inspect_architecture
    from a3_serve.export.compress_layer import layer_tensors, solve_mlp, solve_ov, solve_qk
    from a3_serve.export.methods import RECIPES
    from a3_serve.runtime import read_config
    from a3_serve.solvers.budget import plan_dims

    if args.model is None:
        from a3_serve.demo import build_demo_model

        args.model = str(build_demo_model())
    tok = AutoTokenizer.from_pretrained(args.model)
    tokens = calibration_windows(tok, args.calib, None, args.nsamples, args.seqlen, 0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    arch = inspect_architecture(read_config(args.model))
    plan = plan_dims(arch, args.cr)
    methods = RECIPES[args.recipe][0]
    full = methods.stats_request()
    light = replace(full, mlp_moment=False)
    inv_freq = rope_inv_freq(model) if full.rope_energy else None
    folds = (heldout_folds("batches", tok, args.calib, None, args.nsamples, args.seqlen, 0, args.batch_size)
             if full.heldout else single_fold(args.nsamples, args.seqlen))
    batches, heldout = folds.batches(tokens, args.batch_size)
    keys = ("forward", "stats_light", "stats_full", "solve_qk", "solve_ov", "solve_mlp")
    total = dict.fromkeys(keys, 0.0)
    rows = []

    def run(layer, hidden, kwargs, request):
        t0 = time.perf_counter()
        route = StatsCollector(1, arch.num_heads, arch.num_kv_heads, arch.head_dim, request,
                               heldout) if request else None
        handles = route.attach(layer, 0, inv_freq) if route is not None else []
        out = []
        try:
            for b, (x, kw) in enumerate(zip(hidden, kwargs)):
                if route is not None:
                    route.start_batch(b)
                out.append(layer_output(layer(x, **kw)))
        finally:
            for h in handles:
                h.remove()
        stats = route.finish(0) if route is not None else None
        return time.perf_counter() - t0, out, stats

    with torch.no_grad():
        hidden, kwargs = capture_first_layer_inputs(model, batches)
        for i in range(min(args.layers, arch.num_layers)):
            layer = model.model.layers[i]
            row = {"layer": i}
            row["forward"], nxt, _ = run(layer, hidden, kwargs, None)
            row["stats_light"], _, _ = run(layer, hidden, kwargs, light)
            row["stats_full"], _, st = run(layer, hidden, kwargs, full)
            w = layer_tensors(layer)
            for name, fn in (("solve_qk", lambda: solve_qk(w, st, arch, plan.qk_head_dim, methods.qk)),
                             ("solve_ov", lambda: solve_ov(w, st, arch, plan.v_head_dim, methods.ov, 1e-6)),
                             ("solve_mlp", lambda: solve_mlp(w, st, plan.intermediate_size, methods.mlp))):
                t0 = time.perf_counter()
                fn()
                row[name] = time.perf_counter() - t0
            for k in keys:
                total[k] += row[k]
            rows.append(row)
            print(f"layer {i}: " + ", ".join(f"{k} {row[k]:.2f} s" for k in keys), flush=True)
            hidden = nxt
    fwd = total["forward"]
    result = {"command": "python " + " ".join(__import__("sys").argv), "model": args.model, "recipe": args.recipe,
              "cr": args.cr, "tokens": int(tokens.numel()), "batches": len(batches), "layers": len(rows),
              "heldout_folds": folds.describe(),
              "seconds": total, "ratio_to_forward": {k: v / fwd for k, v in total.items()}, "per_layer": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_layer_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(rows)} layers, {int(tokens.numel()):,} tokens, recipe {args.recipe}: seconds (ratio to the plain "
          "forward)")
    for k in keys:
        print(f"  {k:12s} {total[k]:8.2f}  ({total[k] / fwd:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
