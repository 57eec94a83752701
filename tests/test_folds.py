"""Held-out folds of the calibration windows (a3_serve.calibration.folds) and the cross-validated choice
(a3_serve.solvers.crossval): folds follow domains, then documents, then positions; the windows are unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from a3_serve.calibration import folds as F
from a3_serve.calibration.sources import calibration_windows
from a3_serve.solvers.crossval import choose_setting, relative_fold_losses


@pytest.fixture(scope="module")
def tok(demo_model):
    return AutoTokenizer.from_pretrained(str(demo_model))


def _write(path, docs):
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def test_domains_of_a_combined_source_are_the_folds(tok, tmp_path):
    """Two files of distinct vocabularies: every token is in the fold of the file it came from, also inside windows
    that span both; the windows and batches are calibration_windows' own."""
    a = _write(tmp_path / "apples.txt", [" ".join(["apple"] * (40 + i)) for i in range(30)])
    b = _write(tmp_path / "zebras.txt", [" ".join(["zebra"] * (30 + i)) for i in range(30)])
    spec = f"{a}+{b}"
    folds = F.window_folds(tok, spec, None, 44, 64, seed=3)
    tokens = calibration_windows(tok, spec, None, 44, 64, seed=3)
    assert folds.rule == "domains" and folds.names == (a, b) and folds.fold.shape == tokens.shape
    apple = tok(" apple", add_special_tokens=False)["input_ids"]
    zebra = tok(" zebra", add_special_tokens=False)["input_ids"]
    assert len(apple) == len(zebra) == 1
    assert bool((folds.fold[tokens == apple[0]] == 0).all()) and bool((folds.fold[tokens == zebra[0]] == 1).all())
    mixed = [i for i in range(44) if len(torch.unique(folds.fold[i])) == 2]
    assert mixed, "no window spans both files: the test does not exercise per-token folds"
    assert sum(folds.sizes().values()) == 44 * 64
    batches, heldout = folds.batches(tokens, 5)
    assert [bt.shape[0] for bt in batches] == [5] * 8 + [4] and torch.equal(torch.cat(batches), tokens)
    assert heldout.cross_validate and torch.equal(torch.cat(heldout.token_folds), folds.fold)


def test_one_domain_folds_by_document_then_by_position(tok, tmp_path):
    many = _write(tmp_path / "many.txt", [f"document number {i} " + "word " * 30 for i in range(40)])
    f = F.window_folds(tok, many, None, 18, 64, seed=0)
    assert f.rule == "documents" and f.n_folds == F.N_FOLDS
    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"token{i}" for i in range(3000)))  # a single document
    g = F.window_folds(tok, str(one), None, 9, 64, seed=0)
    assert g.rule == "positions" and g.n_folds == F.N_FOLDS


def test_too_little_text_per_fold_means_one_fold(tok, tmp_path):
    a = _write(tmp_path / "a.txt", ["apple " * 200])
    b = _write(tmp_path / "b.txt", ["zebra " * 200])
    f = F.window_folds(tok, f"{a}+{b}", None, 2, 32, seed=0)  # one window per domain: below MIN_FOLD_WINDOWS
    assert f.rule == "none" and f.n_folds == 1 and f.names == ("all",)
    tokens = calibration_windows(tok, f"{a}+{b}", None, 2, 32, seed=0)
    batches, heldout = f.batches(tokens, 4)
    assert heldout is None and torch.equal(batches[0], tokens)


def test_builtin_mix_folds_are_its_three_domains(tok):
    f = F.window_folds(tok, "mix", None, 48, 256, seed=0)
    assert f.rule == "domains" and set(f.names) == {"wiki", "austen", "pydoc"}
    sizes = f.sizes()
    assert min(sizes.values()) > 0.2 * 48 * 256  # equal characters per domain: none nearly absent


def test_relative_fold_losses_and_choice():
    # fold 0 prefers setting 1, fold 1 (10x larger losses) prefers setting 2; the ratio keeps scales apart
    L0 = torch.tensor([2.0, 1.0, 1.5])
    L1 = torch.tensor([30.0, 20.0, 10.0])
    R = relative_fold_losses([L0, L1])
    torch.testing.assert_close(R, torch.tensor([(2.0 + 3.0) / 2, (1.0 + 2.0) / 2, (1.5 + 1.0) / 2],
                                               dtype=torch.float64))
    assert int(choose_setting([L0, L1])) == 2
    # per unit (columns): chosen independently; ties go to the earlier setting; an all-zero fold is neutral
    L = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert choose_setting([L, L]).tolist() == [0, 0]
    with pytest.raises(ValueError):
        relative_fold_losses([torch.tensor([1.0, -1.0])])
    with pytest.raises(ValueError):
        relative_fold_losses([torch.ones(3), torch.ones(2)])


def test_default_rule_holds_out_every_8th_batch():
    """The default ``batches`` rule: the windows of batches 7, 15, ... are the one held-out set (no cross-validation);
    fewer than 8 batches: none."""
    f = F.heldout_folds("batches", None, "mix", None, 64, 16, 0, batch_size=4)
    assert f.rule == "batches" and not f.cross_validate and f.names == ("fit", "held-out")
    held_rows = [i for i in range(64) if bool(f.fold[i].eq(1).all())]
    assert held_rows == [28, 29, 30, 31, 60, 61, 62, 63]
    assert bool((f.fold[[i for i in range(64) if i not in held_rows]] == 0).all())
    _, heldout = f.batches(torch.zeros(64, 16, dtype=torch.long), 4)
    assert heldout is not None and not heldout.cross_validate and len(heldout.token_folds) == 16
    assert F.heldout_folds("batches", None, "mix", None, 28, 16, 0, batch_size=4).rule == "none"  # 7 batches
    with pytest.raises(ValueError, match="unknown held-out rule"):
        F.heldout_folds("random", None, "mix", None, 64, 16, 0, batch_size=4)
