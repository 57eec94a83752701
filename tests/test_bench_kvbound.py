"""`throughput.py --scenario kv-bound` on real `vllm serve` engines, byte-level KV sizing, the engine's real error,
and vLLM on CPU with its preloads.

One KV-bound run (two server starts, two short levels) carries most assertions: the KV cache is sized in bytes so
the dense model holds 3 requests of 128 tokens (one 128-token block each, plus the block vLLM keeps back) while the
compressed export (heads 64 -> 48) gets 5 blocks, room for 4, and the engines' own counts (``/metrics``) must show the
compressed server running more requests at once. Timings are never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
SKIP_VLLM = os.environ.get("A3_SERVE_SKIP_VLLM") == "1"


def bench(*args: str, env_extra: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(SKIP_VLLM, reason="A3_SERVE_SKIP_VLLM=1")
def test_kv_bound_sweep_shows_the_compressed_engine_running_more_at_once(demo_model, smol_a3_cr01, tmp_path):
    import matplotlib.image as mpimg

    from a3_serve.bench.curve import running_at_once
    from a3_serve.bench.preload import preload_libs

    out = tmp_path / "kvb"
    # a legacy whole-GiB setting in the caller's environment must not reach the engines (it would override the
    # byte-level size and give both models room for hundreds of requests)
    proc = bench("--scenario", "kv-bound", "--dense", str(demo_model), "--compressed", str(smol_a3_cr01),
                 "--kv-sequences", "3", "--input-len", "64", "--output-len", "64", "--concurrency", "1x,2x",
                 "--waves", "2", "--repeats", "1", "--enforce-eager", "--out-dir", str(out),
                 env_extra={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "throughput.json").read_text())
    cfg, curve = report["config"], report["curve"]
    assert cfg["scenario"] == "kv-bound" and cfg["mode"] == "server" and cfg["offered"] == [3, 6]
    assert cfg["kv_cache_bytes"] == 4 * 128 * 46080  # 3 + 1 128-token blocks of the dense fp32 KV (46,080 B/token)
    assert [lv["label"] for lv in curve["levels"]] == ["1x", "2x"]
    assert [lv["num_requests"] for lv in curve["levels"]] == [6, 12]  # --waves 2
    top = curve["levels"][-1]
    d, c = top["dense"], top["compressed"]
    # the engines' own block counts: 4 blocks dense; 5 compressed (48/64 of the bytes per token); one kept back
    assert (d["kv_cache_tokens"], c["kv_cache_tokens"]) == (512, 640)
    # from /metrics: never more running than the usable blocks allow, and the compressed engine ran more at once
    for m, room in ((d, 3), (c, 4)):
        assert 1 <= m["running_max"] <= room
        assert m["waiting_max"] >= 1  # offered more than it holds
        assert 0 < m["running_saturated_mean"] <= m["running_max"] and 0 < m["queued_fraction"] <= 1
        assert m["preemptions"] >= 0 and 0 < m["kv_usage_max"] <= 1.0
        assert 0 < m["ttft_ms_median"] <= m["ttft_ms_p99"] and 0 < m["tpot_ms_median"] <= m["tpot_ms_p99"]
        assert m["output_tokens_per_s"] > 0
    assert c["running_max"] > d["running_max"]
    assert c["running_saturated_mean"] > d["running_saturated_mean"]
    s = curve["summary"]
    # usable blocks (the one kept back excluded): room for 3 vs 4 requests
    assert s["capacity_ratio"] == pytest.approx(4 / 3) and s["saturation_level"] == "2x"
    assert s["capacity_requests"] == {"dense": 3, "compressed": 4}
    assert s["running_ratio"] == pytest.approx(running_at_once(c) / running_at_once(d))
    assert s["gain_vs_capacity"] == pytest.approx(s["throughput_gain"] / s["capacity_ratio"])
    # the standard sections describe the highest level, so the service and dashboard show the saturated comparison
    assert report["models"]["dense"]["median"]["running_max"] == d["running_max"]
    assert report["ratios"]["output_tokens_per_s"] == pytest.approx(top["ratios"]["output_tokens_per_s"])
    md = (out / "throughput.md").read_text()
    assert "fixed KV cache" in md and "| 2x (6) | 12 |" in md and f"{s['throughput_gain']:.3f}x" in md
    img = mpimg.imread(out / "throughput.png")
    rgb = img[..., :3]
    assert img.shape[1] > 1000 and ((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)).mean() > 0.002  # compressed lines
    # vLLM on CPU as its guide asks: with both libraries installed, the engines got them and did not warn
    libs = [os.path.basename(p) for p in preload_libs()]
    assert cfg["cpu_preload"] == libs
    log = (out / "vllm-serve-dense.log").read_text()
    if len(libs) == 2:
        assert "not found in LD_PRELOAD" not in log, [ln for ln in log.splitlines() if "LD_PRELOAD" in ln]


@pytest.mark.skipif(SKIP_VLLM, reason="A3_SERVE_SKIP_VLLM=1")
def test_engine_failure_shows_the_engines_own_error(demo_model, tmp_path):
    """A KV cache too small for one request: the engine refuses to start, and the user sees its ValueError (the
    first exception of the worker's log), not the log's last line."""
    proc = bench("--dense", str(demo_model), "--compressed", str(demo_model), "--allow-mismatch",
                 "--kv-cache-gib", "0.01", "--max-model-len", "2048", "--num-prompts", "1", "--input-len", "8",
                 "--output-len", "2", "--repeats", "1", "--enforce-eager", "--out-dir", str(tmp_path / "o"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[bench] ")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: vllm on the dense model"), lines
    assert "ValueError: To serve at least one request with the model's max seq len (2048)" in lines[0], lines[0]


def test_engine_error_line_is_the_cause():
    """The log scan on vLLM's two failure shapes (texts as the engine prints them, copied from real logs)."""
    from a3_serve.bench.logscan import failure_reason

    pydantic = """INFO 12-06 22:24:01 [model.py:560] Resolved architecture: LlamaForCausalLM
Traceback (most recent call last):
  File "/x/vllm/config/vllm.py", line 1, in __post_init__
pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig
  Value error, invalid literal for int() with base 10: '0.125' [type=value_error, input_value=ArgsKwargs((), {}), \
input_type=ArgsKwargs]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""
    assert failure_reason(pydantic) == ("ValidationError: 1 validation error for VllmConfig: Value error, invalid "
                                        "literal for int() with base 10: '0.125'")
    engine_core = """(EngineCore pid=12) ERROR 12-06 22:24:23 [core.py:1] EngineCore failed to start.
(EngineCore pid=12) Traceback (most recent call last):
(EngineCore pid=12) ValueError: To serve at least one request with the model's max seq len (1280)
(APIServer pid=11) Traceback (most recent call last):
(APIServer pid=11) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
    assert failure_reason(engine_core) == ("ValueError: To serve at least one request with the model's max seq len "
                                           "(1280)")
    assert failure_reason("starting\nerror: --dense: no such folder\n") == "--dense: no such folder"
    assert failure_reason("just a line\nlast line\n") == "last line"


def test_engine_env_preloads_and_drops_the_legacy_kv_variable(capsys):
    from a3_serve.bench.preload import LEGACY_KV_ENV, engine_env, main, preload_libs

    libs = preload_libs()
    env = engine_env({LEGACY_KV_ENV: "0.125", "LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"})
    assert LEGACY_KV_ENV not in env and env["PATH"] == "/bin"
    assert env["LD_PRELOAD"].split(":") == libs + ["/x/libfoo.so"]
    off = engine_env({"LD_PRELOAD": ":".join(libs + ["/x/libfoo.so"])}, preload=False)
    assert off["LD_PRELOAD"] == "/x/libfoo.so"
    # an OpenMP runtime already preloaded stays the only one (vLLM refuses libiomp next to libgomp)
    gomp = engine_env({"LD_PRELOAD": "/t/libgomp.so.1"})
    assert not any("libiomp" in p for p in gomp["LD_PRELOAD"].split(":"))
    assert main([]) == 0 and capsys.readouterr().out.strip() == ":".join(libs)  # `python -m ...` for demo/docker


def test_kv_bound_bad_input_is_one_line(demo_model, capsys):
    from a3_serve.bench.cli import main

    def run(*args: str) -> tuple[int, str]:
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        return code, capsys.readouterr().err

    pair = ["--dense", str(demo_model), "--compressed", str(demo_model)]
    assert_one_line_error(*run(*pair, "--scenario", "kv-bound", "--engine", "hf"), "--engine hf")
    assert_one_line_error(*run(*pair, "--scenario", "kv-bound", "--mode", "offline"), "--mode offline")
    assert_one_line_error(*run(*pair, "--scenario", "kv-bound", "--concurrency", "2y"), "--concurrency")
    assert_one_line_error(*run(*pair, "--scenario", "kv-bound", "--kv-sequences", "4", "--kv-cache-gib", "1"),
                          "not both")
    assert_one_line_error(*run(*pair, "--concurrency", "1x,2x"), "--scenario kv-bound")
    assert_one_line_error(*run(*pair, "--kv-cache-gib", "0"), "--kv-cache-gib")
    assert_one_line_error(*run(*pair, "--kv-cache-gib", "nan"), "--kv-cache-gib")
