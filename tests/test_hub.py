"""Hub ids as `--model` (issue 19, item 1): resolved from a cache laid out exactly as huggingface_hub writes it
(blobs, snapshots, refs), offline, with the id and the resolved commit recorded; unknown ids get one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """``root/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def _run(args: list[str], cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), A3_SERVE_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, random_models) -> Path:
    root = tmp_path_factory.mktemp("hub")
    hub_cache(root, "acme/tiny", random_models["llama3-gqa"])
    return root


def test_export_and_eval_take_a_hub_id_offline(cache, tmp_path):
    out = tmp_path / "a3"
    proc = _run(["a3_serve.export.cli", "--model", "acme/tiny", "--cr", "0.2", "--out", str(out), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cpu", "--recipe", "paper", "--quiet"], cache, tmp_path)
    assert proc.returncode == 0, proc.stderr
    a3 = json.loads((out / "config.json").read_text())["a3"]
    assert a3["source_model"] == "acme/tiny" and a3["source_revision"] == COMMIT
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny" in card and COMMIT in card
    proc = _run(["a3_serve.export.cli", "--model", f"acme/tiny@{COMMIT}", "--cr", "0.2", "--out", str(tmp_path / "b"),
                 "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--recipe", "paper", "--quiet"],
                cache, tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run(["a3_serve.eval.cli", "ppl", "--model", "acme/tiny", "--data", "wiki:heldout", "--seqlen", "64",
                 "--max-tokens", "256", "--quiet"], cache, tmp_path)
    assert proc.returncode == 0 and "perplexity" in proc.stdout, proc.stderr


@pytest.mark.parametrize("spec, needle", [("acme/absent", "not in the Hugging Face cache"),
                                          ("acme/tiny@v9", "not in the Hugging Face cache")])
def test_an_uncached_id_offline_gets_one_line(spec, needle, cache, tmp_path):
    proc = _run(["a3_serve.export.cli", "--model", spec, "--cr", "0.2", "--out", str(tmp_path / "x")], cache, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --model "), proc.stderr
    assert needle in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and "huggingface-cli download" in lines[0]
    assert not (tmp_path / "x").exists()
