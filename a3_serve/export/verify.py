"""The finished checkpoint is checked as a user would load it, before it is moved to ``--out``.

Small checkpoints (at most :data:`FULL_VERIFY_MAX_BYTES` of weights) are loaded through the Auto classes and run
one forward pass, which must give finite logits; larger ones get a structural check (every tensor's name and
shape against the model class built from config.json on ``meta``; the streamed export finite-checks every tensor
as it writes it). With ``--eval-tokens``, the dense and compressed perplexities on held-out text are measured here
and go into the report and the model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from a3_serve.calibration.sources import eval_windows, load_texts
from a3_serve.errors import NumericalError
from a3_serve.eval.ppl import evaluate_ppl
from a3_serve.export.card import render_model_card
from a3_serve.export.lazy import check_checkpoint_structure

#: a streamed export loads its result for the final check only up to this many bytes of weights
FULL_VERIFY_MAX_BYTES = 4 * 2**30


class BrokenCheckpointError(RuntimeError):
    """The written checkpoint does not load, or does not match its config: a bug, never shipped to --out."""


def heldout_windows(job) -> torch.Tensor:
    """Evaluation windows ``[n, eval_seqlen]`` from ``--eval-data`` (checked up front not to overlap the calibration
    text)."""
    opts = job.opts
    return eval_windows(job.tokenizer, load_texts(opts.eval_data), opts.eval_seqlen, opts.eval_tokens)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Perplexity of a loaded causal LM on token windows (:func:`a3_serve.eval.ppl.evaluate_ppl`)."""
    return float(evaluate_ppl(model, windows, batch_size=batch_size)["ppl"])


def verify_and_measure(tmp: Path, job, report: dict[str, Any], eval_windows: torch.Tensor | None,
                       dense_ppl: float | None, full: bool) -> None:
    """Check the finished folder ``tmp``; measure quality; refresh the card and the report in it.

    ``full``: load it through the Auto classes and run a forward pass; otherwise (a checkpoint too large to load
    cheaply) check every tensor's name and shape against the model class built from config.json.
    Raises :class:`BrokenCheckpointError` (does not load, or a structure mismatch) or :class:`NumericalError`
    (non-finite logits): nothing reaches --out.
    """
    opts = job.opts
    if not opts.verify and eval_windows is None:
        return
    if full or eval_windows is not None:
        try:
            comp = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=job.dtype).to(job.device).eval()
        except Exception as err:  # noqa: BLE001 - a checkpoint we cannot load must not reach --out
            raise BrokenCheckpointError(f"the written checkpoint does not load: {type(err).__name__}: {err}") from err
        probe = job.tokens[:1, : min(16, job.tokens.shape[1])].to(job.device)
        with torch.no_grad():
            logits = comp(input_ids=probe).logits
        if not torch.isfinite(logits).all():
            raise NumericalError("the compressed model produces NaN/Inf logits; raise --damp or use more calibration "
                                 "text")
        if eval_windows is not None:
            report["quality"] = {"data": opts.eval_data, "seqlen": opts.eval_seqlen,
                                 "n_tokens": int(eval_windows.numel()), "dense_ppl": dense_ppl,
                                 "compressed_ppl": perplexity(comp, eval_windows, opts.batch_size)}
        del comp
        report["verified"] = "loaded with transformers, forward pass finite"
    else:
        try:
            check_checkpoint_structure(tmp)
        except RuntimeError as err:
            raise BrokenCheckpointError(str(err)) from err
        report["verified"] = "every tensor's name and shape checked against the model class (too large to load cheaply)"
    (tmp / "README.md").write_text(render_model_card(report))
    (tmp / "a3_report.json").write_text(json.dumps(report, indent=2) + "\n")
