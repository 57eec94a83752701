"""Issue 5 acceptance on this CPU machine: a Llama-2-7B-shaped bf16 checkpoint (random weights, about 13 GB on
disk, built here and never committed) exports layer by layer with peak RSS under 4 GiB, and the result loads and
generates. Slow (19 minutes on 2 cores, building the source included; docs/RESULTS.md) and needs ~27 GB of free
disk: `pytest -m slow tests/test_export_7b.py`.

The recipe is `paper`: the default `best` recipe's MLP refit solves d_int x d_int systems (d_int = 11008) for
several ridge values per layer, about an hour on this CPU and seconds on a GPU; its memory is covered in the
dry run's estimate. Set A3_7B_DIR to reuse a random checkpoint between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from a3_serve.random_model import write_random_llama

pytestmark = pytest.mark.slow

PEAK_RSS_LIMIT_MB = 4096


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory, demo_model) -> Path:
    keep = os.environ.get("A3_7B_DIR")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("llama7b") / "llama-2-7b-random"
    if not (folder / "model.safetensors.index.json").is_file():
        need = 28 * 2**30
        if shutil.disk_usage(folder.parent if folder.parent.exists() else "/tmp").free < need:
            pytest.skip("needs about 28 GB of free disk for the 7B source and its compressed copy")
        write_random_llama(folder, "llama-2-7b", demo_model, dtype=torch.bfloat16, progress=False)
    return folder


def test_7b_streamed_export_fits_in_4_gib(llama7b, tmp_path):
    out = tmp_path / "llama7b-a3"
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(llama7b), "--cr", "0.1", "--out", str(out),
           "--recipe", "paper", "--calib", "wiki", "--nsamples", "4", "--seqlen", "128", "--device", "cpu",
           "--json", str(report_file), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * 3600,
                         env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    print(json.dumps({"command": " ".join(cmd), "peak_rss_mb": report["peak_rss_mb"], "timings": report["timings"],
                      "summary": {k: report["summary"][k] for k in ("params_before", "params_after", "achieved_cr",
                                                                    "kv_bytes_per_token_before",
                                                                    "kv_bytes_per_token_after")}},
                     indent=1))
    assert report["streamed"] is True
    assert report["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, f"peak RSS {report['peak_rss_mb']:.0f} MB"
    s = report["summary"]
    assert (s["qk_head_dim"], s["v_head_dim"]) == (112, 112) and abs(s["achieved_cr"] - 0.1) < 0.005
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 12 GB of bf16 in files of at most 5 GB
    # loads through the Auto classes and generates (bf16: 12 GB; fp32 would not fit beside the test)
    from transformers import AutoModelForCausalLM

    import a3_serve  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    assert model.config.qk_head_dim == 112 and model.config.num_hidden_layers == 32
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
        logits = model(gen).logits
    assert gen.shape == (1, ids.shape[1] + 3) and torch.isfinite(logits.float()).all()
