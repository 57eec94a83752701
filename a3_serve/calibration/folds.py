"""Held-out folds of the calibration windows: the data every fitted choice is scored on (docs/METHOD.md §1.5).

Two solvers CHOOSE a setting from data besides fitting their closed forms: the down_proj refit ridge
(:func:`a3_serve.solvers.mlp.mlp_ridge_losses`, §4.6) and the OV moment shrinkage β
(:func:`a3_serve.solvers.ov.ov_choose_shrinkage`, §3.6). A setting is fitted on some folds and scored on another;
with several held-out folds their losses are combined by :func:`a3_serve.solvers.crossval.choose_setting`.

Two rules (``a3-export --heldout-folds``):

* ``batches`` (the default): every :data:`HELDOUT_EVERY`-th calibration batch (``b mod 8 = 7``) is held out and
  the rest is fitted: ONE held-out set drawn like the fitted data (no cross-validation); without
  :data:`HELDOUT_EVERY` batches there is none and the solvers use their fixed defaults. Measured best
  (docs/RESULTS.md, "Transfer to unseen domains").
* ``domains``: leave-one-domain-out cross-validation. Folds are assigned per TOKEN: a token's activations (its rows
  of every moment) go to the fold of the text it belongs to, so a window that spans two domains (the built-in
  ``mix`` interleaves short encyclopedia and manual sections between long novel chapters) never lets one domain
  into another's fold. The first sub-rule that applies:

  1. ``domains``: the windows hold tokens of at least two domains (the parts of the built-in ``mix``, the parts of
     an ``A+B`` spec, ``self`` next to other text; :func:`a3_serve.calibration.sources.document_domains`): one fold
     per domain; a document's end-of-text token belongs to it;
  2. ``documents``: one domain, tokens of at least :data:`N_FOLDS` documents: document ``j`` (in source order)
     belongs to fold ``j mod N_FOLDS``;
  3. ``positions``: otherwise (one long document, or ``self`` alone): :data:`N_FOLDS` equal bands of the token
     stream (``self``: window ``i`` in fold ``i mod N_FOLDS``; every sampled sequence is its own text).

  A fold with fewer than :data:`MIN_FOLD_WINDOWS` windows' worth of tokens joins the largest fold; with fewer than
  two folds left the rule is ``none``. Statistics that pair tokens of one sequence (the RoPE pair energies) are not
  split: they are used for selection, never for a fitted choice.

The windows themselves are exactly :func:`a3_serve.calibration.sources.calibration_windows`' (same positions, same
order, same batches); only the fold of every token is added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from a3_serve.calibration.sources import (
    corpus_token_stream,
    document_domains,
    eos_id,
    self_share,
    uses_self,
    window_positions,
)
from a3_serve.calibration.stats import HeldOut

log = logging.getLogger("a3_serve.calibration")

#: the ``batches`` rule: every HELDOUT_EVERY-th calibration batch is held out
HELDOUT_EVERY = 8
#: how the held-out data is chosen (module docstring); the first is the default
HELDOUT_RULES = ("batches", "domains")
#: folds of the ``documents`` and ``positions`` rules
N_FOLDS = 3
#: a fold needs at least this many windows' worth of tokens to be scored on its own
MIN_FOLD_WINDOWS = 2


@dataclass(frozen=True)
class WindowFolds:
    """The fold of every calibration token: ``fold`` LongTensor [nsamples, seqlen], values ``0..len(names)-1``.
    ``cross_validate``: every fold is held out in turn; otherwise only the last one (the ``batches`` rule)."""

    fold: torch.Tensor
    names: tuple[str, ...]
    rule: str
    cross_validate: bool = True

    @property
    def n_folds(self) -> int:
        return len(self.names)

    @property
    def n_scored(self) -> int:
        """How many held-out sets a fitted choice is scored on: every fold with cross-validation, else one (none
        with a single fold)."""
        if self.n_folds < 2:
            return 0
        return self.n_folds if self.cross_validate else 1

    def sizes(self) -> dict[str, int]:
        """Tokens per fold, by name."""
        return {name: int((self.fold == i).sum()) for i, name in enumerate(self.names)}

    def describe(self) -> dict:
        """Provenance: ``{"rule": ..., "tokens": {fold name: tokens}, "cross_validate": ...}``."""
        return {"rule": self.rule, "tokens": self.sizes(), "cross_validate": self.cross_validate}

    def batches(self, tokens: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], HeldOut | None]:
        """``tokens`` [nsamples, T] in batches of ``batch_size`` windows (in order, as without folds) and their
        held-out folds (the fold of every token of each batch, ``[B, T]``), or None with a single fold."""
        batches = list(tokens.split(batch_size))
        if self.n_folds < 2:
            return batches, None
        return batches, HeldOut(list(self.fold.split(batch_size)), self.cross_validate)


def folds_line(described: dict) -> str:
    """One line from :meth:`WindowFolds.describe`'s dict: ``domains: wiki 22,016 tokens, austen ...``."""
    if described["rule"] == "none":
        return "none (too little text: the fitted choices take their fixed defaults)"
    how = " (cross-validated)" if described.get("cross_validate", True) else ""
    return (f"{described['rule']}{how}: " + ", ".join(f"{n} {c:,}" for n, c in described["tokens"].items())
            + " tokens")


def single_fold(nsamples: int, seqlen: int) -> WindowFolds:
    """Every token in one fold (rule ``none``): no held-out statistics."""
    return WindowFolds(torch.zeros(nsamples, seqlen, dtype=torch.long), ("all",), "none")


def batch_folds(nsamples: int, seqlen: int, batch_size: int) -> WindowFolds:
    """The ``batches`` rule (module docstring): the windows of every :data:`HELDOUT_EVERY`-th batch of ``batch_size``
    held out (fold 1), the rest fitted (fold 0); one fold (rule ``none``) with fewer batches."""
    n_batches = -(-nsamples // batch_size)
    if n_batches < HELDOUT_EVERY:
        return single_fold(nsamples, seqlen)
    held = (torch.arange(nsamples) // batch_size) % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return WindowFolds(held.long()[:, None].expand(nsamples, seqlen).clone(), ("fit", "held-out"), "batches",
                       cross_validate=False)


def heldout_folds(rule: str, tokenizer, spec: str, split: Optional[str], nsamples: int, seqlen: int, seed: int,
                  batch_size: int) -> WindowFolds:
    """The held-out folds of ``calibration_windows(tokenizer, spec, split, nsamples, seqlen, seed)`` in batches of
    ``batch_size`` under ``rule`` (:data:`HELDOUT_RULES`)."""
    if rule == "batches":
        return batch_folds(nsamples, seqlen, batch_size)
    if rule == "domains":
        return window_folds(tokenizer, spec, split, nsamples, seqlen, seed)
    raise ValueError(f"unknown held-out rule {rule!r}; use one of {', '.join(HELDOUT_RULES)}")


def window_folds(tokenizer, spec: str, split: Optional[str], nsamples: int, seqlen: int, seed: int) -> WindowFolds:
    """The ``domains`` rule's folds (module docstring) of ``calibration_windows(tokenizer, spec, split, nsamples,
    seqlen, seed)``."""
    parts: list[tuple[torch.Tensor, list[str]]] = []  # (fold ids [rows, T], names) of the self rows, then the rest
    if uses_self(spec):
        k, rest = self_share(spec, nsamples)
        k = min(k, nsamples)
        if not rest or k == nsamples:
            ids = (torch.arange(nsamples) % N_FOLDS)[:, None].expand(nsamples, seqlen)
            return _finish(ids, [f"self-{i}" for i in range(N_FOLDS)], "positions", seqlen)
        parts.append((torch.zeros(k, seqlen, dtype=torch.long), ["self"]))
        spec, nsamples = rest, nsamples - k
    stream = corpus_token_stream(tokenizer, spec, split)
    n_tok = int(stream.numel())
    pos = window_positions(n_tok, nsamples, seqlen, seed)  # [n, T]
    is_eos = (stream == eos_id(tokenizer)).to(torch.long)
    doc = torch.cumsum(is_eos, 0) - is_eos  # a document's EOS belongs to it
    domains = document_domains(spec, split)
    bands = (pos * N_FOLDS // n_tok, [f"positions-{i}" for i in range(N_FOLDS)])
    if int(is_eos.sum()) != len(domains):  # an EOS inside a document's text: documents are not recoverable
        log.warning("the calibration text contains its own end-of-text tokens; held-out folds by position")
        return _combine(parts + [bands], "domains" if parts else "positions", seqlen)
    names = sorted(set(domains), key=domains.index)
    dom_id = torch.tensor([names.index(d) for d in domains], dtype=torch.long)[doc[pos]]
    if parts or len(torch.unique(dom_id)) >= 2:
        return _combine(parts + [(dom_id, names)], "domains", seqlen)
    win_doc = doc[pos]
    if len(torch.unique(win_doc)) >= N_FOLDS:
        return _finish(win_doc % N_FOLDS, [f"documents-{i}" for i in range(N_FOLDS)], "documents", seqlen)
    return _finish(*bands, "positions", seqlen)


def _combine(parts: list[tuple[torch.Tensor, list[str]]], rule: str, seqlen: int) -> WindowFolds:
    """Stack the rows of several labelled parts (their names kept apart) and finish them."""
    ids, names = [], []
    for part_ids, part_names in parts:
        ids.append(part_ids + len(names))
        names.extend(part_names)
    return _finish(torch.cat(ids), names, rule, seqlen)


def _finish(ids: torch.Tensor, names: list[str], rule: str, seqlen: int) -> WindowFolds:
    """Folds from a fold id per token: unused names dropped, folds below the minimum merged into the largest."""
    counts = torch.bincount(ids.reshape(-1), minlength=len(names))
    big = [i for i in range(len(names)) if int(counts[i]) >= MIN_FOLD_WINDOWS * seqlen]
    if len(big) < 2:
        return single_fold(ids.shape[0], ids.shape[1])
    largest = max(big, key=lambda i: (int(counts[i]), -i))
    small = [names[i] for i in range(len(names)) if 0 < int(counts[i]) and i not in big]
    if small:
        log.info("held-out folds %s have fewer than %d windows of tokens: merged into %s", ", ".join(small),
                 MIN_FOLD_WINDOWS, names[largest])
    remap = torch.full((len(names),), big.index(largest), dtype=torch.long)
    for j, i in enumerate(big):
        remap[i] = j
    return WindowFolds(remap[ids], tuple(names[i] for i in big), rule)
