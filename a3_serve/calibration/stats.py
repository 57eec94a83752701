"""Per-layer calibration statistics in head space, accumulated in float64 with forward hooks.

Every A3 closed form depends on the data only through ``d_h x d_h`` second moments of head
activations (docs/METHOD.md §1.3-§1.4), so we never form ``d x d`` autocorrelations:

================  ======================  ==============================================================================
name              shape                   definition (mean over calibration tokens)
================  ======================  ==============================================================================
``Gq``            ``[h_q, d_h, d_h]``     ``E[q_i q_iᵀ]``, q_proj output per query head, pre-RoPE, bias included
``Gk``            ``[h_kv, d_h, d_h]``    ``E[k_j k_jᵀ]``, k_proj output per KV head, pre-RoPE
``Gv``            ``[h_kv, d_h, d_h]``    ``E[v_j v_jᵀ]``, v_proj output per KV head (the "xkv" moment)
``Go``            ``[h_q, d_h, d_h]``     ``E[o_i o_iᵀ]``, o_proj input per head = attention-weighted values
``x2``            ``[d]``                 ``E[x²]`` of the q/k/v input (RMSNorm output), for Wanda-like scores
``h2``            ``[d_int]``             ``E[h²]`` of the down_proj input (the A3-MLP score)
``H``             ``[d_int, d_int]``      ``E[h hᵀ]`` (only with ``StatsRequest.mlp_moment``; for the least-squares
                                          refit)
``E_rope``        ``[h_kv, d_h/2]``       exact RoPE pair energy, all (m, t) pairs (``StatsRequest.rope_energy``)
``E_rope_c``      ``[h_kv, d_h/2]``       the same over causal pairs t <= m only
``inv_ms_attn``   ``[]``                  ``E[1/ms(h)]`` of the residual stream after the attention block (``ms``: mean
                                          square over features; post_attention_layernorm input): turns an
                                          attention-output error into the relative error the next RMSNorm sees
                                          (loss-aware allocation)
``inv_ms_mlp``    ``[]``                  the same after the MLP block (the decoder layer's output)
================  ======================  ==============================================================================

The RoPE energies (docs/METHOD.md §2.5, "exact all-pairs energy") are, per KV group ``j`` and frequency pair
``p``, the mean per token of ``Σ_seq Σ_{i∈group j} Σ_{m,t} Re(u_{i,m,p}·conj(v_{t,p}))²`` with ``u``/``v`` the
post-RoPE complex coordinates of q/k (:func:`a3_serve.solvers.qk.rope_complex`; positions ``0..T-1``:
calibration windows carry no padding).

Held-out folds: with ``StatsRequest.heldout`` and a fold for every token (:class:`HeldOut`, made by
:mod:`a3_serve.calibration.folds`: every 8th batch, or one fold per calibration domain), every fold is accumulated
separately. The returned stats are those of ALL batches;
``.folds`` (one LayerStats per fold) are attached, and :meth:`LayerStats.held_out_pairs` gives, for every fold, the
statistics of the other folds and of that one, so solvers can choose a hyper-parameter (shrinkage, ridge) on data
they were not fitted on.

Sums are float64. Each batch's products are formed in float32 (:data:`OUTER_BATCH_DTYPE`; float64 where the
activations are float64) and added into the float64 sums: the head moments ``Gq``/``Gk``/``Gv``/``Go`` and the refit
moment ``H`` (``d_int²`` multiply-adds per token, the largest share of the statistics' cost) are float32 matrix
products over one batch's tokens; ``x2``/``h2`` and the ``inv_ms_*`` scalars square in float32 and sum (and take
means) in float64. The rounding is that of a float32 dot product over one batch's tokens, ~1e-7 relative in norm,
not over the whole calibration set, and avoids a float64 copy of every activation (docs/METHOD.md §7.4; measured
effect on the export in docs/RESULTS.md, "Export time"). The RoPE pair energies are float64 throughout. The
result is checked for NaN/Inf.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from a3_serve.errors import NumericalError
from a3_serve.solvers import qk as qk_solver
from a3_serve.solvers.linalg import all_finite, gram

log = logging.getLogger("a3_serve.calibration")


@dataclass(frozen=True)
class HeldOut:
    """Held-out folds of the calibration batches: ``token_folds[b]`` [B, T] is the fold (``0..k-1``) of every token of
    batch ``b``; ``cross_validate``: every fold is held out in turn, else only the last (fitted on the others)."""

    token_folds: list[torch.Tensor]
    cross_validate: bool = True


@dataclass(frozen=True)
class StatsRequest:
    """Which optional statistics to collect (each costs time and memory; the paper needs none of them)."""

    mlp_moment: bool = False  # full H = E[h hᵀ], d_int² float64 per layer
    rope_energy: bool = False  # exact / causal RoPE pair energies
    heldout: bool = False  # statistics per fold of the calibration windows (when the batches come with folds)


@dataclass
class LayerStats:
    """Mean second moments of one decoder layer (see the module docstring for shapes)."""

    n_tokens: int
    Gq: torch.Tensor
    Gk: torch.Tensor
    Gv: torch.Tensor
    Go: torch.Tensor
    x2: torch.Tensor
    h2: torch.Tensor
    H: Optional[torch.Tensor] = None
    E_rope: Optional[torch.Tensor] = None
    E_rope_c: Optional[torch.Tensor] = None
    inv_ms_attn: Optional[torch.Tensor] = None
    inv_ms_mlp: Optional[torch.Tensor] = None
    folds: Optional[list["LayerStats"]] = None  # one per held-out fold (only with StatsRequest.heldout and >= 2 folds)
    cross_validate: bool = True  # every fold held out in turn; False: only the last one (fitted on the others)

    MOMENTS = ("Gq", "Gk", "Gv", "Go", "x2", "h2", "H", "E_rope", "E_rope_c", "inv_ms_attn", "inv_ms_mlp")
    #: sums over pairs of a sequence's tokens: kept for all tokens, never per held-out fold
    SEQUENCE_MOMENTS = ("E_rope", "E_rope_c")

    @staticmethod
    def merge(a: "LayerStats", b: "LayerStats") -> "LayerStats":
        """The statistics of the union of two disjoint token sets (token-weighted means)."""
        return LayerStats.merge_all([a, b])

    @staticmethod
    def merge_all(parts: Sequence["LayerStats"]) -> "LayerStats":
        """The statistics of the union of disjoint token sets (token-weighted means, summed in list order)."""
        n = sum(p.n_tokens for p in parts)
        vals = {}
        for k in LayerStats.MOMENTS:
            if getattr(parts[0], k) is None:
                vals[k] = None
                continue
            total = getattr(parts[0], k) * parts[0].n_tokens
            for p in parts[1:]:
                total = total + getattr(p, k) * p.n_tokens
            vals[k] = total / n
        return LayerStats(n_tokens=n, **vals)

    def held_out_pairs(self) -> Iterator[tuple["LayerStats", "LayerStats"]]:
        """``(fit, val)`` for every fold (only the last one without ``cross_validate``): ``val`` = the fold, ``fit`` =
        all the other folds merged (built one at a time, so only one extra set of moments is alive). Empty without
        folds."""
        folds = self.folds or []
        for i, val in enumerate(folds):
            if self.cross_validate or i == len(folds) - 1:
                yield LayerStats.merge_all([f for j, f in enumerate(folds) if j != i]), val


def stats_to_tensors(st: LayerStats) -> dict[str, Any]:
    """A compact, ``torch.save``-able form of one layer's statistics: ``{"folds": [moments, ...]}`` when held-out
    folds were collected (the all-batches moments are NOT stored: :func:`stats_from_tensors` recomputes them
    with :meth:`LayerStats.merge_all`, exactly as :meth:`StatsCollector.finish` made them), else ``{"all": moments}``.
    ``moments`` maps the names of ``LayerStats.MOMENTS`` that are present (and ``n_tokens``, a 0-dim int64) to
    tensors. With the MLP moment ``H`` and ``k`` folds this is ``k·d_int²`` float64 per layer instead of
    ``(k + 1)·d_int²``."""

    def moments(s: LayerStats) -> dict[str, torch.Tensor]:
        d = {k: getattr(s, k) for k in LayerStats.MOMENTS if getattr(s, k) is not None}
        d["n_tokens"] = torch.tensor(s.n_tokens, dtype=torch.int64)
        return d

    if st.folds:
        seq = {k: getattr(st, k) for k in LayerStats.SEQUENCE_MOMENTS if getattr(st, k) is not None}
        return {"folds": [moments(f) for f in st.folds], "sequence": seq,
                "cross_validate": torch.tensor(st.cross_validate)}
    return {"all": moments(st)}


def stats_from_tensors(d: dict[str, Any]) -> LayerStats:
    """Inverse of :func:`stats_to_tensors`: the same LayerStats, bit for bit (``.folds`` attached)."""

    def build(m: dict[str, torch.Tensor]) -> LayerStats:
        m = dict(m)
        return LayerStats(n_tokens=int(m.pop("n_tokens")), **m)

    if "all" in d:
        return build(d["all"])
    folds = [build(m) for m in d["folds"]]
    merged = LayerStats.merge_all(folds)
    for k, v in d.get("sequence", {}).items():
        setattr(merged, k, v)
    merged.folds = folds
    merged.cross_validate = bool(d.get("cross_validate", True))
    return merged


class CompactStatsList(Sequence):
    """Layers' statistics kept in :func:`stats_to_tensors` form; item ``i`` is rebuilt on access (only the layer
    being used holds the all-batches moments)."""

    def __init__(self, items: list[dict[str, dict[str, torch.Tensor]]] | None = None):
        self.items = [] if items is None else items

    def append(self, st: LayerStats) -> None:
        self.items.append(stats_to_tensors(st))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # noqa: ANN001 - int index only
        return stats_from_tensors(self.items[i])


def stats_nbytes(num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int, intermediate_size: int,
                 request: StatsRequest, n_folds: int = 1) -> int:
    """Bytes of one layer's :func:`stats_to_tensors` form (float64; ``n_folds`` sets of moments with held-out folds,
    else one)."""
    n = num_heads * head_dim**2 * 2 + num_kv_heads * head_dim**2 * 2 + hidden_size + intermediate_size + 2
    if request.mlp_moment:
        n += intermediate_size**2
    if request.rope_energy:
        n += num_kv_heads * head_dim  # two [h_kv, d_h/2] energies
    return 8 * n * (n_folds if request.heldout and n_folds >= 2 else 1)


OUTER_BATCH_DTYPE = torch.float32  # dtype of one batch's products before they join the float64 sums (module docstring)


def batch_dtype(a: torch.Tensor) -> torch.dtype:
    """The dtype of one batch's partial products of ``a``: :data:`OUTER_BATCH_DTYPE`, or ``a``'s own dtype where
    that is wider (float64 activations stay float64; bf16 / fp16 ones are widened to float32)."""
    return OUTER_BATCH_DTYPE if a.dtype.itemsize <= OUTER_BATCH_DTYPE.itemsize else a.dtype


@dataclass
class _Accumulator:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add one batch's partial sum (any float dtype) into the float64 sum ``name``."""
        if name in self.sums:  # our own float64 tensor (made below): add in place, no temporaries
            self.sums[name].add_(value)
        else:
            self.sums[name] = value.to(torch.float64)

    def count(self, act: torch.Tensor) -> None:
        """Count the tokens of ``act`` [..., n]."""
        self.n_tokens += act.shape[:-1].numel()

    def add_sequence(self, name: str, value: torch.Tensor) -> None:
        """Add a sum over whole sequences (pairs of their tokens), which folds by token cannot split."""
        self.add(name, value)

    def add_head_moment(self, name: str, act: torch.Tensor, n_heads: int) -> None:
        """act [..., n_heads * d_h] -> adds sum over tokens of a_h a_hᵀ, shape [n_heads, d_h, d_h] (this batch's
        product in :func:`batch_dtype`)."""
        a = act.reshape(-1, n_heads, act.shape[-1] // n_heads)
        a = a.to(batch_dtype(a)).transpose(0, 1)  # [h, N, d_h]
        self.add(name, torch.bmm(a.transpose(1, 2), a))

    def add_square(self, name: str, act: torch.Tensor) -> None:
        """act [..., n] -> adds Σ_tokens a² [n]: squares in :func:`batch_dtype`, summed in float64."""
        a = act.reshape(-1, act.shape[-1])
        self.add(name, a.to(batch_dtype(a)).square().sum(0, dtype=torch.float64))

    def add_inverse_mean_square(self, name: str, act: torch.Tensor) -> None:
        """act [..., d] -> adds Σ_tokens 1 / mean_j(a_j²) (a scalar): squares in :func:`batch_dtype`, means and sum
        in float64."""
        a = act.reshape(-1, act.shape[-1])
        ms = a.to(batch_dtype(a)).square().mean(-1, dtype=torch.float64)
        self.add(name, (1.0 / ms.clamp_min(1e-30)).sum())

    def add_outer(self, name: str, act: torch.Tensor) -> None:
        """act [..., n] -> adds Σ_tokens a aᵀ [n, n]: this batch's product in :func:`batch_dtype`, added into the
        float64 sum."""
        a = act.reshape(-1, act.shape[-1])
        self.add(name, gram(a.to(batch_dtype(a))))  # the upper block triangle only: 5/8 of the multiply-adds

    def means(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """Every sum divided by the token count, checked for NaN / Inf."""
        if self.n_tokens == 0:
            raise RuntimeError(f"layer {layer_idx}: no calibration tokens reached this layer")
        means = {k: v / self.n_tokens for k, v in self.sums.items()}
        for name, t in means.items():
            if not all_finite(t):
                raise NumericalError(
                    f"calibration statistic {name} of layer {layer_idx} contains NaN or Inf; the model overflows on "
                    "the calibration text: use --dtype float32, check the source weights, or use different calibration "
                    "text"
                )
        return means

    def finish(self, layer_idx: int) -> LayerStats:
        return LayerStats(n_tokens=self.n_tokens, **self.means(layer_idx))


class _FoldRouter:
    """One batch's statistics split among the fold accumulators by the fold of every token: ``routes`` holds
    ``(fold accumulator, mask)`` for the folds present in the batch (``mask`` [B·T] bool, or None when the whole batch
    is that fold's: no copy); per-sequence sums and the total count go to ``shared``. Same methods as _Accumulator."""

    def __init__(self, routes: list[tuple[_Accumulator, torch.Tensor | None]], shared: _Accumulator):
        self.routes, self.shared = routes, shared

    def _split(self, act: torch.Tensor):
        flat = act.reshape(-1, act.shape[-1])
        for acc, m in self.routes:
            yield acc, (flat if m is None else flat[m.to(flat.device)])

    def count(self, act: torch.Tensor) -> None:
        self.shared.count(act)
        for acc, part in self._split(act):
            acc.count(part)

    def add_sequence(self, name: str, value: torch.Tensor) -> None:
        self.shared.add(name, value)

    def add_head_moment(self, name: str, act: torch.Tensor, n_heads: int) -> None:
        for acc, part in self._split(act):
            acc.add_head_moment(name, part, n_heads)

    def add_square(self, name: str, act: torch.Tensor) -> None:
        for acc, part in self._split(act):
            acc.add_square(name, part)

    def add_inverse_mean_square(self, name: str, act: torch.Tensor) -> None:
        for acc, part in self._split(act):
            acc.add_inverse_mean_square(name, part)

    def add_outer(self, name: str, act: torch.Tensor) -> None:
        for acc, part in self._split(act):
            acc.add_outer(name, part)


class StatsCollector:
    """Forward hooks that accumulate :class:`LayerStats` for ``n_layers`` accumulator slots over the calibration
    batches, with the held-out folds of ``request`` (module docstring).

    Use: :meth:`attach` the hooks of a decoder layer to a slot, call :meth:`start_batch` before each batch's
    forward pass, remove the returned hook handles, then :meth:`finish` each slot. The whole-model pass
    (:func:`collect_stats`) gives every layer its own slot; the layer-by-layer pass
    (:func:`a3_serve.calibration.sequential.sequential_calibrate`) uses one slot per layer in turn.

    ``heldout.token_folds[b]`` [B, T] is the fold of every token of batch ``b``
    (:meth:`a3_serve.calibration.folds.WindowFolds.batches`); with ``request.heldout`` and at least two folds, each
    fold has its own accumulators and every token's rows go to its fold (the RoPE pair energies, sums over pairs of
    a sequence's tokens, are kept for all tokens only).
    """

    def __init__(self, n_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, request: StatsRequest,
                 heldout: HeldOut | None = None):
        self.request = request
        token_folds = heldout.token_folds if heldout is not None else None
        self.cross_validate = heldout.cross_validate if heldout is not None else True
        n_folds = max((int(f.max()) + 1 for f in token_folds), default=0) if token_folds else 0
        self.token_folds = list(token_folds) if request.heldout and n_folds >= 2 else None
        n_acc = n_folds if self.token_folds is not None else 1

        def accs() -> list[_Accumulator]:
            return [_Accumulator(num_heads, num_kv_heads, head_dim) for _ in range(n_layers)]

        self.acc = [accs() for _ in range(n_acc)]
        self.shared = accs() if self.token_folds is not None else None
        self.routes: list[tuple[int, torch.Tensor | None]] = []  # (fold, token mask or None: all) of the batch

    def start_batch(self, b: int) -> None:
        """Route the next statistics by the token folds of batch ``b``."""
        if self.token_folds is not None:
            ids = self.token_folds[b].reshape(-1)
            present = torch.unique(ids).tolist()
            self.routes = [(f, None) if len(present) == 1 else (f, ids == f) for f in present]

    def __call__(self, idx: int):
        """The accumulator (or the fold router) of slot ``idx`` that receives the current batch."""
        if self.shared is None:
            return self.acc[0][idx]
        return _FoldRouter([(self.acc[f][idx], m) for f, m in self.routes], self.shared[idx])

    def finish(self, idx: int, layer_idx: int | None = None) -> LayerStats:
        """The statistics of slot ``idx`` (all batches; ``.folds`` attached with held-out folds).
        ``layer_idx`` names the decoder layer in error messages (default: ``idx``)."""
        name = idx if layer_idx is None else layer_idx
        if self.shared is None:
            return self.acc[0][idx].finish(name)
        folds = [acc[idx].finish(name) for acc in self.acc]
        merged = LayerStats.merge_all(folds)
        for k, v in self.shared[idx].means(name).items():  # per-sequence sums: means over all tokens
            setattr(merged, k, v)
        merged.folds = folds
        merged.cross_validate = self.cross_validate
        return merged

    def attach(self, layer: nn.Module, idx: int, inv_freq: torch.Tensor | None = None) -> list:
        """Register the hooks of an HF Llama-style decoder ``layer`` feeding slot ``idx``; returns the handles.
        ``inv_freq`` [d_h/2] (:func:`rope_inv_freq`) is needed when the request asks for RoPE energies."""
        route, req = self, self.request
        attn, mlp = layer.self_attn, layer.mlp
        acc0 = self.acc[0][idx]
        hq, hkv, dh = acc0.num_heads, acc0.num_kv_heads, acc0.head_dim
        pending: dict[str, torch.Tensor] = {}

        def on_q_in(_mod, args):
            x, acc = args[0], route(idx)
            acc.count(x)
            acc.add_square("x2", x)

        def on_q_out(_m, _a, out):
            route(idx).add_head_moment("Gq", out, hq)
            if req.rope_energy:
                B, T = out.shape[0], out.shape[1]
                # [B, h_kv, g, T, d_h]
                q = out.reshape(B, T, hkv, hq // hkv, dh).to(torch.float64).permute(0, 2, 3, 1, 4)
                pending["u"] = qk_solver.rope_complex(q, inv_freq, torch.arange(T, device=out.device))

        def on_k_out(_m, _a, out):
            acc = route(idx)
            acc.add_head_moment("Gk", out, hkv)
            if req.rope_energy:
                B, T = out.shape[0], out.shape[1]
                k = out.reshape(B, T, hkv, dh).to(torch.float64).transpose(1, 2)  # [B, h_kv, T, d_h]
                v = qk_solver.rope_complex(k, inv_freq, torch.arange(T, device=out.device))
                e_all, e_causal = qk_solver.rope_pair_energies(pending.pop("u"), v)
                acc.add_sequence("E_rope", e_all)
                acc.add_sequence("E_rope_c", e_causal)

        hooks = [
            attn.q_proj.register_forward_pre_hook(on_q_in),
            attn.q_proj.register_forward_hook(on_q_out),
            attn.k_proj.register_forward_hook(on_k_out),
            attn.v_proj.register_forward_hook(lambda _m, _a, out: route(idx).add_head_moment("Gv", out, hkv)),
            attn.o_proj.register_forward_pre_hook(lambda _m, args: route(idx).add_head_moment("Go", args[0], hq)),
            mlp.down_proj.register_forward_pre_hook(lambda _m, args: route(idx).add_square("h2", args[0])),
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args: route(idx).add_inverse_mean_square("inv_ms_attn", args[0])),
            layer.register_forward_hook(
                lambda _m, _a, out: route(idx).add_inverse_mean_square("inv_ms_mlp",
                                                                       out[0] if isinstance(out, tuple) else out)),
        ]
        if req.mlp_moment:
            hooks.append(mlp.down_proj.register_forward_pre_hook(lambda _m, args: route(idx).add_outer("H", args[0])))
        return hooks


def rope_inv_freq(model: nn.Module) -> torch.Tensor:
    """The (already scaled, e.g. ``llama3``) RoPE inverse frequencies [d_h/2] of an HF Llama-style model."""
    rot = getattr(model.model, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise RuntimeError("the model has no rotary_emb.inv_freq; the exact RoPE energy needs a RoPE model")
    if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        log.warning("RoPE attention_scaling %.4g is ignored by the pair energies (a common factor)",
                    rot.attention_scaling)
    return rot.inv_freq.detach().to(torch.float64)


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    progress=None,
    request: StatsRequest = StatsRequest(),
    heldout: HeldOut | None = None,
) -> list[LayerStats]:
    """Run ``model`` (a Llama-style causal LM) over token batches and return one LayerStats per layer.

    ``batches`` yields LongTensors ``[B, T]`` of calibration tokens (no padding). Statistics are those
    of the ORIGINAL model at every layer (the paper's protocol). Only the decoder runs (``model.model``):
    the LM head's logits are not needed. ``progress`` is an optional callable ``progress(n_sequences)``
    called after each batch. ``request`` asks for the optional statistics (module docstring); ``heldout`` gives
    the held-out fold of every token of each batch (:class:`StatsCollector`).
    """
    layers = model.model.layers
    batches = list(batches)
    route = StatsCollector(len(layers), num_heads, num_kv_heads, head_dim, request, heldout)
    inv_freq = rope_inv_freq(model) if request.rope_energy else None
    handles = [h for i, layer in enumerate(layers) for h in route.attach(layer, i, inv_freq)]
    device = next(model.parameters()).device
    try:
        for b, batch in enumerate(batches):
            route.start_batch(b)
            model.model(input_ids=batch.to(device), use_cache=False)
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
    return [route.finish(i) for i in range(len(layers))]
