"""One measurement in a fresh process: ``python -m a3_serve.bench.worker --spec JSON --out FILE``.

The spec is ``{"task": "vllm" | "hf" | "ppl", "model": DIR, "workload": {...}, "options": {...}}``; the result
(``{metric: value}``) is written to FILE as JSON. A fresh process per measurement means peak memory is that
engine's alone, nothing cached by the previous model survives, and a crash only costs this process.
"""

from __future__ import annotations

import argparse
import json
import sys

from a3_serve.bench.workload import Workload


def run_spec(spec: dict) -> dict[str, float]:
    task, model, opts = spec["task"], spec["model"], spec.get("options", {})
    workload = Workload(**spec.get("workload", {}))
    if task == "vllm":
        from a3_serve.bench.engines import measure_vllm_offline

        return measure_vllm_offline(model, workload, **opts)
    if task == "hf":
        from a3_serve.bench.engines import measure_hf

        return measure_hf(model, workload, **opts)
    if task == "ppl":
        from a3_serve.eval.ppl import evaluate_folder

        res = evaluate_folder(model, progress=False, **opts)
        return {"perplexity": res["ppl"], "ppl_tokens": float(res["n_tokens"])}
    raise ValueError(f"unknown task {task!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON measurement spec")
    ap.add_argument("--out", required=True, help="result JSON file")
    args = ap.parse_args(argv)
    from a3_serve.runtime import run_cli

    def command() -> int:
        result = run_spec(json.loads(args.spec))
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
