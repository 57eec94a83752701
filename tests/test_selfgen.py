"""`--calib self` (issue 18 item 2): windows sampled from the model itself, reproducible for a seed, cached on disk,
mixed with a corpus, and used by a real export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from a3_serve.calibration import selfgen
from a3_serve.calibration.sources import calibration_windows, describe_source, load_texts, sources_overlap
from a3_serve.errors import InputError
from a3_serve.export.cli import main as export_main


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("A3_SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sampling_is_reproducible_and_follows_the_model(random_models):
    src = random_models["llama3-gqa"]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    a = selfgen.sample_windows(model, 1, 3, 12, seed=7, batch_size=2)
    b = selfgen.sample_windows(model, 1, 3, 12, seed=7, batch_size=3)
    c = selfgen.sample_windows(model, 1, 3, 12, seed=8)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    # each token is a sample of the model's next-token distribution: at temperature -> 0 it is the greedy choice
    greedy = selfgen.sample_windows(model, 1, 1, 6, seed=0, temperature=1e-4)
    with torch.no_grad():
        logits = model(greedy).logits[0, :-1]
    assert torch.equal(logits.argmax(-1), greedy[0, 1:])


def test_windows_are_cached_and_mixed(random_models, cache_root):
    src = random_models["llama3-gqa"]
    tok = AutoTokenizer.from_pretrained(str(src))
    first = calibration_windows(tok, "self", None, 4, 16, seed=3, model_dir=src)
    path = selfgen.cache_path(src, 4, 16, 3)
    assert path.is_file() and torch.equal(torch.load(path).long(), first)
    # a second call reads the cache: plant a marker there and get it back
    marker = torch.full((4, 16), 5, dtype=torch.int32)
    torch.save(marker, path)
    assert torch.equal(calibration_windows(tok, "self", None, 4, 16, seed=3, model_dir=src), marker.long())
    path.unlink()
    assert torch.equal(calibration_windows(tok, "self", None, 4, 16, seed=3, model_dir=src), first)
    mixed = calibration_windows(tok, "self+wiki", None, 4, 16, seed=3, model_dir=src)
    assert mixed.shape == (4, 16) and torch.equal(mixed[:2], selfgen.self_windows(src, tok, 2, 16, 3))
    assert torch.equal(mixed[2:], calibration_windows(tok, "wiki", None, 2, 16, seed=3))
    assert describe_source("self+wiki") == "self+wiki:calibration"
    assert not sources_overlap("self+mix", None, "wiki:heldout", None)
    with pytest.raises(InputError, match="does not load"):
        calibration_windows(tok, "self", None, 4, 16, seed=3)
    with pytest.raises(InputError, match="no documents"):
        load_texts("self")


def test_export_calibrated_on_itself(random_models, cache_root, tmp_path, capsys):
    out = tmp_path / "a3"
    code = export_main(["--model", str(random_models["llama3-gqa"]), "--cr", "0.2", "--calib", "self", "--nsamples",
                        "4", "--seqlen", "32", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    cal = json.loads((out / "config.json").read_text())["a3"]["calibration"]
    assert cal["source"] == "self" and cal["n_tokens"] == 4 * 32
    assert list((cache_root / "self-calibration").glob("*.pt"))
