"""Cost of the vLLM plugin's per-head RoPE gather as a share of a decode step.

Times, per decode step of ``--tokens`` sequences (one new token each) and summed over all layers of a compressed
checkpoint, exactly the code the plugin runs (rows of the shared ``[cos|sin|-sin]`` table, ``apply_rope_gathered`` on q
and k together with the checkpoint's real ``rope_freq_index``) and, for reference, the stock neox rotation of the same
q/k at the ORIGINAL head size (what vLLM's Llama does, in torch). The decode-step time comes from
benchmarks/vllm_throughput.sh's JSON (elapsed / output_len of the compressed run: all requests decode together) or
``--step-ms``. One thread, like vLLM's CPU worker here.

    python benchmarks/vllm_rope_cost.py --model ./compressed --step-json benchmarks/results/vllm_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from a3_serve.vllm_plugin.rope import apply_rope_gathered, extended_table, q_head_kv_rows, rope_gather_index


def _time(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=None, help="sequences decoding together (default: from --step-json)")
    ap.add_argument("--step-json", type=Path, default=None)
    ap.add_argument("--step-ms", type=float, default=None)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_rope_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads((args.model / "config.json").read_text())
    d_h, h_q, h_kv, n_layers = (cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                cfg["num_hidden_layers"])
    step_ms, tokens = args.step_ms, args.tokens
    if args.step_json and args.step_json.is_file():
        bench = json.loads(args.step_json.read_text())
        c = bench["compressed"]
        tokens = tokens or bench["config"]["num_prompts"]
        if step_ms is None:
            elapsed = bench["config"]["num_prompts"] / c["requests_per_s"]
            step_ms = 1e3 * elapsed / bench["config"]["output_len"]
    tokens = tokens or 32
    with safe_open(str(args.model / "model.safetensors"), "pt") as f:
        idx = [f.get_tensor(f"model.layers.{i}.self_attn.rope_freq_index") for i in range(n_layers)]
    r = 2 * idx[0].shape[1]
    table = torch.randn(4096, d_h)  # values do not matter for timing; layout [pos, cos(d/2) | sin(d/2)]
    ext = extended_table(table)
    positions = torch.randint(0, 4096, (tokens,))
    rows = q_head_kv_rows(h_q, h_kv, 0, 1) + list(range(h_kv))
    gathers = [rope_gather_index(i, rows, d_h) for i in idx]
    qkv = torch.randn(tokens, (h_q + 2 * h_kv) * r)
    qd, kd = torch.randn(tokens, h_q * d_h), torch.randn(tokens, h_kv * d_h)

    def a3_rope():  # the plugin's forward: split, rows of the table, one gathered rotation, q/k views
        for g in gathers:
            qk, _ = qkv.split([(h_q + h_kv) * r, h_kv * r], dim=-1)
            out = apply_rope_gathered(qk, ext.index_select(0, positions), g, r)
            out[:, :h_q].reshape(tokens, -1), out[:, h_q:].reshape(tokens, -1)

    def stock_rope():  # vLLM's forward_native neox rotation at the original head size, same tokens
        for _ in range(n_layers):
            cos, sin = table.index_select(0, positions).chunk(2, dim=-1)
            for x, n in ((qd, h_q), (kd, h_kv)):
                x = x.view(tokens, n, d_h)
                x1, x2 = x[..., : d_h // 2], x[..., d_h // 2:]
                c, s = cos[:, None], sin[:, None]
                torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    a3_ms = 1e3 * _time(a3_rope, args.reps)
    stock_ms = 1e3 * _time(stock_rope, args.reps)
    res = {"model": str(args.model), "layers": n_layers, "tokens_per_step": tokens, "r_qk": r, "head_dim": d_h,
           "a3_rope_ms_per_step": a3_ms, "stock_rope_ms_per_step": stock_ms, "decode_step_ms": step_ms,
           "a3_rope_share_of_step": (a3_ms / step_ms) if step_ms else None,
           "extra_over_stock_share_of_step": ((a3_ms - stock_ms) / step_ms) if step_ms else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
