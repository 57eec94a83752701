"""`a3-quantize` end to end: the real llm-compressor (in .venv-quant) quantizes a tiny random A3 checkpoint with
per-layer head sizes and MLP widths (and the dense model it came from); the real vLLM (CPU) serves the results with the
plugin, in parity with the transformers reference of the same quantized checkpoint; bad inputs get one line and leave
nothing at --out.

Serving dtypes on vLLM 0.32's CPU backend: W8A8 in float32 (the oneDNN INT8 kernel; on AMX CPUs the plugin's
``int8_fp32_on_amx_workaround`` keeps vLLM from choosing its bf16-only AMX kernel), W4A16 in bfloat16 (the CPU INT4
kernel, ``cpu_gemm_wna16``, has no float32 path).

Parity (``parity_problems``): greedy tokens for 24 steps on 3 prompts, identical except that a divergence is allowed
where the reference's top-2 logprob gap is below the scheme's tolerance (the steps after it are not compared), and
every top-5 logprob vLLM reports within ``ATOL[scheme]`` of the reference. The reference is transformers (fp32) with
the serving environment's compressed-tensors: weights dequantized from the stored integers and scales; for W8A8 the
activations quantized per token as vLLM's kernel does (symmetric, scale max|x| / 127; compressed-tensors' own fake
quantization uses / 127.5, a different rounding grid whose noise is as large as the quantization's own effect on this
model). Measured on this CPU: W8A8 (fp32) within 0.044 of the reference (0.000 on most prompts), the unquantized model
0.155 to 0.24 away; W4A16 (bf16) within 0.21 (bf16 activations), the unquantized model 1.75 to 3.0 away.
``test_parity_check_catches_wrong_scales`` shows the check fails on a checkpoint whose group scales are swapped between
groups (a scale-layout bug), and ``test_quantization_is_what_was_served`` that it fails when vLLM's quantized output is
compared with the UNQUANTIZED model: the tolerances are tighter than the quantizations' own effects.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if os.environ.get("A3_SERVE_SKIP_QUANT") == "1":
    pytest.skip("A3_SERVE_SKIP_QUANT=1: quantizer tests skipped on purpose", allow_module_level=True)

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import a3_serve  # noqa: E402,F401
from a3_serve.export.pipeline import ExportOptions, run_export  # noqa: E402
from a3_serve.quantize.checkpoint import REPORT_NAME  # noqa: E402
from a3_serve.quantize.cli import main  # noqa: E402
from a3_serve.quantize.driver import quantizer_python  # noqa: E402

from conftest import assert_one_line_error, copy_model  # noqa: E402

# per-layer dims: every size passes the CPU INT4 rules with group 128 (q/k/v/gate/up inputs 256, o_proj inputs 4 x 64
# and 4 x 32, down_proj inputs 384 and 256, fused qkv outputs 512 and 256)
LAYER_DIMS = ((64, 64, 384), (32, 32, 256))
QUICK = ["--nsamples", "8", "--seqlen", "64", "--calib", "wiki", "--quiet"]
N_STEPS = 24
TOP_K = 5
#: largest |logprob difference| accepted per scheme (module docstring; docs/QUANTIZATION.md)
ATOL = {"w8a8": 0.08, "w4a16": 0.3, "none": 0.02}
#: vLLM's --dtype per scheme on CPU (module docstring)
DTYPE = {"w8a8": "float32", "w4a16": "bfloat16", "none": "float32"}
#: first-step top-5 logprobs with an FP8 KV cache vs the default cache (measured: up to 0.35 on this random model)
FP8_ATOL = 0.6
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Photosynthesis is the process by which green plants and some other organisms use sunlight to"]
VLLM = os.environ.get("A3_SERVE_SKIP_VLLM") != "1"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _hidden(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.a3-quantize-*"))


@pytest.fixture(scope="module")
def qroot(tmp_path_factory) -> Path:
    quantizer_python()  # fails loudly (the fix in its message) when setup.sh did not create .venv-quant
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def tiny(qroot, random_models) -> dict[str, Path]:
    dense = random_models["llama3-gqa"]
    a3 = qroot / "a3"
    run_export(ExportOptions(model=dense, out=a3, cr=0.0, nsamples=4, seqlen=64, batch_size=4, device="cpu",
                             dtype="float32", allow_zero_cr=True, layer_dims=LAYER_DIMS), progress=False)
    return {"dense": dense, "a3": a3}


@pytest.fixture(scope="module")
def quantized(qroot, tiny) -> dict[str, Path]:
    jobs = {"a3-w8a8": ("a3", "w8a8", []), "a3-w4a16": ("a3", "w4a16", []),
            "a3-w8a16-gpu": ("a3", "w8a16", ["--backend", "gpu"]), "dense-w8a8": ("dense", "w8a8", [])}
    out = {}
    for name, (src, scheme, extra) in jobs.items():
        out[name] = qroot / name
        code = main(["--model", str(tiny[src]), "--scheme", scheme, "--out", str(out[name]), *QUICK, *extra])
        assert code == 0, name
    return out


def test_a3_checkpoint_keeps_its_contract(tiny, quantized):
    src, q = tiny["a3"], quantized["a3-w8a8"]
    scfg, qcfg = (json.loads((p / "config.json").read_text()) for p in (src, q))
    assert qcfg["quantization_config"]["quant_method"] == "compressed-tensors"
    rec = qcfg["a3"].pop("quantization")
    assert rec["scheme"] == "w8a8" and rec["smoothquant"] == 0.8 and rec["calibration"]["nsamples"] == 8
    assert {k: v for k, v in qcfg.items() if k != "quantization_config"} == scfg  # A3 sizes, auto_map, a3 block
    for name in ("modeling_a3_llama.py", "configuration_a3_llama.py", "tokenizer.json", "tokenizer_config.json",
                 "a3_report.json", "generation_config.json"):
        assert (q / name).read_bytes() == (src / name).read_bytes(), name
    assert "## Quantization (a3-quantize)" in (q / "README.md").read_text()
    report = json.loads((q / REPORT_NAME).read_text())
    assert report["verified"]["forward"] and report["sizes"]["weight_bytes_after"] > 0
    tensors = load_file(str(q / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.int8
    assert tuple(tensors["model.layers.1.self_attn.o_proj.weight"].shape) == (256, 4 * 32)  # per-layer r_vo kept
    assert "model.layers.1.self_attn.rope_freq_index" in tensors
    # the dense model quantized for comparison: no a3 block appears
    dcfg = json.loads((quantized["dense-w8a8"] / "config.json").read_text())
    assert "a3" not in dcfg and dcfg["model_type"] == "llama" and dcfg["quantization_config"]
    w4 = load_file(str(quantized["a3-w4a16"] / "model.safetensors"))
    assert tuple(w4["model.layers.0.mlp.down_proj.weight_scale"].shape) == (256, 384 // 128)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_unknown_scheme(capsys, tiny, qroot):
    out = qroot / "bad-scheme"
    code, _, err = _run(capsys, "--model", tiny["a3"], "--scheme", "fp4", "--out", out, *QUICK)
    assert_one_line_error(code, err, "--scheme 'fp4'", "w8a8, w4a16, w8a16")
    assert not out.exists() and not _hidden(out)


def test_already_quantized_input(capsys, quantized, qroot):
    out = qroot / "twice"
    code, _, err = _run(capsys, "--model", quantized["a3-w8a8"], "--scheme", "w4a16", "--out", out, *QUICK)
    assert_one_line_error(code, err, "already quantized", "compressed-tensors", "unquantized checkpoint")
    assert not out.exists() and not _hidden(out)


def test_sizes_a_kernel_cannot_take(capsys, tiny, qroot):
    """An MLP width of 448 in layer 1: GPTQ's group 128 cannot split down_proj's input; the fix is --group-size 64."""
    src = copy_model(tiny["a3"], qroot / "mlp448")
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_intermediate_sizes"] = [384, 448]
    (src / "config.json").write_text(json.dumps(cfg))
    out = qroot / "mlp448-w4a16"
    code, _, err = _run(capsys, "--model", src, "--scheme", "w4a16", "--out", out, *QUICK)
    assert_one_line_error(code, err, "model.layers.1.mlp.down_proj has input size 448", "group size 128",
                          "--group-size 64")
    assert not out.exists() and not _hidden(out)
    code, _, err = _run(capsys, "--model", tiny["a3"], "--scheme", "w8a16", "--backend", "cpu", "--out", out, *QUICK)
    assert_one_line_error(code, err, "cannot be served on cpu", "--scheme w8a8 or w4a16")
    assert not out.exists()


def test_dense_folder_without_tokenizer(capsys, tiny, qroot):
    src = copy_model(tiny["dense"], qroot / "no-tokenizer")
    for f in src.glob("tokenizer*"):
        f.unlink()
    out = qroot / "no-tokenizer-q"
    code, _, err = _run(capsys, "--model", src, "--scheme", "w8a8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "has no tokenizer", "copy the tokenizer files")
    assert not out.exists() and not _hidden(out)


def test_missing_quantizer_environment(capsys, tiny, qroot, monkeypatch):
    monkeypatch.setenv("A3_SERVE_QUANT_PYTHON", str(qroot / "nope" / "python"))
    out = qroot / "no-env"
    code, _, err = _run(capsys, "--model", tiny["a3"], "--scheme", "w8a8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "A3_SERVE_QUANT_PYTHON", "quantizer environment")
    assert not out.exists() and not _hidden(out)


def test_quantizer_failure_is_one_line_naming_its_log(capsys, tiny, qroot):
    """The quantizer itself fails (here: a truncated weight file it cannot load): one line with its reason and the
    log that holds the traceback; nothing at --out."""
    src = copy_model(tiny["a3"], qroot / "truncated")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    out = qroot / "truncated-q"
    code, _, err = _run(capsys, "--model", src, "--scheme", "w8a8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "llm-compressor failed:", "full log:")
    log = Path(err.rsplit("full log: ", 1)[1].rstrip(")\n "))
    assert log.is_file() and "Traceback" in log.read_text()
    log.unlink()
    assert not out.exists() and not _hidden(out)


def test_existing_output_needs_overwrite(capsys, quantized, tiny):
    out = quantized["dense-w8a8"]
    code, _, err = _run(capsys, "--model", tiny["dense"], "--scheme", "w8a8", "--out", out, *QUICK)
    assert_one_line_error(code, err, "already exists", "--overwrite")


def _worker_running(request: Path) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if str(request) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def _start(tiny, out: Path) -> tuple[subprocess.Popen, Path]:
    exe = Path(sys.executable).with_name("a3-quantize")
    proc = subprocess.Popen([str(exe), "--model", str(tiny["a3"]), "--scheme", "w8a8", "--out", str(out), *QUICK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reqs = [h / "request.json" for h in _hidden(out) if (h / "request.json").is_file()]
        if reqs and _worker_running(reqs[0]):
            return proc, reqs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the quantizer worker never started")


def test_interrupted_run_leaves_nothing(tiny, qroot):
    """SIGTERM (or Ctrl-C) while llm-compressor runs: one line, exit 130, the worker stopped, nothing at --out."""
    out = qroot / "interrupted"
    proc, request = _start(tiny, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and lines == ["error: interrupted; nothing was written to --out"], (proc.returncode,
                                                                                                    err)
    assert not out.exists() and not _hidden(out) and not _worker_running(request)


def test_killed_run_leaves_nothing_and_is_cleaned_up(capsys, tiny, qroot):
    """SIGKILL: no line can be printed, but the worker dies with its parent, nothing appears at --out, and the next
    run for the same --out removes the abandoned work folder (here one that then fails on its calibration text)."""
    out = qroot / "killed"
    proc, request = _start(tiny, out)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while _worker_running(request) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _worker_running(request)
    assert not out.exists() and len(_hidden(out)) == 1
    code, _, err = _run(capsys, "--model", tiny["a3"], "--scheme", "w8a8", "--out", out, "--nsamples", "8",
                        "--seqlen", "64", "--calib", str(qroot / "missing.txt"), "--quiet")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not _hidden(out)


# ------------------------------------------------------------------------------------------------ serving
def _swap_groups(tensors):  # every INT4 layer's group scales swapped between groups: valid shapes, wrong model
    return {k: (v.roll(1, dims=1).contiguous() if k.endswith("weight_scale") and v.shape[1] > 1 else v)
            for k, v in tensors.items()}


@pytest.fixture(scope="module")
def served(qroot, tiny, quantized, prompt_ids):
    """Every checkpoint through one vLLM interpreter (CPU, eager, 1 GiB KV cache), each with its scheme's dtype; the
    A3 ones again with an FP8 KV cache."""
    if not VLLM:
        pytest.skip("A3_SERVE_SKIP_VLLM=1")
    bad = copy_model(quantized["a3-w4a16"], qroot / "a3-w4a16-bad-scales")
    save_file(_swap_groups(load_file(str(bad / "model.safetensors"))), str(bad / "model.safetensors"),
              metadata={"format": "pt"})
    models = {"dense": tiny["dense"], "a3": tiny["a3"], **quantized, "bad-scales": bad}
    runs = {name: (folder, "bfloat16" if "w4a16" in name or name == "bad-scales" else "float32", "auto")
            for name, folder in models.items()}
    runs.update({"a3+fp8": (tiny["a3"], "float32", "fp8"), "a3-w8a8+fp8": (quantized["a3-w8a8"], "float32", "fp8")})
    out = qroot / "vllm.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "a3_serve.vllm_plugin.check", "--in-process", "--enforce-eager",
           "--prompts-json", json.dumps(prompt_ids), "--max-tokens", str(N_STEPS), "--logprobs", str(TOP_K),
           "--out", str(out)]
    for folder, dtype, kv in runs.values():
        cmd += ["--model", f"{folder}::dtype={dtype},kv_cache_dtype={kv}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    return {"models": models, "results": dict(zip(runs, json.loads(out.read_text())))}


@pytest.fixture(scope="module")
def prompt_ids(tiny) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(tiny["a3"]))
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


_REF: dict = {}


def _vllm_int8_activations(model) -> int:
    """Quantize each W8A8 layer's input per token as vLLM's INT8 kernel does (symmetric, scale max|x| / 127, round to
    nearest even); the weights stay compressed-tensors' dequantized ones. Returns the number of layers changed."""
    model(input_ids=torch.tensor([[1, 2]]))  # compressed-tensors decompresses the weights on the first forward
    n = 0
    for m in model.modules():
        scheme = getattr(m, "quantization_scheme", None)
        if isinstance(m, torch.nn.Linear) and scheme is not None and scheme.input_activations is not None:
            def forward(x, m=m):
                s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
                return torch.nn.functional.linear(torch.clamp(torch.round(x / s), -128, 127) * s, m.weight, m.bias)
            m.forward = forward
            n += 1
    return n


def reference(folder: Path, prompts: list[list[int]]):
    """Greedy tokens and full log-probabilities per step from transformers (fp32) with the serving environment's
    compressed-tensors (module docstring)."""
    key = str(folder)
    if key not in _REF:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        cfg = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
        if any(g.get("input_activations") for g in cfg.get("config_groups", {}).values()):
            assert _vllm_int8_activations(model) > 0
        res = []
        with torch.no_grad():
            for p in prompts:
                ids = list(p)
                toks, lps = [], []
                for _ in range(N_STEPS):  # no KV cache: every step recomputes the whole sequence
                    lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
                    t = int(lp.argmax())
                    toks.append(t)
                    lps.append(lp)
                    ids.append(t)
                res.append((toks, lps))
        _REF[key] = res
    return _REF[key]


def parity_problems(result: dict, ref, atol: float) -> list[str]:
    problems = []
    for i, (out, (ref_toks, ref_lps)) in enumerate(zip(result["outputs"], ref)):
        toks = out["token_ids"]
        worst = 0.0
        for s, (step, ref_lp) in enumerate(zip(out["logprobs"], ref_lps)):
            for t, lp in step.items():
                worst = max(worst, abs(lp - float(ref_lp[int(t)])))
            if toks[s] != ref_toks[s]:
                top2 = torch.topk(ref_lp, 2).values
                gap = float(top2[0] - top2[1])
                if gap >= atol:  # a divergence within the tolerance's noise is a tie, not a bug
                    problems.append(f"prompt {i}: greedy tokens differ at step {s} (reference top-2 gap {gap:.3f})")
                break
        if worst > atol:
            problems.append(f"prompt {i}: top-{TOP_K} logprobs differ by up to {worst:.4f} (atol {atol})")
    return problems


@pytest.mark.parametrize("name, scheme", [("a3-w8a8", "w8a8"), ("a3-w4a16", "w4a16"), ("dense-w8a8", "w8a8"),
                                          ("a3", "none")])
def test_vllm_serves_in_parity_with_the_reference(name, scheme, served, prompt_ids):
    res = served["results"][name]
    assert "error" not in res, res.get("error")
    problems = parity_problems(res, reference(served["models"][name], prompt_ids), ATOL[scheme])
    assert not problems, f"{name}: " + "; ".join(problems)


def test_parity_check_catches_wrong_scales(served, prompt_ids):
    res = served["results"]["bad-scales"]
    assert "error" not in res, res.get("error")
    assert parity_problems(res, reference(served["models"]["a3-w4a16"], prompt_ids), ATOL["w4a16"])


@pytest.mark.parametrize("name, scheme", [("a3-w8a8", "w8a8"), ("a3-w4a16", "w4a16")])
def test_quantization_is_what_was_served(name, scheme, served, prompt_ids):
    """vLLM's quantized output against the UNQUANTIZED A3 reference fails the check: the tolerance is tighter than
    the quantization's effect, so serving the model without its quantization would be caught."""
    problems = parity_problems(served["results"][name], reference(served["models"]["a3"], prompt_ids), ATOL[scheme])
    assert problems, f"{name} is indistinguishable from the unquantized model at atol {ATOL[scheme]}"


def test_w8a16_has_no_cpu_kernel(served):
    """Why a3-quantize refuses w8a16 for --backend cpu: vLLM 0.32's CPU backend finds no kernel for it."""
    err = served["results"]["a3-w8a16-gpu"].get("error", "")  # served with float32 like the others
    assert "Failed to find a kernel" in err and "uint8b128" in err, err


def test_fp8_kv_cache_capacity(served):
    """--kv-cache-dtype fp8 on CPU (AVX-512 or AMX needed): the engine's capacity is the head-size ratio times the
    dtype ratio (fp32 -> fp8: 4) of the dense model's; on an AVX2-only CPU vLLM refuses it with that reason."""
    r = served["results"]
    heads = [d[0] for d in LAYER_DIMS]
    head_ratio = len(heads) * 64 / sum(heads)
    fp8_ok = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()
    for name in ("a3", "a3-w8a8"):
        res = r[f"{name}+fp8"]
        if not fp8_ok:
            assert "AVX-512 or AMX" in res.get("error", ""), res
            continue
        assert "error" not in res, res.get("error")
        assert abs(r[name]["num_blocks"] - r["dense"]["num_blocks"] * head_ratio) <= 1
        assert abs(res["num_blocks"] - r["dense"]["num_blocks"] * head_ratio * 4) <= 4, (name, res["num_blocks"])
        for o, base in zip(res["outputs"], r[name]["outputs"]):  # the FP8 cache's rounding only, not garbage
            first, ref = o["logprobs"][0], base["logprobs"][0]
            assert max(abs(first[t] - ref[t]) for t in set(first) & set(ref)) <= FP8_ATOL


def test_overwrite_replaces_a_quantized_dense_output(capsys, tiny, quantized):
    """--overwrite replaces an a3-quantize output (it has no a3 block: a3_quantize.json marks it). Last in this file:
    the engine tests above read the folder it replaces."""
    out = quantized["dense-w8a8"]
    code, _, err = _run(capsys, "--model", tiny["dense"], "--scheme", "w4a16", "--out", out, "--overwrite", *QUICK)
    assert code == 0, err
    assert json.loads((out / REPORT_NAME).read_text())["quantization"]["scheme"] == "w4a16"
    assert not _hidden(out)
    shutil.rmtree(out)


# ------------------------------------------------------------------------------------ the throughput benchmark
def test_benchmark_reads_the_quantization(tiny, quantized, tmp_path, capsys):
    """benchmarks/throughput.py (and the service, which runs the same code): each folder's scheme from its
    quantization_config; a scheme vLLM's CPU backend cannot run at the chosen dtype is refused in one line before
    any engine starts; served weight bytes count INT8 weights at one byte."""
    from a3_serve.bench.cli import main as bench_main
    from a3_serve.bench.engines import checkpoint_bytes
    from a3_serve.provenance import quantization_info

    assert quantization_info(tiny["a3"]) is None
    w8, w4 = quantization_info(quantized["a3-w8a8"]), quantization_info(quantized["a3-w4a16"])
    assert (w8["scheme"], w8["weight_bits"], w8["activation_bits"], w8["format"]) == ("w8a8", 8, 8, "int-quantized")
    assert (w4["scheme"], w4["group_size"], w4["activation_bits"], w4["tool"]) == ("w4a16", 128, None, "a3-quantize")
    tensors = load_file(str(quantized["a3-w8a8"] / "model.safetensors"))
    int8 = sum(t.numel() for t in tensors.values() if t.dtype == torch.int8)
    assert int8 > 0 and checkpoint_bytes(str(quantized["a3-w8a8"]), 4) == sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors.values())

    def run(*args) -> tuple[int, str]:
        sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
        try:
            return bench_main([str(a) for a in args]), capsys.readouterr().err
        finally:
            signal.signal(signal.SIGTERM, sigterm)

    out = tmp_path / "refused"
    assert_one_line_error(*run("--dense", tiny["dense"], "--compressed", quantized["a3-w4a16"], "--out-dir", out),
                          "--compressed is w4a16", "--dtype bfloat16")
    assert_one_line_error(*run("--dense", tiny["dense"], "--compressed", quantized["a3-w8a16-gpu"], "--out-dir", out),
                          "8-bit weight-only", "on a GPU")
    assert not (out / "throughput.json").exists()


@pytest.mark.skipif(not VLLM, reason="A3_SERVE_SKIP_VLLM=1")
def test_benchmark_measures_a_quantized_checkpoint(tiny, quantized, tmp_path):
    """A real vLLM run of dense vs A3 + W8A8: the report names the scheme (JSON, Markdown) and the compressed model's
    served weight bytes are its files' (INT8 weights at one byte)."""
    from a3_serve.bench.engines import checkpoint_bytes

    out = tmp_path / "bench"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "throughput.py"), "--dense", str(tiny["dense"]),
                           "--compressed", str(quantized["a3-w8a8"]), "--num-prompts", "2", "--input-len", "16",
                           "--output-len", "4", "--repeats", "1", "--enforce-eager", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=root,
                          env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "throughput.json").read_text())
    q = report["config"]["quantization"]
    assert q["dense"] is None and q["compressed"]["scheme"] == "w8a8"
    assert "(quantized: w8a8 (int-quantized))" in (out / "throughput.md").read_text()
    med = report["models"]["compressed"]["median"]
    assert med["weight_bytes"] == checkpoint_bytes(str(quantized["a3-w8a8"]), 4)
    assert med["output_tokens_per_s"] > 0 and med["kv_cache_tokens"] > 0
