"""Random-weight checkpoints at real model shapes, written shard by shard (for timing and memory tests).

``python -m a3_serve.random_model --shape llama-2-7b --out DIR --tokenizer TOKDIR [--dtype bfloat16]``

No model object is built: every tensor of a Llama-family checkpoint is drawn (``N(0, 0.02²)`` for matrices,
ones for RMSNorm weights; seeded, one generator per tensor name so shards are reproducible) and written into
safetensors shards of at most ``--shard-gib`` with a ``model.safetensors.index.json``, so peak memory is about one
shard whatever the model size. The tokenizer files are copied from ``--tokenizer`` (its vocabulary sets
``vocab_size``, so prompts and calibration text tokenise into valid ids). The weights carry no knowledge: use
these checkpoints for speed and memory, never for quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from a3_serve.errors import InputError
from a3_serve.runtime import DTYPES, OneLineArgumentParser, dtype_name, run_cli

#: published shapes (hidden, intermediate, layers, heads, kv heads, rope theta, max positions)
SHAPES = {
    # a small GQA shape for quick tests of the writer itself
    "tiny-gqa": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, rope_theta=10000.0, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, rope_theta=10000.0, max_position_embeddings=4096),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def llama_config(shape: str, vocab_size: int, dtype: torch.dtype, num_layers: Optional[int] = None) -> dict:
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
            "dtype": dtype_name(dtype), **cfg}


def tensor_shapes(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in file order: ``(name, shape)``."""
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (m, h)
        yield p + "mlp.up_proj.weight", (m, h)
        yield p + "mlp.down_proj.weight", (h, m)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)
    gen = torch.Generator(device=device).manual_seed(gen_seed)
    t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
    return t.to(dtype).cpu()


def write_random_llama(out: Path, shape: str, tokenizer_dir: Path, *, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu", seed: int = 0, shard_gib: float = 2.0, num_layers: Optional[int] = None,
                       progress: Optional[bool] = None) -> Path:
    """Write the checkpoint into ``out`` (must not exist yet); returns ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from a3_serve.progress import progress_bar

    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists; choose a new folder or remove it")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = llama_config(shape, len(tok), dtype, num_layers)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = list(tensor_shapes(cfg))
    limit = int(shard_gib * 2**30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, int] = {}
    total = 0
    elem = torch.finfo(dtype).bits // 8

    def flush(last: bool) -> None:
        idx = len(shards)
        save_file(shards[-1], str(tmp / f"part-{idx:05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {}
        if not last:
            shards.append({})

    with progress_bar(total=len(names), desc=f"random {shape}", unit="tensor", force=progress) as bar:
        for name, shp in names:
            nbytes = elem * int(torch.Size(shp).numel())
            if shards[-1] and size + nbytes > limit:
                flush(last=False)
                size = 0
            shards[-1][name] = random_tensor(name, shp, dtype, device, seed)
            weight_map[name] = len(shards)
            size += nbytes
            total += nbytes
            bar.update(1)
        flush(last=True)
    n = len(shards)
    for i in range(1, n + 1):
        (tmp / f"part-{i:05d}.safetensors").rename(tmp / f"model-{i:05d}-of-{n:05d}.safetensors")
    index = {"metadata": {"total_size": total},
             "weight_map": {k: f"model-{v:05d}-of-{n:05d}.safetensors" for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, tmp / f)
    tmp.rename(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = OneLineArgumentParser(prog="python -m a3_serve.random_model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer files (default: the built-in SmolLM2 demo model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is much faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gib", type=float, default=2.0)
    p.add_argument("--num-layers", type=int, default=None,
                   help="fewer decoder layers than the real shape (quick tests)")
    args = p.parse_args(argv)

    def command() -> int:
        tok = args.tokenizer
        if tok is None:
            from a3_serve.demo import build_demo_model

            tok = build_demo_model()
        out = write_random_llama(Path(args.out), args.shape, Path(tok), dtype=DTYPES[args.dtype], device=args.device,
                                 seed=args.seed, shard_gib=args.shard_gib, num_layers=args.num_layers)
        print(out)
        return 0

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
