#!/usr/bin/env python3
"""Markdown table of `a3-eval tasks --json` results: each model's accuracy with its 95% interval, and each model's
paired difference from the first (same items: mean difference, 95% interval, exact McNemar p-value).

usage: python benchmarks/lm_eval_table.py BASE.json OTHER.json [...] [--labels dense,cr0.1,...] [--out FILE.md]

The runs must have scored the same items (same task files, same --limit). docs/EVAL.md shows the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from a3_serve.eval.harness import Z95, paired_difference


def mcnemar_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact McNemar test on 0/1 scores of the same items: the discordant pairs are Binomial(n, 1/2)."""
    up = sum(1 for x, y in zip(a, b) if y > x)
    down = sum(1 for x, y in zip(a, b) if x > y)
    n, k = up + down, min(up, down)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def table(runs: list[dict], labels: list[str]) -> str:
    """The markdown table (one row per task and 0/1 metric)."""
    head = ["task", "metric", "n"] + labels + [f"{lab} - {labels[0]} (paired, 95% CI, McNemar p)" for lab in labels[1:]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, base in runs[0]["tasks"].items():
        for metric in ("acc", "acc_norm"):
            if metric not in base["items"]:
                continue
            cells = [task, metric, str(base["n"])]
            for run in runs:
                m = run["tasks"][task]["metrics"][metric]
                cells.append(f"{m['value']:.3f} ± {Z95 * m['stderr']:.3f}")
            for run in runs[1:]:
                a, b = base["items"][metric], run["tasks"][task]["items"][metric]
                if run["tasks"][task]["items"]["doc_ids"] != base["items"]["doc_ids"]:
                    raise SystemExit(f"error: {task}: the runs scored different items; use the same --limit")
                d = paired_difference(a, b)
                cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p={mcnemar_p(a, b):.2f}")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="a3-eval tasks --json files; the first is the baseline")
    p.add_argument("--labels", help="comma-separated column names (default: the file names)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    runs = [json.loads(f.read_text()) for f in args.results]
    labels = args.labels.split(",") if args.labels else [f.stem for f in args.results]
    if len(labels) != len(runs):
        p.error("--labels needs one name per result file")
    text = table(runs, labels)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
