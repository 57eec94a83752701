#!/usr/bin/env bash
# A3 stacked on quantization, measured through vLLM on CPU (docs/QUANTIZATION.md, "Measured"): SmolLM2-135M-Instruct
# by default, any other checkpoint with MODEL=DIR (e.g. MODEL=$(a3-demo-model --model qwen2.5-coder-0.5b)).
# 1. A3 exports at CR 0.1 / 0.2 whose sizes pass the w4a16 CPU rules at group 32 and an FP8 KV cache on CPU
#    (a3-export --quant-scheme ... --kv-cache-dtype fp8: MLP widths multiples of 32, head sizes multiples of 32 for the
#    FP8 cache; also legal for w8a8), so one export per CR serves every row;
# 2. quantizations (w8a8, w4a16 group 32) of those and of the dense model (a3-quantize);
# 3. one vLLM engine per row (benchmarks/quantize_stack.py): perplexity on three held-out domains, weight bytes, KV
#    capacity, output tokens/s and time per decode step.
# Checkpoints go to $WORK (default /tmp/a3-quant-stack); results to $OUT_DIR. Steps 1-2 are skipped for checkpoints
# that exist. Run step 3 on a quiet machine (STEP=measure runs only it; STEP=prepare only steps 1-2).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
W=${WORK:-/tmp/a3-quant-stack}
OUT=${OUT_DIR:-benchmarks/results/quantize-stack}
NS=${NSAMPLES:-32}      # export calibration: NS x 512 tokens of the default mix
QNS=${QNSAMPLES:-16}    # quantizer calibration: QNS x 512 tokens of the default mix (64: 15+ min per GPTQ run here)
CRS=${CRS:-"0.1 0.2"}
STEP=${STEP:-all}
D=${MODEL:-$(a3-demo-model)}
mkdir -p "$W" "$OUT"
if [ "$STEP" != measure ]; then
  for cr in $CRS; do
    [ -f "$W/a3-$cr/config.json" ] || a3-export --model "$D" --cr "$cr" --quant-scheme w4a16 --quant-group-size 32 \
      --quant-backend cpu --kv-cache-dtype fp8 --nsamples "$NS" --seqlen 512 --out "$W/a3-$cr" --overwrite --quiet \
      --json "$OUT/export-a3-$cr.json"
  done
fi
quantize() {  # SRC NAME SCHEME [flags]; a refusal (sizes) is recorded and the row left out
  local src=$1 name=$2 scheme=$3; shift 3
  [ "$STEP" = measure ] || [ -f "$W/$name/config.json" ] || a3-quantize --model "$src" --scheme "$scheme" \
    --out "$W/$name" --overwrite --nsamples "$QNS" --seqlen 512 --json "$OUT/quantize-$name.json" "$@" \
    2> >(grep -v '^\[a3-serve\]' > "$OUT/quantize-$name.err") || true
}
row() {  # NAME DIR[@fp8]: only rows whose checkpoint exists
  [ -f "${2%@*}/config.json" ] && rows+=(--row "$1=$2") || true
}
quantize "$D" dense-w8a8 w8a8
quantize "$D" dense-w4a16 w4a16 --group-size 32
rows=()
row dense "$D"; row dense+w8a8 "$W/dense-w8a8"; row dense+w4a16 "$W/dense-w4a16"
for cr in $CRS; do
  quantize "$W/a3-$cr" "a3-$cr-w8a8" w8a8
  quantize "$W/a3-$cr" "a3-$cr-w4a16" w4a16 --group-size 32
  row "a3-$cr" "$W/a3-$cr"; row "a3-$cr+w8a8" "$W/a3-$cr-w8a8"; row "a3-$cr+w4a16" "$W/a3-$cr-w4a16"
done
row dense+fp8kv "$D@fp8"; row dense+w8a8+fp8kv "$W/dense-w8a8@fp8"
for cr in $CRS; do
  row "a3-$cr+fp8kv" "$W/a3-$cr@fp8"; row "a3-$cr+w8a8+fp8kv" "$W/a3-$cr-w8a8@fp8"
done
[ "$STEP" = prepare ] && exit 0
uptime
python benchmarks/quantize_stack.py "${rows[@]}" --out-dir "$OUT"
uptime
