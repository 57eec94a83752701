"""Aggregate benchmark runs and write the side-by-side report: JSON, Markdown and PNG charts.

Each model has ``runs``: one ``{metric: value}`` dict per repeat, as measured by an engine. The summary of a
metric is its median over the repeats that measured it; the ratio is ``median(compressed) / median(dense)``
(so > 1 is better for throughput and capacity, < 1 better for latency and memory).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from a3_serve.provenance import describe_quantization

SCHEMA = "a3-serve/throughput/1"
MODELS = ("dense", "compressed")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    fmt: str = "{:,.2f}"

    def meta(self) -> dict[str, str]:
        return {"key": self.key, "label": self.label, "unit": self.unit, "better": self.better}


def _latency(name: str, label: str) -> list[Metric]:
    return [Metric(f"{name}_ms_{stat}", f"{label} {stat}", "ms", "lower") for stat in ("mean", "median", "p99")]


#: every metric an engine may report, in display order
METRICS: tuple[Metric, ...] = (
    Metric("output_tokens_per_s", "output tokens/s", "tok/s", "higher"),
    Metric("total_tokens_per_s", "total tokens/s", "tok/s", "higher"),
    Metric("requests_per_s", "requests/s", "req/s", "higher", "{:,.3f}"),
    *_latency("ttft", "TTFT"),
    *_latency("tpot", "TPOT"),
    *_latency("itl", "ITL"),
    Metric("kv_cache_tokens", "KV-cache capacity", "tokens", "higher", "{:,.0f}"),
    Metric("max_concurrency", "max concurrency at workload length", "sequences", "higher"),
    Metric("saturated_output_tokens_per_s", "output tokens/s while requests queued (engine)", "tok/s", "higher"),
    Metric("running_saturated_mean", "requests running at once while requests queued (engine, mean)", "requests",
           "higher"),
    Metric("running_mean", "requests running at once while busy (engine, mean)", "requests", "higher"),
    Metric("queued_fraction", "share of the run with requests queued (engine)", "", "higher", "{:.1%}"),
    Metric("running_max", "requests running at once (engine, max)", "requests", "higher", "{:,.0f}"),
    Metric("waiting_max", "requests waiting (engine, max)", "requests", "lower", "{:,.0f}"),
    Metric("preemptions", "preemptions (engine)", "", "lower", "{:,.0f}"),
    Metric("kv_usage_max", "KV-cache usage (engine, max)", "", "lower", "{:.1%}"),
    Metric("kv_bytes_per_token", "KV-cache bytes per token", "bytes", "lower", "{:,.0f}"),
    Metric("weight_bytes", "weight bytes", "bytes", "lower", "{:,.0f}"),
    Metric("peak_rss_bytes", "peak process memory (RSS)", "bytes", "lower", "{:,.0f}"),
    Metric("peak_gpu_bytes", "peak GPU memory", "bytes", "lower", "{:,.0f}"),
    Metric("perplexity", "perplexity (held-out)", "", "lower", "{:,.3f}"),
    Metric("elapsed_s", "wall time of the timed run", "s", "lower"),
)
BY_KEY = {m.key: m for m in METRICS}
#: the metrics drawn as charts (one panel each, when measured)
CHARTS = ("output_tokens_per_s", "total_tokens_per_s", "ttft_ms_median", "tpot_ms_median", "kv_cache_tokens",
          "peak_rss_bytes", "peak_gpu_bytes", "weight_bytes")


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of every metric over the runs that report it (metrics keep :data:`METRICS` order)."""
    out = {}
    for m in METRICS:
        vals = [r[m.key] for r in runs if r.get(m.key) is not None]
        if vals:
            out[m.key] = float(statistics.median(vals))
    return out


def ratios(dense: dict[str, float], compressed: dict[str, float]) -> dict[str, float]:
    return {k: compressed[k] / dense[k] for k in dense if k in compressed and dense[k]}


def build_report(*, command: str, created: str, environment: dict[str, Any], config: dict[str, Any],
                 paths: dict[str, str], runs: dict[str, list[dict[str, float]]],
                 extra: Optional[dict[str, dict[str, float]]] = None) -> dict[str, Any]:
    """The ``throughput.json`` document (see the package docstring for the contract).

    ``extra[model]`` holds once-per-model metrics (weight bytes, perplexity) merged into the median."""
    models = {}
    for name in MODELS:
        med = median_of(runs[name])
        med.update((extra or {}).get(name, {}))
        med = {m.key: med[m.key] for m in METRICS if m.key in med}
        models[name] = {"path": paths[name], "runs": runs[name], "median": med}
    present = [m.meta() for m in METRICS if m.key in models["dense"]["median"]
               or m.key in models["compressed"]["median"]]
    return {"schema": SCHEMA, "command": command, "created": created, "environment": environment, "config": config,
            "models": models, "ratios": ratios(models["dense"]["median"], models["compressed"]["median"]),
            "metrics": present}


def format_value(metric: Metric, value: Optional[float]) -> str:
    """A metric's value as the reports print it (bytes in MiB / GiB, "–" when not measured)."""
    if value is None:
        return "–"
    if metric.unit == "bytes":
        return f"{value / 2**20:,.1f} MiB" if value < 2**30 else f"{value / 2**30:,.2f} GiB"
    return metric.fmt.format(value)


def to_markdown(report: dict[str, Any]) -> str:
    """A side-by-side table (dense, compressed, ratio) with the workload and the exact command."""
    cfg = report["config"]
    workload = (f"{cfg.get('num_prompts')} requests x {cfg.get('input_len')} input + {cfg.get('output_len')} output "
                f"tokens (random token ids, seed {cfg.get('seed')}), {cfg.get('repeats')} alternating repeats, median "
                "shown")
    lines = header_lines(report, f"Dense vs compressed: {cfg.get('engine')} engine, {cfg.get('mode', 'offline')} mode",
                         workload)
    lines += metric_table(report)
    lines += ["", RATIO_NOTE, ""]
    return "\n".join(lines)


RATIO_NOTE = "Ratios above 1 are better for throughput and capacity, below 1 for latency and memory."


def header_lines(report: dict[str, Any], title: str, workload: str) -> list[str]:
    """Title, the two models, the workload, machine, command (and a comparability warning), then a blank line."""
    cfg = report["config"]
    preload = cfg.get("cpu_preload")
    return [
        f"# {title}",
        "",
        f"- dense: `{report['models']['dense']['path']}`{_quant_note(cfg, 'dense')}",
        f"- compressed: `{report['models']['compressed']['path']}`{_quant_note(cfg, 'compressed')}",
        f"- workload: {workload}",
        f"- machine: {report['environment'].get('machine', '?')}; created {report['created']}",
        *([f"- LD_PRELOAD for vLLM: {', '.join(preload) or 'none'}"] if preload is not None else []),
        f"- command: `{report['command']}`",
        *_mismatch_lines(cfg),
        "",
    ]


def metric_table(report: dict[str, Any]) -> list[str]:
    """The side-by-side table of every measured metric: dense, compressed, compressed / dense."""
    d, c = report["models"]["dense"]["median"], report["models"]["compressed"]["median"]
    lines = ["| metric | dense | compressed | compressed / dense |", "|---|---:|---:|---:|"]
    for meta in report["metrics"]:
        m = BY_KEY[meta["key"]]
        r = report["ratios"].get(m.key)
        unit = f" ({m.unit})" if m.unit and m.unit != "bytes" else ""
        lines.append(f"| {m.label}{unit} | {format_value(m, d.get(m.key))} | {format_value(m, c.get(m.key))} | "
                     f"{'–' if r is None else f'{r:.3f}x'} |")
    return lines


def _quant_note(cfg: dict[str, Any], name: str) -> str:
    """`` (quantized: w8a8 (compressed-tensors))`` after a quantized model's path; nothing for an unquantized one."""
    info = (cfg.get("quantization") or {}).get(name)
    return f" (quantized: {describe_quantization(info)})" if info else ""


def _mismatch_lines(cfg: dict[str, Any]) -> list[str]:
    """A warning line when the two models were measured with --allow-mismatch despite comparability problems."""
    comp = cfg.get("comparability")
    problems = comp.get("problems") if isinstance(comp, dict) else None
    if not problems:
        return []
    return [f"- **warning: the two models are not comparable** (measured with --allow-mismatch): {'; '.join(problems)}"]


def write_charts(report: dict[str, Any], path: Path) -> Optional[Path]:
    """One PNG with a bar panel per charted metric (dense vs compressed, ratio in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, c = report["models"]["dense"]["median"], report["models"]["compressed"]["median"]
    keys = [k for k in CHARTS if k in d and k in c]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = BY_KEY[key]
        scale, unit = (2**20, "MiB") if m.unit == "bytes" else (1, m.unit)
        vals = [d[key] / scale, c[key] / scale]
        ax.bar(["dense", "compressed"], vals, color=["#7f7f7f", "#1f77b4"])
        ax.set_title(f"{m.label}\n{c[key] / d[key]:.2f}x", fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path, *,
                 markdown: Callable[[dict[str, Any]], str] = to_markdown,
                 charts: Callable[[dict[str, Any], Path], Optional[Path]] = write_charts) -> dict[str, Path]:
    """Write ``throughput.json``, ``throughput.md`` and ``throughput.png`` into ``out_dir`` (``markdown`` and
    ``charts`` render the last two: the KV-bound scenario passes its curve's, :mod:`a3_serve.bench.curve`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "throughput.json", "markdown": out_dir / "throughput.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    png = charts(report, out_dir / "throughput.png")
    if png is not None:
        paths["png"] = png
    return paths
