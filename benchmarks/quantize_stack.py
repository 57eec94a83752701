#!/usr/bin/env python
"""A3 stacked on quantization, measured through vLLM (CPU): one row per checkpoint (and KV-cache dtype).

    python benchmarks/quantize_stack.py --row dense=DIR --row dense+w8a8=DIR ... [--row NAME=DIR@fp8] \
        --out-dir benchmarks/results/quantize-stack

Every row runs in a fresh process (one vLLM engine, ``--dtype`` (bf16 by default), eager, the same KV-cache bytes for
all rows, tcmalloc and Intel OpenMP preloaded as vLLM's CPU guide asks) and reports, all from the engine itself:

- perplexity on the held-out splits of the built-in corpora (``wiki``, ``austen``, ``pydoc``): non-overlapping
  windows, the same token windows for every row (the tokenizer is shared), from vLLM's prompt logprobs;
- KV-cache capacity in tokens (``num_gpu_blocks x block_size``) at ``--kv-cache-gib``;
- output tokens/s and the mean time per decode step of a fixed random-token workload (greedy, EOS ignored);
- weight bytes: the checkpoint's safetensors files on disk (quantized weights, scales, unquantized embeddings).

Writes ``quantize_stack.json`` (every number and the command), ``.md`` (a table) and ``.png`` (perplexity against
weight bytes and against KV capacity).

The A3 rows come from ``a3-export --quant-scheme w4a16 --quant-group-size 32 --quant-backend cpu --kv-cache-dtype fp8``
(every head size and MLP width legal for vLLM's CPU INT4 kernel, GPTQ groups of 32 and an FP8 KV cache), so one export
per CR serves every scheme; ``benchmarks/quantize_stack.sh`` runs the whole table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = ("wiki", "austen", "pydoc")


def _one(args) -> dict:
    """Inside the per-row process: measure one checkpoint."""
    import math
    import random

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from a3_serve.calibration.sources import eval_windows, load_texts

    tok = AutoTokenizer.from_pretrained(args.model)
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=args.seqlen + 8, seed=0,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory_bytes=int(args.kv_cache_gib * 1024**3),
              max_num_seqs=max(args.num_prompts, 8))
    cache = llm.llm_engine.vllm_config.cache_config
    res: dict = {"model": args.model, "kv_cache_dtype": args.kv_cache_dtype, "dtype": args.dtype,
                 "kv_cache_tokens": int(cache.num_gpu_blocks or 0) * int(cache.block_size),
                 "weight_bytes": sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))}
    ppl_params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    for dom in DOMAINS:
        windows = eval_windows(tok, load_texts(dom, "heldout"), args.seqlen, max_tokens=args.ppl_tokens)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in windows], ppl_params, use_tqdm=False)
        nll, n = 0.0, 0
        for w, o in zip(windows, outs):
            for pos, lp in enumerate(o.prompt_logprobs or []):
                if pos == 0 or lp is None:
                    continue
                nll -= lp[int(w[pos])].logprob
                n += 1
        res[f"ppl_{dom}"] = math.exp(nll / n)
        res[f"ppl_{dom}_tokens"] = n
    rng = random.Random(0)
    vocab = tok.vocab_size
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(args.input_len)])
               for _ in range(args.num_prompts)]
    gen = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, gen, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    res.update(output_tokens_per_s=n_out / elapsed, elapsed_s=elapsed, output_tokens=n_out,
               step_ms=1000 * elapsed / args.output_len,
               workload=dict(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len))
    return res


def _parse_row(spec: str) -> tuple[str, str, str]:
    name, _, rest = spec.partition("=")
    path, _, kv = rest.partition("@")
    if not name or not path:
        raise SystemExit(f"--row {spec!r}: use NAME=DIR or NAME=DIR@fp8")
    return name, path, kv or "auto"


def _describe(path: str) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    a3 = cfg.get("a3") if isinstance(cfg.get("a3"), dict) else {}
    q = (a3 or {}).get("quantization") or {}
    if not q and (Path(path) / "a3_quantize.json").is_file():
        q = json.loads((Path(path) / "a3_quantize.json").read_text())["quantization"]
    layers = cfg.get("layer_qk_head_dims") or [cfg.get("qk_head_dim") or cfg.get("head_dim")] * cfg["num_hidden_layers"]
    mlp = cfg.get("layer_intermediate_sizes") or [cfg["intermediate_size"]] * cfg["num_hidden_layers"]
    times = {}
    for fname, key in (("a3_report.json", "export_s"), ("a3_quantize.json", "quantize_s")):
        try:
            times[key] = json.loads((Path(path) / fname).read_text())["timings"]["total_s"]
        except (OSError, ValueError, KeyError):
            pass
    return {"a3_cr": a3.get("achieved_cr"), "scheme": q.get("scheme"), "group_size": q.get("group_size"),
            "head_sizes": sorted(set(layers)), "mlp_widths": [min(mlp), max(mlp)], **times}


def _fmt_cr(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _baseline(rows: list[dict]) -> dict:
    """The row the others are compared with: the one named ``dense``, else the first."""
    return next((r for r in rows if r["name"] == "dense"), rows[0])


def _markdown(rows: list[dict]) -> str:
    dense = _baseline(rows)
    head = ("| row | A3 CR | quant | KV dtype | ppl wiki | ppl austen | ppl pydoc | weight MB | x dense | KV tokens | "
            "x dense | output tok/s | ms / step | export + quantize s |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_fmt_cr(r['a3_cr'])} | "
            f"{(r['scheme'] or '-') + ('/g' + str(r['group_size']) if r.get('group_size') else '')} | "
            f"{r['kv_cache_dtype']} | {r['ppl_wiki']:.2f} | {r['ppl_austen']:.2f} | {r['ppl_pydoc']:.2f} | "
            f"{r['weight_bytes'] / 1e6:.1f} | {dense['weight_bytes'] / r['weight_bytes']:.2f} | "
            f"{r['kv_cache_tokens']:,} | {r['kv_cache_tokens'] / dense['kv_cache_tokens']:.2f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['step_ms']:.0f} | "
            f"{_fmt_s(r.get('export_s'))} + {_fmt_s(r.get('quantize_s'))} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        ppl = sum(r[f"ppl_{d}"] for d in DOMAINS) / len(DOMAINS)
        marker = "o" if r["a3_cr"] is None else "s"
        for ax, x in ((axes[0], r["weight_bytes"] / 1e6), (axes[1], r["kv_cache_tokens"])):
            ax.scatter(x, ppl, marker=marker)
            ax.annotate(r["name"], (x, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("checkpoint weight files (MB)")
    axes[1].set_xlabel("KV-cache capacity (tokens, same cache bytes)")
    for ax in axes:
        ax.set_ylabel("perplexity, mean of wiki/austen/pydoc held-out")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(_baseline(rows)['path']).name} through vLLM 0.32 (CPU, {rows[0]['dtype']}): A3 x quantization "
                 "(circles dense, squares A3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", default=[], help="NAME=DIR or NAME=DIR@fp8 (repeatable, in order)")
    ap.add_argument("--out-dir", default="benchmarks/results/quantize-stack")
    ap.add_argument("--seqlen", type=int, default=512, help="perplexity window (default 512)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens per domain (default 4096)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16",
                    help="vLLM --dtype for every row (default bfloat16: vLLM 0.32's CPU INT4 kernel has no float32 "
                         "path, and W8A8's AMX kernel wants bf16)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        Path(args.one).write_text(json.dumps(_one(args)))
        return 0
    from a3_serve.bench.preload import engine_env

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.row:
        name, path, kv = _parse_row(spec)
        tmp = out_dir / f".row-{len(rows)}.json"
        cmd = [sys.executable, __file__, "--one", str(tmp), "--model", path, "--kv-cache-dtype", kv,
               "--seqlen", str(args.seqlen), "--ppl-tokens", str(args.ppl_tokens), "--kv-cache-gib",
               str(args.kv_cache_gib), "--dtype", args.dtype, "--num-prompts", str(args.num_prompts),
               "--input-len", str(args.input_len),
               "--output-len", str(args.output_len)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=engine_env(dict(os.environ, VLLM_TARGET_DEVICE="cpu")), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(f"[quantize_stack] {name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append({"name": name, "path": path, "kv_cache_dtype": kv, "error": proc.stderr[-2000:]})
            continue
        row = json.loads(tmp.read_text())
        tmp.unlink()
        row.update(name=name, path=path, wall_s=time.perf_counter() - t0, **_describe(path))
        rows.append(row)
        print(f"[quantize_stack] {name}: ppl wiki {row['ppl_wiki']:.2f} austen {row['ppl_austen']:.2f} pydoc "
              f"{row['ppl_pydoc']:.2f}, {row['weight_bytes'] / 1e6:.1f} MB, KV {row['kv_cache_tokens']:,} tokens, "
              f"{row['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_at_end": os.getloadavg()[0]}
    (out_dir / "quantize_stack.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if ok:
        (out_dir / "quantize_stack.md").write_text(_markdown(ok))
        _plot(ok, out_dir / "quantize_stack.png")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
