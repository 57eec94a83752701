"""lm-evaluation-harness as the accuracy tool: the local tasks, `a3-eval tasks` and the plain `lm_eval` commands.

Real lm-eval, real checkpoints (the demo SmolLM2 and the shared CR 0.1 export), no mocks; the Hub is never
reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). vLLM runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from a3_serve.eval.cli import main
from a3_serve.eval.harness import LOCAL_TASKS, TASKS_DIR, paired_difference

from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "A3_SERVE_NO_PROGRESS": "1"}
os.environ.update(OFFLINE)
DOMAINS = ("wiki", "austen", "pydoc")
PER_DOMAIN = 100
#: items scored by the backend-parity tests (the first items of a task: Wikipedia ones)
LIMIT = 8
#: vLLM and transformers both run float32; a choice's summed log-likelihood (20-60 tokens) may differ by the
#: kernels' rounding: measured up to ~1e-3 here; 0.02 is the per-token top-k tolerance of tests/test_vllm_plugin.py
LL_ATOL = 0.02


def _rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _a3_eval(*argv, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("a3-eval")
    return subprocess.run([str(exe), *map(str, argv)], cwd=cwd, env=dict(os.environ, **OFFLINE),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ the task data
def test_generator_is_deterministic_and_wrote_the_shipped_files(tmp_path):
    """Re-running the generator (a fresh process, another folder) writes the shipped JSONL files byte for byte."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_lm_eval_tasks.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in LOCAL_TASKS:
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (TASKS_DIR / f"{task}.jsonl").read_bytes(), task


def test_items_are_well_formed_balanced_and_held_out():
    """Every string of every item occurs in its domain's held-out text and nowhere in its calibration text."""
    from a3_serve.calibration.sources import load_texts

    def blob(name, split):
        return "\n".join(" ".join(d.split()) for d in load_texts(name, split))

    lastword, cloze = _rows("a3_lastword"), _rows("a3_cloze")
    for rows in (lastword, cloze):
        assert [r["domain"] for r in rows] == [d for d in DOMAINS for _ in range(PER_DOMAIN)]
        assert len({r["context"] for r in rows}) == len(rows)
    labels = set()
    for domain in DOMAINS:
        held, calib = blob(domain, "heldout"), blob(domain, "calibration")
        for r in (r for r in lastword if r["domain"] == domain):
            target, context = r["target"], r["context"]
            assert target.isalpha() and len(target) >= 4 and re.search(rf"\b{target}\b", context), r["id"]
            assert len(context.split()) >= 30 and not context.endswith(" ")
            assert context + " " + target in held, r["id"]
            assert context + " " + target not in calib and context not in calib, r["id"]
        for r in (r for r in cloze if r["domain"] == domain):
            choices, label = r["choices"], r["label"]
            assert len(choices) == 4 and len(set(choices)) == 4 and label in range(4), r["id"]
            labels.add(label)
            assert r["context"] + " " + choices[label] in held, r["id"]  # the true sentence follows its context
            for text in (r["context"], *choices):
                assert text in held and text not in calib, (r["id"], text)
    assert labels == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------ a3-eval tasks
@pytest.fixture(scope="module")
def hf_compressed(smol_a3_cr01, tmp_path_factory) -> dict:
    """`a3-eval tasks` with the hf backend on the CR 0.1 export: both local tasks, the first LIMIT items."""
    out = tmp_path_factory.mktemp("lm_eval_hf") / "hf.json"
    code = main(["tasks", "--model", str(smol_a3_cr01), "--tasks", "a3_lastword,a3_cloze", "--limit", str(LIMIT),
                 "--json", str(out), "--quiet"])
    assert code == 0
    return json.loads(out.read_text())


def test_tasks_hf_backend_on_a_compressed_checkpoint(hf_compressed, smol_a3_cr01):
    res = hf_compressed
    assert res["backend"] == "hf" and res["model_type"] == "a3_llama" and res["a3"]["target_cr"] == 0.1
    assert set(res["tasks"]) == set(LOCAL_TASKS)
    for task, n_choices, metrics in (("a3_lastword", 1, {"acc", "perplexity"}), ("a3_cloze", 4, {"acc", "acc_norm"})):
        entry = res["tasks"][task]
        assert entry["n"] == LIMIT and set(entry["metrics"]) == metrics
        for name in metrics - {"perplexity"}:
            m = entry["metrics"][name]
            assert 0.0 <= m["value"] <= 1.0 and m["stderr"] >= 0.0
            assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
            assert sum(entry["items"][name]) / LIMIT == pytest.approx(m["value"])
        lls = entry["items"]["loglikelihoods"]
        assert len(lls) == LIMIT and all(len(x) == n_choices and all(v < 0 for v in x) for x in lls)
    cloze = res["tasks"]["a3_cloze"]["items"]
    labels = [r["label"] for r in _rows("a3_cloze")[:LIMIT]]
    assert cloze["acc"] == [float(max(range(4), key=ll.__getitem__) == y) for ll, y in zip(cloze["loglikelihoods"],
                                                                                            labels)]


def test_dense_demo_model_is_clearly_above_chance_on_the_cloze(demo_model, capsys):
    """The real SmolLM2 picks the true next sentence far more often than 1 in 4 (24 Wikipedia items: 12 or more right
    by chance has probability 0.007)."""
    code, out, err = _run(capsys, "tasks", "--model", demo_model, "--tasks", "a3_cloze", "--limit", 24, "--quiet")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("a3_cloze") and " acc " in line)
    assert float(row.split()[2]) >= 0.5, out


def test_vllm_backend_agrees_with_hf_on_the_same_items(smol_a3_cr01, hf_compressed, tmp_path):
    """`a3-eval tasks --backend vllm` (a3-serve's plugin loaded by vLLM through its entry point) scores the same items
    with the same log-likelihoods as transformers, up to float32 rounding, hence the same accuracy."""
    pytest.importorskip("vllm")
    out = tmp_path / "vllm.json"
    proc = _a3_eval("tasks", "--model", smol_a3_cr01, "--tasks", "a3_cloze", "--backend", "vllm", "--limit", LIMIT,
                    "--json", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["backend"] == "vllm" and res["model_args"]["enforce_eager"] is True
    ref, got = hf_compressed["tasks"]["a3_cloze"]["items"], res["tasks"]["a3_cloze"]["items"]
    worst = max(abs(a - b) for x, y in zip(ref["loglikelihoods"], got["loglikelihoods"]) for a, b in zip(x, y))
    assert worst <= LL_ATOL, worst
    for ll, a, b in zip(ref["loglikelihoods"], ref["acc"], got["acc"]):
        top = sorted(ll, reverse=True)
        if top[0] - top[1] > 2 * LL_ATOL:  # no near-tie: the argmax cannot move within the tolerance
            assert a == b
    assert res["tasks"]["a3_cloze"]["metrics"]["acc"]["value"] == pytest.approx(
        hf_compressed["tasks"]["a3_cloze"]["metrics"]["acc"]["value"])


# ------------------------------------------------------------------------------------------------ plain lm_eval
def test_plain_lm_eval_command_hf_from_any_folder(smol_a3_cr01, hf_compressed, tmp_path, capsys):
    """The command docs/EVAL.md gives, typed in an unrelated folder: lm_eval finds the installed tasks through
    --include_path (`a3-eval tasks --print-include-path`) and loads the A3 checkpoint with trust_remote_code."""
    code, out, _ = _run(capsys, "tasks", "--print-include-path")
    assert code == 0 and Path(out.strip()) == TASKS_DIR and (TASKS_DIR / "a3_lastword.yaml").is_file()
    exe = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(exe), "--model", "hf", "--model_args",
                           f"pretrained={smol_a3_cr01},trust_remote_code=True,dtype=float32", "--device", "cpu",
                           "--tasks", "a3_lastword", "--include_path", out.strip(), "--limit", str(LIMIT),
                           "--batch_size", "8", "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=dict(os.environ, **OFFLINE), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["a3_lastword"]
    assert results["acc,none"] == pytest.approx(hf_compressed["tasks"]["a3_lastword"]["metrics"]["acc"]["value"])
    assert results["perplexity,none"] == pytest.approx(
        hf_compressed["tasks"]["a3_lastword"]["metrics"]["perplexity"]["value"], rel=1e-4)


@pytest.mark.slow
def test_plain_lm_eval_command_vllm(smol_a3_cr01, hf_compressed, tmp_path):
    """docs/EVAL.md's `lm_eval --model vllm` command: vLLM loads a3-serve's plugin through its entry point (no flag),
    and the log-likelihoods are transformers' up to float32 rounding (slow: a second vLLM start-up)."""
    pytest.importorskip("vllm")
    exe = Path(sys.executable).with_name("lm_eval")
    args = (f"pretrained={smol_a3_cr01},dtype=float32,enforce_eager=True,kv_cache_memory_bytes=1073741824,"
            "max_model_len=2048")
    proc = subprocess.run([str(exe), "--model", "vllm", "--model_args", args, "--tasks", "a3_lastword",
                           "--include_path", str(TASKS_DIR), "--limit", str(LIMIT), "--log_samples",
                           "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=dict(os.environ, VLLM_TARGET_DEVICE="cpu", **OFFLINE),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_a3_lastword_*.jsonl")).open()]
    got = [float(r["resps"][0][0][0]) for r in sorted(rows, key=lambda r: r["doc_id"])]
    ref = [x[0] for x in hf_compressed["tasks"]["a3_lastword"]["items"]["loglikelihoods"]]
    assert max(abs(a - b) for a, b in zip(ref, got)) <= LL_ATOL


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, needles", [
    (["--tasks", "no_such_task"], ["unknown lm-eval task 'no_such_task'", "a3_lastword"]),
    (["--tasks", "arc_easy"], ["lm-eval task 'arc_easy'", "network"]),
    (["--tasks", ","], ["--tasks names no task"]),
    (["--backend", "tpu"], ["--backend"]),
    (["--limit", "0"], ["--limit must be >= 1"]),
    (["--batch-size", "x"], ["--batch-size"]),
])
def test_bad_inputs_are_one_line(argv, needles, demo_model, capsys):
    code, _, err = _run(capsys, "tasks", "--model", demo_model, *argv)
    assert_one_line_error(code, err, *needles)


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "tasks", "--model", tmp_path / "nope", "--tasks", "a3_cloze")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = _run(capsys, "tasks", "--tasks", "a3_cloze")
    assert_one_line_error(code, err, "--model is required")


def test_paired_difference():
    d = paired_difference([1, 0, 1, 1], [1, 1, 1, 0])
    assert d["mean"] == 0.0 and d["n"] == 4 and d["ci95"][0] < 0 < d["ci95"][1]
