"""`a3-export`: compress a dense Hugging Face checkpoint with A3 into a smaller standard checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from a3_serve.calibration.folds import HELDOUT_RULES
from a3_serve.export.methods import (
    ALLOCATIONS,
    DEFAULT_RECIPE,
    MLP_METHODS,
    OV_METHODS,
    QK_METHODS,
    RECIPES,
    Methods,
)
from a3_serve.progress import setup_logging
from a3_serve.runtime import OneLineArgumentParser, run_cli

DESCRIPTION = """\
Compress a dense Hugging Face decoder (Llama 1/2/3, Mistral, Qwen2/2.5, SmolLM2, TinyLlama) with A3:
every attention head keeps fewer QK and VO dimensions and the MLP gets narrower, computed in closed form
from calibration statistics. The output is a normal Hugging Face folder (model_type a3_llama) that
transformers loads after `import a3_serve` (or with trust_remote_code=True) and vLLM serves with the
a3-serve plugin. The write is atomic: nothing appears at --out until the checkpoint is complete.

CR is the fraction of the decoder's linear-layer parameters (q, k, v, o, gate, up, down) removed.
The default recipe spends that budget per layer (loss-aware allocation): each layer gets its own head
size (a multiple of --head-multiple, K = V) and MLP width, written as per-layer lists in config.json,
where the predicted loss increase per removed parameter is smallest (each solver's error weighted by the
loss's sensitivity to that layer's residual stream: one backward pass over 4,096 calibration tokens).
With --allocation uniform (recipes paper, best-uniform) every layer gets the same sizes: heads rounded
DOWN to --head-multiple and the MLP re-solved to meet the target (SmolLM2 at --cr 0.1: heads 64 -> 48,
MLP 1536 -> 1459).

KV-CR is the fraction of the KV cache's bytes per token removed (K and V head sizes); the same cache memory
then holds 1/(1 - KV-CR) times the tokens. It defaults to CR: the export never trades the KV cache away to
meet the parameter budget (--kv-cr 0 lets the allocation choose freely). --kv-cr alone is the KV-cache
compression mode: only the QK/OV head sizes change, the MLP is untouched. With both, both targets hold.
"""

EPILOG = """\
examples:
  a3-export --model ./Llama-3.1-8B --cr 0.1 --out ./compressed
  a3-export --model ./Llama-3.1-8B --kv-cr 0.25 --out ./kv-compressed     # KV cache only: 1.33x more tokens
  a3-export --model ./Llama-3.1-8B --cr 0.1 --kv-cr 0.33 --out ./both      # 10% of the parameters, 1.5x the tokens
  a3-export --model "$(a3-demo-model)" --cr 0.2 --out ./smol-a3 --nsamples 64 --seqlen 512 --eval-tokens 16384
  a3-export --model ./m --cr 0.2 --out ./m-ov --components ov          # ablation: only VO dims
  a3-export --model ./m --cr 0.2 --out ./m-paper --recipe paper       # reproduce the publication
  a3-export --model ./m --cr 0.2 --out ./m-wanda --recipe wanda        # a baseline
  a3-export --model ./m --cr 0.2 --out ./m-x --recipe paper --mlp-method greedy-refit   # override one component
  a3-export --model ./m --cr 0.1 --out ./m-a3 --quant-scheme w4a16 --quant-group-size 32 --quant-backend cpu
                                                                     # sizes a3-quantize --scheme w4a16 can take

cost: calibration is one forward pass over nsamples x seqlen tokens with float64 statistics, plus
head-space solves: --recipe paper takes 1.5x one plain forward pass, the default 3.3x (its MLP refit's
d_int x d_int statistics and ridge search); measured with 32 x 512 tokens on the 135M demo model on 2 CPU
cores: 110 s and 247 s. Time grows with the tokens: the paper's 128 x 2048 takes tens of minutes for a
135M model on CPU and hours for a 7B model; use --device cuda, or fewer tokens (64 x 512 is a good quick
setting for small models). bfloat16 is very slow on most CPUs: keep float32 there.
"""


def _methods(args) -> Methods:
    """The recipe's methods with any per-component --*-method override applied."""
    base = RECIPES[args.recipe][0]
    return Methods(qk=args.qk_method or base.qk, ov=args.ov_method or base.ov, mlp=args.mlp_method or base.mlp,
                   allocation=args.allocation or base.allocation)


def _describe(table: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in table.items())


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="a3-export", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model and output")
    io.add_argument("--model", required=True, metavar="PATH|ID",
                    help="dense Hugging Face model folder (config.json, *.safetensors, tokenizer), or a Hub id "
                         "org/name[@revision]: taken from the Hugging Face cache (HF_HOME / HF_HUB_CACHE) or "
                         "downloaded; HF_HUB_OFFLINE=1 uses the cache only. The id and resolved commit go into the "
                         "provenance")
    io.add_argument("--out", required=True, metavar="DIR",
                    help="folder to create for the compressed checkpoint (must not exist unless --overwrite)")
    io.add_argument("--cr", type=float, default=None, metavar="RATIO",
                    help="compression ratio in (0, 1): fraction of decoder linear parameters to remove, e.g. 0.1 "
                         "(give --cr, --kv-cr or both)")
    io.add_argument("--kv-cr", type=float, default=None, metavar="RATIO",
                    help="KV-cache target in [0, 1): at least this fraction of the KV cache's bytes per token removed "
                         "(0.25: 1.33x more tokens in the same memory). Default: --cr. Alone: only QK/OV head sizes "
                         "change (the MLP is untouched); 0: no KV target")
    io.add_argument("--overwrite", action="store_true",
                    help="replace --out if it exists (the old folder is removed only after the new one is complete)")
    io.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="largest safetensors file to write, as save_pretrained's max_shard_size (default: 5GB; e.g. "
                         "2GB, 500MB); a larger checkpoint is split into model-0000k-of-0000n.safetensors files with "
                         "an index")
    io.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the written weights (default: the source checkpoint's dtype)")

    cal = p.add_argument_group("calibration data")
    cal.add_argument("--calib", default="mix", metavar="SOURCE",
                     help="calibration text: a .txt file (documents separated by blank lines), a .jsonl file (field "
                          "'text', or FILE.jsonl:FIELD), a folder of .txt files, a built-in corpus: 'mix' (default: "
                          "Wikipedia lead paragraphs, Jane Austen's novels and the Python docs in equal shares, "
                          "calibration split), 'wiki', 'austen' or 'pydoc'; A+B concatenates sources; or "
                          "hf:NAME[:CONFIG][:SPLIT] (a Hugging Face dataset; needs network and `pip install "
                          "datasets`); 'self': sequences sampled from the model itself (temperature 1, from its "
                          "start of text, seeded by --seed and cached), 'self+mix': half of them")
    cal.add_argument("--calib-split", default=None, metavar="SPLIT",
                     help="split of the built-in corpus (default: calibration; 'heldout' is reserved for evaluation)")
    cal.add_argument("--nsamples", type=int, default=128,
                     help="number of calibration sequences (default: 128, the paper's)")
    cal.add_argument("--seqlen", type=int, default=2048,
                     help="tokens per calibration sequence (default: 2048, the paper's; see 'cost' below)")
    cal.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows (default: 0)")
    cal.add_argument("--batch-size", type=int, default=4, help="sequences per calibration forward pass (default: 4)")
    cal.add_argument("--heldout-folds", default="batches", choices=list(HELDOUT_RULES),
                     help="what the fitted choices (MLP refit ridge, OV shrinkage) are scored on: 'batches' = every "
                          "8th calibration batch, fitted on the rest (default; measured best), 'domains' = "
                          "leave-one-domain-out cross-validation over the calibration set's domains (mix: wiki, "
                          "austen, pydoc), else its documents (docs/METHOD.md 1.5)")
    cal.add_argument("--stats", default="original", choices=["original", "propagated"],
                     help="where each layer's statistics come from: 'original' = the dense model's activations at "
                          "every layer (the paper; one pass for all layers), 'propagated' = activations that went "
                          "through the already-compressed earlier layers (layer by layer; about twice the calibration "
                          "compute; default: original)")

    run = p.add_argument_group("compute")
    run.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:N or auto (default: cuda if available, else cpu)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="dtype of the calibration forward pass (default: float32 on CPU, bfloat16 on GPU); "
                          "statistics are always accumulated in float64")
    run.add_argument("--in-memory", action="store_true",
                     help="load the whole source model instead of streaming it layer by layer from its safetensors "
                          "files (same result; streaming keeps peak memory at about one layer and can resume)")
    run.add_argument("--no-resume", action="store_true",
                     help="start over instead of resuming an interrupted export with the same arguments (streamed "
                          "exports keep their finished layers in a hidden folder beside --out until they finish)")
    run.add_argument("--damp", type=float, default=1e-6,
                     help="relative eigenvalue floor for the PSD square roots (default: 1e-6)")

    shape = p.add_argument_group("shapes and methods")
    shape.add_argument("--head-multiple", type=int, default=16,
                       help="round head sizes down to a multiple of this (default: 16, needed by vLLM's CPU attention; "
                            "8 is enough for GPU FlashAttention)")
    shape.add_argument("--mlp-multiple", type=int, default=1, metavar="N",
                       help="round reduced MLP widths to a multiple of N (default: 1). Quantized serving needs it: "
                            "a group size must divide down_proj's input (the MLP width), and vLLM's CPU INT4 kernel "
                            "needs multiples of 32; a3-quantize names the value a checkpoint needs "
                            "(docs/QUANTIZATION.md)")
    quant = p.add_argument_group(
        "sizes for a quantized deployment",
        "make every head size and MLP width pass the kernel rules of the scheme you will quantize with "
        "(a3-quantize) and serve on (docs/QUANTIZATION.md): the allocation then only offers legal sizes and meets "
        "the budget with them, and the planned sizes are checked before anything is solved")
    quant.add_argument("--quant-scheme", default=None, choices=["w8a8", "w4a16", "w8a16"],
                       help="the a3-quantize scheme the checkpoint is for (e.g. w4a16 on CPU: fused layer sizes "
                            "multiples of 32; GPTQ groups must divide o_proj's and down_proj's inputs)")
    quant.add_argument("--quant-group-size", default=None, metavar="N|channel",
                       help="the a3-quantize --group-size you will use (default: the scheme's, 128 for w4a16)")
    quant.add_argument("--quant-backend", default="auto", choices=["auto", "all", "cpu", "gpu"],
                       help="the vLLM backend it will be served on (default auto: gpu where nvidia-smi lists a GPU, "
                            "else cpu; all: every backend the scheme runs on)")
    quant.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                       help="the vLLM --kv-cache-dtype it will be served with; fp8 on CPU needs head sizes that are "
                            "multiples of 32 (default: the model's dtype, no extra rule)")
    shape.add_argument("--components", default="qk,ov,mlp", metavar="LIST",
                       help="which components to compress, comma-separated subset of qk,ov,mlp (default: all). With a "
                            "subset, each chosen component is cut by --cr and the others stay dense (for ablations; "
                            "QK-only/OV-only checkpoints have K and V of different sizes, which vLLM's CPU backend "
                            "cannot run)")
    shape.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                       help=f"named set of per-component methods (default: {DEFAULT_RECIPE}). "
                       + _describe({k: v[1] for k, v in RECIPES.items()}))
    shape.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                       help="override the recipe's budget allocation. " + _describe(ALLOCATIONS))
    shape.add_argument("--qk-method", default=None, choices=list(QK_METHODS),
                       help="override the recipe's QK (RoPE pair selection) score. " + _describe(QK_METHODS))
    shape.add_argument("--ov-method", default=None, choices=list(OV_METHODS),
                       help="override the recipe's OV solver. " + _describe(OV_METHODS))
    shape.add_argument("--mlp-method", default=None, choices=list(MLP_METHODS),
                       help="override the recipe's MLP method. " + _describe(MLP_METHODS))

    ev = p.add_argument_group("quality check and output")
    ev.add_argument("--eval-tokens", type=int, default=0, metavar="N",
                    help="after solving, measure perplexity of dense and compressed on N held-out tokens and put it in "
                         "the model card (default: 0 = skip)")
    ev.add_argument("--eval-data", default="wiki:heldout", metavar="SOURCE",
                    help="held-out text for --eval-tokens (default: wiki:heldout; never the calibration text)")
    ev.add_argument("--eval-seqlen", type=int, default=512, help="window length for --eval-tokens (default: 512)")
    ev.add_argument("--no-verify", action="store_true",
                    help="skip loading the written checkpoint (and a forward pass) before it is moved into place")
    ev.add_argument("--dry-run", action="store_true",
                    help="check every input, print the planned dims, parameter and KV-cache savings and the estimated "
                         "time and memory, and stop (nothing is computed or written)")
    ev.add_argument("--json", metavar="FILE", help="also write the export report as JSON to FILE ('-' for stdout)")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines; errors only")
    ev.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def _dims_line(s: dict) -> str:
    """'QK head 64 -> 48, ...' for uniform dims; ranges over layers for per-layer dims."""
    from a3_serve.export.card import dim_span

    layers = s.get("layer_dims")
    if not layers:
        return (f"QK head {s['head_dim']} -> {s['qk_head_dim']}, VO head {s['head_dim']} -> {s['v_head_dim']}, "
                f"MLP {s['intermediate_size']} -> {s['new_intermediate_size']}")
    return (f"per layer: QK head {s['head_dim']} -> {dim_span(layers, 0)}, VO head {s['head_dim']} -> "
            f"{dim_span(layers, 1)}, MLP {s['intermediate_size']} -> {dim_span(layers, 2)} (config.json layer_* lists)")


def format_summary(report: dict) -> str:
    s = report["summary"]
    t = report["timings"]
    lines = [
        f"A3 export done: {report['output']}",
        f"  source      {report['source']['name']} ({report['source']['architecture']}, "
        f"{report['source']['attention']})",
        f"  dims        {_dims_line(s)}",
        f"  params      decoder linear {s['linear_params_before']:,} -> {s['linear_params_after']:,}; all "
        f"{s['params_before']:,} -> {s['params_after']:,}",
        f"  KV cache    {s['kv_bytes_per_token_before']:,} -> {s['kv_bytes_per_token_after']:,} bytes/token "
        f"({s['kv_dtype']}), x{s['kv_bytes_per_token_before'] / s['kv_bytes_per_token_after']:.2f} more tokens per GB "
        f"(target >= {s.get('target_kv_cr', 0.0):.3f} removed, achieved {s.get('achieved_kv_cr', 0.0):.4f})",
        f"  CR          target {s['target_cr']:.3f}, achieved {s['achieved_cr']:.4f}",
        f"  methods     recipe {report.get('recipe', 'custom')}: qk={report['methods']['qk']} "
        f"ov={report['methods']['ov']} mlp={report['methods']['mlp']} "
        f"allocation={report.get('allocation', 'uniform')}; components {','.join(s['components'])}",
        f"  calibration {report['calibration']['nsamples']} x {report['calibration']['seqlen']} tokens from "
        f"{report['calibration']['description']} ({report['calibration'].get('statistics', 'original')} statistics)",
        f"  time        {t['total_s']:.1f} s (load {t['load_s']:.1f}, calibration {t['calibration_s']:.1f}, solve "
        f"{t['solve_s']:.1f}, write + verify{' + eval' if report.get('quality') else ''} {t['write_s']:.1f}); peak RSS "
        f"{report['peak_rss_mb']:.0f} MB",
    ]
    if report.get("resumed"):
        lines.append("  resumed     from an interrupted run: calibration and solve times include that run's finished "
                     "layers")
    q = report.get("quality")
    if q:
        lines.append(f"  perplexity  dense {q['dense_ppl']:.3f} -> compressed {q['compressed_ppl']:.3f} on "
                     f"{q['n_tokens']:,} held-out tokens of {q['data']}")
    for note in s.get("notes", []):
        lines.append(f"  note        {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else (2 if args.verbose else 1))

    def command() -> int:
        from a3_serve.errors import InputError
        from a3_serve.export.pipeline import ExportOptions, run_export
        from a3_serve.folders import check_output_file, write_output_file

        if args.cr is None and args.kv_cr is None:
            raise InputError("give --cr (parameters removed), --kv-cr (KV cache removed) or both, e.g. --cr 0.1")
        if args.json and args.json != "-":  # checked now: a bad path must not cost the export
            check_output_file(Path(args.json), "--json", (("--model", Path(args.model)), ("--out", Path(args.out))))
        opts = ExportOptions(
            model=Path(args.model), out=Path(args.out), cr=0.0 if args.cr is None else args.cr, kv_cr=args.kv_cr,
            calib=args.calib, calib_split=args.calib_split,
            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, save_dtype=args.save_dtype, head_multiple=args.head_multiple,
            mlp_multiple=args.mlp_multiple, quant_scheme=args.quant_scheme, quant_group_size=args.quant_group_size,
            quant_backend=args.quant_backend, kv_cache_dtype=args.kv_cache_dtype,
            components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
            methods=_methods(args), recipe=args.recipe, damp=args.damp, stats=args.stats,
            heldout_folds=args.heldout_folds, overwrite=args.overwrite, eval_data=args.eval_data,
            eval_tokens=args.eval_tokens,
            eval_seqlen=args.eval_seqlen, verify=not args.no_verify, max_shard_size=args.max_shard_size,
            stream=not args.in_memory, resume=not args.no_resume, dry_run=args.dry_run,
        )
        report = run_export(opts, progress=not args.quiet)
        if report.get("dry_run"):
            print("\n".join(report.pop("lines")))
        elif not args.quiet:
            print(format_summary(report))
        if args.json:
            text = json.dumps(report, indent=2)
            if args.json == "-":
                print(text)
            else:
                write_output_file(Path(args.json), text + "\n")
        return 0

    return run_cli(command, interrupted="interrupted; nothing was written to --out (re-run the same command to resume "
                                        "a streamed export)")


if __name__ == "__main__":
    sys.exit(main())
