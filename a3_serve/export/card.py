"""The model card (README.md) of a compressed checkpoint: what was done and what it cost."""

from __future__ import annotations

from typing import Any

from a3_serve.calibration.folds import folds_line


def _fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def dim_span(layer_dims, k: int, sep: str = "..") -> str:
    """Entry ``k`` (0: r_qk, 1: r_vo, 2: r_int) of per-layer dims as ``"lo{sep}hi"``, or ``"lo"`` when all agree."""
    lo, hi = min(t[k] for t in layer_dims), max(t[k] for t in layer_dims)
    return str(lo) if lo == hi else f"{lo}{sep}{hi}"


def _dim_cell(s: dict, k: int, key: str) -> str:
    """The compressed size, or its range over layers when the layers differ (per-layer dims)."""
    layers = s.get("layer_dims")
    if not layers:
        return str(s[key])
    span = dim_span(layers, k, " to ")
    return f"{span} (per layer)" if len({t[k] for t in layers}) > 1 else span


def render_model_card(report: dict[str, Any]) -> str:
    """Markdown model card from the export report (the same dict that becomes a3_report.json)."""
    s = report["summary"]
    src = report["source"]
    cal = report["calibration"]
    m = report["methods"]
    q = report.get("quality")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"base_model: {src['name']}",
        "tags: [a3, a3-serve, low-rank, compressed, kv-cache-compression]",
        "---",
        "",
        f"# {src['name']}: A3-compressed (CR {s['target_cr']:.2f}"
        + (f", KV cache -{s['achieved_kv_cr']:.0%})" if s.get("achieved_kv_cr") else ")"),
        "",
        f"This checkpoint was produced by a3-serve {report['a3_serve_version']} from `{src['name']}` "
        + (f"(revision `{src['revision']}`) " if src.get("revision") else "")
        +
        f"({src['architecture']}, {src['attention']}) with **A3**, an analytical post-training low-rank method: every "
        "attention head keeps fewer QK and VO dimensions and the MLP is narrower. The model keeps the same number of "
        "matrix multiplies; weights, FLOPs and the KV cache shrink.",
        "",
        "## What changed",
        "",
        "| | dense | compressed |",
        "|---|---|---|",
        f"| QK head dim | {s['head_dim']} | {_dim_cell(s, 0, 'qk_head_dim')} |",
        f"| VO head dim | {s['head_dim']} | {_dim_cell(s, 1, 'v_head_dim')} |",
        f"| MLP width | {s['intermediate_size']} | {_dim_cell(s, 2, 'new_intermediate_size')} |",
        f"| decoder linear parameters | {_fmt_int(s['linear_params_before'])} | {_fmt_int(s['linear_params_after'])} |",
        f"| all parameters | {_fmt_int(s['params_before'])} | {_fmt_int(s['params_after'])} |",
        f"| KV cache per token ({s['kv_dtype']}) | {_fmt_int(s['kv_bytes_per_token_before'])} B | "
        f"{_fmt_int(s['kv_bytes_per_token_after'])} B |",
        "",
        f"KV-cache target: at least {s.get('target_kv_cr', 0.0):.3f} of the bytes per token removed; achieved "
        f"{s.get('achieved_kv_cr', 0.0):.4f}, so the same cache memory holds "
        f"{s['kv_bytes_per_token_before'] / s['kv_bytes_per_token_after']:.2f}x the tokens.",
        "",
        f"Target compression ratio {s['target_cr']:.3f}; achieved {s['achieved_cr']:.4f} of the decoder's linear "
        "parameters "
        + (f"(per-layer head sizes in multiples of {s['head_multiple']} and MLP widths chosen by loss-aware "
           "allocation)."
           if s.get("layer_dims") else
           f"(head sizes rounded down to multiples of {s['head_multiple']}, the MLP width re-solved to meet the "
           "budget)."),
        "",
        *_size_rules_lines(s.get("size_rules")),
        f"Recipe `{report.get('recipe', 'custom')}`: QK `{m['qk']}`, OV `{m['ov']}`, MLP `{m['mlp']}`, budget "
        f"allocation `{report.get('allocation', 'uniform')}`; components compressed: {', '.join(s['components'])}.",
        f"Calibration: {cal['nsamples']} x {cal['seqlen']} tokens from `{cal['source']}` (seed {cal['seed']})"
        + (f"; held-out folds for the fitted choices: {folds_line(cal['heldout_folds'])}." if cal.get("heldout_folds")
           else "."),
        "",
        "## Quality",
        "",
    ]
    if q:
        lines += [
            f"Perplexity on held-out text `{q['data']}` ({_fmt_int(q['n_tokens'])} tokens, windows of {q['seqlen']}), "
            "which calibration never saw:",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| dense | {q['dense_ppl']:.3f} |",
            f"| compressed | {q['compressed_ppl']:.3f} ({q['compressed_ppl'] / q['dense_ppl'] - 1:+.1%}) |",
        ]
    else:
        lines += [
            "Not measured at export time. Measure it on held-out text (never the calibration text):",
            "",
            "```",
            "a3-eval ppl --model <this folder> --data wiki:heldout --seqlen 512 --max-tokens 32768",
            "```",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import a3_serve  # registers the a3_llama model type (or pass trust_remote_code=True without a3-serve)",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')",
        "```",
        "",
        "The folder carries its modeling code (`modeling_a3_llama.py`), so "
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` also works without a3-serve. "
        "Loaders that know neither refuse it (`model_type: a3_llama`) instead of silently mis-loading it.",
        "",
        "Per-layer losses and timings are in `a3_report.json`.",
        "",
    ]
    return "\n".join(lines)


def _size_rules_lines(rules: dict | None) -> list[str]:
    """The ``--quant-scheme`` paragraph: which quantized deployment every size was chosen for."""
    if not rules:
        return []
    what = f"`{rules['scheme']}`" if rules.get("scheme") else "unquantized weights"
    if rules.get("group_size"):
        what += f" (group size {rules['group_size']})"
    kv = f" with a `{rules['kv_cache_dtype']}` KV cache" if rules.get("kv_cache_dtype") else ""
    cmd = (f"a3-quantize --model <this folder> --scheme {rules['scheme']}"
           + (f" --group-size {rules['group_size']}" if rules.get("group_size") else "") + " --out <folder>")
    return [f"Every size was chosen to pass the kernel rules of {what}{kv} on vLLM {' and '.join(rules['backends'])} "
            "(docs/QUANTIZATION.md)" + (f": `{cmd}`." if rules.get("scheme") else "."), ""]
