"""Perplexity on held-out text: the quality number that dense and compressed checkpoints are compared by.

Protocol (docs/DESIGN.md): the held-out token stream (:func:`a3_serve.calibration.sources.eval_windows`)
is cut into consecutive non-overlapping windows of ``seqlen`` tokens; each window is run on its own (no
context carried over, no BOS added) and predicts its tokens 2..seqlen from the ones before. Perplexity is
``exp(mean token NLL)`` over all predicted tokens, accumulated in float64. Dense and compressed models are
given the same windows (same tokenizer, same text, same seqlen).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

import a3_serve  # noqa: F401  (registers the a3_llama model type with the transformers Auto classes)
from a3_serve.errors import InputError, NumericalError
from a3_serve.progress import progress_bar

log = logging.getLogger(__name__)

from a3_serve.runtime import check_context_length, dtype_name, read_config, resolve_device, resolve_dtype  # noqa: E402  (read_config/resolve_* are part of this module's API)


def load_model(model_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
               dtype: Union[str, torch.dtype] = "float32"):
    """Load a dense or compressed (``a3_llama``) causal LM for evaluation, in eval mode on ``device``.

    Compressed folders load through the Auto classes registered by ``import a3_serve``; no remote code runs.
    """
    from transformers import AutoModelForCausalLM

    read_config(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load the model in {model_dir}: {first[:300]}; check that it is a complete Hugging "
                         "Face folder") from exc
    return model.to(dev).eval()


def load_tokenizer(model_dir: Union[str, Path]):
    """The tokenizer saved in a model folder; InputError when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"cannot load a tokenizer from {model_dir} ({first[:200]}); copy the tokenizer files there or pass "
            "--tokenizer DIR"
        ) from exc


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.inference_mode()
def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of each window in ``batch`` [b, seqlen], predicting tokens 2..seqlen.

    Raises NumericalError when the model produces NaN/Inf logits.
    """
    batch = batch.to(_model_device(model))
    logits = model(input_ids=batch, use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise NumericalError(
            "the model produces NaN/Inf logits; check the checkpoint (or use --dtype float32 if float16 overflows)"
        )
    logits = logits[:, :-1, :].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).double().sum(dim=1).cpu()


def evaluate_ppl(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
                 progress: Optional[bool] = None, desc: str = "perplexity") -> dict[str, Any]:
    """Perplexity of ``model`` over ``windows`` [n, seqlen] (see the module docstring for the protocol).

    Returns ``{"ppl", "nll" (mean per predicted token), "n_windows", "seqlen", "n_tokens" (n * seqlen),
    "n_predicted" (n * (seqlen - 1)), "seconds", "tokens_per_s"}``. ``progress=None`` shows a bar with ETA
    when stderr is a terminal (see :mod:`a3_serve.progress`), False hides it.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise InputError(f"evaluation windows must be [n >= 1, seqlen >= 2], got {list(windows.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    n, seqlen = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    t0 = time.perf_counter()
    try:
        with progress_bar(total=n, desc=desc, unit="window", force=None if progress is None else bool(progress)) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size]
                total += window_nll(model, batch).sum()
                bar.update(batch.shape[0])
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t0
    n_pred = n * (seqlen - 1)
    nll = float(total / n_pred)
    if not math.isfinite(nll):
        raise NumericalError("the mean NLL is not finite; check the checkpoint")
    return {
        "ppl": math.exp(nll) if nll < 700 else float("inf"),
        "nll": nll,
        "n_windows": int(n),
        "seqlen": int(seqlen),
        "n_tokens": int(n * seqlen),
        "n_predicted": int(n_pred),
        "seconds": seconds,
        "tokens_per_s": (n * seqlen) / seconds if seconds > 0 else None,
    }


# --------------------------------------------------------------------------------------------- provenance
def a3_block(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``a3`` provenance block of a compressed checkpoint's config, or None for a dense model."""
    block = config.get("a3")
    return block if isinstance(block, dict) else None


def calibration_sources(a3: Optional[dict[str, Any]]) -> list[tuple[str, Optional[str]]]:
    """(spec, split) pairs naming the calibration text recorded in an ``a3`` block.

    Reads ``a3.calibration.{source, split, description}`` (the exporter's layout) and, for older or
    hand-written blocks, ``a3.calibration_source`` / ``a3.calibration_split`` or a string ``a3.calibration``.
    """
    if not a3:
        return []
    out: list[tuple[str, Optional[str]]] = []
    cal = a3.get("calibration")
    if isinstance(cal, dict):
        if cal.get("source"):
            out.append((str(cal["source"]), cal.get("split")))
        if cal.get("description"):
            out.append((str(cal["description"]), None))
    elif isinstance(cal, str) and cal:
        out.append((cal, a3.get("calibration_split")))
    if a3.get("calibration_source"):
        out.append((str(a3["calibration_source"]), a3.get("calibration_split")))
    return out


def check_calibration_overlap(config: dict[str, Any], data: str, split: Optional[str], model_label: str) -> None:
    """InputError when the model's recorded calibration text overlaps the evaluation text."""
    from a3_serve.calibration.sources import describe_source, sources_overlap

    for spec, cal_split in calibration_sources(a3_block(config)):
        if sources_overlap(spec, cal_split, data, split):
            try:
                shown = describe_source(data, split)
            except Exception:  # noqa: BLE001 - only for the message
                shown = data
            raise InputError(
                f"{model_label} was calibrated on {spec if cal_split is None else spec + ':' + str(cal_split)}, which "
                f"is the evaluation text {shown}; perplexity on calibration text is meaningless: evaluate on held-out "
                "text (e.g. --data wiki --split heldout) or pass --allow-calibration-overlap"
            )


def default_split(data: str) -> Optional[str]:
    """The evaluation split used when none is given: ``heldout`` for the built-in corpora (``wiki``, ``austen``)."""
    from a3_serve.calibration.sources import BUILTIN_CORPORA

    return "heldout" if data.strip() in BUILTIN_CORPORA else None


def evaluate_folder(model_dir: Union[str, Path], data: str = "wiki", split: Optional[str] = None, seqlen: int = 512,
                    max_tokens: Optional[int] = 32768, batch_size: int = 1, device: Union[str, torch.device] = "cpu",
                    dtype: Union[str, torch.dtype] = "float32", allow_calibration_overlap: bool = False,
                    tokenizer_dir: Union[str, Path, None] = None, progress: Optional[bool] = None) -> dict[str, Any]:
    """Everything ``a3-eval ppl`` does, as a function: checks, windows, model, perplexity, result dict."""
    from a3_serve.calibration.sources import describe_source, eval_windows, load_texts

    if split is None:
        split = default_split(data)
    config = read_config(model_dir)
    check_context_length(config, seqlen)
    if not allow_calibration_overlap:
        check_calibration_overlap(config, data, split, f"model {model_dir}")
    data_desc = describe_source(data, split)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    texts = load_texts(data, split)
    windows = eval_windows(tokenizer, texts, seqlen, max_tokens)
    t0 = time.perf_counter()
    model = load_model(model_dir, dev, dt)
    load_s = time.perf_counter() - t0
    res = evaluate_ppl(model, windows, batch_size=batch_size, progress=progress)
    out: dict[str, Any] = {
        "model": str(Path(model_dir).expanduser().resolve()),
        "model_type": config.get("model_type"),
        "data": data_desc,
        "split": split,
        "seqlen": res["seqlen"],
        "max_tokens": max_tokens,
        "n_windows": res["n_windows"],
        "n_tokens": res["n_tokens"],
        "n_predicted": res["n_predicted"],
        "nll": res["nll"],
        "ppl": res["ppl"],
        "seconds": res["seconds"],
        "load_seconds": load_s,
        "tokens_per_s": res["tokens_per_s"],
        "batch_size": batch_size,
        "device": str(dev),
        "dtype": dtype_name(dt),
        "a3_serve_version": a3_serve.__version__,
    }
    a3 = a3_block(config)
    if a3 is not None:
        out["a3"] = a3
    return out


def format_result(res: dict[str, Any]) -> str:
    """The one human line: ``perplexity 12.34 over 32,256 tokens (63 windows of 512) on wiki:heldout, 41.2 s``."""
    return (
        f"perplexity {res['ppl']:.2f} over {res['n_tokens']:,} tokens ({res['n_windows']} windows of {res['seqlen']}) "
        f"on {res['data']}, {res['seconds']:.1f} s"
    )


# --------------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = False) -> str:
    """Greedy completion of ``prompt`` (the new text only). With ``chat``, the prompt is wrapped as one user
    message with the tokenizer's chat template and the assistant's reply is returned."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this tokenizer has no chat template; drop --chat and give a plain prompt")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty; give --prompt TEXT")
    ids = ids.to(_model_device(model))
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                         temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
