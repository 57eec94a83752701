#!/usr/bin/env bash
# The main job, end to end on the built-in real model (SmolLM2-135M-Instruct, fp32 on CPU):
# set up, build the dense demo checkpoint, compress it with A3 at CR 0.1, measure held-out
# perplexity of both, generate with the compressed model, then serve it with vLLM and send one completion
# request. About 20 minutes on 2 CPU cores.
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

# --- serve the compressed checkpoint with vLLM (a3-serve's vLLM plugin; docs/VLLM.md) ---------------------
PORT=${PORT:-8000}
echo "[demo] serving $OUT with vLLM on 127.0.0.1:$PORT (start-up takes 1-2 minutes on CPU)"
# --dtype float32: vLLM would otherwise downcast the fp32 checkpoint to bf16, which is very slow on CPUs.
# As vLLM's CPU guide asks: tcmalloc and Intel OpenMP preloaded (where setup.sh found them), the KV cache in bytes
# (the legacy whole-GiB VLLM_CPU_KVCACHE_SPACE would override --kv-cache-memory-bytes, so it is unset).
PRELOAD=$(python -m a3_serve.bench.preload)${LD_PRELOAD:+:$LD_PRELOAD}
env -u VLLM_CPU_KVCACHE_SPACE LD_PRELOAD="$PRELOAD" vllm serve "$OUT" --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len 2048 --kv-cache-memory-bytes "${KV_CACHE_BYTES:-2G}" \
  --served-model-name compressed > "$OUT.vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill -INT $VLLM_PID 2>/dev/null; wait $VLLM_PID 2>/dev/null' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $VLLM_PID 2>/dev/null || { echo "[demo] vllm serve failed; log: $OUT.vllm.log"; tail -20 "$OUT.vllm.log"; exit 1; }
  sleep 2
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "[demo] vllm serve not ready; log: $OUT.vllm.log"; exit 1; }
echo "[demo] vLLM /v1/completions answer:"
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "compressed", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}' \
  | python -c 'import json,sys; print("  The capital of France is" + json.load(sys.stdin)["choices"][0]["text"].rstrip())'
kill -INT $VLLM_PID; wait $VLLM_PID 2>/dev/null || true
trap - EXIT
echo "[demo] vLLM server stopped; its log: $OUT.vllm.log"
# --- end vLLM ----------------------------------------------------------------------------------------------
