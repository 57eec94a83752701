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


PROBE = r"""
import json, sys
from pathlib import Path
from a3_serve.bench.engines import check_model_dir
from a3_serve.bench.server.settings import PathRejected, check_model_dir as service_check
from a3_serve.errors import InputError
out = {"bench": check_model_dir("acme/tiny", "dense"), "service": str(service_check("acme/tiny", (Path(sys.argv[1]),),
                                                                                       "dense"))}
try:
    check_model_dir("acme/absent", "compressed")
except InputError as err:
    out["bench_absent"] = str(err)
try:
    service_check("acme/absent", (Path(sys.argv[1]),), "dense")
except PathRejected as err:
    out["service_absent"] = [err.status, err.message]
print(json.dumps(out))
"""


def test_benchmark_and_service_take_a_cached_hub_id(cache, tmp_path):
    """benchmarks/throughput.py resolves --dense/--compressed Hub ids like a3-export; the service takes a Hub id only
    from the local cache (a request never starts a download) and refuses an uncached one with 422."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    snap = cache / "models--acme--tiny" / "snapshots" / COMMIT
    assert Path(out["bench"]) == snap.resolve() or Path(out["bench"]) == snap
    assert Path(out["service"]) == snap
    assert out["bench_absent"].startswith("--compressed acme/absent: not a local folder and not in the Hugging Face")
    status, message = out["service_absent"]
    assert status == 422 and "only serves models that are already in the cache" in message
