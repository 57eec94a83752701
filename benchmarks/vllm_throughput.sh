#!/usr/bin/env bash
# vLLM offline throughput, dense vs A3-compressed SmolLM2, alternating, on this machine (CPU: fp32).
# Records output tokens/s, total tokens/s and the KV-cache capacity the engine reports ("KV cache size: N tokens"),
# then the cost of the plugin's per-head RoPE gather as a share of a decode step (benchmarks/vllm_rope_cost.py).
# Usage: benchmarks/vllm_throughput.sh [COMPRESSED_DIR]   (default: exports SmolLM2 at CR 0.1 into $WORK)
# Env: ROUNDS=2 NUM_PROMPTS=32 IN_LEN=128 OUT_LEN=128 KV_GIB=1 DTYPE=float32 WORK=/tmp/a3-vllm-bench
#      OUT_JSON=benchmarks/results/vllm_throughput.json
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ROUNDS=${ROUNDS:-2}; NUM_PROMPTS=${NUM_PROMPTS:-32}; IN_LEN=${IN_LEN:-128}; OUT_LEN=${OUT_LEN:-128}
KV_GIB=${KV_GIB:-1}; DTYPE=${DTYPE:-float32}; WORK=${WORK:-/tmp/a3-vllm-bench}
OUT_JSON=${OUT_JSON:-benchmarks/results/vllm_throughput.json}
mkdir -p "$WORK" "$(dirname "$OUT_JSON")"
DENSE=$(a3-demo-model)
KV_BYTES=$(python -c "import sys; print(int(float(sys.argv[1]) * 2**30))" "$KV_GIB")
PRELOAD=$(python -m a3_serve.bench.preload)${LD_PRELOAD:+:$LD_PRELOAD}
COMP=${1:-$WORK/smollm2-a3-cr0.1}
if [ ! -f "$COMP/config.json" ]; then
  a3-export --model "$DENSE" --cr 0.1 --out "$COMP" --nsamples 8 --seqlen 256 --device cpu --overwrite
fi
for round in $(seq "$ROUNDS"); do
  for kind in dense compressed; do
    model=$DENSE; [ "$kind" = compressed ] && model=$COMP
    log="$WORK/$kind.$round.log"
    echo "[bench] round $round: $kind ($model)"
    # KV cache in bytes (the legacy VLLM_CPU_KVCACHE_SPACE takes whole GiB only and would override it); tcmalloc and
    # Intel OpenMP preloaded as vLLM's CPU guide asks (a3_serve/bench/preload.py)
    env -u VLLM_CPU_KVCACHE_SPACE LD_PRELOAD="$PRELOAD" vllm bench throughput --model "$model" --dtype "$DTYPE" \
      --dataset-name random --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN" \
      --num-prompts "$NUM_PROMPTS" --max-model-len 512 --seed 0 --kv-cache-memory-bytes "$KV_BYTES" > "$log" 2>&1
    grep -E "^Throughput:|KV cache size" "$log" | sed 's/^.*\] //'
  done
done
python - "$WORK" "$ROUNDS" "$OUT_JSON" "$COMP" "$NUM_PROMPTS" "$IN_LEN" "$OUT_LEN" "$KV_GIB" "$DTYPE" <<'PY'
import json, re, statistics, sys
work, rounds, out, comp, n, il, ol, kv, dtype = sys.argv[1:]
res = {"config": {"num_prompts": int(n), "input_len": int(il), "output_len": int(ol), "kv_cache_gib": float(kv),
                  "dtype": dtype, "compressed": comp, "rounds": int(rounds)}}
for kind in ("dense", "compressed"):
    runs = []
    for r in range(1, int(rounds) + 1):
        text = open(f"{work}/{kind}.{r}.log").read()
        m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", text)
        kvm = re.search(r"KV cache size: ([\d,]+) tokens", text)
        runs.append({"requests_per_s": float(m[1]), "total_tokens_per_s": float(m[2]),
                     "output_tokens_per_s": float(m[3]), "kv_cache_tokens": int(kvm[1].replace(",", ""))})
    res[kind] = {"runs": runs, **{k: statistics.median(x[k] for x in runs) for k in runs[0]}}
d, c = res["dense"], res["compressed"]
res["ratio_compressed_over_dense"] = {k: c[k] / d[k] for k in ("output_tokens_per_s", "total_tokens_per_s", "kv_cache_tokens")}
json.dump(res, open(out, "w"), indent=2)
print(json.dumps({k: res[k] for k in ("dense", "compressed", "ratio_compressed_over_dense")}, indent=1))
PY
python benchmarks/vllm_rope_cost.py --model "$COMP" --step-json "$OUT_JSON"
