#!/usr/bin/env python
"""What the default recipe's MLP refit costs at one MLP shape (default: Llama-2-7B's), old form against new.

On synthetic SwiGLU activations ``h = silu(x Wgᵀ) ∘ (x Wuᵀ)`` (random Gaussian ``x`` and weights; the costs depend on
the shapes only), times in one process, each piece once:

* ``moment_f64`` / ``moment_f32``: ``Σ h hᵀ`` over ``--tokens`` rows in batches of ``--batch-rows``, every batch a
  float64 product (before) or a float32 product added into the float64 sum (``calibration.stats``, now);
* ``search``: the held-out ridge search, ``solvers.mlp.mlp_ridge_losses`` over ``DEFAULT_RIDGES`` (one held-out set,
  as the default's every-8th-batch rule; fitted on 7/8 of the batches, scored on the rest);
* ``refit_direct`` / ``refit``: the final refit at one ridge with its in-sample error (the report's ``refit_gain``):
  the direct closed form with ``d`` right-hand sides, the ``H_{S,:} Wdᵀ`` product and ``mlp_objective`` (before),
  against ``mlp_refit_with_loss`` from the dropped columns (now); the two results are compared.

The kept neurons are the top ``--keep`` fraction by the A3 score. Writes ``<out-dir>/refit_cost.json``.

    python benchmarks/refit_cost.py                                   # d 4096, d_int 11008, keep 0.9, 8192 tokens
    python benchmarks/refit_cost.py --d 576 --d-int 1536              # SmolLM2's MLP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=4096, help="hidden size (default: Llama-2-7B's)")
    p.add_argument("--d-int", type=int, default=11008, help="MLP width (default: Llama-2-7B's)")
    p.add_argument("--keep", type=float, default=0.9, help="fraction of the MLP neurons kept (default 0.9)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration rows of h (default 8192)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per calibration batch (default 1024)")
    p.add_argument("--ridge", type=float, default=0.1, help="ridge of the final refit (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="benchmarks/results/refit-cost")
    args = p.parse_args()

    from a3_serve.solvers.linalg import gram
    from a3_serve.solvers.mlp import (
        DEFAULT_RIDGES,
        mlp_objective,
        mlp_refit_with_loss,
        mlp_ridge_losses,
        mlp_scores,
        select_neurons,
    )

    g = torch.Generator().manual_seed(args.seed)
    d, d_int = args.d, args.d_int
    Wg = torch.randn(d_int, d, generator=g) / d**0.5
    Wu = torch.randn(d_int, d, generator=g) / d**0.5
    Wd = torch.randn(d, d_int, generator=g, dtype=torch.float64) / d_int**0.5
    batches = []
    for _ in range(0, args.tokens, args.batch_rows):
        x = torch.randn(args.batch_rows, d, generator=g)
        batches.append(torch.nn.functional.silu(x @ Wg.T) * (x @ Wu.T))  # [rows, d_int] float32
    sec: dict[str, float] = {}

    def moment(dtype: torch.dtype, parts: list[torch.Tensor]) -> torch.Tensor:
        t0 = time.perf_counter()
        total = None
        for h in parts:
            partial = gram(h.to(dtype))
            total = partial.to(torch.float64) if total is None else total.add_(partial)
        sec[f"moment_{'f32' if dtype == torch.float32 else 'f64'}"] = time.perf_counter() - t0
        return total / (len(parts) * args.batch_rows)

    gram(batches[0][:64, :256])  # warm-up (thread pool, kernels)
    H64 = moment(torch.float64, batches)
    H = moment(torch.float32, batches)
    moment_rel = float((H - H64).norm() / H64.norm())
    del H64
    n_val = max(1, len(batches) // 8)
    H_fit = sum(gram(b.to(torch.float64)) for b in batches[:-n_val]) / ((len(batches) - n_val) * args.batch_rows)
    H_val = sum(gram(b.to(torch.float64)) for b in batches[-n_val:]) / (n_val * args.batch_rows)
    r = int(round(args.keep * d_int))
    keep = select_neurons(mlp_scores("a3", torch.diagonal(H), None, None, Wd), r)

    t0 = time.perf_counter()
    losses = mlp_ridge_losses(H_fit, H_val, keep, Wd, DEFAULT_RIDGES)
    sec["search"] = time.perf_counter() - t0
    del H_fit, H_val

    t0 = time.perf_counter()  # the direct closed form, as mlp_refit solved it before, and mlp_objective for the gain
    H_SS = H[keep][:, keep]
    delta = max(args.ridge, 1e-12) * torch.diagonal(H_SS).mean()
    L = torch.linalg.cholesky(H_SS + delta * torch.eye(r, dtype=torch.float64))
    W_direct = torch.cholesky_solve(H[keep] @ Wd.T + delta * Wd[:, keep].T, L).T.contiguous()
    loss_direct = mlp_objective(H, Wd, keep, W_direct)
    sec["refit_direct"] = time.perf_counter() - t0
    del H_SS, L
    t0 = time.perf_counter()
    W, loss = mlp_refit_with_loss(H, keep, Wd, args.ridge)
    sec["refit"] = time.perf_counter() - t0

    result = {
        "command": "python " + " ".join(sys.argv), "d": d, "d_int": d_int, "kept": r, "dropped": d_int - r,
        "tokens": len(batches) * args.batch_rows, "batch_rows": args.batch_rows, "ridge": args.ridge,
        "threads": torch.get_num_threads(), "seconds": sec,
        "moment_f32_relative_difference": moment_rel,
        "refit_relative_difference": float((W - W_direct).norm() / W_direct.norm()),
        "refit_loss": loss, "refit_loss_direct": loss_direct,
        "search_ridges": [str(x) for x in DEFAULT_RIDGES], "search_losses": losses,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refit_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("d", "d_int", "kept", "tokens", "seconds",
                                            "moment_f32_relative_difference", "refit_relative_difference")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
