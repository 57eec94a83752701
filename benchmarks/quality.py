#!/usr/bin/env python
"""Quality grid: held-out perplexity of A3 recipes and baselines at several CRs, on one model.

Calibrates ONCE (statistics of the original model), then solves every (CR, recipe) from the same
statistics, builds each compressed model in memory and measures perplexity on held-out text that
calibration never saw, with the same windows for every model. Also times one plain forward pass over
the calibration tokens, so the export cost can be read as a ratio.

    python benchmarks/quality.py                      # SmolLM2 demo, CR 0.1/0.2/0.3, all recipes
    python benchmarks/quality.py --crs 0.2 --recipes a3,wanda --eval-tokens 8192
    python benchmarks/quality.py --crs 0,0.1,0.2 --kv-crs 0,0.1,0.2,0.25,0.33,0.4,0.5 --recipes best,paper   # KV axis

The KV axis (``--kv-crs``): every (CR, KV-CR) pair of the grid is one model (``default`` = the exporter's default,
KV-CR = CR; CR 0 with KV-CR > 0 is the KV-cache-compression mode: only head sizes change); the rows carry the
achieved KV-cache reduction and capacity ratio, and the Markdown adds a quality-vs-capacity table.

Writes ``<out-dir>/quality.json``, ``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import a3_serve
from a3_serve.calibration import stats as calibration_stats
from a3_serve.calibration.fisher import fisher_windows, residual_fisher
from a3_serve.calibration.folds import HELDOUT_RULES, heldout_folds, single_fold
from a3_serve.calibration.sources import (
    MIX_PARTS,
    calibration_windows,
    describe_source,
    eval_windows,
    load_texts,
    sources_overlap,
)
from a3_serve.calibration.stats import collect_stats
from a3_serve.errors import A3Error
from a3_serve.eval.ppl import evaluate_ppl
from a3_serve.export.architectures import inspect_architecture
from a3_serve.export.card import dim_span
from a3_serve.export.inmemory import build_a3_model, compress_model
from a3_serve.export.loss_curves import allocate_plan
from a3_serve.export.methods import RECIPES as NAMED_RECIPES
from a3_serve.export.methods import Methods, union_request
from a3_serve.export.report import compressed_config
from a3_serve.progress import progress_bar
from a3_serve.runtime import read_config
from a3_serve.solvers.budget import plan_dims

ALL = ("qk", "ov", "mlp")
# name -> (components, methods, what it is): the named recipes on every component, then component ablations
RECIPES = {name: (ALL, methods, desc) for name, (methods, desc) in NAMED_RECIPES.items()}
RECIPES.update({
    "paper-qk-only": (("qk",), NAMED_RECIPES["paper"][0], "the paper's A3 on QK only (head QK dims cut by CR)"),
    "paper-ov-only": (("ov",), NAMED_RECIPES["paper"][0], "the paper's A3 on OV only (head VO dims cut by CR)"),
    "paper-mlp-only": (("mlp",), NAMED_RECIPES["paper"][0], "the paper's A3 on the MLP only (width cut by CR)"),
    "paper-ov-svd": (ALL, Methods("a3", "svd", "a3"), "paper, but OV by plain SVD (no whitening)"),
    "paper-mlp-rxx": (ALL, Methods("a3", "a3", "rxx"), "paper, but MLP scored by E[h^2] only"),
})
DEFAULT_GRID = ("paper", "best", "best-uniform", "paper+alloc", "paper+ov-shrink", "wanda")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="dense model folder (default: the built-in SmolLM2 demo model)")
    p.add_argument("--crs", default="0.1,0.2,0.3", help="comma-separated compression ratios")
    p.add_argument("--kv-crs", default="default",
                   help="comma-separated KV-cache targets (fraction of KV bytes per token removed); 'default' = the "
                        "exporter's default (KV-CR = CR); each (CR, KV-CR) pair is one model")
    p.add_argument("--recipes", default=",".join(DEFAULT_GRID), help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--calib", default="mix", help="calibration source (default: built-in mix = wiki + austen + pydoc "
                   "in equal shares, calibration split, as a3-export; e.g. wiki for the paper's setting)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", dest="evals", action="append", default=None,
                   help="held-out text to evaluate on, repeatable (default: wiki:heldout and austen:heldout)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--head-multiple", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--heldout-folds", default="batches", choices=list(HELDOUT_RULES),
                   help="what the fitted choices are scored on, as a3-export --heldout-folds (default: batches)")
    p.add_argument("--moment-batch-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of one batch's MLP refit moment before it joins the float64 sum (as a3-export: "
                        "float32; float64 = the all-float64 accumulation, to check that float32 changes nothing)")
    p.add_argument("--out-dir", default="benchmarks/results/quality")
    p.add_argument("--leave-one-out", action="store_true",
                   help="transfer: one calibration per domain of --calib (mix: wiki, austen, pydoc) without it, "
                        "every grid evaluated on all --eval texts; writes without-<domain>/quality.* and "
                        "leave_one_out.md/.json (the share of the paper recipe's increase removed on the unseen "
                        "domain; --recipes must include paper)")
    args = p.parse_args()
    torch.manual_seed(0)
    calibration_stats.OUTER_BATCH_DTYPE = getattr(torch, args.moment_batch_dtype)

    if args.model is None:
        from a3_serve.demo import build_demo_model

        args.model = str(build_demo_model())
    evals = args.evals or ["wiki:heldout", "austen:heldout"]
    crs = [float(c) for c in args.crs.split(",")]
    kv_crs = [None if k == "default" else float(k) for k in args.kv_crs.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    for r in recipes:
        if r.split("@")[0] not in RECIPES or r.split("@")[1:] not in ([], ["propagated"]):
            p.error(f"unknown recipe {r!r}; choose from {', '.join(RECIPES)} (optionally suffixed @propagated)")
    if args.leave_one_out and "paper" not in recipes:
        p.error("--leave-one-out compares with the paper recipe: add paper to --recipes")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_cfg = read_config(args.model)
    arch = inspect_architecture(src_cfg)
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = {}
    for spec in evals:
        windows[spec] = eval_windows(tok, load_texts(spec), args.eval_seqlen, args.eval_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    dense = {spec: evaluate_ppl(model, w, batch_size=args.batch_size, progress=False)["ppl"]
             for spec, w in windows.items()}
    print(f"dense: {dense}", flush=True)
    ctx = Grid(args, src_cfg, arch, tok, model, windows, dense, crs, kv_crs, recipes)
    if not args.leave_one_out:
        ctx.run(args.calib, out_dir)
        print((out_dir / "quality.md").read_text())
        return 0
    results = {}
    for left_out, calib in leave_one_out_folds(args.calib):
        print(f"fold: calibrate on {calib}, {left_out} unseen", flush=True)
        results[left_out] = ctx.run(calib, out_dir / f"without-{left_out}")
    summary = leave_one_out_summary(results, " ".join(["python"] + sys.argv))
    (out_dir / "leave_one_out.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "leave_one_out.md").write_text(render_leave_one_out(summary))
    print((out_dir / "leave_one_out.md").read_text())
    return 0


def leave_one_out_folds(calib: str) -> list[tuple[str, str]]:
    """``(left-out domain, calibration spec)`` per domain of ``calib`` (``mix``: wiki, austen, pydoc): calibrate on
    the others' calibration splits, concatenated (``A+B``), so the left-out domain is text calibration never saw."""
    parts = list(MIX_PARTS) if calib == "mix" else [x for x in calib.split("+") if x]
    if len(parts) < 2:
        raise SystemExit(f"--leave-one-out needs a calibration set of several domains (e.g. mix), got {calib!r}")
    return [(d, "+".join(x for x in parts if x != d)) for d in parts]


class Grid:
    """One model's quality grid: the loaded dense model, the held-out windows and their dense perplexity, shared
    by every calibration set that :meth:`run` is given."""

    def __init__(self, args, src_cfg, arch, tok, model, windows, dense, crs, kv_crs, recipes):
        self.args, self.src_cfg, self.arch, self.tok, self.model = args, src_cfg, arch, tok, model
        self.windows, self.dense, self.crs, self.kv_crs, self.recipes = windows, dense, crs, kv_crs, recipes

    def run(self, calib: str, out_dir: Path) -> dict:
        """Calibrate once on ``calib``, solve and evaluate every (CR, KV-CR, recipe); write ``out_dir``'s
        quality.json / .md / .png after every model; return the result."""
        args, arch, model, windows = self.args, self.arch, self.model, self.windows
        recipes, crs = self.recipes, self.crs
        evals = list(windows)
        for spec in evals:
            if sources_overlap(calib, None, spec, None):
                raise SystemExit(f"--eval {spec} overlaps the calibration text {calib}; evaluate on held-out text")
        out_dir.mkdir(parents=True, exist_ok=True)
        tokens = calibration_windows(self.tok, calib, None, args.nsamples, args.seqlen, args.seed,
                                     model_dir=Path(args.model))
        request = union_request([RECIPES[r.split("@")[0]][1] for r in recipes])
        folds = (heldout_folds(args.heldout_folds, self.tok, calib, None, args.nsamples, args.seqlen, args.seed,
                               args.batch_size) if request.heldout
                 else single_fold(args.nsamples, args.seqlen))  # as a3-export draws them
        batches, heldout = folds.batches(tokens, args.batch_size)
        t0 = time.perf_counter()
        stats = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, request=request,
                              heldout=heldout)
        t_stats = time.perf_counter() - t0
        print(f"statistics over {tokens.numel():,} calibration tokens: {t_stats:.1f} s", flush=True)
        self.fisher, t_fisher = None, 0.0
        if any(RECIPES[r.split("@")[0]][1].needs_fisher for r in recipes):  # as a3-export: its first windows
            t0 = time.perf_counter()
            self.fisher = residual_fisher(model, fisher_windows(tokens), args.batch_size)
            t_fisher = time.perf_counter() - t0
            print(f"residual Fisher over {self.fisher.tokens:,} tokens: {t_fisher:.1f} s", flush=True)
        result: dict = {}

        def save(rows: list) -> None:
            """Write JSON, Markdown and the plot for the rows so far (called after every model)."""
            result.update({
                "command": " ".join(["python"] + sys.argv),
                "model": args.model,
                "a3_serve_version": a3_serve.__version__,
                "machine": {"platform": platform.platform(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()},
                "calibration": {"source": describe_source(calib, None), "nsamples": args.nsamples,
                                "seqlen": args.seqlen, "seed": args.seed, "tokens": int(tokens.numel()),
                                "heldout_folds": folds.describe()},
                "evaluation": {spec: {"tokens": int(w.numel()), "seqlen": args.eval_seqlen}
                               for spec, w in windows.items()},
                "timing": {"statistics_s": t_stats, "fisher_s": t_fisher,
                           "solve_s": {r["recipe"]: r["solve_s"] for r in rows if r["cr"] == crs[0]}},
                "statistics_request": vars(request),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "recipes": {k: RECIPES[k.split("@")[0]][2] + (" (statistics propagated through the compressed "
                                                                 "layers)" if k.endswith("@propagated") else "")
                            for k in recipes},
                "rows": rows,
            })
            (out_dir / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
            (out_dir / "quality.md").write_text(render_markdown(result, evals))
            plot(result, evals, out_dir / "quality.png")

        rows = [{"cr": 0.0, "kv_cr": 0.0, "recipe": "dense",
                 "dims": [arch.head_dim, arch.head_dim, arch.intermediate_size], "achieved_cr": 0.0,
                 "achieved_kv_cr": 0.0, "kv_capacity": 1.0, "ppl": dict(self.dense), "solve_s": 0.0}]
        # recipe-major: the first recipes are complete early; (0, 0) and (0, default) would be the dense model
        grid = [(cr, kv, r) for r in recipes for cr in crs for kv in self.kv_crs if cr > 0 or (kv or 0) > 0]
        for cr, kv_target, recipe in progress_bar(grid, desc="grid", unit="model", force=True):
            row = self.one(stats, batches, heldout, cr, kv_target, recipe)
            if row is None:
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(rows)
        save(rows)
        return result

    def one(self, stats, batches, heldout, cr: float, kv_target, recipe: str):
        """Solve, build and evaluate one model; None when its budget cannot be met (said so)."""
        args, arch, model = self.args, self.arch, self.model
        base, _, stats_mode = recipe.partition("@")
        components, methods, _ = RECIPES[base]
        kv = kv_target if kv_target is not None else (cr if {"qk", "ov"} <= set(components) else 0.0)
        t0 = time.perf_counter()
        try:
            if methods.loss_aware:
                plan = allocate_plan(model, stats, arch, cr, methods, components, args.head_multiple, kv_cr=kv,
                                     fisher=self.fisher)
            else:
                plan = plan_dims(arch, cr, components=components, head_multiple=args.head_multiple, kv_cr=kv)
        except A3Error as err:  # e.g. a KV target below the minimum head size: a gap in the grid, said so
            print(f"skipped CR {cr} KV-CR {kv} {recipe}: {err}", flush=True)
            return None
        cfg = compressed_config(self.src_cfg, arch, plan, {}, torch.float32)
        dims = plan.dim_lists(arch.num_layers)
        if stats_mode:  # layer-by-layer calibration through the already-compressed layers (costs a forward pass)
            state, _ = compress_model(model, None, arch, *dims, methods, batches=batches,
                                      stats_mode=stats_mode, a3_config=cfg, heldout=heldout)
        else:
            state, _ = compress_model(model, stats, arch, *dims, methods)
        solve_s = time.perf_counter() - t0
        small = build_a3_model(cfg, state)
        ppl = {spec: evaluate_ppl(small, w, batch_size=args.batch_size, progress=False)["ppl"]
               for spec, w in self.windows.items()}
        achieved_kv = plan.achieved_kv_cr(arch)
        return {"cr": cr, "kv_cr": kv, "recipe": recipe,
                "dims": [plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size],
                "layer_dims": [list(t) for t in plan.layers] if plan.layers else None,
                "achieved_cr": plan.achieved_cr, "achieved_kv_cr": achieved_kv,
                "kv_capacity": 1.0 / (1.0 - achieved_kv), "ppl": ppl, "solve_s": solve_s}


def share_removed(dense: float, paper: float, value: float):
    """The share of the paper recipe's perplexity increase that ``value`` removes: (paper - value) / (paper -
    dense); None when the paper recipe did not increase perplexity."""
    return (paper - value) / (paper - dense) if paper > dense else None


def leave_one_out_summary(results: dict[str, dict], command: str) -> dict:
    """Per left-out domain, CR and recipe (other than paper): perplexity on the unseen domain's held-out text and
    the share of the paper recipe's increase removed there; also the worst share on any text of the fold."""
    rows = []
    for left_out, result in results.items():
        spec = next(s for s in result["evaluation"] if s.split(":")[0] == left_out)
        dense = result["rows"][0]["ppl"]
        paper = {(r["cr"], r["kv_cr"]): r["ppl"] for r in result["rows"] if r["recipe"] == "paper"}
        for r in result["rows"][1:]:
            p_ = paper.get((r["cr"], r["kv_cr"]))
            if r["recipe"] == "paper" or p_ is None:
                continue
            shares = {s: share_removed(dense[s], p_[s], r["ppl"][s]) for s in r["ppl"]}
            rows.append({"unseen": left_out, "calibration": result["calibration"]["source"], "cr": r["cr"],
                         "kv_cr": r["kv_cr"], "recipe": r["recipe"], "dense": dense[spec], "paper": p_[spec],
                         "ppl": r["ppl"][spec], "share_removed": shares[spec],
                         "worst_share_any_text": min((v for v in shares.values() if v is not None), default=None)})
    return {"command": command, "rows": rows}


def render_leave_one_out(summary: dict) -> str:
    """The leave-one-out table (Markdown)."""
    lines = [f"Command: `{summary['command']}`", "",
             "Each fold calibrates on the other domains' calibration splits and evaluates on the held-out split of "
             "the domain it left out. Share removed = (paper - recipe) / (paper - dense) on the unseen domain; the "
             "last column is the smallest share over every held-out text of the fold (negative: worse than the "
             "paper recipe there).", "",
             "| unseen | calibration | CR | KV-CR | recipe | dense | paper | recipe ppl | share removed | worst share, "
             "any text |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        share = "-" if r["share_removed"] is None else f"{100 * r['share_removed']:.0f}%"
        worst = "-" if r["worst_share_any_text"] is None else f"{100 * r['worst_share_any_text']:.0f}%"
        lines.append(f"| {r['unseen']} | {r['calibration']} | {r['cr']:.2f} | {r['kv_cr']:.2f} | {r['recipe']} | "
                     f"{r['dense']:.2f} | {r['paper']:.2f} | {r['ppl']:.2f} | {share} | {worst} |")
    return "\n".join(lines) + "\n"


def render_markdown(result: dict, evals: list[str]) -> str:
    cal = result["calibration"]
    lines = [
        f"Model `{Path(result['model']).name}`; calibration {cal['nsamples']} x {cal['seqlen']} tokens from "
        f"{cal['source']}; held-out: "
        + ", ".join(f"{s} ({result['evaluation'][s]['tokens']:,} tokens)" for s in evals) + ".",
        f"Command: `{result['command']}`",
        "",
        "| CR | KV-CR | recipe | QK/VO/MLP dims | achieved CR | KV capacity | " + " | ".join(f"ppl {s}" for s in evals)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(evals),
    ]
    lines[0] += " Cells: perplexity (increase over dense, and the share of the paper recipe's increase removed)."
    dense = result["rows"][0]["ppl"]
    paper = {(r["cr"], r.get("kv_cr"), s): r["ppl"][s] for r in result["rows"] if r["recipe"] == "paper" for s in evals}
    for r in result["rows"]:
        cells = []
        for s in evals:
            v = r["ppl"][s]
            if r["recipe"] == "dense":
                cells.append(f"{v:.2f}")
                continue
            cell = f"{v:.2f} ({v - dense[s]:+.2f}"
            p_ = paper.get((r["cr"], r.get("kv_cr"), s))
            if p_ is not None and r["recipe"] != "paper" and p_ > dense[s]:
                cell += f", {100 * (p_ - v) / (p_ - dense[s]):+.0f}% vs paper"
            cells.append(cell + ")")
        kv = r.get("kv_cr")
        lines.append(f"| {r['cr']:.2f} | {'' if kv is None else f'{kv:.2f}'} | {r['recipe']} | {_dims_cell(r)} | "
                     f"{r['achieved_cr']:.3f} | {r.get('kv_capacity', 1.0):.2f}x | " + " | ".join(cells) + " |")
    if len({r.get("kv_cr") for r in result["rows"]}) > 2:
        lines += ["", "Quality vs KV capacity (geometric mean of perplexity / dense over the held-out texts):", "",
                  "| series | " + " | ".join(["KV capacity", "geo-mean ppl ratio"]) + " |", "|---|---|---|"]
        for name, pts in _capacity_series(result, evals).items():
            for cap, g in pts:
                lines.append(f"| {name} | {cap:.2f}x | {g:.3f} |")
    return "\n".join(lines) + "\n"


def _capacity_series(result: dict, evals: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Per (recipe, CR): (KV capacity ratio, geometric-mean perplexity ratio over ``evals``) points, sorted."""
    import math

    dense = result["rows"][0]["ppl"]
    out: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"][1:]:
        name = f"{r['recipe']} CR {r['cr']:g}" if r["cr"] > 0 else f"{r['recipe']} KV mode"
        g = math.exp(sum(math.log(r["ppl"][s] / dense[s]) for s in evals) / len(evals))
        out.setdefault(name, []).append((r.get("kv_capacity", 1.0), g))
    return {k: sorted(v) for k, v in out.items()}


def _dims_cell(row: dict) -> str:
    """'48/48/1459' for uniform dims, 'min-max' ranges over layers for per-layer dims."""
    layers = row.get("layer_dims")
    if not layers:
        return "/".join(map(str, row["dims"]))
    return "/".join(dim_span(layers, k, "-") for k in range(3)) + " (per layer)"


def plot(result: dict, evals: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return
    if len({r.get("kv_cr") for r in result["rows"]}) > 2:  # the KV axis: quality vs capacity
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in _capacity_series(result, evals).items():
            ax.plot([1.0] + [c for c, _ in pts], [1.0] + [g for _, g in pts], marker="o", label=name)
        ax.set_xlabel("KV-cache capacity ratio (tokens in the same memory, vs dense)")
        ax.set_ylabel("perplexity / dense (geometric mean over held-out texts)")
        ax.set_title(f"{Path(result['model']).name}: quality vs KV capacity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    spec = evals[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = result["rows"][0]["ppl"][spec]
    by_recipe: dict[str, list] = {}
    for r in result["rows"][1:]:
        by_recipe.setdefault(r["recipe"], []).append((r["cr"], r["ppl"][spec]))
    for name, pts in by_recipe.items():
        pts.sort()
        ax.plot([0.0] + [c for c, _ in pts], [dense] + [v for _, v in pts], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (decoder linear parameters removed)")
    ax.set_ylabel(f"perplexity on {spec} (log)")
    ax.set_title(f"{Path(result['model']).name}: held-out perplexity vs CR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
