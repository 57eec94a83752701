"""`a3-quantize`: quantize an A3 export (or a dense model) with llm-compressor into a compressed-tensors checkpoint
that `vllm serve` runs as it is."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from a3_serve.folders import fmt_bytes
from a3_serve.progress import setup_logging
from a3_serve.runtime import OneLineArgumentParser, run_cli

from .schemes import SCHEMES

DESCRIPTION = """\
Quantize a checkpoint written by a3-export (or the dense Llama / Mistral / Qwen2 model it came from, to compare
on equal terms) with llm-compressor, and write a compressed-tensors checkpoint that `vllm serve` runs as it is.
The A3 config, auto_map, modeling code, tokenizer and provenance are kept; the quantization is recorded in the
config's `a3` block (A3 checkpoints), the model card and a3_quantize.json. The write is atomic: nothing appears
at --out until the checkpoint is complete and loads in this environment.

llm-compressor runs in its own environment (.venv-quant, created by scripts/setup.sh): its compressed-tensors
cannot share one with vLLM's. a3-quantize drives it as a subprocess.

Before anything runs, every linear layer's size is checked against the scheme's rules for the serving backend
(--backend; docs/QUANTIZATION.md): a size the quantizer or vLLM's kernel cannot take is refused, naming the
layer, the size and the fix.

schemes:
""" + "\n".join(f"  {name:6s} {s.summary}" for name, s in SCHEMES.items())

EPILOG = """\
examples:
  a3-export --model "$(a3-demo-model)" --cr 0.1 --out ./smol-a3
  a3-quantize --model ./smol-a3 --scheme w8a8 --out ./smol-a3-w8a8
  vllm serve ./smol-a3-w8a8 --dtype float32
  a3-quantize --model ./smol-a3 --scheme w4a16 --group-size 32 --out ./smol-a3-w4a16
  a3-quantize --model "$(a3-demo-model)" --scheme w8a8 --out ./smol-w8a8          # the dense model, for comparison

cost: one calibration forward pass plus a GPTQ solve per linear layer, one decoder layer at a time; the 135M demo
model with 128 x 512 tokens takes a few minutes on 2 CPU cores.
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="a3-quantize", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model and output")
    io.add_argument("--model", required=True, metavar="PATH|ID",
                    help="an a3-export checkpoint, or a dense Llama/Mistral/Qwen2 folder (or Hub id org/name[@rev]), "
                         "not quantized yet, with its tokenizer")
    io.add_argument("--scheme", required=True, metavar="SCHEME", help=f"one of {', '.join(SCHEMES)} (see above)")
    io.add_argument("--out", required=True, metavar="DIR",
                    help="folder to create for the quantized checkpoint (must not exist unless --overwrite)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace --out if it exists and was written by a3-serve (the old folder is removed only "
                         "after the new one is complete)")
    q = p.add_argument_group("quantization")
    q.add_argument("--group-size", default=None, metavar="N|channel",
                   help="weights per scale along the input (w4a16: default 128; w8a16: default per output channel). "
                        "Must divide every linear's input size: use 64 or 32 for models whose sizes need it")
    q.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu"],
                   help="the vLLM backend whose kernel size rules the checkpoint must meet (default auto: gpu where "
                        "nvidia-smi lists a GPU, else cpu)")
    q.add_argument("--smoothing-strength", type=float, default=None, metavar="A",
                   help="SmoothQuant migration strength for w8a8 (default 0.8)")
    q.add_argument("--dampening-frac", type=float, default=0.01, metavar="F",
                   help="GPTQ's Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    cal = p.add_argument_group("calibration data (as a3-export)")
    cal.add_argument("--calib", default="mix", metavar="SOURCE",
                     help="calibration text: a .txt/.jsonl file, a folder of .txt, a built-in corpus ('mix' (default), "
                          "'wiki', 'austen', 'pydoc'), A+B, or hf:NAME[:CONFIG][:SPLIT]")
    cal.add_argument("--calib-split", default=None, metavar="SPLIT",
                     help="split of the built-in corpus (default: calibration)")
    cal.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default: 128)")
    cal.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    cal.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows (default: 0)")
    run = p.add_argument_group("run and output")
    run.add_argument("--threads", type=int, default=0,
                     help="CPU threads of the quantizer (default: torch's choice)")
    run.add_argument("--no-verify", action="store_true",
                     help="skip loading the quantized checkpoint in this environment before it is moved into place")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-' for stdout)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress; errors only")
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def format_summary(report: dict) -> str:
    q, s, t = report["quantization"], report["sizes"], report["timings"]
    src = report["source"]
    kind = "A3 checkpoint" if src["a3"] else f"dense {src['model_type']} model"
    cal = q["calibration"]
    return "\n".join([
        f"a3-quantize done: {report['output']}",
        f"  source      {src['path']} ({kind})",
        f"  scheme      {q['scheme']}: {q['description']}",
        f"  weights     {fmt_bytes(s['weight_bytes_before'])} -> {fmt_bytes(s['weight_bytes_after'])} "
        f"(x{s['ratio']:.2f} smaller files)",
        f"  calibration {cal['nsamples']} x {cal['seqlen']} tokens of {cal['description']}",
        f"  checked     sizes for vLLM on {q['backend']}; loads here: "
        f"{'yes' if report.get('verified', {}).get('forward') else 'not checked'}",
        f"  time        {t['total_s']:.1f} s (quantizer {t['quantizer_s']:.1f}, of which GPTQ/SmoothQuant "
        f"{t['quantize_s']:.1f})",
        f"  serve       {report['serve']}",
    ])


def _sigterm_as_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0 if args.quiet else (2 if args.verbose else 1))

    def command() -> int:
        from a3_serve.folders import check_output_file, write_output_file

        from .pipeline import QuantizeOptions, run_quantize

        if args.json and args.json != "-":
            check_output_file(Path(args.json), "--json", (("--model", Path(args.model)), ("--out", Path(args.out))))
        opts = QuantizeOptions(model=args.model, out=Path(args.out), scheme=args.scheme, group_size=args.group_size,
                               backend=args.backend, calib=args.calib, calib_split=args.calib_split,
                               nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                               smoothing_strength=args.smoothing_strength, dampening_frac=args.dampening_frac,
                               overwrite=args.overwrite, verify=not args.no_verify, threads=args.threads)
        report = run_quantize(opts, progress=not args.quiet)
        if not args.quiet:
            print(format_summary(report))
        if args.json:
            text = json.dumps(report, indent=2)
            if args.json == "-":
                print(text)
            else:
                write_output_file(Path(args.json), text + "\n")
        return 0

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return run_cli(command, interrupted="interrupted; nothing was written to --out")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
