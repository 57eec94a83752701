"""Shared fixtures: the real SmolLM2 demo model and random-weight models of every supported architecture.

Random models reuse the real SmolLM2 tokenizer (vocab 49152) so that calibration runs on real text.
They are small (2 layers, hidden 256-512, head size 64) so an export takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("A3_SERVE_NO_PROGRESS", "1")

VOCAB = 49152
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}

# name -> (config class name, kwargs). head_dim 64 everywhere so head-multiple 16 leaves room to shrink.
RANDOM_ARCHS = {
    "llama2-mha": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=4,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3-gqa": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=8192,
                                       rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=64, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-bias": ("Qwen2Config", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "tinyllama": ("LlamaConfig", dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                      num_key_value_heads=1,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct as a dense fp32 folder (built once, cached)."""
    from a3_serve.demo import build_demo_model

    return build_demo_model()


def build_random_model(kind: str, folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of one of RANDOM_ARCHS (fp32, safetensors) with the demo tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, kwargs = RANDOM_ARCHS[kind]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    kw = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    kw.update(kwargs)
    kw.update(overrides)
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the 0.02 default so heads differ visibly and statistics are informative
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


#: the arguments of the smol_a3_cr01 fixture as a3-export flags (tests that re-run the same export use them)
SMOL_FIXTURE_FLAGS = ["--cr", "0.1", "--nsamples", "4", "--seqlen", "128", "--batch-size", "4", "--device", "cpu",
                      "--dtype", "float32", "--recipe", "best-uniform", "--calib", "wiki"]


@pytest.fixture(scope="session")
def smol_a3_cr01(tmp_path_factory, demo_model) -> Path:
    """SmolLM2 compressed at CR 0.1 with uniform dims (heads 64 -> 48, recipe best-uniform, 4 x 128 calibration
    tokens of Wikipedia): one export shared by every test file that serves or benchmarks a compressed model. Its
    folder is ``<tmp>/compressed`` inside a folder of its own, which the service tests use as a model root.

    Calibration is pinned to ``wiki``: four windows are too few to split across the three domains of the default
    ``mix`` (one or two 128-token windows per domain); with them the model stops answering "Paris" to "The capital
    of France is", while the real default export (64 x 512 tokens of ``mix``) still does."""
    from a3_serve.export.methods import RECIPES
    from a3_serve.export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("smol_a3") / "compressed"
    run_export(ExportOptions(model=demo_model, out=out, cr=0.1, nsamples=4, seqlen=128, batch_size=4, device="cpu",
                             dtype="float32", methods=RECIPES["best-uniform"][0], recipe="best-uniform",
                             calib="wiki"), progress=False)
    return out


@pytest.fixture(scope="session")
def smol_a3_cr0(tmp_path_factory, demo_model) -> Path:
    """SmolLM2 exported at CR 0 (default recipe, 4 x 128 calibration tokens): the A3 checkpoint that must
    reproduce the dense model, in transformers and in vLLM."""
    from a3_serve.export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("smol_a3_cr0") / "smol-cr0"
    run_export(ExportOptions(model=demo_model, out=out, cr=0.0, nsamples=4, seqlen=128, batch_size=4, device="cpu",
                             dtype="float32", allow_zero_cr=True), progress=False)
    return out


@pytest.fixture(scope="session")
def random_models(tmp_path_factory, demo_model) -> dict[str, Path]:
    """One saved random-weight model per supported architecture family."""
    root = tmp_path_factory.mktemp("random_models")
    return {kind: build_random_model(kind, root / kind, demo_model, seed=i) for i, kind in enumerate(RANDOM_ARCHS)}


def hf_param_bytes(folder: Path) -> int:
    """fp32 bytes of the transformers model's parameters: an independent count of what the engine serves."""
    import torch
    from transformers import AutoModelForCausalLM

    import a3_serve  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters()) * 4


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def link_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose ``*.safetensors`` are hard links to ``src``'s (no disk space: the suite keeps
    several variants of a 0.5 GB checkpoint). A test that changes a weights file must replace it (unlink, then write),
    never write into it, or it would change ``src`` too."""
    def copy(s: str, d: str) -> None:
        (_link_or_copy if s.endswith(".safetensors") else shutil.copy2)(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def run_without_a3_serve(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh interpreter where a3_serve cannot be imported.

    ``-I`` drops PYTHONPATH, the user site and the cwd from sys.path; ``-S`` skips site-packages' .pth
    files (so the editable a3_serve finder never runs). The code gets ``SITE_PACKAGES`` to append to
    sys.path itself, and a private HF cache so remote code is loaded from the checkpoint folder.
    """
    import transformers

    site_packages = str(Path(transformers.__file__).resolve().parents[1])
    script = f"SITE_PACKAGES = {site_packages!r}\nimport sys\nsys.path.append(SITE_PACKAGES)\n" + code
    run_dir = tmp_path / "isolated_cwd"
    run_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A CLI failure as users must see it: exit 2 and exactly one `error: ...` line naming the problem."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
