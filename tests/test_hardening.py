"""No command may destroy a user's data or ship a silently wrong model (issue 17, the export side).

Each test names the defect it guards against; each failed on the code before the fix. The destination rules are
also checked as a property over generated ``--model`` / ``--out`` layouts (nested, symlinked, relative, ``.``,
``..``, the home folder): whatever the rules decide, the source and every file outside ``--out`` stay intact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from a3_serve.errors import InputError
from a3_serve.export.cli import main
from a3_serve.export.workdir import RESUME_MARK
from a3_serve.folders import check_destination, swap_into_place

from conftest import assert_one_line_error, copy_model

QUICK = ["--nsamples", "2", "--seqlen", "32", "--batch-size", "2", "--device", "cpu", "--quiet", "--recipe", "paper"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (not following symlinks) with the SHA-256 of its bytes; symlinks by target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(folder: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f".{out_name}.*"))


# --- 1. data loss ----------------------------------------------------------------------------------------------------

def test_out_containing_the_source_is_refused_even_with_overwrite(capsys, tmp_path, random_models):
    """The reported case: `--model victim/model --out victim --overwrite` deleted the source and every file beside
    it."""
    victim = tmp_path / "victim"
    copy_model(random_models["llama2-mha"], victim / "model")
    (victim / "notes.txt").write_text("the user's own notes")
    before = tree_digest(tmp_path)
    code, _, err = _run(capsys, "--model", victim / "model", "--cr", "0.2", "--out", victim, "--overwrite", *QUICK)
    assert_one_line_error(code, err, "contains the source folder")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("out_spec, needle", [(".", "is the current folder"), ("..", "contains the current folder"),
                                              ("~", "is your home folder"), ("/", "contains the source folder")])
def test_out_never_the_current_folder_home_or_a_root(out_spec, needle, capsys, tmp_path, random_models, monkeypatch):
    """`--out . --overwrite` ran the whole export and then died with EBUSY, leaving a 100 MB hidden folder."""
    work = tmp_path / "projects" / "work"
    work.mkdir(parents=True)
    (work / "data.txt").write_text("keep me")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("# the user's")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    before = tree_digest(tmp_path)
    code, _, err = _run(capsys, "--model", random_models["llama2-mha"], "--cr", "0.2", "--out",
                        os.path.expanduser(out_spec), "--overwrite", *QUICK)
    assert_one_line_error(code, err, needle)
    assert tree_digest(tmp_path) == before


def test_overwrite_replaces_only_a3_outputs_or_empty_folders(capsys, tmp_path, random_models):
    src = random_models["llama2-mha"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("user data")
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--overwrite", *QUICK)
    assert_one_line_error(code, err, "not an a3-serve output", "--overwrite replaces only")
    assert (out / "thesis.tex").read_text() == "user data"
    (out / "thesis.tex").unlink()  # an empty folder may be replaced
    code, _, _ = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--overwrite", *QUICK)
    assert code == 0 and (out / "config.json").is_file()
    first = json.loads((out / "config.json").read_text())["a3"]["target_cr"]
    code, _, _ = _run(capsys, "--model", src, "--cr", "0.3", "--out", out, "--overwrite", *QUICK)  # an a3-serve output
    assert code == 0 and first == 0.2 and json.loads((out / "config.json").read_text())["a3"]["target_cr"] == 0.3
    link = tmp_path / "link"
    link.symlink_to(out)
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", link, "--overwrite", *QUICK)
    assert_one_line_error(code, err, "symbolic link")


def _layout(root: Path) -> None:
    """root/a/model (the source), root/a/notes.txt, root/a/old-export (an a3 output), root/b (empty),
    root/c (user files), root/link -> a, root/home (HOME)."""
    (root / "a" / "model").mkdir(parents=True)
    (root / "a" / "model" / "config.json").write_text('{"model_type": "llama"}')
    (root / "a" / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "a" / "notes.txt").write_text("notes")
    (root / "a" / "old-export").mkdir()
    (root / "a" / "old-export" / "config.json").write_text('{"model_type": "a3_llama", "a3": {}}')
    (root / "b").mkdir()
    (root / "c").mkdir()
    (root / "c" / "data.bin").write_bytes(b"data")
    (root / "link").symlink_to(root / "a")
    (root / "home").mkdir()


CWDS = ["", "a", "a/model", "b", "home"]
MODELS = ["{root}/a/model", "{root}/link/model", "{root}/a/../a/model", "a/model", "../a/model", "model", "."]
OUTS = [".", "..", "../..", "{root}", "{root}/a", "{root}/link", "{root}/a/model", "{root}/a/model/sub", "a/model/x",
        "{root}/a/old-export", "{root}/link/old-export", "{root}/b", "{root}/c", "{root}/new", "new", "../new",
        "{root}/home", "~", "~/out", "/", "{root}/a/notes.txt"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cwd=st.sampled_from(CWDS), model=st.sampled_from(MODELS), out=st.sampled_from(OUTS), overwrite=st.booleans())
def test_destination_rules_never_lose_data(tmp_path_factory, monkeypatch, cwd, model, out, overwrite):
    """Property: for any layout and spelling, check + atomic swap either refuse with an InputError or replace only
    the destination, which was empty, new, or an a3-serve output; the source and every other file stay intact."""
    root = tmp_path_factory.mktemp("layout").resolve()
    _layout(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / cwd)
    model_path = Path(model.format(root=root))
    out_path = Path(os.path.expanduser(out.format(root=root)))
    if not (model_path / "config.json").is_file():
        return  # this spelling does not name the source from this folder: not a layout the export accepts
    before = tree_digest(root)
    source_before = tree_digest(model_path.resolve())
    try:
        resolved = check_destination(out_path, overwrite, sources=(model_path,))
    except InputError:
        assert tree_digest(root) == before
        return
    resolved.parent.mkdir(parents=True, exist_ok=True)  # as the export does for a new destination
    tmp = resolved.parent / f".{resolved.name}.a3-partial-test"
    tmp.mkdir()
    (tmp / "config.json").write_text('{"model_type": "a3_llama", "a3": {"new": true}}')
    swap_into_place(tmp, out_path, overwrite)
    assert tree_digest(model_path.resolve()) == source_before
    after = tree_digest(root)
    if root not in resolved.parents:  # a new folder beside the layout (e.g. ../new): nothing of the layout may change
        assert tree_digest(root) == before
        shutil.rmtree(resolved)
        return
    rel_out = str(resolved.relative_to(root))
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k == rel_out or k.startswith(rel_out + "/") for k in changed), (changed, rel_out)
    replaced = {k: v for k, v in before.items() if k.startswith(rel_out + "/")}
    assert not replaced or json.loads(Path(root / rel_out / "config.json").read_text())["a3"] == {"new": True}
    assert set(replaced) <= {rel_out + "/config.json"}, "only an a3-serve output may be replaced"


def test_json_report_path_is_checked_before_the_export(capsys, tmp_path, random_models):
    """`--json` into a missing folder gave a traceback after the checkpoint was written (now the folder is created);
    a path that can never be written, or one inside the source folder (it would replace the source's files), is
    refused before the export starts."""
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "out"
    (tmp_path / "a-file").write_text("x")
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--json",
                        tmp_path / "a-file" / "r.json", *QUICK)
    assert_one_line_error(code, err, "is a file, not a folder")
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--json", src / "config.json", *QUICK)
    assert_one_line_error(code, err, "inside --model")
    assert not out.exists() and tree_digest(src) == before
    code, _, _ = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, "--json", tmp_path / "new" / "r.json",
                      *QUICK)
    assert code == 0 and json.loads((tmp_path / "new" / "r.json").read_text())["output"] == str(out.resolve())


# --- 2. resume must never mix two models ------------------------------------------------------------------------------

def _fail_at_layer_1(monkeypatch):
    from a3_serve.export import streamed

    real = streamed.compress_layer_into

    def failing(state, layer, i, *args, **kw):
        if i == 1:
            raise RuntimeError("injected failure")
        return real(state, layer, i, *args, **kw)

    monkeypatch.setattr(streamed, "compress_layer_into", failing)
    return real


def _export_api(src: Path, out: Path, **kw) -> dict:
    from a3_serve.export.methods import RECIPES
    from a3_serve.export.pipeline import ExportOptions, run_export

    opts = ExportOptions(model=src, out=out, cr=0.2, nsamples=4, seqlen=32, batch_size=2, device="cpu", dtype="float32",
                         methods=RECIPES["best-uniform"][0], recipe="best-uniform", **kw)
    return run_export(opts, progress=False)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resume_never_mixes_replaced_weights_or_calibration_text(tmp_path, random_models, monkeypatch):
    """Replacing the weights at the same path (what the NaN message advises) or the calibration file's content
    after a kill "resumed" into a checkpoint made of two models; now each starts over."""
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog near river {i}." * 3
                                 for i in range(200)))
    out = tmp_path / "out"
    real = _fail_at_layer_1(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        _export_api(src, out, calib=str(calib))
    assert len(list(tmp_path.glob(f".out{RESUME_MARK}*"))) == 1  # layer 0 is kept for a resume
    # the user re-downloads the weights: same path, other values
    state = _tensors(src)
    state = {k: v * 1.5 if k.endswith("proj.weight") else v for k, v in state.items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr("a3_serve.export.streamed.compress_layer_into", real)
    rep = _export_api(src, out, calib=str(calib))
    assert rep["resumed"] is False
    _export_api(src, tmp_path / "fresh", calib=str(calib), resume=False)
    assert all(torch.equal(a, _tensors(tmp_path / "fresh")[k]) for k, a in _tensors(out).items())
    # the calibration file changes under the same name
    _fail_at_layer_1(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        _export_api(src, tmp_path / "out2", calib=str(calib))
    calib.write_text(calib.read_text().replace("fox", "cat"))
    monkeypatch.setattr("a3_serve.export.streamed.compress_layer_into", real)
    assert _export_api(src, tmp_path / "out2", calib=str(calib))["resumed"] is False


# --- 3. every copied tensor is finite-checked ------------------------------------------------------------------------

def test_nan_lm_head_is_caught_in_a_large_streamed_export(capsys, tmp_path, random_models, monkeypatch):
    """Above the full-verify size (every 7B+ model) the streamed export copied a NaN lm_head unchecked and shipped
    it."""
    from a3_serve.export import streamed

    src = copy_model(random_models["llama2-mha"], tmp_path / "src")  # untied lm_head
    state = _tensors(src)
    state["lm_head.weight"][5, 3] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(streamed, "FULL_VERIFY_MAX_BYTES", 0)  # as for a model too large to load for the check
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "lm_head.weight", "NaN", "re-download")
    assert not out.exists() and not _leftovers(tmp_path, "out")


# --- 4. a tampered checkpoint is refused at load -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_export(tmp_path_factory, random_models) -> Path:
    out = tmp_path_factory.mktemp("tamper") / "a3"
    _export_api(random_models["llama3-gqa"], out)
    return out


def test_tampered_head_dim_or_rope_index_is_refused_by_transformers(small_export, tmp_path):
    """A changed head_dim (RoPE table, softmax scale) or a permuted rope_freq_index row loaded and gave other
    outputs."""
    from transformers import AutoModelForCausalLM

    import a3_serve  # noqa: F401

    AutoModelForCausalLM.from_pretrained(str(small_export))  # the untouched export loads
    edited = copy_model(small_export, tmp_path / "head_dim")
    cfg = json.loads((edited / "config.json").read_text())
    cfg["head_dim"] = 80
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_digest"):
        AutoModelForCausalLM.from_pretrained(str(edited))
    swapped = copy_model(small_export, tmp_path / "rows")
    state = _tensors(swapped)
    name = next(k for k, v in state.items() if k.endswith("rope_freq_index") and not torch.equal(v[0], v[1]))
    state[name] = state[name][[1, 0]].contiguous()  # two KV heads' rows exchanged: each row still valid
    save_file(state, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="rope_digest"):
        AutoModelForCausalLM.from_pretrained(str(swapped))


# --- 6. tracebacks and leftovers ----------------------------------------------------------------------------------

def test_non_resumable_input_errors_leave_no_work_folder(capsys, tmp_path, random_models):
    """A shape mismatch or NaN found mid-export left `.OUT.a3-resume-*` (GBs at 7B) behind without a word."""
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    state = _tensors(src)
    good = dict(state)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "shape")
    assert not out.exists() and not _leftovers(tmp_path, "out")
    good["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(good, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "model.layers.1.self_attn.o_proj.weight", "NaN or Inf")
    assert not out.exists() and not _leftovers(tmp_path, "out")
    raw = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # a truncated download
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", out, *QUICK)
    assert_one_line_error(code, err, "model.safetensors", "re-download")
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_disk_errors_are_one_line_and_the_resumable_work_is_named(tmp_path, random_models):
    """A full disk gave a raw OSError traceback and a silent hidden folder. A file-size limit (``ulimit -f``) stands
    in for a full disk: the write fails with an OSError in the working folder."""
    src = random_models["llama2-mha"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "a3_serve.export.cli", "--model", str(src), "--cr", "0.2", "--out", str(out), *QUICK]

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    (work,) = tmp_path.glob(f".out{RESUME_MARK}*")
    assert "File too large" in lines[0] and str(work) in lines[0] and "resume" in lines[0]
    assert re.search(r"\(\d+(\.\d)? (B|KB|MB|GB)\)", lines[0]), lines[0]  # how large the kept folder is
    assert not out.exists()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # the same command, room again
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and not _leftovers(tmp_path, "out")


def test_a_lock_whose_pid_was_reused_does_not_block(tmp_path, random_models, monkeypatch):
    """A lock file naming a PID that now belongs to another process blocked the export for good."""
    src = random_models["llama2-mha"]
    out = tmp_path / "out"
    real = _fail_at_layer_1(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        _export_api(src, out)
    (work,) = tmp_path.glob(f".out{RESUME_MARK}*")
    (work / "lock").write_text(f"{os.getppid()}\n")  # a live process that is not an export
    monkeypatch.setattr("a3_serve.export.streamed.compress_layer_into", real)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a');fcntl.flock(f, "
                               "fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(work / "lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another a3-export"):  # a live export does hold it
            _export_api(src, out)
    finally:
        holder.kill()
        holder.wait()
    assert _export_api(src, out)["resumed"] is True
    assert fcntl  # the lock is an flock: released by the kernel when its holder dies


@pytest.mark.parametrize("field, value, needle", [
    ("sliding_window", "abc", "'sliding_window' is 'abc'"),
    ("rope_parameters", [1, 2], "'rope_parameters' is [1, 2]"),
    ("num_hidden_layers", 2.5, "'num_hidden_layers' is 2.5"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' is 'yes'"),
])
def test_malformed_config_fields_get_one_line(field, value, needle, capsys, tmp_path, random_models):
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", tmp_path / "out", *QUICK)
    assert_one_line_error(code, err, needle, "config.json")


def test_weights_the_config_does_not_declare_are_refused(capsys, tmp_path, random_models):
    """q/k-norm tensors in the weights of a config that does not declare them were dropped silently."""
    src = copy_model(random_models["llama2-mha"], tmp_path / "src")
    state = _tensors(src)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", tmp_path / "out", *QUICK)
    assert_one_line_error(code, err, "model.layers.0.self_attn.q_norm.weight", "does not declare")


def test_seqlen_beyond_the_context_is_refused(capsys, tmp_path, random_models):
    src = random_models["llama2-mha"]  # max_position_embeddings 2048
    code, _, err = _run(capsys, "--model", src, "--cr", "0.2", "--out", tmp_path / "out", "--nsamples", "2", "--seqlen",
                        "4096", "--device", "cpu", "--quiet")
    assert_one_line_error(code, err, "--seqlen 4096", "max_position_embeddings=2048")
    from a3_serve.eval.cli import main as eval_main

    code = eval_main(["ppl", "--model", str(src), "--data", "wiki:heldout", "--seqlen", "4096", "--max-tokens", "8192"])
    assert_one_line_error(code, capsys.readouterr().err, "--seqlen 4096", "max_position_embeddings=2048")
