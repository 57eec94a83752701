"""Perplexity (`a3_serve.eval.ppl`) and the `a3-eval` command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from a3_serve.calibration.sources import eval_windows, load_texts
from a3_serve.errors import NumericalError
from a3_serve.eval.cli import main
from a3_serve.eval.ppl import evaluate_ppl, load_model, load_tokenizer

from conftest import assert_one_line_error

os.environ.setdefault("A3_SERVE_NO_PROGRESS", "1")

SEQLEN = 256
MAX_TOKENS = 4 * SEQLEN


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from a3_serve.demo import build_demo_model

    return build_demo_model()


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_model(smol_dir, "cpu", "float32"), load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def windows(smol):
    return eval_windows(smol[1], load_texts("wiki", "heldout"), SEQLEN, MAX_TOKENS)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --------------------------------------------------------------------------------------------- the numbers
def test_demo_model_perplexity_is_sane_and_matches_brute_force(smol, windows):
    model, _ = smol
    assert windows.shape == (4, SEQLEN)
    res = evaluate_ppl(model, windows, batch_size=2)
    assert 5 < res["ppl"] < 40, res
    assert (res["n_windows"], res["seqlen"], res["n_tokens"], res["n_predicted"]) == (
        4, SEQLEN, 4 * SEQLEN, 4 * (SEQLEN - 1))
    # brute force with transformers' own loss (mean over tokens 2..seqlen of each window; windows are equal-sized)
    with torch.inference_mode():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    brute = math.exp(float(torch.stack(losses).mean()))
    assert abs(res["ppl"] - brute) / brute < 1e-4, (res["ppl"], brute)


def test_random_weights_are_far_worse(windows):
    model = _tiny_llama()
    res = evaluate_ppl(model, windows, batch_size=4)
    assert res["ppl"] > 1000, res
    # the batch size does not change the number
    assert math.isclose(res["nll"], evaluate_ppl(model, windows, batch_size=1)["nll"], rel_tol=1e-6)
    assert math.isclose(res["nll"], evaluate_ppl(model, windows, batch_size=3)["nll"], rel_tol=1e-6)


def test_nan_logits_fail_loudly(windows):
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf logits"):
        evaluate_ppl(model, windows[:1])


# --------------------------------------------------------------------------------------------- CLI
def test_cli_missing_model_is_one_line(capsys, tmp_path):
    code, out, err = _run(capsys, "ppl", "--model", tmp_path / "no-such-model")
    assert_one_line_error(code, err, "no-such-model", "does not exist")
    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, "ppl", "--model", tmp_path / "empty")
    assert_one_line_error(code, err, "no config.json")
    code, out, err = _run(capsys, "ppl", "--model", tmp_path / "empty", "--seqlen", "abc")
    assert_one_line_error(code, err, "--seqlen")


def test_cli_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "a3_serve.eval.cli", "ppl", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def calibrated_on_wiki(smol_dir, tmp_path_factory):
    """The demo model, relabelled as if a3-export had calibrated it on wiki:calibration (its a3 block)."""
    d = tmp_path_factory.mktemp("fake_a3")
    for f in smol_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            (d / f.name).symlink_to(f)
    cfg = json.loads((smol_dir / "config.json").read_text())
    cfg["a3"] = {"format_version": 1, "target_cr": 0.1,
                 "calibration": {"source": "wiki", "split": None, "description": "wiki:calibration",
                                 "nsamples": 4, "seqlen": 128, "seed": 0}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_cli_refuses_calibration_text(capsys, calibrated_on_wiki):
    for data in (["--data", "wiki", "--split", "calibration"], ["--data", "wiki:calibration"]):
        code, out, err = _run(capsys, "ppl", "--model", calibrated_on_wiki, *data, "--max-tokens", "256")
        assert_one_line_error(code, err, "calibrated on", "--allow-calibration-overlap")
        assert out == ""


def test_cli_json_output_and_allowed_overlap(capsys, calibrated_on_wiki, tmp_path):
    out_file = tmp_path / "ppl.json"
    code, out, err = _run(capsys, "ppl", "--model", calibrated_on_wiki, "--seqlen", "128", "--max-tokens", "256",
                          "--json", out_file, "--quiet")
    assert code == 0, err
    assert out.startswith("perplexity ") and "over 256 tokens (2 windows of 128) on wiki:heldout" in out
    res = json.loads(out_file.read_text())
    for key in ("model", "data", "split", "seqlen", "n_windows", "n_tokens", "nll", "ppl", "seconds", "dtype", "a3"):
        assert key in res, key
    assert (res["data"], res["split"], res["seqlen"], res["n_windows"], res["n_tokens"]) == (
        "wiki:heldout", "heldout", 128, 2, 256)
    assert res["dtype"] == "float32" and res["a3"]["calibration"]["description"] == "wiki:calibration"
    assert math.isclose(res["ppl"], math.exp(res["nll"]), rel_tol=1e-9) and 3 < res["ppl"] < 60

    code, out, err = _run(capsys, "ppl", "--model", calibrated_on_wiki, "--split", "calibration", "--seqlen", "128",
                          "--max-tokens", "128", "--allow-calibration-overlap", "--json", "-", "--quiet")
    assert code == 0, err
    res = json.loads(out)  # stdout is pure JSON; the human line went to stderr
    assert res["data"] == "wiki:calibration" and res["n_windows"] == 1
    assert err.strip().startswith("perplexity ")


def test_cli_generate_greedy(capsys, smol_dir):
    code, out, err = _run(capsys, "generate", "--model", smol_dir, "--prompt", "The capital of France is",
                          "--max-new-tokens", "2")
    assert code == 0, err
    assert out.startswith(" Paris")


def test_compressed_checkpoint_evaluates_and_refuses_its_calibration_text(smol_dir, tmp_path, capsys):
    """End to end with a real a3_llama folder from a3-export (tiny random Llama, tiny calibration)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from a3_serve.export.pipeline import ExportOptions, run_export

    src = tmp_path / "dense"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    load_tokenizer(smol_dir).save_pretrained(str(src))
    out = tmp_path / "a3"
    run_export(ExportOptions(model=src, out=out, cr=0.2, nsamples=2, seqlen=64, device="cpu", dtype="float32"),
               progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "a3_llama"

    code, stdout, err = _run(capsys, "ppl", "--model", out, "--seqlen", "64", "--max-tokens", "128", "--json", "-",
                             "--quiet")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["model_type"] == "a3_llama" and res["n_windows"] == 2 and math.isfinite(res["ppl"])
    assert res["a3"]["calibration"]["nsamples"] == 2
    code, stdout, err = _run(capsys, "ppl", "--model", out, "--data", "wiki:calibration", "--seqlen", "64",
                             "--max-tokens", "128")
    assert_one_line_error(code, err, "calibrated on", "--allow-calibration-overlap")
