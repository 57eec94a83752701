"""Self-generated calibration (``--calib self``): token windows sampled from the dense model itself.

A calibration set reflects what we happened to install; text the model writes itself reflects what it knows
(its own distribution over domains, formats and languages), which is what a compressed model has to keep. Each
window is one sequence sampled at temperature 1 (no top-k / top-p truncation) from the model's own start of
text, the config's ``bos_token_id`` (else the tokenizer's BOS, else its EOS), for ``seqlen - 1`` further tokens;
an end-of-text token does not stop it (the model starts a new document, as in pre-training streams).

Reproducible: sequence ``i`` is sampled with its own ``torch.Generator`` seeded from ``(seed, i)`` (the global RNG
is untouched), in float32, so it is the same whatever the batch size or the number of sequences asked for.
The windows are cached on disk in
``<cache root>/self-calibration/<key>.pt`` (int32 ``[nsamples, seqlen]``), keyed by the model's content
fingerprint (:func:`a3_serve.provenance.source_fingerprint`), ``nsamples``, ``seqlen``, ``seed``, the
temperature and :data:`FORMAT`: a second export with the same settings reads them instead of sampling again.

Cost: ``nsamples x seqlen`` decoding steps in batches of ``batch_size`` with a KV cache (about as many
model-token FLOPs as one calibration forward pass, but sequential: on a CPU, minutes for a 135M model at
64 x 512 tokens, and a GPU for 7B models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from a3_serve.errors import InputError
from a3_serve.provenance import source_fingerprint
from a3_serve.runtime import default_cache_root

log = logging.getLogger(__name__)

#: the source name (``--calib self``, ``self+mix``)
SELF = "self"
#: bump when the sampling procedure changes: older cache entries are then not reused
FORMAT = 1
TEMPERATURE = 1.0


def cache_path(model_dir: Path, nsamples: int, seqlen: int, seed: int, temperature: float = TEMPERATURE) -> Path:
    """Where the windows of these settings are cached."""
    key = json.dumps({"model": source_fingerprint(model_dir), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                      "temperature": temperature, "format": FORMAT}, sort_keys=True)
    return default_cache_root() / "self-calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def start_token(config, tokenizer) -> int:
    """The model's start of text: ``config.bos_token_id``, else the tokenizer's BOS, else its EOS."""
    for tid in (getattr(config, "bos_token_id", None), getattr(tokenizer, "bos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise InputError("--calib self needs a start-of-text token: the model config and tokenizer name no BOS or EOS")


def sample_windows(model, start: int, nsamples: int, seqlen: int, seed: int, temperature: float = TEMPERATURE,
                   batch_size: int = 8, progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` LongTensor: each row ``start`` followed by ``seqlen - 1`` tokens sampled from
    ``softmax(logits / temperature)`` of ``model`` (a causal LM in eval mode), with a KV cache."""
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for b0 in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - b0)
            # one generator per sequence: row i is the same whatever the batch size or nsamples
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + b0 + i) for i in range(n)]
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model(input_ids=ids, use_cache=True)
            past, seq = out.past_key_values, [ids]
            for _ in range(seqlen - 1):
                probs = torch.softmax(out.logits[:, -1, :].float().cpu() / temperature, dim=-1)
                nxt = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(n)])[:, None]
                seq.append(nxt.to(device))
                out = model(input_ids=seq[-1], past_key_values=past, use_cache=True)
                past = out.past_key_values
            rows.append(torch.cat(seq, dim=1).cpu())
            if progress:
                progress(n)
    return torch.cat(rows)


def self_windows(model_dir: Path, tokenizer, nsamples: int, seqlen: int, seed: int,
                 temperature: float = TEMPERATURE, device: Optional[str] = None) -> torch.Tensor:
    """The cached windows of these settings, sampled (and cached) on first use; LongTensor ``[nsamples, seqlen]``."""
    from transformers import AutoModelForCausalLM

    from a3_serve.progress import progress_bar

    path = cache_path(Path(model_dir), nsamples, seqlen, seed, temperature)
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if tuple(cached.shape) == (nsamples, seqlen):
                return cached.to(torch.long)
        except Exception:  # noqa: BLE001 - a damaged cache entry is sampled again
            pass
        log.warning("sampling the self-generated calibration again: %s is unreadable", path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev).eval()
    start = start_token(model.config, tokenizer)
    with progress_bar(total=nsamples, desc=f"sampling calibration text from the model ({seqlen} tokens each)",
                      unit="seq") as bar:
        windows = sample_windows(model, start, nsamples, seqlen, seed, temperature, progress=bar.update)
    del model
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(windows.to(torch.int32), tmp)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache costs a resample next time, nothing else
        log.warning("could not cache the self-generated calibration in %s (%s)", path, err)
    return windows
