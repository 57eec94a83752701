"""Random-weight checkpoints at real shapes, written shard by shard (the helper behind timing and memory tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from a3_serve.errors import InputError
from a3_serve.random_model import SHAPES, llama_config, tensor_shapes, write_random_llama

from conftest import assert_one_line_error


def test_shards_index_and_loadable(demo_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = write_random_llama(tmp_path / "m", "tiny-gqa", demo_model, dtype=torch.bfloat16,
                             shard_gib=0.02, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    tensors = {}
    for s in shards:
        tensors.update(load_file(str(out / s)))
    cfg = json.loads((out / "config.json").read_text())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == dict(tensor_shapes(cfg))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    w = tensors["model.layers.1.mlp.down_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(tensors["model.norm.weight"].float(), torch.ones(256))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 49152
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
    assert not list(tmp_path.glob(".m.partial"))


def test_reproducible_and_refuses_existing(demo_model, tmp_path):
    a = write_random_llama(tmp_path / "a", "tiny-gqa", demo_model, seed=3, progress=False)
    b = write_random_llama(tmp_path / "b", "tiny-gqa", demo_model, seed=3, shard_gib=0.01, progress=False)
    ta, tb = {}, {}
    for p in a.glob("*.safetensors"):
        ta.update(load_file(str(p)))
    for p in b.glob("*.safetensors"):
        tb.update(load_file(str(p)))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # sharding does not change values
    with pytest.raises(InputError, match="already exists"):
        write_random_llama(a, "tiny-gqa", demo_model, progress=False)
    proc = subprocess.run([sys.executable, "-m", "a3_serve.random_model", "--shape", "tiny-gqa", "--out", str(a),
                           "--tokenizer", str(demo_model)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "already exists")


def test_published_shapes():
    cfg = llama_config("llama-2-7b", 32000, torch.bfloat16)
    n = sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))
    assert n == 6_738_415_616  # Llama-2-7B's published parameter count
    cfg = llama_config("llama-3.1-8b", 128256, torch.bfloat16)
    assert sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg)) == 8_030_261_248
    assert set(SHAPES) >= {"llama-2-7b", "llama-3.1-8b", "llama-3.1-70b"}
