"""`benchmarks/throughput.py` on the real demo models: real engines, real reports, engine figures cross-checked.

The workloads are tiny (CPU, 2 cores): these tests check that every number is the engine's and lands in all three
report formats, not how fast anything is (timings are not asserted; benchmarks/ records them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, hf_param_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
SKIP_VLLM = os.environ.get("A3_SERVE_SKIP_VLLM") == "1"


def bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")  # the KV cache: --kv-cache-gib's default (1 GiB on CPU)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def check_files(out: Path) -> dict:
    """All three formats written; the PNG is a real image with bars drawn (not a blank canvas)."""
    import matplotlib.image as mpimg

    report = json.loads((out / "throughput.json").read_text())
    assert report["schema"] == "a3-serve/throughput/1"
    md = (out / "throughput.md").read_text()
    for meta in report["metrics"]:
        assert meta["label"] in md
    for key, r in report["ratios"].items():
        assert f"{r:.3f}x" in md, key
    img = mpimg.imread(out / "throughput.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    blue = ((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)).mean()  # the compressed bars' colour
    assert blue > 0.01, blue
    return report


# ~2.5 min; the default run checks the same engine figures on the service's vLLM run (test_bench_server.py)
@pytest.mark.slow
@pytest.mark.skipif(SKIP_VLLM, reason="A3_SERVE_SKIP_VLLM=1")
def test_vllm_offline_report_has_the_engines_numbers(demo_model, smol_a3_cr01, tmp_path):
    out = tmp_path / "offline"
    proc = bench("--dense", str(demo_model), "--compressed", str(smol_a3_cr01), "--num-prompts", "4",
                 "--input-len", "16", "--output-len", "8", "--repeats", "1", "--enforce-eager", "--out-dir", str(out),
                 "--ppl-data", "wiki:heldout", "--ppl-tokens", "1024", "--ppl-seqlen", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_files(out)
    d, c = (report["models"][m]["median"] for m in ("dense", "compressed"))
    cfg_d, cfg_c = config(demo_model), config(smol_a3_cr01)
    head, r = cfg_d["hidden_size"] // cfg_d["num_attention_heads"], cfg_c["qk_head_dim"]
    # same KV memory (1 GiB) for both: the engine's capacity scales as head size / compressed head size
    assert c["kv_cache_tokens"] / d["kv_cache_tokens"] == pytest.approx(head / r, rel=0.02)
    for name, m in (("dense", d), ("compressed", c)):  # whole 24-token sequences in the engine's blocks
        block = report["models"][name]["runs"][0]["kv_block_size"]
        assert m["max_concurrency"] == pytest.approx(m["kv_cache_tokens"] / block / -(-24 // block))
        assert m["output_tokens_per_s"] > 0 and m["total_tokens_per_s"] == pytest.approx(m["output_tokens_per_s"] * 3)
        assert m["requests_per_s"] == pytest.approx(m["output_tokens_per_s"] / 8)
        assert m["peak_rss_bytes"] > m["weight_bytes"]
    # weight bytes: the checkpoint's tensors at the served dtype (fp32 here); compressed is smaller by about the CR
    assert d["weight_bytes"] == pytest.approx(hf_param_bytes(demo_model), rel=0.002)
    assert c["weight_bytes"] == pytest.approx(hf_param_bytes(smol_a3_cr01), rel=0.002)
    assert 0.85 < c["weight_bytes"] / d["weight_bytes"] < 0.97
    assert 1.0 < c["perplexity"] and 5.0 < d["perplexity"] < c["perplexity"] < 3 * d["perplexity"]
    assert report["config"]["order"] == ["dense", "compressed"]
    assert "--ppl-data" in report["command"] and report["environment"]["vllm"].startswith("0.32")


def test_hf_engine_alternates_and_measures_the_kv_cache(demo_model, smol_a3_cr01, tmp_path):
    out = tmp_path / "hf"
    proc = bench("--engine", "hf", "--device", "cpu", "--dense", str(demo_model), "--compressed", str(smol_a3_cr01),
                 "--num-prompts", "2", "--input-len", "12", "--output-len", "4", "--repeats", "2",
                 "--out-dir", str(out), "--ppl-data", "wiki:heldout", "--ppl-tokens", "1024", "--ppl-seqlen", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_files(out)
    assert report["config"]["order"] == ["dense", "compressed", "compressed", "dense"]
    # the export and its source are comparable (same tokenizer and vocabulary, recorded source matches)
    assert report["config"]["comparability"] == {"checked": True, "problems": [], "allow_mismatch": False}
    cfg_d, cfg_c = config(demo_model), config(smol_a3_cr01)
    layers, kv_heads = cfg_d["num_hidden_layers"], cfg_d["num_key_value_heads"]
    head = cfg_d["hidden_size"] // cfg_d["num_attention_heads"]
    d, c = (report["models"][m]["median"] for m in ("dense", "compressed"))
    # bytes the model's own cache tensors hold per cached position (fp32): K and V of every layer
    assert d["kv_bytes_per_token"] == layers * kv_heads * 2 * head * 4
    assert c["kv_bytes_per_token"] == layers * kv_heads * (cfg_c["qk_head_dim"] + cfg_c["v_head_dim"]) * 4
    for m in (d, c):
        assert 0 < m["ttft_ms_median"] <= m["ttft_ms_p99"]
        assert 0 < m["tpot_ms_median"] <= m["tpot_ms_p99"]
    for name in ("dense", "compressed"):
        assert len(report["models"][name]["runs"]) == 2
    assert d["weight_bytes"] == pytest.approx(hf_param_bytes(demo_model), rel=0.002)  # + rotary buffers
    assert c["weight_bytes"] == pytest.approx(hf_param_bytes(smol_a3_cr01), rel=0.002)
    assert 5.0 < d["perplexity"] < c["perplexity"] < 3 * d["perplexity"]  # held-out text, 1024 tokens
    assert "|" in proc.stdout and "wrote png" in proc.stdout


@pytest.mark.slow  # two `vllm serve` starts (~2-4 min); the default run covers URL mode in test_vllm_serve.py
@pytest.mark.skipif(SKIP_VLLM, reason="A3_SERVE_SKIP_VLLM=1")
def test_server_mode_streams_real_http(demo_model, smol_a3_cr01, tmp_path):
    """--mode server launches `vllm serve` for each model, streams real HTTP and reads capacity from /metrics."""
    out = tmp_path / "server"
    proc = bench("--mode", "server", "--dense", str(demo_model), "--compressed", str(smol_a3_cr01),
                 "--num-prompts", "3", "--input-len", "16", "--output-len", "6", "--repeats", "1", "--enforce-eager",
                 "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_files(out)
    cfg_d, cfg_c = config(demo_model), config(smol_a3_cr01)
    head = cfg_d["hidden_size"] // cfg_d["num_attention_heads"]
    d, c = (report["models"][m]["median"] for m in ("dense", "compressed"))
    for m in (d, c):
        for lat in ("ttft", "tpot", "itl"):
            assert 0 < m[f"{lat}_ms_median"] <= m[f"{lat}_ms_p99"]
        assert m["peak_rss_bytes"] > 2**27
    # capacity read from the servers' Prometheus metrics agrees with the head-size ratio
    assert c["kv_cache_tokens"] / d["kv_cache_tokens"] == pytest.approx(head / cfg_c["qk_head_dim"], rel=0.02)
    assert (out / "vllm-serve-dense.log").is_file()


def test_bad_input_is_one_line(demo_model, tmp_path, capsys):
    """Checked in this process (the script is a thin wrapper of a3_serve.bench.cli.main; each interpreter start
    costs ~10 s); the real subprocess path and its exit code are covered by test_engine_crash_is_one_line_and_exit_1."""
    import signal

    from a3_serve.bench.cli import main

    def run(*args: str) -> tuple[int, str]:
        sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
        try:
            code = main(list(args))
        except SystemExit as exc:  # an argparse error
            code = exc.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        return code, capsys.readouterr().err

    assert_one_line_error(*run("--dense", str(demo_model)), "--compressed")
    assert_one_line_error(*run("--dense", str(demo_model), "--compressed", str(tmp_path / "missing")), "--compressed",
                          "does not exist")
    assert_one_line_error(*run("--dense-url", "http://127.0.0.1:1"), "--compressed-url")
    assert_one_line_error(*run("--dense", str(demo_model), "--compressed", str(demo_model), "--input-len", "0"),
                          "--input-len")


def test_engine_crash_is_one_line_and_exit_1(demo_model, tmp_path):
    """A checkpoint whose weights are truncated: the worker dies, the benchmark reports which and why, no traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in demo_model.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((demo_model / "model.safetensors").read_bytes()[:4096])
    proc = bench("--engine", "hf", "--device", "cpu", "--dense", str(demo_model), "--compressed", str(broken),
                 "--num-prompts", "1", "--input-len", "4", "--output-len", "2", "--repeats", "1",
                 "--out-dir", str(tmp_path / "o"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[bench] ")]  # progress lines
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "compressed model" in lines[0], lines
    assert not (tmp_path / "o" / "throughput.json").exists()


def test_sigterm_stops_the_engine_worker(demo_model, smol_a3_cr01, tmp_path):
    """Stopping the benchmark leaves no engine worker behind (workers run in their own process session)."""
    import signal
    import time

    import psutil

    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--engine", "hf", "--device", "cpu",
                             "--dense", str(demo_model), "--compressed", str(smol_a3_cr01), "--num-prompts", "2",
                             "--input-len", "16", "--output-len", "512", "--max-model-len", "1024",
                             "--out-dir", str(tmp_path / "o")],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    worker = None
    deadline = time.monotonic() + 120
    while worker is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for p in psutil.process_iter(["cmdline"]):
            if "a3_serve.bench.worker" in " ".join(p.info["cmdline"] or []):
                worker = p
    assert worker is not None, "no engine worker started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    gone, alive = psutil.wait_procs([worker], timeout=15)
    assert not alive, "the engine worker outlived the benchmark"
