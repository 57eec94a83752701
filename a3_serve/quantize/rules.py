"""Size rules: which linear-layer sizes each quantization scheme can be quantized and served with, per backend.

Pure functions of a checkpoint's ``config.json`` (a dict): no files, no torch. Sources (docs/QUANTIZATION.md has
the table and the lines of vLLM 0.32 / llm-compressor 0.14 they come from):

- **quantizer** (llm-compressor GPTQ, compressed-tensors): a group size must divide every quantized linear's input
  size (q/k/v/gate/up: ``hidden_size``; o_proj: ``heads x r_vo``; down_proj: the MLP width).
- **vLLM CPU** (``CPUWNA16LinearKernel.can_implement``): INT4 weight-only layers need input and output sizes per
  tensor-parallel partition that are multiples of 32, as vLLM builds the layers: q/k/v fused into ``qkv_proj``
  (output ``(heads + kv_heads) x r_qk + kv_heads x r_vo``) and gate/up into ``gate_up_proj`` (output ``2 x MLP``).
  8-bit weight-only layers have no CPU kernel. INT8 W8A8 takes any size (oneDNN; the AMX path wants input % 32
  and output % 16, else oneDNN runs it). CPU attention: head sizes multiples of 16 from 32 to 256, K = V; with an
  FP8 KV cache multiples of 32 (``_get_attn_isa``), and a CPU with AVX-512 or AMX.
- **vLLM GPU** (Marlin, ``MarlinLinearKernel.can_implement``): group size 32, 64, 128 or per channel, dividing
  each partition's input size; other shapes are zero-padded to Marlin's tiles (slower, not refused). INT8 W8A8:
  CUTLASS for sizes that are multiples of 16, Triton otherwise. Attention: head sizes multiples of 8.

:func:`size_problems` lists what breaks a rule, each as one sentence naming the layer, the size and the fix;
:func:`round_for` gives the head-size and MLP-width multiples an export must use so that every size passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from a3_serve.errors import InputError
from a3_serve.modeling.configuration_a3_llama import layer_dims

from .schemes import BACKENDS, Scheme, get_scheme

#: sentinel: use the scheme's default group size
DEFAULT = "default"
#: KV-cache dtypes vLLM treats as FP8 (``--kv-cache-dtype``)
FP8_KV = ("fp8", "fp8_e4m3", "fp8_e5m2")
#: Marlin's group sizes (vLLM 0.32 ``MARLIN_SUPPORTED_GROUP_SIZES``; None = per channel)
MARLIN_GROUPS = (None, 32, 64, 128)
#: CPU attention head sizes (vLLM 0.32 CPU backend; also a3_serve.vllm_plugin.model.CPU_HEAD_SIZES)
CPU_HEAD_MIN, CPU_HEAD_MAX = 32, 256


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer, ``in_features -> out_features``; ``name`` as in the checkpoint
    (``self_attn.q_proj``) or, for vLLM's fused layers, as vLLM names them (``self_attn.qkv_proj``)."""

    layer: int
    name: str
    in_features: int
    out_features: int

    @property
    def where(self) -> str:
        return f"model.layers.{self.layer}.{self.name}"


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: tuple[tuple[int, int, int], ...]  # (r_qk, r_vo, r_int) per layer


def model_shape(config: dict[str, Any]) -> Shape:
    """Sizes of a Llama-family or A3 ``config.json`` (per-layer head sizes and MLP widths of an A3 export)."""
    try:
        cfg = SimpleNamespace(**config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        n_layers = int(config["num_hidden_layers"])
        if config.get("head_dim") is None:
            cfg.head_dim = hidden // heads
        dims = tuple(layer_dims(cfg, i) for i in range(n_layers))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise InputError(f"config.json lacks a usable size field ({err}); a3-quantize reads hidden_size, "
                         "num_attention_heads, num_key_value_heads, num_hidden_layers and the A3 head sizes") from None
    return Shape(hidden, heads, kv_heads, int(cfg.head_dim), dims)


def linear_shapes(config: dict[str, Any]) -> list[Linear]:
    """The quantized linears as the checkpoint holds them (what llm-compressor quantizes; lm_head is left out)."""
    s = model_shape(config)
    out = []
    for i, (r_qk, r_vo, r_int) in enumerate(s.layers):
        out += [Linear(i, "self_attn.q_proj", s.hidden, s.heads * r_qk),
                Linear(i, "self_attn.k_proj", s.hidden, s.kv_heads * r_qk),
                Linear(i, "self_attn.v_proj", s.hidden, s.kv_heads * r_vo),
                Linear(i, "self_attn.o_proj", s.heads * r_vo, s.hidden),
                Linear(i, "mlp.gate_proj", s.hidden, r_int),
                Linear(i, "mlp.up_proj", s.hidden, r_int),
                Linear(i, "mlp.down_proj", r_int, s.hidden)]
    return out


def served_shapes(config: dict[str, Any], tp: int = 1) -> list[Linear]:
    """The linears as vLLM builds them, per tensor-parallel partition: q/k/v fused (``qkv_proj``) and gate/up fused
    (``gate_up_proj``); column-parallel layers split their output, row-parallel layers (o, down) their input."""
    s = model_shape(config)
    tp = max(1, int(tp))
    heads, kv = s.heads // tp, max(1, s.kv_heads // tp)  # KV heads are replicated when tp exceeds them
    out = []
    for i, (r_qk, r_vo, r_int) in enumerate(s.layers):
        out += [Linear(i, "self_attn.qkv_proj", s.hidden, (heads + kv) * r_qk + kv * r_vo),
                Linear(i, "self_attn.o_proj", heads * r_vo, s.hidden),
                Linear(i, "mlp.gate_up_proj", s.hidden, 2 * r_int // tp),
                Linear(i, "mlp.down_proj", r_int // tp, s.hidden)]
    return out


def _resolve(scheme: Scheme | str, group_size) -> tuple[Scheme, Optional[int]]:
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    return sch, (sch.default_group if group_size == DEFAULT else group_size)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is not one a3-quantize knows; use one of {', '.join(BACKENDS)}")


def _group_fix(config: dict[str, Any], sch: Scheme, backend: str, group_size: Optional[int]) -> str:
    better = suggest_group_size(config, sch, backend, exclude=group_size)
    if better is not None and group_size is not None:
        return f"use --group-size {better if better else 'channel'}"
    return _reexport_fix(config, sch, backend, group_size)


def _reexport_fix(config: dict[str, Any], sch: Scheme, backend: str, group_size: Optional[int]) -> str:
    try:
        h, m = round_for(config, sch, backend, group_size)
    except InputError:
        return "use --scheme w8a8 (no size rules), or another --group-size"
    group = "" if group_size == sch.default_group else f" --quant-group-size {group_size or 'channel'}"
    return (f"re-export with a3-export --quant-scheme {sch.name}{group} --quant-backend {backend} (head sizes that "
            f"are multiples of {h} and MLP widths that are multiples of {m}), or use --scheme w8a8 (no size rules)")


def size_problems(config: dict[str, Any], scheme: Scheme | str, backend: str, group_size=DEFAULT, tp: int = 1,
                  kv_cache_dtype: Optional[str] = None) -> list[str]:
    """Every rule ``config`` breaks for ``scheme`` served on ``backend`` (``cpu`` or ``gpu``: vLLM 0.32), one
    sentence each naming the layer, the size and the fix; empty when the checkpoint can be quantized and served.

    ``group_size``: the scheme's default unless given (None: per output channel). ``kv_cache_dtype``: also check
    the attention's head sizes for that KV-cache dtype (``fp8``: multiples of 32 on CPU)."""
    _check_backend(backend)
    sch, g = _resolve(scheme, group_size)
    problems: list[str] = []
    why = sch.unsupported.get(backend)
    if why:
        other = [b for b in BACKENDS if b not in sch.unsupported]
        problems.append(f"--scheme {sch.name} cannot be served on {backend}: {why}; use --scheme w8a8 or w4a16 "
                        f"there, or quantize for {' or '.join(other)} (--backend {other[0]})")
        return problems
    s = model_shape(config)
    # the quantizer: a group must divide each quantized linear's input
    if g:
        for lin in linear_shapes(config):
            if lin.in_features % g:
                problems.append(f"{lin.where} has input size {lin.in_features}, not a multiple of the group size {g} "
                                f"(GPTQ groups split each input row); {_group_fix(config, sch, backend, g)}")
    # the serving kernels
    if sch.weight_bits == 4 and sch.act_bits == 16 and backend == "cpu":
        for lin in served_shapes(config, tp):
            for what, n in (("input", lin.in_features), ("output", lin.out_features)):
                if n % 32:
                    problems.append(f"{lin.where} (vLLM's fused layer) has {what} size {n}, not a multiple of 32 "
                                    "(vLLM's CPU INT4 kernel, CPUWNA16); "
                                    f"{_reexport_fix(config, sch, backend, g)}")
    if sch.act_bits == 16 and backend == "gpu":
        if g not in MARLIN_GROUPS:
            problems.append(f"group size {g} is not one vLLM's GPU kernel (Marlin) takes (32, 64, 128 or per "
                            "channel); use --group-size 128, 64 or 32")
        elif g and tp > 1:
            for lin in served_shapes(config, tp):
                if lin.in_features % g:
                    problems.append(f"{lin.where} has input size {lin.in_features} per tensor-parallel rank, not a "
                                    f"multiple of the group size {g} (Marlin); use --group-size 32 or fewer ranks")
    problems += head_problems(s, backend, kv_cache_dtype)
    return problems


def head_problems(s: Shape, backend: str, kv_cache_dtype: Optional[str] = None) -> list[str]:
    """Attention head sizes the backend's attention kernel cannot run (with ``kv_cache_dtype`` fp8 on CPU:
    multiples of 32)."""
    problems = []
    fp8 = (kv_cache_dtype or "").lower() in FP8_KV
    for i, (r_qk, r_vo, _) in enumerate(s.layers):
        if backend == "cpu":
            step = attention_head_multiple(backend, kv_cache_dtype)
            if r_qk != r_vo:
                problems.append(f"model.layers.{i}.self_attn has K head size {r_qk} but V head size {r_vo}; vLLM's "
                                "CPU attention needs them equal: re-export with equal QK and VO dims")
            elif r_qk % step or not CPU_HEAD_MIN <= r_qk <= CPU_HEAD_MAX:
                need = "an FP8 KV cache on CPU needs" if fp8 else "vLLM's CPU attention needs"
                problems.append(f"model.layers.{i}.self_attn has head size {r_qk}; {need} a multiple of {step} from "
                                f"{CPU_HEAD_MIN} to {CPU_HEAD_MAX}: re-export with a3-export --head-multiple {step}"
                                + ("" if not fp8 else ", or serve with the default KV-cache dtype"))
        elif r_qk % 8 or r_vo % 8:
            problems.append(f"model.layers.{i}.self_attn has head sizes qk={r_qk}, v={r_vo}; GPU attention needs "
                            "multiples of 8: re-export with a3-export --head-multiple 8")
    return problems


def suggest_group_size(config: dict[str, Any], scheme: Scheme | str, backend: str, exclude=None,
                       tp: int = 1) -> Optional[int]:
    """The largest group size (128, 64, 32; 0 for per channel) with which ``config`` passes every rule of a grouped
    scheme, or None when none does."""
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    for g in (128, 64, 32, None):
        if g == exclude:
            continue
        if not _group_size_problems(config, sch, backend, g, tp):
            return g if g else 0
    return None


def _group_size_problems(config, sch: Scheme, backend: str, g: Optional[int], tp: int) -> bool:
    if g and any(lin.in_features % g for lin in linear_shapes(config)):
        return True
    if g and tp > 1 and any(lin.in_features % g for lin in served_shapes(config, tp)):
        return True
    if sch.weight_bits == 4 and sch.act_bits == 16 and backend == "cpu":
        return any(n % 32 for lin in served_shapes(config, tp) for n in (lin.in_features, lin.out_features))
    return False


def attention_head_multiple(backend: str, kv_cache_dtype: Optional[str] = None) -> int:
    """The head-size multiple the backend's attention needs: CPU 16 (32 with an FP8 KV cache), GPU 8."""
    if backend == "cpu":
        return 32 if (kv_cache_dtype or "").lower() in FP8_KV else 16
    return 8


def round_for(config: dict[str, Any], scheme: Scheme | str, backend: str, group_size=DEFAULT, tp: int = 1,
              kv_cache_dtype: Optional[str] = None) -> tuple[int, int]:
    """``(head_multiple, mlp_multiple)``: an A3 export of the model ``config`` describes (the dense source's config
    suffices: heads and hidden size do not change) whose head sizes (K = V) are multiples of ``head_multiple`` and
    whose MLP widths are multiples of ``mlp_multiple`` passes :func:`size_problems` for ``scheme`` on ``backend``.

    Raises :class:`InputError` naming the fix when no export can: the hidden size itself breaks a rule (a group size
    that does not divide it), or no head size up to the original one satisfies the rules."""
    _check_backend(backend)
    sch, g = _resolve(scheme, group_size)
    why = sch.unsupported.get(backend)
    if why:
        raise InputError(f"--scheme {sch.name} cannot be served on {backend}: {why}")
    s = model_shape(config)
    tp = max(1, int(tp))
    heads, kv = s.heads // tp, max(1, s.kv_heads // tp)
    cpu_int4 = sch.weight_bits == 4 and sch.act_bits == 16 and backend == "cpu"
    head = attention_head_multiple(backend, kv_cache_dtype)
    mlp = 1
    if g:
        if s.hidden % g:
            raise InputError(f"hidden size {s.hidden} (every q/k/v/gate/up input) is not a multiple of the group size "
                             f"{g}, whatever the export; use --group-size "
                             f"{next((x for x in (64, 32) if s.hidden % x == 0), 'channel')}")
        head = math.lcm(head, g // math.gcd(heads, g))  # o_proj input heads x r_vo
        mlp = math.lcm(mlp, g * tp)  # down_proj input r_int (per rank)
    if cpu_int4:
        if s.hidden % 32:
            raise InputError(f"hidden size {s.hidden} is not a multiple of 32, which vLLM's CPU INT4 kernel needs; "
                             "use --scheme w8a8")
        head = math.lcm(head, 32 // math.gcd(heads, 32), 32 // math.gcd(heads + 2 * kv, 32))  # o input, qkv output
        mlp = math.lcm(mlp, 32 * tp)  # down input and gate_up output (2 x r_int) per rank
    if head > s.head_dim:
        raise InputError(f"no head size up to {s.head_dim} satisfies --scheme {sch.name} on {backend}"
                         f"{' with group size ' + str(g) if g else ''} ({s.heads} heads: o_proj's input is heads x "
                         f"head size); use a smaller --group-size or --scheme w8a8")
    return head, mlp
