"""The KV-bound scenario (``--scenario kv-bound``): a fixed KV-cache memory, more long requests than it holds.

A server gets the same KV-cache bytes for both models, sized so that the dense model holds ``--kv-sequences``
whole requests of ``input_len + output_len`` tokens (or ``--kv-cache-gib``). The benchmark then offers a sweep of
concurrency levels (``--concurrency``, e.g. ``0.5x,1x,2x``: multiples of the dense engine's own capacity, or plain
request counts) to one running server per model, streaming ``waves x level`` requests per level with exactly
``level`` in flight, and samples the server's ``/metrics`` throughout (:mod:`a3_serve.bench.enginestats`): how many
requests the engine ran at once, its waiting queue, preemptions and KV usage. Each level gets its own prompts
(seed + level index), the same for both models, so no level reuses another's prefix-cache blocks.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

from a3_serve.bench.workload import Workload
from a3_serve.errors import InputError

#: the block size vLLM 0.32 gives the KV cache on CPU when none is asked for (GPU backends use 16): sizing whole
#: requests in these blocks gives the dense model at least --kv-sequences of them on either
SIZING_BLOCK = 128
_LEVEL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x?)\s*$")


def parse_levels(text: str) -> list[tuple[float, bool]]:
    """``"0.5x,1x,2x"`` / ``"4,8,16"`` -> ``[(value, relative)]``, in the order given; InputError when malformed."""
    out = []
    for part in text.split(","):
        m = _LEVEL.match(part)
        if not m or float(m.group(1)) <= 0:
            raise InputError(f"--concurrency {text!r}: each level is a request count (8) or a multiple of the dense "
                             "model's KV capacity (2x), separated by commas, e.g. 0.5x,1x,2x")
        out.append((float(m.group(1)), m.group(2) == "x"))
    if not out:
        raise InputError("--concurrency needs at least one level")
    return out


def resolve_levels(levels: list[tuple[float, bool]], dense_capacity: float) -> list[int]:
    """Request counts in flight for each level: ``Nx`` is N times the dense engine's capacity in whole requests."""
    whole = max(1, int(math.floor(dense_capacity + 1e-9)))
    return [max(1, int(round(v * whole))) if rel else int(round(v)) for v, rel in levels]


def level_label(value: float, relative: bool) -> str:
    return f"{value:g}x" if relative else f"{value:g}"


def kv_bytes_per_token(config: dict[str, Any], itemsize: int) -> int:
    """KV-cache bytes one token takes in a dense Hugging Face decoder (K and V of every layer)."""
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        raise InputError("--kv-sequences needs the dense model's config.json to give num_hidden_layers, "
                         "num_attention_heads and hidden_size (or head_dim); pass --kv-cache-gib instead") from None
    return layers * kv_heads * 2 * head_dim * itemsize


def _blocks_per_request(workload: Workload) -> int:
    return -(-workload.sequence_len // SIZING_BLOCK)


def kv_bytes_for_sequences(config: dict[str, Any], itemsize: int, sequences: int, workload: Workload) -> int:
    """KV-cache bytes that hold ``sequences`` whole requests of the dense model, each in whole blocks, plus the one
    block vLLM's block pool keeps back (its null block)."""
    blocks = sequences * _blocks_per_request(workload) + 1
    return blocks * SIZING_BLOCK * kv_bytes_per_token(config, itemsize)


def dense_capacity(config: dict[str, Any], itemsize: int, kv_bytes: int, workload: Workload) -> float:
    """Whole requests of ``workload``'s length the dense model holds in ``kv_bytes`` (the inverse of
    :func:`kv_bytes_for_sequences`)."""
    blocks = kv_bytes // (SIZING_BLOCK * kv_bytes_per_token(config, itemsize))
    return float(max(0, blocks - 1) // _blocks_per_request(workload))


def level_workload(workload: Workload, index: int, concurrency: int, waves: float) -> Workload:
    """The requests of one level: ``ceil(waves x concurrency)`` prompts with the level's own seed."""
    return Workload(max(concurrency, int(math.ceil(waves * concurrency))), workload.input_len, workload.output_len,
                    workload.seed + 1000 * (index + 1), workload.max_model_len)


def sweep(base_url: str, workload: Workload, tokenizer, levels: list[int], *, waves: float,
          token: Optional[str] = None, rss_sampler: Optional[Callable[[], int]] = None,
          on_level: Optional[Callable[[int, dict[str, float]], None]] = None) -> list[dict[str, float]]:
    """Measure every level on the running server at ``base_url``; one result per level (client and engine figures,
    plus ``offered_concurrency`` and ``num_requests``)."""
    from a3_serve.bench.engines import measure_server
    from a3_serve.bench.enginestats import engine_figures, server_metrics_fetcher

    fetch = server_metrics_fetcher(base_url, token)
    points = []
    try:
        for i, conc in enumerate(levels):
            wl = level_workload(workload, i, conc, waves)
            res, figures = engine_figures(fetch, lambda: measure_server(base_url, wl, tokenizer, max_concurrency=conc,
                                                                        token=token, rss_sampler=rss_sampler))
            point = {"offered_concurrency": float(conc), "num_requests": float(wl.num_prompts), **res, **figures}
            points.append(point)
            if on_level:
                on_level(i, point)
    finally:
        getattr(fetch, "close", lambda: None)()
    return points

