#!/usr/bin/env python
"""Resident memory of the streamed export, layer by layer, at a real model shape with random weights.

Builds (once, reusable with --source) a random-weight checkpoint of a published shape with the first --layers
decoder layers, runs the streamed export on it in this process and prints the process's resident set (VmRSS)
and high-water mark (VmHWM) after every layer is released, then the export's peak RSS. A flat resident set
across layers means the peak does not grow with the number of layers.

    python benchmarks/stream_memory.py --shape llama-2-7b --layers 6 --out-dir benchmarks/results/stream-memory

Writes ``<out-dir>/stream_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _status_mb() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, val = line.split(":")
            out[key] = int(val.split()[0]) / 1024.0
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b",
                   help="a shape of a3_serve.random_model.SHAPES (default: llama-2-7b)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers to build (default: 6)")
    p.add_argument("--source", default=None, help="reuse (or create) the random checkpoint in this folder")
    p.add_argument("--recipe", default="paper", help="export recipe (default: paper; see a3-export --help)")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--out-dir", default="benchmarks/results/stream-memory")
    args = p.parse_args()

    import a3_serve.export.streamed as streamed
    from a3_serve.demo import build_demo_model
    from a3_serve.export.methods import RECIPES
    from a3_serve.export.pipeline import ExportOptions, run_export
    from a3_serve.random_model import write_random_llama

    tmp = Path(tempfile.mkdtemp(prefix="a3-stream-mem-"))
    source = Path(args.source) if args.source else tmp / f"{args.shape}-{args.layers}l"
    if not (source / "config.json").is_file():
        write_random_llama(source, args.shape, build_demo_model(), num_layers=args.layers, progress=True)
    per_layer: list[dict] = []
    release = streamed.release_module

    def probe(model, prefix):
        release(model, prefix)
        per_layer.append({"released": prefix, **_status_mb()})
        print(f"{prefix:>18}: resident {per_layer[-1]['VmRSS']:8.0f} MB, high-water {per_layer[-1]['VmHWM']:8.0f} MB",
              flush=True)

    streamed.release_module = probe
    t0 = time.perf_counter()
    try:
        report = run_export(ExportOptions(model=source, out=tmp / "out", cr=0.1, calib="wiki", nsamples=args.nsamples,
                                          seqlen=args.seqlen, device="cpu", dtype="float32",
                                          methods=RECIPES[args.recipe][0], recipe=args.recipe, verify=False),
                            progress=True)
    finally:
        streamed.release_module = release
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "shape": args.shape,
              "layers": args.layers, "recipe": args.recipe, "calibration_tokens": args.nsamples * args.seqlen,
              "per_layer": per_layer, "peak_rss_mb": report["peak_rss_mb"], "export_s": time.perf_counter() - t0}
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(tmp / "out", ignore_errors=True)
    if not args.source:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
