"""`a3-eval`: perplexity on held-out text (`a3-eval ppl`), greedy completions (`a3-eval generate`) and task
accuracy with lm-evaluation-harness (`a3-eval tasks`, :mod:`a3_serve.eval.harness`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from a3_serve.errors import InputError
from a3_serve.runtime import OneLineArgumentParser, run_cli

DESCRIPTION = """\
Evaluate a dense or A3-compressed Hugging Face checkpoint.

  ppl       perplexity = exp(mean token NLL) over consecutive non-overlapping windows of held-out text;
            every window is scored on its own and predicts its tokens 2..seqlen. The same --data,
            --split, --seqlen and --max-tokens give the same windows for every model that shares a
            tokenizer, so dense and compressed numbers are directly comparable.
  generate  greedy completion of a prompt (plain text, or one chat turn with --chat).
  tasks     accuracy on lm-evaluation-harness tasks: the local a3_lastword and a3_cloze (built from held-out
            text, no network) or standard task names (their data from the Hugging Face Hub or its cache);
            transformers (--backend hf) or vLLM (--backend vllm) runs the model.

Compressed folders (model_type a3_llama) load through a3-serve's registered classes; no remote code runs.
"""

EPILOG = """\
examples:
  a3-eval ppl --model "$(a3-demo-model)"                              # wiki:heldout, 32,768 tokens, 512-token windows
  a3-eval ppl --model ./smol-a3 --max-tokens 16384 --json result.json
  a3-eval ppl --model ./m --data my_eval.txt --seqlen 1024 --max-tokens 0 --json -
  a3-eval generate --model ./smol-a3 --prompt "The capital of France is"
  a3-eval generate --model ./smol-a3 --chat --prompt "Name three primary colours." --max-new-tokens 48
  a3-eval tasks --model ./smol-a3 --tasks a3_lastword,a3_cloze --json tasks.json
  a3-eval tasks --model ./smol-a3 --tasks a3_cloze --backend vllm --limit 50

speed: a 135M-parameter model scores about 400 tokens/s in float32 on a 2-core CPU, so the default
32,768 tokens take about 1.5 minutes there. bfloat16 is very slow on most CPUs: keep float32 there.
"""

DATA_HELP = (
    "evaluation text: 'wiki' (built-in Wikipedia lead paragraphs; default, split heldout), 'wiki:heldout', "
    "'austen' (built-in Jane Austen novels, split heldout: Persuasion and Northanger Abbey), "
    "a .txt file (documents separated by blank lines), a .jsonl file (field 'text', or FILE.jsonl:FIELD), "
    "a folder of .txt files, or hf:NAME[:CONFIG][:SPLIT] (needs the 'datasets' package and network)"
)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True, tokenizer: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="DIR|ID",
                   help="Hugging Face model folder: dense (e.g. `a3-demo-model`'s) or compressed by a3-export; or a "
                        "Hub id org/name[@revision] (from the local cache first; HF_HUB_OFFLINE=1 honoured)")
    if tokenizer:
        p.add_argument("--tokenizer", metavar="DIR", default=None,
                       help="folder to load the tokenizer from (default: the --model folder)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu, cuda, cuda:N or auto (cuda when available) (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype (default: float32; auto = float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); on a busy shared machine "
                        "1 can be several times faster than oversubscribed cores")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or log lines; results and errors only")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log what is done (-vv: also transformers' logs)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="a3-eval", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{ppl,generate,tasks}", parser_class=OneLineArgumentParser)
    sub.required = True

    pp = sub.add_parser("ppl", help="perplexity on held-out text",
                        description="Perplexity = exp(mean token NLL) over non-overlapping windows of held-out text. "
                                    "Prints one line, e.g. 'perplexity 12.34 over 32,768 tokens (64 windows of 512) on "
                                    "wiki:heldout, 80.1 s'; --json also writes all numbers.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(pp)
    g = pp.add_argument_group("evaluation text")
    g.add_argument("--data", default="wiki", metavar="SOURCE", help=DATA_HELP)
    g.add_argument("--split", default=None, metavar="SPLIT",
                   help="split of 'wiki' or 'austen' (calibration or heldout; default heldout) or of an hf: dataset; "
                        "not allowed for files and folders")
    g.add_argument("--seqlen", type=int, default=512, metavar="N",
                   help="tokens per window; each window is scored on its own (default: 512)")
    g.add_argument("--max-tokens", type=int, default=32768, metavar="N",
                   help="evaluate at most N tokens from the start of the text, rounded down to whole windows "
                        "(default: 32768; 0 = all of the text)")
    g.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="windows per forward pass; more is faster on GPU, needs B x seqlen x vocab x 4 bytes "
                        "for the logits (default: 1)")
    g.add_argument("--allow-calibration-overlap", action="store_true",
                   help="evaluate even when the model's recorded calibration text (config.json 'a3' block) is the "
                        "evaluation text; otherwise that is refused, since such a number says nothing about quality")
    g.add_argument("--json", metavar="FILE",
                   help="write the result as JSON to FILE ('-' for stdout; the human line then goes to stderr): "
                        "model, data, split, seqlen, n_windows, n_tokens, nll, ppl, seconds, dtype, device, "
                        "and the model's a3 provenance block if it has one")

    pg = sub.add_parser("generate", help="greedy completion of a prompt",
                        description="Greedy (deterministic) completion of --prompt; prints the new text only.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(pg)
    pg.add_argument("--prompt", required=True, metavar="TEXT",
                    help="the text to continue (or the user message with --chat)")
    pg.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                    help="stop after N new tokens or at the end-of-sequence token (default: 32)")
    pg.add_argument("--chat", action="store_true",
                    help="wrap the prompt as one user turn with the tokenizer's chat template and print the reply")
    _add_tasks_parser(sub)
    return p


TASKS_EPILOG = """\
examples:
  a3-eval tasks --model ./smol-a3 --tasks a3_lastword,a3_cloze --json smol-a3.json
  a3-eval tasks --model ./smol-a3 --tasks a3_cloze --backend vllm --limit 100
  a3-eval tasks --model ./smol-a3 --tasks arc_easy,hellaswag          # needs the Hub (or its datasets cache)
  lm_eval --model hf --model_args pretrained=./smol-a3,trust_remote_code=True,dtype=float32 \\
      --tasks a3_cloze --include_path "$(a3-eval tasks --print-include-path)"

speed: a 135M-parameter model in float32 on 2 CPU cores scores a3_lastword (300 items) in about 2 minutes
and a3_cloze (300 items x 4 choices) in about 8. Results and methods: docs/EVAL.md.
"""


def _add_tasks_parser(sub) -> None:
    pt = sub.add_parser("tasks", help="accuracy on lm-evaluation-harness tasks (local or standard)",
                        description="Run lm-evaluation-harness (lm_eval.simple_evaluate) on a dense or A3 checkpoint "
                                    "and print each metric with its standard error and 95%% interval. Local tasks "
                                    "(a3_lastword, a3_cloze; the tag a3_local names both) come with a3-serve; "
                                    "standard task names are passed to lm-eval and need their Hub dataset.",
                        epilog=TASKS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(pt, required=False, tokenizer=False)
    pt.add_argument("--tasks", default="a3_lastword,a3_cloze", metavar="A,B",
                    help="comma-separated lm-eval task names (default: a3_lastword,a3_cloze)")
    pt.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                    help="hf: transformers with trust_remote_code; vllm: vLLM's offline engine with a3-serve's plugin "
                         "(default: hf)")
    pt.add_argument("--limit", type=int, default=None, metavar="N",
                    help="score only the first N items of each task (default: all)")
    pt.add_argument("--batch-size", default="8", metavar="B",
                    help="requests per forward pass for --backend hf, or 'auto' (default: 8)")
    pt.add_argument("--kv-cache-gib", type=float, default=1.0, metavar="G",
                    help="vLLM's KV cache size in GiB (--backend vllm; default: 1)")
    pt.add_argument("--max-model-len", type=int, default=2048, metavar="N",
                    help="vLLM's longest sequence (--backend vllm; default: 2048)")
    pt.add_argument("--json", metavar="FILE",
                    help="write the result as JSON to FILE ('-' for stdout; the table then goes to stderr): every "
                         "metric with stderr and 95%% interval, per-item log-likelihoods and scores, the model's "
                         "a3 block")
    pt.add_argument("--print-include-path", action="store_true",
                    help="print the folder of the local task YAMLs (lm_eval's --include_path) and exit")


def _run_ppl(args: argparse.Namespace) -> int:
    from a3_serve.eval.ppl import evaluate_folder, format_result
    from a3_serve.folders import check_output_file, write_output_file

    max_tokens: Optional[int] = args.max_tokens
    if max_tokens is not None and max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (0 = all of the text), got {max_tokens}")
    if max_tokens == 0:
        max_tokens = None
    if args.json and args.json != "-":
        check_output_file(Path(args.json), "--json", (("--model", Path(args.model)),))
    res = evaluate_folder(
        args.model, data=args.data, split=args.split, seqlen=args.seqlen, max_tokens=max_tokens,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        allow_calibration_overlap=args.allow_calibration_overlap, tokenizer_dir=args.tokenizer,
        progress=False if args.quiet else None,
    )
    line = format_result(res)
    if args.json == "-":
        print(line, file=sys.stderr)
        print(json.dumps(_json_safe(res), indent=2))
    else:
        print(line)
        if args.json:
            write_output_file(Path(args.json), json.dumps(_json_safe(res), indent=2) + "\n")
    return 0


def _json_safe(obj):
    """inf/nan are not JSON: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _run_generate(args: argparse.Namespace) -> int:
    from a3_serve.eval.ppl import generate_text, load_model, load_tokenizer, read_config

    read_config(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, args.device, args.dtype)
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat)
    print(text.strip() if args.chat else text)
    return 0


def _run_tasks(args: argparse.Namespace) -> int:
    from a3_serve.eval.harness import format_table, run_tasks
    from a3_serve.folders import check_output_file, write_output_file

    batch: object = args.batch_size
    if args.batch_size != "auto":
        try:
            batch = int(args.batch_size)
        except ValueError:
            raise InputError(f"--batch-size must be an integer >= 1 or 'auto', got {args.batch_size!r}") from None
        if batch < 1:
            raise InputError(f"--batch-size must be an integer >= 1 or 'auto', got {args.batch_size!r}")
    if args.json and args.json != "-":
        check_output_file(Path(args.json), "--json", (("--model", Path(args.model)),))
    res = run_tasks(args.model, args.tasks, backend=args.backend, limit=args.limit, batch_size=batch,
                    dtype=args.dtype, device=args.device, kv_cache_gib=args.kv_cache_gib,
                    max_model_len=args.max_model_len, verbose=args.verbose > 0)
    table = format_table(res)
    text = json.dumps(_json_safe(res), indent=1) + "\n"
    if args.json == "-":
        print(table, file=sys.stderr)
        print(text, end="")
    else:
        print(table)
        if args.json:
            write_output_file(Path(args.json), text)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported on one line)
        return exc.code if isinstance(exc.code, int) else 2
    from a3_serve.progress import setup_logging

    if args.quiet:
        import os

        os.environ["A3_SERVE_NO_PROGRESS"] = "1"
    setup_logging(0 if args.quiet else args.verbose)

    def command() -> int:
        if args.command == "tasks":
            if args.print_include_path:
                from a3_serve.eval.harness import include_path

                print(include_path())
                return 0
            if not args.model:
                raise InputError("--model is required; give a model folder or Hub id, e.g. --model ./compressed")
        if args.threads is not None:
            if args.threads < 1:
                raise InputError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from a3_serve.runtime import resolve_model

        args.model = str(resolve_model(args.model).path)  # a Hub id becomes its snapshot folder in the cache
        if getattr(args, "tokenizer", None):
            args.tokenizer = str(resolve_model(args.tokenizer, "--tokenizer").path)
        return {"ppl": _run_ppl, "generate": _run_generate, "tasks": _run_tasks}[args.command](args)

    return run_cli(command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
