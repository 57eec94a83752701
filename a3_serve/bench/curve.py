"""The KV-bound report: throughput, latency and the engine's running count against offered concurrency.

``report["curve"]`` (present only in ``--scenario kv-bound`` reports) is::

    {"kv_cache_bytes": B, "kv_sequences": N | None, "waves": W,
     "levels": [{"label": "2x", "offered": C, "num_requests": R,
                 "dense": {metric: median}, "compressed": {metric: median}, "ratios": {metric: c / d},
                 "runs": {"dense": [...], "compressed": [...]}}, ...],
     "summary": {"capacity_ratio", "capacity_requests": {"dense", "compressed"}, "running_ratio", "throughput_gain",
                 "gain_vs_capacity", "sustained_gain", "sustained_vs_capacity", "saturation_level"}}

``models`` / ``ratios`` of the same report describe the highest level (saturation), so every reader of the
standard report (the service, the dashboard) sees the saturated comparison. ``summary.gain_vs_capacity`` is the
output-throughput gain at the highest level (client clock, the whole level including the last wave's drain) over the
engines' KV capacity ratio, ``sustained_vs_capacity`` the same for the engine's generated-token rate while requests
were queued: 1.0 means capacity turned into throughput one for one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from a3_serve.bench.report import BY_KEY, MODELS, RATIO_NOTE, format_value, header_lines, median_of, metric_table
from a3_serve.bench.report import ratios as ratio_of

#: the two per-level Markdown tables: (metric, short header); "running" is the saturated mean where a queue formed
TABLES = ((("running", "running at once"), ("running_max", "running max"), ("preemptions", "preemptions"),
           ("output_tokens_per_s", "output tok/s")),
          (("ttft_ms_median", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"), ("tpot_ms_median", "TPOT p50 ms"),
           ("tpot_ms_p99", "TPOT p99 ms")))


def running_at_once(m: dict[str, float]) -> Optional[float]:
    """The engine's mean running count while requests were queued, where the queue lasted through at least half the
    level (the cache or the scheduler was the limit); else while it was busy (a queue that forms only while the
    first prompts prefill says nothing about what the engine holds). Reports without ``queued_fraction`` take the
    larger of the two."""
    queued, busy = m.get("running_saturated_mean"), m.get("running_mean")
    if queued is None or busy is None:
        return busy if queued is None else queued
    if "queued_fraction" in m:
        return queued if m["queued_fraction"] >= 0.5 else busy
    return max(queued, busy)


def build_curve(labels: list[str], offered: list[int], runs: dict[str, list[list[dict[str, float]]]], *,
                kv_cache_bytes: Optional[int], kv_sequences: Optional[int], waves: float,
                sequence_len: int) -> dict[str, Any]:
    """The ``curve`` section from ``runs[model][level] = [one result per repeat]``."""
    levels = []
    for i, (label, conc) in enumerate(zip(labels, offered)):
        med = {name: median_of(runs[name][i]) for name in MODELS}
        n_req = next((r.get("num_requests") for r in runs["dense"][i] + runs["compressed"][i]), None)
        levels.append({"label": label, "offered": conc, "num_requests": n_req, **med,
                       "ratios": ratio_of(med["dense"], med["compressed"]),
                       "runs": {name: runs[name][i] for name in MODELS}})
    return {"kv_cache_bytes": kv_cache_bytes, "kv_sequences": kv_sequences, "waves": waves, "levels": levels,
            "summary": summarize(levels, sequence_len)}


def summarize(levels: list[dict[str, Any]], sequence_len: int) -> dict[str, Any]:
    """At the highest level: the KV capacity ratio (usable tokens, and whole requests each engine holds), the ratio
    of requests running at once, the output throughput gain and the gain over the capacity ratio."""
    if not levels:
        return {}
    top = levels[-1]
    d, c = top["dense"], top["compressed"]
    out: dict[str, Any] = {"saturation_level": top["label"]}
    usable = {name: usable_capacity(top, name, sequence_len) for name in MODELS}
    cap = None
    if usable["dense"] and usable["compressed"]:
        cap = usable["compressed"]["tokens"] / usable["dense"]["tokens"]
        out["capacity_requests"] = {name: usable[name]["requests"] for name in MODELS}
    run_d, run_c = running_at_once(d), running_at_once(c)
    running = run_c / run_d if run_d and run_c is not None else None
    gain = top["ratios"].get("output_tokens_per_s")
    sustained = top["ratios"].get("saturated_output_tokens_per_s")
    for key, value in (("capacity_ratio", cap), ("running_ratio", running), ("throughput_gain", gain),
                       ("sustained_gain", sustained)):
        if value is not None:
            out[key] = value
    if cap and gain:
        out["gain_vs_capacity"] = gain / cap
    if cap and sustained:
        out["sustained_vs_capacity"] = sustained / cap
    return out


def usable_capacity(level: dict[str, Any], name: str, sequence_len: int) -> Optional[dict[str, float]]:
    """``{"tokens", "requests"}`` a model's engine can use: its block count less the one block vLLM's block pool keeps
    back (its null block, which matters when a cache holds few blocks), and the whole requests those hold."""
    tokens = level[name].get("kv_cache_tokens")
    block = next((r.get("kv_block_size") for r in level["runs"][name] if r.get("kv_block_size")), None)
    if not tokens or not block or tokens <= block:
        return None
    usable = tokens - block
    return {"tokens": usable, "requests": float((usable // block) // -(-sequence_len // int(block)))}


def _cell(key: str, m: dict[str, float]) -> str:
    if key == "running":
        return format_value(BY_KEY["running_mean"], running_at_once(m))
    return format_value(BY_KEY[key], m.get(key))


def to_markdown(report: dict[str, Any]) -> str:
    """The KV-bound report: header, the sweep table (one row per level), the summary, then the full table of the
    highest level."""
    cfg, curve = report["config"], report["curve"]
    kv = curve.get("kv_cache_bytes")
    seqs = curve.get("kv_sequences")
    sizing = (f"{kv / 2**20:,.1f} MiB of KV cache for each model" if kv else "the servers' own KV cache") + (
        f" (the dense model's {seqs} requests)" if seqs else "")
    workload = (f"KV-bound sweep: requests of {cfg.get('input_len')} input + {cfg.get('output_len')} output tokens "
                f"(random token ids, EOS ignored), {sizing}; per level, {curve.get('waves'):g} x level requests with "
                f"exactly level in flight; {cfg.get('repeats')} alternating repeats, median shown")
    lines = header_lines(report, f"Dense vs compressed under a fixed KV cache: {cfg.get('engine')} server", workload)
    for columns in TABLES:
        lines += ["| offered (in flight) | requests | " + " | ".join(f"{h} dense | {h} compressed" for _, h in columns)
                  + (" | output tok/s compressed / dense |" if columns is TABLES[0] else " |"),
                  "|" + "---:|" * (2 + 2 * len(columns) + (columns is TABLES[0]))]
        for lv in curve["levels"]:
            cells = [f"{lv['label']} ({lv['offered']})", f"{lv.get('num_requests') or 0:,.0f}"]
            for key, _ in columns:
                cells += [_cell(key, lv["dense"]), _cell(key, lv["compressed"])]
            if columns is TABLES[0]:
                gain = lv["ratios"].get("output_tokens_per_s")
                cells.append("–" if gain is None else f"{gain:.3f}x")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    s = curve.get("summary", {})
    lines += ["Running at once: the mean of the server's `vllm:num_requests_running` while its waiting queue was "
              "non-empty, where that queue lasted through the level (else while the engine was busy: a queue that "
              "forms only while the first prompts prefill says nothing about what the cache holds); running max: its "
              "largest sample; preemptions: the growth of `vllm:num_preemptions_total` during the level.", ""]
    if s:
        parts = []
        if "capacity_ratio" in s:
            held = s.get("capacity_requests", {})
            parts.append(f"KV capacity ratio {s['capacity_ratio']:.3f}x (the engines' usable blocks: room for "
                         f"{held.get('dense', 0):.0f} dense and {held.get('compressed', 0):.0f} compressed requests)")
        if "running_ratio" in s:
            parts.append(f"requests running at once at {s['saturation_level']}: {s['running_ratio']:.3f}x")
        if "throughput_gain" in s:
            parts.append(f"output tokens/s at {s['saturation_level']}: {s['throughput_gain']:.3f}x over the whole level"
                         + (f" ({s['gain_vs_capacity']:.3f} of the capacity ratio)" if "gain_vs_capacity" in s else ""))
        if "sustained_gain" in s:
            parts.append(f"{s['sustained_gain']:.3f}x while requests queued (engine's generated-token counter"
                         + (f"; {s['sustained_vs_capacity']:.3f} of the capacity ratio)" if "sustained_vs_capacity" in s
                            else ")"))
        lines.append("- " + "; ".join(parts))
    lines += ["", f"At the highest level ({curve['levels'][-1]['label']}), every metric:", ""]
    lines += metric_table(report)
    lines += ["", RATIO_NOTE, ""]
    return "\n".join(lines)


#: chart panels: (title, [(metric, line style)])
PANELS = (("output tokens/s", [("output_tokens_per_s", "-")]),
          ("requests running at once (engine; max dotted)", [("running", "-"), ("running_max", ":")]),
          ("TTFT ms (p50 solid, p99 dashed)", [("ttft_ms_median", "-"), ("ttft_ms_p99", "--")]),
          ("TPOT ms (p50 solid, p99 dashed)", [("tpot_ms_median", "-"), ("tpot_ms_p99", "--")]))
COLORS = {"dense": "#7f7f7f", "compressed": "#1f77b4"}


def write_charts(report: dict[str, Any], path: Path) -> Optional[Path]:
    """One PNG: each panel a metric against offered concurrency, dense (grey) and compressed (blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["curve"]["levels"]
    if not levels:
        return None
    x = [lv["offered"] for lv in levels]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes.flat, PANELS):
        for name in MODELS:
            for key, style in series:
                ys = [running_at_once(lv[name]) if key == "running" else lv[name].get(key) for lv in levels]
                if all(y is None for y in ys):
                    continue
                ax.plot(x, [float("nan") if y is None else y for y in ys], style, marker="o", color=COLORS[name],
                        label=f"{name}" if style == "-" else None, linewidth=2)
        held = report["curve"].get("summary", {}).get("capacity_requests", {})
        if title.startswith("requests running"):
            for name in MODELS:
                if held.get(name):  # what the engine's usable blocks hold
                    ax.axhline(held[name], color=COLORS[name], linewidth=1, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("offered concurrency (requests in flight)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    s = report["curve"].get("summary", {})
    if "throughput_gain" in s and "capacity_ratio" in s:
        fig.suptitle(f"KV-bound: capacity {s['capacity_ratio']:.2f}x; output tok/s at {s['saturation_level']} "
                     f"{s['throughput_gain']:.2f}x" + (f", {s['sustained_gain']:.2f}x while queued"
                                                      if "sustained_gain" in s else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rebuild(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its ``curve`` (medians, ratios, summary) recomputed from the runs it holds."""
    cv = report["curve"]
    runs = {name: [lv["runs"][name] for lv in cv["levels"]] for name in MODELS}
    cfg = report["config"]
    report["curve"] = build_curve([lv["label"] for lv in cv["levels"]], [lv["offered"] for lv in cv["levels"]], runs,
                                  kv_cache_bytes=cv.get("kv_cache_bytes"), kv_sequences=cv.get("kv_sequences"),
                                  waves=cv.get("waves"), sequence_len=int(cfg["input_len"]) + int(cfg["output_len"]))
    return report


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m a3_serve.bench.curve DIR``: recompute a kv-bound report's curve from its runs and rewrite
    ``throughput.json``, ``.md`` and ``.png`` in DIR (after a change to how the summary is computed or drawn)."""
    import argparse
    import json

    from a3_serve.bench.report import write_report

    ap = argparse.ArgumentParser(prog="python -m a3_serve.bench.curve", description=main.__doc__.splitlines()[0])
    ap.add_argument("dir", help="folder holding a kv-bound throughput.json")
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    report = rebuild(json.loads((folder / "throughput.json").read_text()))
    for path in write_report(report, folder, markdown=to_markdown, charts=write_charts).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
