"""Compression ratio -> reduced dimensions (docs/METHOD.md §5).

The compression ratio (CR) is defined on the decoder's linear-layer parameters (q, k, v, o, gate, up,
down; biases, norms and embeddings excluded): ``CR = 1 − params(compressed) / params(original)``.

Rounding rules: the QK and OV head dims share one reduced size ``r``, rounded DOWN to a multiple of
``head_multiple`` (even, so RoPE keeps whole pairs). When all three components are compressed the MLP
width is re-solved so the whole decoder still meets the target. Pure integer/float arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from a3_serve.errors import BudgetError, InputError

__all__ = ["COMPONENTS", "ModelShape", "DimPlan", "plan_dims", "plan_per_layer", "kv_head_cap", "check_kv_cr",
           "check_mlp_multiple"]

COMPONENTS = ("qk", "ov", "mlp")

# Slack for float rounding in floor(): (1 - 0.2) * 80 / 16 must give 4, not 3.
_FLOOR_SLACK = 1e-9


def _floor(x: float) -> int:
    return int(math.floor(x + _FLOOR_SLACK))


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that the budget depends on.

    ``hidden_size`` d, ``num_layers``, ``num_heads`` h_q, ``num_kv_heads`` h_kv, ``head_dim`` d_h,
    ``intermediate_size`` d_int, ``n_mlp_mats`` (3 for gated SwiGLU MLPs, 2 for plain 2-layer MLPs).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    n_mlp_mats: int = 3

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "n_mlp_mats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"model config field {name} must be a positive integer (got {v!r}); check the source "
                                 "config.json")
        if self.num_heads % self.num_kv_heads:
            raise InputError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); check the source config.json"
            )

    def layer_linear_params(self, r_qk: int | None = None, r_vo: int | None = None, r_int: int | None = None) -> int:
        """Linear-layer parameters of one decoder layer with head dims ``r_qk``/``r_vo`` and MLP width ``r_int``.

        ``d·r_qk·(h_q + h_kv) + d·r_vo·(h_kv + h_q) + n_mlp·d·r_int``; ``None`` means the original size.
        """
        d, hq, hkv = self.hidden_size, self.num_heads, self.num_kv_heads
        r_qk = self.head_dim if r_qk is None else r_qk
        r_vo = self.head_dim if r_vo is None else r_vo
        r_int = self.intermediate_size if r_int is None else r_int
        return d * r_qk * (hq + hkv) + d * r_vo * (hkv + hq) + self.n_mlp_mats * d * r_int

    def linear_params(self, r_qk: int | None = None, r_vo: int | None = None, r_int: int | None = None) -> int:
        """Linear-layer parameters of all decoder layers (``num_layers × layer_linear_params``)."""
        return self.num_layers * self.layer_linear_params(r_qk, r_vo, r_int)

    def kv_bytes_per_token(self, r_qk: int | None = None, r_vo: int | None = None, bytes_per_elem: int = 2) -> int:
        """KV-cache bytes per token: ``num_layers · h_kv · (r_qk + r_vo) · bytes_per_elem``."""
        r_qk = self.head_dim if r_qk is None else r_qk
        r_vo = self.head_dim if r_vo is None else r_vo
        return self.num_layers * self.num_kv_heads * (r_qk + r_vo) * bytes_per_elem


@dataclass
class DimPlan:
    """Reduced dimensions for a target CR, uniform over layers.

    ``qk_head_dim`` r_qk, ``v_head_dim`` r_vo, ``intermediate_size`` r_int, the requested ``target_cr``, the
    ``achieved_cr`` (linear-layer parameters), the compressed ``components`` and human-readable ``notes``.
    """

    qk_head_dim: int
    v_head_dim: int
    intermediate_size: int
    target_cr: float
    achieved_cr: float
    components: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    #: per-layer ``(r_qk, r_vo, r_int)`` when layers differ (then the scalar fields hold the maxima); None: uniform
    layers: tuple[tuple[int, int, int], ...] | None = None
    #: the KV-cache target: at least this fraction of the KV bytes per token removed (0: none)
    target_kv_cr: float = 0.0

    def layer_dims(self, i: int) -> tuple[int, int, int]:
        """``(r_qk, r_vo, r_int)`` of layer ``i``."""
        if self.layers is not None:
            return self.layers[i]
        return (self.qk_head_dim, self.v_head_dim, self.intermediate_size)

    def dim_lists(self, num_layers: int) -> tuple[list[int], list[int], list[int]]:
        """The per-layer ``r_qk``, ``r_vo`` and ``r_int`` lists (what ``compress_model`` takes)."""
        a, b, c = zip(*(self.layer_dims(i) for i in range(num_layers)))
        return list(a), list(b), list(c)

    def linear_params(self, shape: ModelShape) -> int:
        """Decoder linear-layer parameters of the planned model."""
        return sum(shape.layer_linear_params(*self.layer_dims(i)) for i in range(shape.num_layers))

    def kv_bytes_per_token(self, shape: ModelShape, bytes_per_elem: int = 2) -> int:
        """KV-cache bytes per token of the planned model: ``Σ_l h_kv·(r_qk,l + r_vo,l)·bytes_per_elem``."""
        return sum(shape.num_kv_heads * (a + b) * bytes_per_elem
                   for a, b, _ in map(self.layer_dims, range(shape.num_layers)))

    def achieved_kv_cr(self, shape: ModelShape) -> float:
        """The fraction of the original KV-cache bytes per token removed (``1 − Σ_l (r_qk + r_vo) / (2·L·d_h)``)."""
        return 1.0 - self.kv_bytes_per_token(shape, 1) / shape.kv_bytes_per_token(bytes_per_elem=1)


def _normalise_components(components) -> tuple[str, ...]:
    if isinstance(components, str):
        components = [c for c in components.replace(" ", "").split(",") if c]
    comps = [str(c).strip().lower() for c in components]
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown:
        raise BudgetError(f"unknown component(s) {', '.join(unknown)}; choose from qk, ov, mlp (e.g. --components "
                          "qk,ov,mlp)")
    if not comps:
        raise BudgetError("no component selected for compression; choose one or more of qk, ov, mlp (e.g. --components "
                          "qk,ov,mlp)")
    return tuple(c for c in COMPONENTS if c in comps)


def kv_head_cap(shape: ModelShape, kv_cr: float, head_multiple: int, min_head_dim: int) -> int:
    """The largest head size (K = V, a multiple of ``head_multiple``) whose KV cache removes at least ``kv_cr`` of
    the original bytes per token: ``floor((1 − kv_cr)·d_h / m)·m``; :class:`BudgetError` below the minimum."""
    exact = (1.0 - kv_cr) * shape.head_dim
    r = _floor(exact / head_multiple) * head_multiple
    minimum = max(min_head_dim, head_multiple)
    if r < minimum:
        raise BudgetError(
            f"--kv-cr {kv_cr:g} (its default is --cr) needs heads of at most {exact:.1f} dims (of {shape.head_dim}), "
            f"below the {minimum}-dim minimum the serving backend runs; use a smaller --kv-cr"
        )
    return r


def check_kv_cr(kv_cr: float, components) -> float:
    """``kv_cr`` as a float in ``[0, 1)``; a KV target needs both head sizes compressed (K and V are cached)."""
    try:
        kv = float(kv_cr)
    except (TypeError, ValueError):
        raise BudgetError(f"--kv-cr must be a number in [0, 1) (got {kv_cr!r}); e.g. --kv-cr 0.25") from None
    if not 0.0 <= kv < 1.0:
        raise BudgetError(f"--kv-cr must be in [0, 1) (got {kv_cr!r}); it is the fraction of KV-cache bytes per token "
                          "removed, e.g. --kv-cr 0.25 holds 1.33x more tokens")
    if kv > 0 and not {"qk", "ov"} <= set(components):
        raise BudgetError(f"--kv-cr {kv:g} shrinks the cached K and V heads, but --components {','.join(components)} "
                          "leaves them whole; add qk,ov to --components or drop --kv-cr")
    return kv


def plan_dims(
    shape: ModelShape,
    cr: float,
    components=COMPONENTS,
    head_multiple: int = 16,
    min_head_dim: int = 16,
    kv_cr: float = 0.0,
    mlp_multiple: int = 1,
) -> DimPlan:
    """Map a target compression ratio to reduced ``(r_qk, r_vo, r_int)``.

    Rules (docs/METHOD.md §5.2-§5.4):

    * ``0 <= cr < 1``; ``cr == 0`` returns the original dims exactly.
    * Attention (``qk`` and/or ``ov``): ``r = floor((1−cr)·d_h / m)·m`` with ``m = head_multiple`` (even);
      ``r >= max(min_head_dim, m)`` or :class:`BudgetError`. Uncompressed attention parts keep ``d_h``.
    * All three components: the MLP is re-solved so the decoder meets the target,
      ``r_int = floor(((1−cr)·P_layer − attention(r)) / (n_mlp·d))``; if that exceeds ``d_int`` (the head
      rounding removed more than the budget), ``r + m`` is tried (when ``<= d_h``), then ``r_int`` is capped
      at ``d_int`` with a note that the achieved CR exceeds the target.
    * MLP with only part of the attention: ``r_int = floor((1−cr)·d_int)`` (each selected component is cut by cr).
    * ``r_int < 1`` raises :class:`BudgetError`.
    * ``mlp_multiple`` ``k``: a reduced MLP width is rounded DOWN to a multiple of ``k`` (a quantization kernel's
      or group size's rule, docs/QUANTIZATION.md); the original width always stays allowed.
    * KV-cache target ``kv_cr > 0`` (docs/METHOD.md §5.6): heads are at most :func:`kv_head_cap` (K = V), so at
      least ``kv_cr`` of the KV bytes per token go; with ``cr == 0`` that is the KV-cache-compression mode (only the
      head sizes change, the MLP is untouched), with ``cr > 0`` the MLP is re-solved for ``cr`` around the smaller
      heads (capped at ``d_int``: both targets hold, the achieved CR may exceed ``cr``).

    ``components`` is an iterable of names from ``("qk", "ov", "mlp")`` or a comma-separated string.
    Returns a :class:`DimPlan`; ``achieved_cr = 1 − params(new)/params(orig)``.
    """
    comps = _normalise_components(components)
    kv = check_kv_cr(kv_cr, comps)
    k_mlp = check_mlp_multiple(mlp_multiple)
    try:
        cr_f = float(cr)
    except (TypeError, ValueError):
        raise BudgetError(f"--cr must be a number in [0, 1) (got {cr!r}); e.g. --cr 0.1") from None
    if not (0.0 <= cr_f < 1.0):  # also rejects NaN
        raise BudgetError(f"--cr must be in [0, 1) (got {cr!r}); it is the fraction of linear-layer parameters "
                          "removed, e.g. --cr 0.1")
    m = head_multiple
    if isinstance(m, bool) or not isinstance(m, int) or m < 2 or m % 2:
        raise BudgetError(f"--head-multiple must be an even positive integer (got {m!r}) so heads keep whole RoPE "
                          "pairs; e.g. 16 or 8")
    if isinstance(min_head_dim, bool) or not isinstance(min_head_dim, int) or min_head_dim < 1:
        raise BudgetError(f"the minimum head dim must be a positive integer (got {min_head_dim!r})")

    d_h, d_int, d, n_mlp = shape.head_dim, shape.intermediate_size, shape.hidden_size, shape.n_mlp_mats
    notes: list[str] = []
    orig = shape.layer_linear_params()

    def plan(r_qk: int, r_vo: int, r_int: int) -> DimPlan:
        achieved = 1.0 - shape.layer_linear_params(r_qk, r_vo, r_int) / orig
        return DimPlan(r_qk, r_vo, r_int, cr_f, achieved, comps, notes, target_kv_cr=kv)

    r_cap = kv_head_cap(shape, kv, m, min_head_dim) if kv > 0 else d_h
    if cr_f == 0.0:
        if kv > 0:
            notes.append(f"KV-cache mode: heads {d_h} -> {r_cap} (at least {kv:g} of the KV cache removed), "
                         "MLP unchanged")
            return plan(r_cap, r_cap, d_int)
        notes.append("cr 0: all dims unchanged")
        return plan(d_h, d_h, d_int)

    attn = "qk" in comps or "ov" in comps
    r = d_h
    if attn:
        exact = (1.0 - cr_f) * d_h
        r = _floor(exact / m) * m
        minimum = max(min_head_dim, m)
        if r < minimum:
            got = (f"{exact:.1f} dims" if exact < minimum
                   else f"{exact:.1f} dims ({r} after rounding down to a multiple of {m})")
            raise BudgetError(
                f"--cr {cr_f:.2f} shrinks attention heads from {d_h} to {got}, below the {minimum}-dim minimum; "
                "use a smaller --cr, a smaller --head-multiple, or compress only the MLP (--components mlp)"
            )
        if r != exact:
            notes.append(f"attention head dim {exact:g} rounded down to {r} (multiple of {m})")
        if r > r_cap:
            notes.append(f"heads {r} -> {r_cap} for the KV-cache target (at least {kv:g} of the KV bytes removed)")
            r = r_cap
    r_qk = r if "qk" in comps else d_h
    r_vo = r if "ov" in comps else d_h

    if "mlp" not in comps:
        notes.append(f"MLP not compressed; the whole-decoder CR is below the per-component cut of {cr_f:g}")
        return plan(r_qk, r_vo, d_int)

    if len(comps) == len(COMPONENTS):
        target = (1.0 - cr_f) * orig

        def solve_int(rr: int) -> float:
            return (target - shape.layer_linear_params(rr, rr, 0)) / (n_mlp * d)

        x = solve_int(r)
        if _floor(x) > d_int and r + m <= r_cap and _floor(solve_int(r + m)) >= 1:
            # r + m > (1-cr)·d_h, so the MLP now has to give up parameters: r_int <= d_int.
            notes.append(
                f"rounding heads down to {r} removed more than the budget; heads raised to {r + m} and the MLP "
                "re-solved"
            )
            r = r + m
            r_qk = r_vo = r
            x = solve_int(r)
        r_int = _floor(x / k_mlp) * k_mlp
        if r_int > d_int:
            r_int = d_int
            notes.append(
                f"MLP width capped at its original {d_int}: the head rounding alone removes more than the target, "
                "so the achieved CR exceeds the target"
                if r_cap == d_h or r < r_cap else
                f"MLP width capped at its original {d_int}: the KV-cache target alone removes more than --cr, so the "
                "achieved CR exceeds the target"
            )
        elif r_int < 1:
            raise BudgetError(
                f"--cr {cr_f:.2f} leaves no parameters for the MLP after attention heads of {r} dims "
                f"(solved intermediate size {x:.2f}, below {k_mlp}); use a smaller --cr, --head-multiple or "
                "--mlp-multiple"
            )
        else:
            notes.append(f"MLP width re-solved to {r_int} so the whole decoder meets the target CR"
                         + (f" (rounded down to a multiple of {k_mlp})" if k_mlp > 1 else ""))
        return plan(r_qk, r_vo, r_int)

    x = (1.0 - cr_f) * d_int
    r_int = _floor(x / k_mlp) * k_mlp
    if r_int < 1:
        raise BudgetError(
            f"--cr {cr_f:.2f} shrinks the MLP from {d_int} to {x:.2f} neurons, below 1; use a smaller --cr"
        )
    notes.append(f"each selected component is cut by {cr_f:g}; the MLP width is not re-solved (not all components "
                 "compressed)")
    return plan(r_qk, r_vo, r_int)


def check_mlp_multiple(mlp_multiple: int) -> int:
    """``mlp_multiple`` as a positive int, else :class:`BudgetError`."""
    if isinstance(mlp_multiple, bool) or not isinstance(mlp_multiple, int) or mlp_multiple < 1:
        raise BudgetError(f"--mlp-multiple must be a positive integer (got {mlp_multiple!r}); e.g. 32 or 128")
    return mlp_multiple


def plan_per_layer(shape: ModelShape, layer_dims, head_multiple: int = 16, target_cr: float | None = None,
                   target_kv_cr: float = 0.0, mlp_multiple: int = 1) -> DimPlan:
    """A plan from explicit per-layer ``(r_qk, r_vo, r_int)`` (e.g. from a loss-aware allocation).

    Each ``r_qk``/``r_vo`` must be ``d_h`` (unchanged) or a multiple of ``head_multiple`` in ``[head_multiple,
    d_h)`` and each ``r_int`` ``d_int`` or a multiple of ``mlp_multiple`` in ``[1, d_int)``; otherwise
    :class:`BudgetError`. ``achieved_cr`` is computed from the sum over layers; ``target_cr`` defaults to it. Layers
    that are all equal give a uniform plan (``layers=None``).
    """
    dims = [tuple(int(v) for v in t) for t in layer_dims]
    if len(dims) != shape.num_layers or any(len(t) != 3 for t in dims):
        raise BudgetError(f"per-layer dims need one (r_qk, r_vo, r_int) triple per layer ({shape.num_layers}), got "
                          f"{len(dims)}")
    for i, (a, b, m) in enumerate(dims):
        for name, r in (("r_qk", a), ("r_vo", b)):
            if r != shape.head_dim and (r % head_multiple or not head_multiple <= r < shape.head_dim):
                raise BudgetError(
                    f"layer {i}: {name} = {r} must be a multiple of {head_multiple} between {head_multiple} and "
                    f"{shape.head_dim} (or the original head dim)"
                )
        if not 1 <= m <= shape.intermediate_size:
            raise BudgetError(f"layer {i}: r_int = {m} must be between 1 and {shape.intermediate_size}")
        if m != shape.intermediate_size and m % mlp_multiple:
            raise BudgetError(f"layer {i}: r_int = {m} must be a multiple of {mlp_multiple} (or the original "
                              f"{shape.intermediate_size})")
    orig = shape.linear_params()
    achieved = 1.0 - sum(shape.layer_linear_params(*t) for t in dims) / orig
    comps = tuple(c for c, k in (("qk", 0), ("ov", 1), ("mlp", 2))
                  if any(t[k] != (shape.head_dim if k < 2 else shape.intermediate_size) for t in dims)) or COMPONENTS
    uniform = all(t == dims[0] for t in dims)
    return DimPlan(
        qk_head_dim=max(t[0] for t in dims), v_head_dim=max(t[1] for t in dims),
        intermediate_size=max(t[2] for t in dims),
        target_cr=achieved if target_cr is None else float(target_cr), achieved_cr=achieved, components=comps,
        notes=[] if uniform else ["per-layer dims"], layers=None if uniform else tuple(dims),
        target_kv_cr=float(target_kv_cr),
    )
