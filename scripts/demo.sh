#!/usr/bin/env bash
# The main job, end to end on the built-in real model (SmolLM2-135M-Instruct, fp32 on CPU):
# set up, build the dense demo checkpoint, compress it with A3 at CR 0.1, measure held-out
# perplexity of both, and generate with the compressed model. About 5 minutes on 2 CPU cores.
# Override with env vars: CR=0.2 NSAMPLES=128 SEQLEN=2048 EVAL_TOKENS=32768 OUT=./out/x scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
CR=${CR:-0.1}
NSAMPLES=${NSAMPLES:-64}
SEQLEN=${SEQLEN:-512}
EVAL_TOKENS=${EVAL_TOKENS:-16384}
OUT=${OUT:-./out/smollm2-a3-cr${CR}}

DENSE=$(a3-demo-model)
echo "[demo] dense model: $DENSE"
a3-export --model "$DENSE" --cr "$CR" --out "$OUT" --overwrite \
  --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --eval-tokens "$EVAL_TOKENS" --json "$OUT.report.json"
echo "[demo] greedy completion from the compressed model:"
a3-eval generate --model "$OUT" --prompt "The capital of France is" --max-new-tokens 24
echo "[demo] report: $OUT.report.json; checkpoint: $OUT"
