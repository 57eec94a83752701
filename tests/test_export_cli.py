"""`a3-export` as a user runs it: bad input gets one clear line, exit 2, and no destination folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from a3_serve.export.cli import main

from conftest import assert_one_line_error, build_random_model, copy_model


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


QUICK = ["--nsamples", "2", "--seqlen", "64", "--device", "cpu", "--quiet"]


def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", tmp_path / "nope", "--cr", "0.1", "--out", out, *QUICK)
    assert_one_line_error(code, err, "does not exist")
    assert not out.exists()


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", tmp_path / "empty", "--cr", "0.1", "--out", out, *QUICK)
    assert_one_line_error(code, err, "config.json")
    assert not out.exists()


def test_unsupported_architecture(capsys, tmp_path, random_models):
    src = copy_model(random_models["llama2-mha"], tmp_path / "qwen3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen3"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", src, "--cr", "0.1", "--out", out, *QUICK)
    assert_one_line_error(code, err, "q/k RMSNorm", "supported")
    assert not out.exists()
    cfg["model_type"] = "mistral"
    cfg["sliding_window"] = 512
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "--model", src, "--cr", "0.1", "--out", out, *QUICK)
    assert_one_line_error(code, err, "sliding")
    assert not out.exists()


@pytest.mark.parametrize("cr", ["0", "-0.1", "1", "1.5"])
def test_cr_out_of_range(capsys, tmp_path, random_models, cr):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", cr, "--out", out, *QUICK)
    assert_one_line_error(code, err, "--cr")
    assert not out.exists()


def test_cr_too_high_for_heads_and_mlp(capsys, tmp_path, random_models):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "16")
    assert not out.exists()
    # a 1-neuron MLP cannot lose half its width
    src = build_random_model("llama2-mha", tmp_path / "tiny-mlp", random_models["llama2-mha"], intermediate_size=1)
    code, _, err = _run(capsys, "--model", src, "--cr", "0.5", "--out", out, "--components", "mlp", *QUICK)
    assert_one_line_error(code, err, "MLP")
    assert not out.exists()


def test_bad_flag_is_one_line(capsys, tmp_path, random_models):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(random_models["llama2-mha"]), "--cr", "abc", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "--cr")


def test_existing_output_folder(capsys, tmp_path, random_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only what a3-serve wrote (tests/test_hardening.py has the rules)
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.2", "--out", out,
                        "--overwrite", *QUICK)
    assert_one_line_error(code, err, "not an a3-serve output")
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    code, stdout, _ = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.2", "--out", out, "--overwrite",
                           "--nsamples", "2", "--seqlen", "64", "--device", "cpu")
    assert code == 0 and "A3 export done" in stdout
    assert (out / "config.json").is_file()


def test_calibration_text_too_short(capsys, tmp_path, random_models):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.\n")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.2", "--out", out, "--calib", text,
                        *QUICK)
    assert_one_line_error(code, err, "tokens")
    assert not out.exists()


def test_nan_weights(capsys, tmp_path, random_models):
    src = copy_model(random_models["llama2-mha"], tmp_path / "nan")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "NaN", "model.layers.1.mlp.up_proj.weight")
    assert not out.exists()


def test_sigkill_midway_leaves_no_destination(tmp_path, demo_model, random_models):
    """Kill -9 during calibration/solve/write: the destination never appears, and a rerun cleans up."""
    out = tmp_path / "killed"
    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(demo_model), "--cr", "0.2", "--out", str(out),
           "--nsamples", "16", "--seqlen", "512", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # wait until calibration is under way (the log line is printed after the up-front checks)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "->" not in seen:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # a killed run may leave a hidden partial folder; the next export to the same place removes it
    partial = tmp_path / f".{out.name}.a3-partial-99999999-deadbeef"
    partial.mkdir()
    rerun = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(random_models["llama2-mha"]), "--cr",
             "0.2", "--out", str(out), "--nsamples", "2", "--seqlen", "64", "--device", "cpu", "--quiet"]
    code = subprocess.run(rerun, env=env).returncode
    assert code == 0 and (out / "config.json").is_file()
    assert not partial.exists()


def test_out_must_not_be_the_source(capsys, tmp_path, random_models):
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "inside"):
        code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--overwrite", *QUICK)
        assert_one_line_error(code, err, "source folder")
    assert sorted(p.name for p in src.iterdir()) == before


def test_kv_cache_targets_bad_input(capsys, tmp_path, random_models):
    src = random_models["llama2-mha"]
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", src, "--out", out, *QUICK)
    assert_one_line_error(code, err, "give --cr", "--kv-cr")
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--kv-cr", "0.2", "--components", "mlp", "--out", out,
                        *QUICK)
    assert_one_line_error(code, err, "--kv-cr 0.2", "add qk,ov to --components")
    code, _, err = _run(capsys, "--model", src, "--kv-cr", "0.8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "--kv-cr 0.8", "minimum", "smaller --kv-cr")
    code, _, err = _run(capsys, "--model", src, "--kv-cr", "1.5", "--out", out, *QUICK)
    assert_one_line_error(code, err, "--kv-cr must be in [0, 1)")
    assert not out.exists()


def test_kv_cache_mode_and_joint_mode(capsys, tmp_path, random_models):
    """`--kv-cr` alone shrinks only the heads; with `--cr` both targets hold; the default KV target is --cr."""
    src = random_models["llama3-gqa"]  # 2 layers, 64-dim heads
    code, stdout, _ = _run(capsys, "--model", src, "--kv-cr", "0.25", "--out", tmp_path / "kv", "--nsamples", "4",
                           "--seqlen", "32", "--device", "cpu", "--json", "-")
    rep = json.loads(stdout[stdout.index("{"):])
    cfg = json.loads((tmp_path / "kv" / "config.json").read_text())
    assert code == 0 and rep["summary"]["achieved_kv_cr"] >= 0.25 and cfg["a3"]["target_kv_cr"] == 0.25
    layers = cfg.get("layer_intermediate_sizes") or [cfg["intermediate_size"]] * 2
    assert layers == [512, 512]  # the MLP is untouched
    assert "KV cache" in (tmp_path / "kv" / "README.md").read_text()
    code, stdout, _ = _run(capsys, "--model", src, "--cr", "0.1", "--kv-cr", "0.5", "--out", tmp_path / "both",
                           "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--json", "-")
    rep = json.loads(stdout[stdout.index("{"):])
    assert code == 0 and rep["summary"]["achieved_kv_cr"] >= 0.5 and rep["summary"]["achieved_cr"] >= 0.1
    code, stdout, _ = _run(capsys, "--model", src, "--cr", "0.2", "--out", tmp_path / "default", "--nsamples", "4",
                           "--seqlen", "32", "--device", "cpu", "--json", "-")
    rep = json.loads(stdout[stdout.index("{"):])
    assert code == 0 and rep["summary"]["target_kv_cr"] == 0.2 and rep["summary"]["achieved_kv_cr"] >= 0.2


def test_progress_lines_in_a_log_file(tmp_path, random_models):
    """`a3-export ... 2> log`: when stderr is not a terminal, the long phases write lines with elapsed time and ETA
    that a log keeps; --quiet silences them."""
    env = {k: v for k, v in os.environ.items() if k not in ("A3_SERVE_NO_PROGRESS", "A3_SERVE_PROGRESS")}
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(random_models["llama2-mha"]), "--cr", "0.2",
           "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
    log = tmp_path / "export.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd + ["--out", str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL, stderr=f,
                              timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("[a3-serve] ") and "elapsed" in ln]
    phases = {ln.split(":")[0] for ln in lines}
    assert any("calibrating" in p for p in phases) and any("solving" in p for p in phases), phases
    assert any("ETA" in ln for ln in lines) and any("finished" in ln for ln in lines), lines
    assert "\r" not in text  # no terminal redraws in a log
    with open(log, "w") as f:
        proc = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                              stderr=f, timeout=600)
    assert proc.returncode == 0 and log.read_text() == ""


def test_mlp_multiple_in_the_export(capsys, tmp_path, random_models):
    src = random_models["llama3-gqa"]  # MLP 512
    code, _, _ = _run(capsys, "--model", src, "--cr", "0.3", "--mlp-multiple", "64", "--out", tmp_path / "a", *QUICK)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    widths = cfg.get("layer_intermediate_sizes") or [cfg["intermediate_size"]]
    assert code == 0 and all(w == 512 or w % 64 == 0 for w in widths) and cfg["a3"]["mlp_multiple"] == 64
    code, _, err = _run(capsys, "--model", src, "--cr", "0.3", "--mlp-multiple", "0", "--out", tmp_path / "b", *QUICK)
    assert_one_line_error(code, err, "--mlp-multiple must be a positive integer")


def test_sizes_for_a_quantized_deployment(capsys, tmp_path, random_models):
    """`--quant-scheme` (a3-quantize's scheme, group size, backend, KV-cache dtype): every size of the export, chosen by
    the loss-aware allocation, passes that deployment's kernel rules; the rules are recorded in config.json and the
    card; impossible combinations are refused before anything runs."""
    from a3_serve.quantize import rules

    src = random_models["llama3-gqa"]  # hidden 256, 4 heads / 2 KV heads of 64, MLP 512
    code, stdout, _ = _run(capsys, "--model", src, "--cr", "0.3", "--quant-scheme", "w4a16", "--quant-group-size",
                           "64", "--quant-backend", "cpu", "--kv-cache-dtype", "fp8", "--out", tmp_path / "a",
                           "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--json", "-")
    rep = json.loads(stdout[stdout.index("{"):])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert code == 0 and rep["summary"]["achieved_cr"] >= 0.3
    # head sizes: multiples of 32 (an FP8 KV cache on CPU); MLP widths: multiples of the group size 64
    assert cfg["a3"]["head_multiple"] == 32 and cfg["a3"]["mlp_multiple"] == 64
    assert cfg["a3"]["size_rules"] == {"scheme": "w4a16", "group_size": 64, "backends": ["cpu"],
                                       "kv_cache_dtype": "fp8"}
    widths = cfg.get("layer_intermediate_sizes") or [cfg["intermediate_size"]]
    heads = cfg.get("layer_qk_head_dims") or [cfg["qk_head_dim"]]
    assert all(w % 64 == 0 for w in widths) and all(h in (32, 64) for h in heads), (widths, heads)
    assert rules.size_problems(cfg, "w4a16", "cpu", 64, kv_cache_dtype="fp8") == []
    card = (tmp_path / "a" / "README.md").read_text()
    assert "a3-quantize --model <this folder> --scheme w4a16 --group-size 64" in card

    out = tmp_path / "bad"
    for argv, words in (
        (["--quant-scheme", "w8a16", "--quant-backend", "cpu"], ("cannot be served on cpu", "--quant-backend gpu")),
        (["--quant-group-size", "32"], ("--quant-group-size needs --quant-scheme",)),
        (["--quant-scheme", "w4a16", "--head-multiple", "48"], ("leave no head size up to 64",)),
        (["--kv-cache-dtype", "int3"], ("--kv-cache-dtype 'int3' is not a vLLM KV-cache dtype",)),
    ):
        code, _, err = _run(capsys, "--model", src, "--cr", "0.3", "--out", out, *argv, *QUICK)
        assert_one_line_error(code, err, *words)
    assert not out.exists()
