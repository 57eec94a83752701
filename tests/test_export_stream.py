"""Streamed export (issue 5): identical to the in-memory export, resumable after a kill, and a dry run that plans
without computing. The 7B-shaped run on disk is in test_export_7b.py (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from a3_serve.errors import InputError
from a3_serve.export.methods import RECIPES
from a3_serve.export.pipeline import ExportOptions, run_export
from a3_serve.export.workdir import LOCK_FILE, RESUME_MARK, WorkDir

from conftest import RANDOM_ARCHS, SMOL_FIXTURE_FLAGS


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bit-for-bit equal tensors (by name, whatever the sharding) and equal config.json."""
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb), f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _export(src: Path, out: Path, **kw) -> dict:
    opts = ExportOptions(model=src, out=out, cr=kw.pop("cr", 0.2), nsamples=kw.pop("nsamples", 16),
                         seqlen=kw.pop("seqlen", 64), batch_size=2, device="cpu", dtype="float32", **kw)
    return run_export(opts, progress=False)


@pytest.mark.parametrize("kind", list(RANDOM_ARCHS))
def test_streamed_equals_in_memory_random(kind, random_models, tmp_path):
    """The default recipe (allocation pass + refit with a held-out fold) on every architecture family."""
    src = random_models[kind]
    rep = _export(src, tmp_path / "streamed")
    _export(src, tmp_path / "memory", stream=False)
    assert rep["streamed"] is True and rep["summary"]["layer_dims"] is not None
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    assert sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors")) == ["model.safetensors"]
    # above --max-shard-size: shards and an index, as save_pretrained writes them
    _export(src, tmp_path / "sharded", max_shard_size="30MB")  # the 50 MB embedding matrices get shards of their own
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    per_shard = {s: sum(v == s for v in index["weight_map"].values()) for s in shards}
    assert all((tmp_path / "sharded" / s).stat().st_size <= 30e6 + 2**16 for s, n in per_shard.items() if n > 1)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in _tensors(tmp_path / "sharded").values())
    assert_same_checkpoint(tmp_path / "sharded", tmp_path / "memory")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the working folder must be gone"


def test_one_pass_allocation_equals_two_passes(random_models, tmp_path, monkeypatch):
    """The default recipe's single calibration pass (every layer's statistics kept until the allocation is known) gives
    the checkpoint of the light allocation pass + solve pass it replaces, streamed and in memory; with the cache
    limit at 0 both paths take the two-pass route."""
    from a3_serve.export import passes

    src = random_models["llama3-gqa"]
    rep = _export(src, tmp_path / "one-pass")
    monkeypatch.setattr(passes, "CACHED_STATS_MAX_BYTES", 0)
    monkeypatch.setattr(passes, "DISK_STATS_SHARE", 0.0)
    _export(src, tmp_path / "two-pass")
    _export(src, tmp_path / "two-pass-memory", stream=False)
    assert rep["summary"]["layer_dims"] is not None
    assert_same_checkpoint(tmp_path / "one-pass", tmp_path / "two-pass")
    assert_same_checkpoint(tmp_path / "two-pass", tmp_path / "two-pass-memory")


def test_compact_stats_round_trip_bit_for_bit():
    """What the one-pass export stores per layer rebuilds the same statistics, with and without held-out folds."""
    from a3_serve.calibration.stats import CompactStatsList, HeldOut, StatsCollector, StatsRequest, stats_nbytes

    torch.manual_seed(0)
    token_folds = [torch.tensor([[0, 0, 1, 1, 2], [2, 2, 0, 1, 1]])] * 4  # batches of 2 sequences x 5 tokens
    for heldout in (False, True):
        req = StatsRequest(mlp_moment=True, heldout=heldout, rope_energy=False)
        route = StatsCollector(1, 4, 2, 8, req, HeldOut(token_folds, cross_validate=not heldout))
        for b in range(4):
            route.start_batch(b)
            acc = route(0)
            acc.count(torch.randn(2, 5, 32))
            for name, n in (("Gq", 4), ("Gk", 2), ("Gv", 2), ("Go", 4)):
                acc.add_head_moment(name, torch.randn(2, 5, n * 8), n)
            acc.add_square("x2", torch.randn(2, 5, 32))
            acc.add_square("h2", torch.randn(2, 5, 48))
            acc.add_outer("H", torch.randn(2, 5, 48))
            acc.add_sequence("E_rope", torch.rand(2, 4))
        st = route.finish(0)
        kept = CompactStatsList()
        kept.append(st)
        back = kept[0]
        pairs = [(st, back)] + (list(zip(st.folds, back.folds)) if heldout else [])
        for obj_a, obj_b in pairs:
            assert obj_a.n_tokens == obj_b.n_tokens
            for k in ("Gq", "Gk", "Gv", "Go", "x2", "h2", "H"):
                assert torch.equal(getattr(obj_a, k), getattr(obj_b, k)), k
        assert torch.equal(st.E_rope, back.E_rope) and st.n_tokens == 40
        assert (back.folds is None) == (not heldout)
        assert back.cross_validate == (not heldout)  # the flag survives the round trip
        assert [f.n_tokens for f in back.folds or []] == ([12, 16, 12] if heldout else [])
        n_sets = 3 if heldout else 1
        stored = sum(t.numel() * t.element_size() for m in (kept.items[0].get("folds") or [kept.items[0].get("all")])
                     for k, t in m.items() if k not in ("n_tokens", "E_rope"))
        assert stored == stats_nbytes(4, 2, 8, 32, 48, req, 3) - 8 * 2 * n_sets  # no inv_ms moments here


def test_interrupted_solve_from_cached_statistics_resumes(random_models, tmp_path, monkeypatch):
    """An export that fails while solving from the one-pass statistics keeps them in its working folder; the same
    call resumes at the failed layer (no calibration pass again) and writes the uninterrupted checkpoint."""
    from a3_serve.export import streamed

    src = random_models["llama2-mha"]
    _export(src, tmp_path / "reference")
    out = tmp_path / "resumed"
    real = streamed.compress_layer_into

    def failing(state, layer, i, *args, **kw):
        if i == 1:
            raise RuntimeError("injected failure")
        return real(state, layer, i, *args, **kw)

    monkeypatch.setattr(streamed, "compress_layer_into", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _export(src, out)
    (work,) = tmp_path.glob(f".{out.name}{RESUME_MARK}*")
    state = json.loads((work / "state.json").read_text())
    assert state["cached_stats"] is True and state["pass"] == "solve" and state["done"] == 1
    assert sorted(p.name for p in work.glob("stats-*.pt")) == ["stats-00001.pt"]  # layer 0 solved, layer 1 not
    monkeypatch.setattr(streamed, "compress_layer_into", real)
    calls = []
    monkeypatch.setattr(streamed, "sequential_calibrate", lambda *a, **k: calls.append(a))
    rep = _export(src, out)
    assert rep["resumed"] is True and not calls
    assert_same_checkpoint(tmp_path / "reference", out)
    assert not list(tmp_path.glob(f".{out.name}*")), "nothing but the checkpoint may remain"


def test_interrupted_fisher_and_allocation_passes_resume(random_models, tmp_path, monkeypatch):
    """A failure inside the Fisher pass (its layer inputs on disk, no result yet): the same call runs the pass again;
    a failure in the allocation pass after it: the Fisher is in the state and the resumed call does not run the pass
    again. Both give the uninterrupted checkpoint (untied LM head, read from the source) and leave nothing behind."""
    from a3_serve.calibration import fisher
    from a3_serve.export import streamed

    src = random_models["llama2-mha"]
    ref = _export(src, tmp_path / "reference")
    assert len(ref["residual_fisher"]["mlp"]) == 2 and ref["residual_fisher"]["tokens"] == 16 * 64
    out = tmp_path / "resumed"

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as m:
        m.setattr(fisher, "_head_gradient", boom)
        with pytest.raises(RuntimeError, match="injected"):
            _export(src, out)
    (work,) = tmp_path.glob(f".{out.name}{RESUME_MARK}*")
    assert json.loads((work / "state.json").read_text()).get("fisher") is None
    assert sorted(p.name for p in work.glob("fisher-inputs-*.pt")) == ["fisher-inputs-00000.pt",
                                                                        "fisher-inputs-00001.pt"]
    calls = []
    real_curves = streamed.layer_curves

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_curves(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(streamed, "layer_curves", fail_second)
        with pytest.raises(RuntimeError, match="injected"):
            _export(src, out)
    state = json.loads((work / "state.json").read_text())
    assert state["fisher"] == ref["residual_fisher"] and not list(work.glob("fisher-inputs-*"))
    with monkeypatch.context() as m:
        m.setattr(streamed, "fisher_pass", boom)
        rep = _export(src, out)
    assert rep["resumed"] is True and rep["residual_fisher"] == ref["residual_fisher"]
    assert_same_checkpoint(tmp_path / "reference", out)
    assert not list(tmp_path.glob(f".{out.name}*")), "nothing but the checkpoint may remain"


def test_streamed_equals_in_memory_propagated(random_models, tmp_path):
    src = random_models["llama3-gqa"]
    _export(src, tmp_path / "streamed", stats="propagated", methods=RECIPES["paper"][0], recipe="paper")
    _export(src, tmp_path / "memory", stats="propagated", methods=RECIPES["paper"][0], recipe="paper", stream=False)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")


def test_streamed_equals_in_memory_smollm2(smol_a3_cr01, demo_model, tmp_path):
    """The shared SmolLM2 fixture is a streamed export (the default); the in-memory path gives the same bits."""
    out = tmp_path / "memory"
    run_export(ExportOptions(model=demo_model, out=out, cr=0.1, nsamples=4, seqlen=128, batch_size=4, device="cpu",
                             dtype="float32", methods=RECIPES["best-uniform"][0], recipe="best-uniform", calib="wiki",
                             stream=False),
               progress=False)
    assert json.loads((smol_a3_cr01 / "a3_report.json").read_text())["streamed"] is True
    assert_same_checkpoint(smol_a3_cr01, out)


def test_kill_and_resume_gives_the_same_checkpoint(smol_a3_cr01, demo_model, tmp_path):
    """SIGKILL a streamed a3-export in the middle of its solve pass; the same command resumes at the next
    unfinished layer and writes exactly the checkpoint of an uninterrupted run (the fixture, same arguments)."""
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(demo_model), "--out", str(out),
           *SMOL_FIXTURE_FLAGS]
    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            for work in tmp_path.glob(f".{out.name}{RESUME_MARK}*"):
                try:
                    state = json.loads((work / "state.json").read_text())
                except (OSError, ValueError):
                    continue
                if state.get("pass") == "solve" and state.get("done", 0) >= 3:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = state["done"]
            if killed_at is not None:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None and 3 <= killed_at < 30, "the export finished before it could be killed mid-way"
    assert not out.exists()
    run = subprocess.run(cmd + ["--verbose"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming the solve pass at layer" in run.stderr
    resumed_from = int(run.stderr.split("resuming the solve pass at layer ")[1].split()[0])
    assert resumed_from >= killed_at  # the kill may land after one more layer was recorded
    report = json.loads((out / "a3_report.json").read_text())
    assert report["resumed"] is True and len(report["layers"]) == 30
    assert_same_checkpoint(smol_a3_cr01, out)
    assert not list(tmp_path.glob(f".{out.name}*")), "nothing but the checkpoint may remain"


def test_dry_run_plans_without_writing(smol_a3_cr01, demo_model, tmp_path, capsys):
    """--dry-run's parameter and KV numbers are those of the real export with the same arguments; nothing is written."""
    from a3_serve.export.cli import main

    out = tmp_path / "planned"
    report_file = tmp_path / "plan.json"
    code = main(["--model", str(demo_model), "--out", str(out), *SMOL_FIXTURE_FLAGS, "--dry-run",
                 "--json", str(report_file)])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists() and not list(tmp_path.glob(".planned*"))
    assert "dry run" in printed and "KV cache" in printed and "estimate" in printed
    plan = json.loads(report_file.read_text())
    real = json.loads((smol_a3_cr01 / "a3_report.json").read_text())["summary"]
    assert plan["linear_params_after"] == real["linear_params_after"]
    assert plan["params_after"] == real["params_after"]
    assert plan["kv_bytes_per_token_after"] == real["kv_bytes_per_token_after"] == 34560
    assert plan["dims"]["qk_head_dim"] == real["qk_head_dim"] == 48
    est = plan["estimate"]
    assert est["seconds"] > 0 and est["probe_flops_per_s"] > 1e8 and est["streamed_peak_memory_bytes"] > 0


def test_workdir_lock_and_no_resume(tmp_path):
    """A working folder in use by a live export is refused; a lock nobody holds (whatever PID it names) is not an
    owner; --no-resume starts over; other keys are discarded once their export is gone."""
    out = tmp_path / "ckpt"
    w = WorkDir(out, "k1")
    (w.path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    w.finish_layer("solve", 0, [torch.zeros(1, 2, 3)])
    with pytest.raises(InputError, match="another a3-export"):  # w holds its flock
        WorkDir(out, "k1")
    w.release()
    (w.path / LOCK_FILE).write_text(f"{os.getppid()}\n")  # a live process's PID, but it holds no lock
    again = WorkDir(out, "k1")
    assert again.resumed and again.state["done"] == 1
    again.release()
    fresh = WorkDir(out, "k1", resume=False)
    assert (not fresh.resumed and fresh.state["done"] == 0
            and not (fresh.path / "model-00001-of-00002.safetensors").exists())
    other = WorkDir(out, "k2")  # different arguments, k1 still in use by `fresh`: kept
    assert fresh.path.exists() and other.path.exists()
    fresh.release()
    other.release()
    WorkDir(out, "k2")  # k1's export is gone now: its folder is discarded
    assert not fresh.path.exists()


def test_one_pass_statistics_go_to_disk_when_memory_is_too_small():
    """At a 0.5B shape (MLP 4,864, three held-out folds: 14 GB of statistics) the streamed export keeps every layer's
    statistics on disk when the disk has room, instead of a second forward pass; in memory it takes two passes."""
    from a3_serve.export.architectures import inspect_architecture
    from a3_serve.export.methods import RECIPES
    from a3_serve.export.passes import CACHED_STATS_MAX_BYTES, cached_stats_bytes, plan_passes

    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
           "hidden_act": "silu"}
    arch = inspect_architecture(cfg)
    best = RECIPES["best"][0]
    need = cached_stats_bytes(arch, best.stats_request(), 3)
    assert 13e9 < need < 15e9 and need > CACHED_STATS_MAX_BYTES
    assert plan_passes(best, False, arch, 3, "original", True, disk_free=4 * need).count == 1
    assert plan_passes(best, False, arch, 3, "original", True, disk_free=need).count == 2  # only half may be used
    assert plan_passes(best, False, arch, 3, "original", False, disk_free=4 * need).count == 2  # in memory
    assert plan_passes(best, False, arch, 3, "propagated", True, disk_free=4 * need).count == 2


def test_leave_one_domain_out_folds_stream_like_memory(random_models, tmp_path):
    """--heldout-folds domains: the streamed and in-memory exports give the same checkpoint, the report records the
    three domain folds (cross-validated) and every layer's chosen ridge and shrinkage; the default records the
    every-8th-batch split."""
    src = random_models["llama3-gqa"]
    rep = _export(src, tmp_path / "domains", heldout_folds="domains", nsamples=24)
    _export(src, tmp_path / "domains-memory", heldout_folds="domains", nsamples=24, stream=False)
    assert_same_checkpoint(tmp_path / "domains", tmp_path / "domains-memory")
    folds = rep["calibration"]["heldout_folds"]
    assert folds["rule"] == "domains" and folds["cross_validate"]
    assert set(folds["tokens"]) == {"wiki", "austen", "pydoc"}
    assert sum(folds["tokens"].values()) == 24 * 64
    assert all("shrinkage" in lay["ov"] and "ridge" in lay["mlp"] for lay in rep["layers"])
    card = (tmp_path / "domains" / "README.md").read_text()
    assert "held-out folds for the fitted choices: domains (cross-validated)" in card
    default = _export(src, tmp_path / "batches", nsamples=16)  # 8 batches of 2: the last one held out
    assert default["calibration"]["heldout_folds"] == {
        "rule": "batches", "tokens": {"fit": 14 * 64, "held-out": 2 * 64}, "cross_validate": False}
