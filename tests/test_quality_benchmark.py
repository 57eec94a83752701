"""`benchmarks/quality.py --leave-one-out` on a tiny random model: the folds, the transfer table and its arithmetic
(the real measurement on the demo model is recorded in docs/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_leave_one_out_folds_and_table(tmp_path, random_models):
    out = tmp_path / "loo"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model", str(random_models["llama3-gqa"]),
           "--leave-one-out", "--calib", "wiki+austen", "--crs", "0.2", "--recipes", "paper,best-uniform",
           "--nsamples", "2", "--seqlen", "64", "--eval", "wiki:heldout", "--eval", "austen:heldout",
           "--eval-tokens", "256", "--eval-seqlen", "64", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "leave_one_out.json").read_text())
    assert sorted({r["unseen"] for r in summary["rows"]}) == ["austen", "wiki"]  # two folds of wiki+austen
    for r in summary["rows"]:
        fold = json.loads((out / f"without-{r['unseen']}" / "quality.json").read_text())
        # the fold never calibrated on the domain it evaluates as unseen
        assert r["unseen"] not in fold["calibration"]["source"] and r["recipe"] == "best-uniform"
        rows = {x["recipe"]: x for x in fold["rows"]}
        spec = f"{r['unseen']}:heldout"
        dense, paper, mine = rows["dense"]["ppl"][spec], rows["paper"]["ppl"][spec], rows["best-uniform"]["ppl"][spec]
        assert (r["dense"], r["paper"], r["ppl"]) == (dense, paper, mine)
        if paper > dense:
            assert r["share_removed"] == pytest.approx((paper - mine) / (paper - dense))
    assert "| unseen | calibration |" in (out / "leave_one_out.md").read_text()


def test_leave_one_out_needs_the_paper_recipe(tmp_path, random_models):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model",
                           str(random_models["llama3-gqa"]), "--leave-one-out", "--recipes", "best",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "add paper to --recipes" in proc.stderr
