#!/usr/bin/env python
"""Export wall time as a ratio to one plain forward pass over the same calibration tokens.

Alternates (forward pass, full `a3-export` run) ``--repeats`` times in fresh subprocesses so a drifting
machine affects both alike, then reports medians, the ratio, the export's own phase breakdown (load,
calibration, solve, write incl. verification) and peak RSS of each process.

    python benchmarks/export_time.py                       # SmolLM2 demo, CR 0.1, 64 x 512 tokens
    python benchmarks/export_time.py --nsamples 16 --seqlen 512 --repeats 3

Writes ``<out-dir>/export_time.json`` and ``export_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORWARD = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from a3_serve.calibration.sources import calibration_windows
from a3_serve.runtime import resolve_device, resolve_dtype
model_dir, nsamples, seqlen, seed, bs, calib, device, dtype = sys.argv[1:9]
nsamples, seqlen, seed, bs = int(nsamples), int(seqlen), int(seed), int(bs)
dev = resolve_device(device)
dt = resolve_dtype(dtype, dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(model_dir)
tokens = calibration_windows(tok, calib, None, nsamples, seqlen, seed)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev).eval()
t_load = time.perf_counter() - t0
with torch.no_grad():
    model.model(input_ids=tokens[:1, :64].to(dev), use_cache=False)  # warm-up (kernel selection, allocator)
    sync()
    t0 = time.perf_counter()
    for b in tokens.split(bs):
        model.model(input_ids=b.to(dev), use_cache=False)
    sync()
t_fwd = time.perf_counter() - t0
print("RESULT=" + json.dumps({"load_s": t_load, "forward_s": t_fwd, "tokens": tokens.numel(),
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_forward(model: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", FORWARD, model, str(args.nsamples), str(args.seqlen), str(args.seed),
                          str(args.batch_size), args.calib, args.device, args.dtype],
                         capture_output=True, text=True, check=True, env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT="))
    return json.loads(line[len("RESULT="):])


def run_export(model: str, args, workdir: Path) -> dict:
    out_dir = workdir / "a3"
    report = workdir / "report.json"
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", model, "--cr", str(args.cr), "--out", str(out_dir),
           "--overwrite", "--device", args.device, "--dtype", args.dtype, "--calib", args.calib, "--recipe",
           args.recipe, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "--json", str(report), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
    wall = time.perf_counter() - t0
    rep = json.loads(report.read_text())
    if args.keep:
        import shutil

        shutil.rmtree(args.keep, ignore_errors=True)
        shutil.copytree(out_dir, args.keep)
    return {"wall_s": wall, **{k: rep["timings"][k]
                               for k in ("load_s", "calibration_s", "solve_s", "write_s", "total_s")},
            "peak_rss_mb": rep["peak_rss_mb"], "peak_gpu_mb": rep.get("peak_gpu_mb"), "command": " ".join(cmd),
            "per_layer_solve_s": [layer.get("seconds") for layer in rep.get("layers", [])]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="dense model folder (default: the built-in SmolLM2 demo model)")
    p.add_argument("--cr", type=float, default=0.1)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--dtype", default="auto",
                   help="forward / calibration dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--calib", default="mix", help="calibration source (default: built-in mix, as a3-export)")
    p.add_argument("--recipe", default="best", help="a3-export recipe (default: best)")
    p.add_argument("--keep", default=None, help="keep the last export in this folder (default: a temporary one)")
    p.add_argument("--out-dir", default="benchmarks/results/export-time")
    args = p.parse_args()
    if args.model is None:
        from a3_serve.demo import build_demo_model

        args.model = str(build_demo_model())
    fwd, exp = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            fwd.append(run_forward(args.model, args))
            exp.append(run_export(args.model, args, Path(tmp)))
            print(f"repeat {i + 1}/{args.repeats}: forward {fwd[-1]['forward_s']:.1f} s, export "
                  f"{exp[-1]['total_s']:.1f} s (calibration {exp[-1]['calibration_s']:.1f}, solve "
                  f"{exp[-1]['solve_s']:.1f})", flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    result = {
        "command": " ".join(["python"] + sys.argv),
        "export_command": exp[0]["command"],
        "model": args.model,
        "tokens": fwd[0]["tokens"],
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "forward_s": med(fwd, "forward_s"),
        "export": {k: med(exp, k) for k in ("wall_s", "total_s", "load_s", "calibration_s", "solve_s", "write_s")},
        "ratio_export_total_to_forward": med(exp, "total_s") / med(fwd, "forward_s"),
        "ratio_calibration_plus_solve_to_forward":
            (med(exp, "calibration_s") + med(exp, "solve_s")) / med(fwd, "forward_s"),
        "peak_rss_mb": {"forward_process": max(r["peak_rss_mb"] for r in fwd),
                        "export_process": max(r["peak_rss_mb"] for r in exp)},
        "device": args.device,
        "per_layer_solve_s": exp[-1].get("per_layer_solve_s"),
        "repeats": {"forward": fwd, "export": exp},
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_time.json").write_text(json.dumps(result, indent=2) + "\n")
    e = result["export"]
    md = "\n".join([
        f"Model `{Path(args.model).name}`, CR {args.cr}, {result['tokens']:,} calibration tokens ({args.nsamples} x "
        f"{args.seqlen}), median of {args.repeats} alternating runs. Command: `{result['command']}`",
        "",
        "| | seconds | ratio to forward |",
        "|---|---|---|",
        f"| plain forward pass (decoder, fp32) | {result['forward_s']:.1f} | 1.00 |",
        f"| a3-export calibration (forward + float64 statistics) | {e['calibration_s']:.1f} | "
        f"{e['calibration_s'] / result['forward_s']:.2f} |",
        f"| a3-export solve (all layers) | {e['solve_s']:.1f} | {e['solve_s'] / result['forward_s']:.2f} |",
        f"| a3-export load + write + verify | {e['load_s'] + e['write_s']:.1f} | "
        f"{(e['load_s'] + e['write_s']) / result['forward_s']:.2f} |",
        f"| **a3-export total** | **{e['total_s']:.1f}** | **{result['ratio_export_total_to_forward']:.2f}** |",
        "",
        f"Peak RSS: export process {result['peak_rss_mb']['export_process']:.0f} MB, forward-only process "
        f"{result['peak_rss_mb']['forward_process']:.0f} MB.",
        "",
    ])
    (out / "export_time.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
