"""Sizes for a quantized deployment: ``a3-export --quant-scheme`` (and ``--kv-cache-dtype``).

A quantized checkpoint can be served only when every linear layer's size meets the rules of its scheme's kernels
(docs/QUANTIZATION.md, :mod:`a3_serve.quantize.rules`): e.g. vLLM's CPU INT4 kernel needs the fused qkv output
``(heads + kv_heads) x r + kv_heads x r`` and the MLP width to be multiples of 32, GPTQ's groups must divide
``o_proj``'s input ``heads x r_vo`` and ``down_proj``'s input ``r_int``. An A3 export chooses ``r`` and ``r_int``
per layer, so it can make them legal from the start:

1. :func:`with_serving_multiples` turns the target (scheme, group size, backends, KV-cache dtype) into a head-size
   multiple ``h`` and an MLP-width multiple ``m`` (``rules.round_for``, the least common multiple over the
   backends) and raises the export's ``--head-multiple`` / ``--mlp-multiple`` to them, so the allocation (uniform
   or loss-aware) only offers legal sizes and meets the budget with them;
2. :func:`check_plan` checks a plan's compressed config against every rule (``rules.size_problems``) before any
   solve, once for the planned dims and again for the loss-aware allocation's dims.

Only the dense source's config is needed (heads and the hidden size do not change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import a3_serve.quantize.rules as rules
from a3_serve.errors import InputError
from a3_serve.quantize.schemes import BACKENDS, Scheme, default_backend, get_scheme, parse_group_size

#: ``--quant-backend`` values: one backend, every backend the scheme runs on (``all``), or the machine's (``auto``)
BACKEND_CHOICES = ("auto", "all") + BACKENDS
#: ``--kv-cache-dtype`` values (vLLM's names)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32") + rules.FP8_KV


@dataclass(frozen=True)
class ServingTarget:
    """What the checkpoint will be served with: a scheme (None: unquantized), its group size (None: per channel),
    the vLLM backends, and the KV-cache dtype (None: the model's)."""

    scheme: Optional[Scheme]
    group_size: Optional[int]
    backends: tuple[str, ...]
    kv_cache_dtype: Optional[str]

    def record(self) -> dict[str, Any]:
        """The target as the report and the ``a3`` block record it (``a3.size_rules``)."""
        return {"scheme": self.scheme.name if self.scheme else None, "group_size": self.group_size,
                "backends": list(self.backends), "kv_cache_dtype": self.kv_cache_dtype}

    def describe(self) -> str:
        what = self.scheme.describe(self.group_size) if self.scheme else "unquantized weights"
        kv = f", KV cache {self.kv_cache_dtype}" if self.kv_cache_dtype else ""
        return f"{what}{kv} on vLLM {' and '.join(self.backends)}"


def serving_target(scheme: Optional[str], group_size: Optional[str], backend: str,
                   kv_cache_dtype: Optional[str]) -> Optional[ServingTarget]:
    """Parse the options (one-line :class:`InputError` for a bad value); None when no target was asked for."""
    kv = (kv_cache_dtype or "auto").strip().lower()
    if kv not in KV_CACHE_DTYPES:
        raise InputError(f"--kv-cache-dtype {kv_cache_dtype!r} is not a vLLM KV-cache dtype; use one of "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    if backend not in BACKEND_CHOICES:
        raise InputError(f"--quant-backend {backend!r}: use one of {', '.join(BACKEND_CHOICES)}")
    if scheme is None:
        if group_size is not None:
            raise InputError("--quant-group-size needs --quant-scheme (e.g. --quant-scheme w4a16 "
                             "--quant-group-size 32)")
        if kv not in rules.FP8_KV:
            return None
    sch = get_scheme(scheme) if scheme is not None else None
    group = parse_group_size(sch, group_size) if sch else None
    if backend == "all":
        backends = tuple(b for b in BACKENDS if not (sch and b in sch.unsupported))
    else:
        backends = (default_backend() if backend == "auto" else backend,)
        why = sch.unsupported.get(backends[0]) if sch else None
        if why:
            other = [b for b in BACKENDS if b not in sch.unsupported]
            raise InputError(f"--quant-scheme {sch.name} cannot be served on {backends[0]}: {why}; use --quant-backend "
                             f"{other[0]} to export for it there, or --quant-scheme w8a8 / w4a16")
    return ServingTarget(sch, group, backends, kv if kv in rules.FP8_KV else None)


def multiples(target: ServingTarget, src_cfg: dict[str, Any]) -> tuple[int, int]:
    """``(head_multiple, mlp_multiple)`` every export of ``src_cfg`` must use to meet ``target`` on all its
    backends: the least common multiple of ``rules.round_for`` per backend (without a scheme: the attention's head
    rule for the KV-cache dtype, 32 for FP8 on CPU)."""
    head, mlp = 2, 1
    for backend in target.backends:
        if target.scheme is not None:
            h, m = rules.round_for(src_cfg, target.scheme, backend, target.group_size,
                                   kv_cache_dtype=target.kv_cache_dtype)
        else:
            h, m = rules.attention_head_multiple(backend, target.kv_cache_dtype), 1
        head, mlp = math.lcm(head, h), math.lcm(mlp, m)
    return head, mlp


def with_serving_multiples(opts, target: ServingTarget, src_cfg: dict[str, Any], head_dim: int):
    """``opts`` (:class:`~a3_serve.export.options.ExportOptions`) with ``head_multiple`` / ``mlp_multiple`` raised
    to what ``target`` needs (their least common multiple with the user's values); ``head_dim``: the source's."""
    h, m = multiples(target, src_cfg)
    head = math.lcm(opts.head_multiple, h)
    if head > head_dim:
        raise InputError(f"--head-multiple {opts.head_multiple} and {target.describe()} (head sizes multiples of {h}) "
                         f"leave no head size up to {head_dim}; drop --head-multiple or choose another --quant-scheme")
    return replace(opts, head_multiple=head, mlp_multiple=math.lcm(opts.mlp_multiple, m))


def check_plan(target: ServingTarget, config: dict[str, Any], what: str) -> None:
    """Raise :class:`InputError` naming the first broken rule when the compressed ``config`` cannot be quantized
    and served as ``target`` says (``what``: which plan, for the message)."""
    for backend in target.backends:
        if target.scheme is not None:
            problems = rules.size_problems(config, target.scheme, backend, target.group_size,
                                           kv_cache_dtype=target.kv_cache_dtype)
        else:
            problems = rules.head_problems(rules.model_shape(config), backend, target.kv_cache_dtype)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(f"{what} cannot be served as {target.describe()}: {problems[0]}{more}")
