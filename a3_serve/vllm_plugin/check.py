"""Run vLLM on one or more checkpoints; dump greedy tokens, top-k logprobs and KV-cache capacity as JSON.

Used by the tests and benchmarks. It is a script (vLLM's engine wants a ``__main__`` guard)::

    python -m a3_serve.vllm_plugin.check --model DIR [--model DIR2 ...] --prompts-json '[[1,2,3]]' \
        --max-tokens 32 --out results.json [--in-process] [--enforce-eager] [--kv-cache-dtype fp8]

``--model DIR::dtype=bfloat16,kv_cache_dtype=fp8`` serves one model with its own dtype / KV-cache dtype.

``--in-process`` runs the engine core and the worker inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
and the ``uni`` executor), so several models share one interpreter start-up. A model that fails to load is
recorded as ``{"error": "<type>: <message>"}`` and the next one still runs. The KV-cache capacity is the
engine's own figure: ``num_gpu_blocks * block_size`` from its cache config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys


def _run_one(spec: str, prompts: list[list[int]], args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, opts = _model_options(spec, args)
    kw = dict(model=model, dtype=opts["dtype"], enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tp, seed=0, max_num_seqs=max(1, len(prompts)),
              kv_cache_dtype=opts["kv_cache_dtype"])
    if args.in_process:
        kw["distributed_executor_backend"] = "uni"
    llm = LLM(**kw)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = {"outputs": []}
        for o in outs:
            c = o.outputs[0]
            result["outputs"].append({
                "token_ids": list(c.token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs],
            })
        cache = llm.llm_engine.vllm_config.cache_config
        result.update(num_blocks=cache.num_gpu_blocks, block_size=cache.block_size,
                      kv_cache_tokens=(cache.num_gpu_blocks or 0) * cache.block_size)
        return result
    finally:
        del llm
        gc.collect()


def _model_options(spec: str, args) -> tuple[str, dict]:
    """``DIR`` or ``DIR::dtype=bfloat16,kv_cache_dtype=fp8``: per-model overrides of --dtype / --kv-cache-dtype."""
    model, _, rest = spec.partition("::")
    opts = {"dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in opts or not value:
            raise SystemExit(f"--model {spec!r}: options are dtype=... and kv_cache_dtype=...")
        opts[key] = value
    return model, opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="checkpoint folder (repeatable); DIR::dtype=X,kv_cache_dtype=Y overrides those for it")
    ap.add_argument("--prompts-json", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--in-process", action="store_true", help="engine core and worker in this process")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype (auto, fp8, ...)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    prompts = json.loads(args.prompts_json)
    results = []
    for model in args.model:
        try:
            results.append(_run_one(model, prompts, args))
        except Exception as err:  # recorded for the caller (tests assert on load-time messages)
            print(f"[check] {model}: {type(err).__name__}: {err}", file=sys.stderr)
            results.append({"error": f"{type(err).__name__}: {err}"})
    with open(args.out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
