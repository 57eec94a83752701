#!/usr/bin/env python
"""Digest every tensor and the config of a matrix of exports, to show that a change of the exporter's code
leaves its checkpoints bit for bit the same.

    python scripts/export_digests.py --out /tmp/digests-after.json [--quick]
    PYTHONPATH=/tmp/a3-before python scripts/export_digests.py --out /tmp/digests-before.json   # another version
    python scripts/export_digests.py --compare /tmp/digests-before.json /tmp/digests-after.json

The matrix: the real demo model (SmolLM2-135M) with every recipe, streamed and in memory, with original and
propagated statistics, the loss-aware allocation through one calibration pass and through two (statistics
cache limit 0), a component subset; and random GQA (llama3 RoPE) and Qwen2 (biases, tied embeddings) models.
Only the public API is used (``ExportOptions``/``run_export``), so two versions of the package run the same
script. Config digests leave out provenance fields that record the package version or were added later.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

#: ``a3`` provenance keys that are not part of the model (they may be added or change between versions)
PROVENANCE_ONLY = {"a3_serve_version", "source_fingerprint", "rope_digest", "source"}


def digest_folder(folder: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                out[name] = (f"{t.dtype}:{list(t.shape)}:"
                             + hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:24])
    cfg = json.loads((folder / "config.json").read_text())
    a3 = {k: v for k, v in (cfg.pop("a3", None) or {}).items() if k not in PROVENANCE_ONLY}
    for k in ("transformers_version",):
        cfg.pop(k, None)
    out["config.json"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:24]
    out["config.a3"] = hashlib.sha256(json.dumps(a3, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return out


def cases(quick: bool) -> list[tuple[str, str, dict]]:
    """(name, model key, ExportOptions fields)."""
    base = dict(nsamples=4, seqlen=64, batch_size=2, device="cpu", dtype="float32", calib="wiki")
    out = []
    recipes = ["best", "paper"] if quick else ["best", "paper", "best-uniform", "paper+alloc", "wanda", "weight-norm"]
    for recipe in recipes:
        for stream in (True, False):
            out.append((f"smol/{recipe}/{'stream' if stream else 'mem'}", "smol",
                        dict(base, cr=0.2, recipe=recipe, stream=stream)))
    if not quick:
        out.append(("smol/best/two-pass/stream", "smol",
                    dict(base, cr=0.2, recipe="best", stream=True, _two_pass=True)))
        out.append(("smol/best/two-pass/mem", "smol", dict(base, cr=0.2, recipe="best", stream=False, _two_pass=True)))
        out.append(("smol/best-uniform/propagated/stream", "smol",
                    dict(base, cr=0.2, recipe="best-uniform", stats="propagated")))
        out.append(("smol/best-uniform/propagated/mem", "smol",
                    dict(base, cr=0.2, recipe="best-uniform", stats="propagated", stream=False)))
        out.append(("smol/paper/ov,mlp", "smol", dict(base, cr=0.2, recipe="paper", components=("ov", "mlp"))))
    for kind in ("llama3-gqa", "qwen2-bias"):
        for recipe in ("best", "paper"):
            out.append((f"{kind}/{recipe}", kind, dict(base, cr=0.25, recipe=recipe)))
    return out


def run(out_file: Path, quick: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import a3_serve
    from a3_serve.demo import build_demo_model
    from a3_serve.export.pipeline import ExportOptions, run_export

    try:  # the layout since the export's redesign
        import a3_serve.export.passes as allocation
        from a3_serve.export.methods import RECIPES
    except ImportError:  # before it
        import a3_serve.export.allocation as allocation
        from a3_serve.export.recipes import RECIPES
    from conftest import build_random_model

    print(f"a3_serve from {Path(a3_serve.__file__).parent}", file=sys.stderr)
    demo = build_demo_model()
    limit = allocation.CACHED_STATS_MAX_BYTES
    results = {}
    with tempfile.TemporaryDirectory(prefix="a3-digests-") as tmp:
        models = {"smol": demo}
        for i, kind in enumerate(("llama3-gqa", "qwen2-bias")):
            models[kind] = build_random_model(kind, Path(tmp) / "src" / kind, demo, seed=i)
        for name, key, fields in cases(quick):
            fields = dict(fields)
            two_pass = fields.pop("_two_pass", False)
            allocation.CACHED_STATS_MAX_BYTES = 0 if two_pass else limit
            recipe = fields.pop("recipe")
            out = Path(tmp) / "out" / name.replace("/", "_")
            opts = ExportOptions(model=models[key], out=out, methods=RECIPES[recipe][0], recipe=recipe, **fields)
            run_export(opts, progress=False)
            results[name] = digest_folder(out)
            print(f"{name}: {len(results[name])} entries", file=sys.stderr)
    allocation.CACHED_STATS_MAX_BYTES = limit
    out_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def compare(a: Path, b: Path) -> int:
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for case in sorted(set(da) | set(db)):
        if case not in da or case not in db:
            print(f"{case}: only in {'the first' if case in da else 'the second'} file")
            bad += 1
            continue
        diff = sorted(k for k in set(da[case]) | set(db[case]) if da[case].get(k) != db[case].get(k))
        print(f"{case}: {'identical' if not diff else 'DIFFERS in ' + ', '.join(diff[:6])} ({len(da[case])} entries)")
        bad += bool(diff)
    print(f"{len(set(da) & set(db)) - bad} of {len(set(da) | set(db))} exports identical")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the digests of the export matrix here")
    ap.add_argument("--quick", action="store_true", help="a smaller matrix (two recipes)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two digest files")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give --out FILE or --compare A B")
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
