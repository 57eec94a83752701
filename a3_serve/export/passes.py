"""Which calibration passes an export runs: decided once, here, for the streamed and the in-memory path alike.

A pass is one run of the dense model over the calibration tokens with statistics hooks. What the methods need
decides how many (as llm-compressor infers its pipeline from what its modifiers need):

* the **allocation pass** runs only for the loss-aware allocation (``--allocation loss`` or ``loss-rms`` without
  explicit per-layer dims): every layer's loss curves must be known before any layer can be solved;
* the **Fisher pass** (``--allocation loss``): forward and backward over the first calibration windows
  (:mod:`a3_serve.calibration.fisher`, :data:`~a3_serve.calibration.fisher.FISHER_TOKENS` tokens), one number per
  layer and residual point that weights that layer's curves; it runs before the allocation pass;
* the **solve statistics** come either from that first pass (it then gathers the recipe's full statistics and
  keeps them, compactly, until the plan is known: *one pass*), or from a **solve pass** of their own.

One pass is possible with original-model statistics (propagated ones depend on the plan) when every layer's
statistics fit where they are kept: the in-memory export holds them in memory, up to :data:`CACHED_STATS_MAX_BYTES`;
the streamed export writes one file per layer into its working folder, up to :data:`DISK_STATS_SHARE` of the free
space on that disk (at least :data:`CACHED_STATS_MAX_BYTES`). The MLP refit's ``d_int x d_int`` moments, one set per
held-out fold, make them large (a 0.5B model with a 4,864-wide MLP and three folds: 14 GB; Llama-2-7B's shape: 93
GB). Above the limit the allocation pass gathers only the light moments its curves need and the solve pass
recomputes the rest one layer at a time (one more forward pass).

How a pass runs: the streamed export always goes layer by layer (:mod:`a3_serve.calibration.sequential`); the
in-memory export runs the whole model at once (:func:`a3_serve.calibration.stats.collect_stats`) when the
statistics of all layers are small (original statistics and no MLP moment), else layer by layer too. Both give
the same statistics, bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from a3_serve.calibration.stats import StatsRequest, stats_nbytes
from a3_serve.export.architectures import SourceArch
from a3_serve.export.methods import Methods

#: every layer's statistics are kept in memory for the solve when they take at most this many bytes (module docstring)
CACHED_STATS_MAX_BYTES = 4 * 2**30
#: the streamed export keeps them on disk when they take at most this share of the free space there
DISK_STATS_SHARE = 0.5


def cached_stats_bytes(arch: SourceArch, request: StatsRequest, n_folds: int) -> int:
    """Bytes of every layer's compact statistics for ``request`` (``n_folds`` held-out folds of the windows)."""
    return arch.num_layers * stats_nbytes(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size,
                                          arch.intermediate_size, request, n_folds)


@dataclass(frozen=True)
class CalibrationPasses:
    """The passes of one export (module docstring).

    ``allocate``: run the allocation pass. ``fisher``: run the Fisher pass before it. ``first_request``: what the
    first pass gathers (None: there is none).
    ``first_whole_model``: the first pass runs the whole model at once (in-memory only). ``solve_from_first``: the
    layers are solved from the first pass's statistics; otherwise a layer-by-layer solve pass gathers
    ``solve_request`` in ``stats_mode``.
    """

    allocate: bool
    fisher: bool
    first_request: StatsRequest | None
    first_whole_model: bool
    solve_from_first: bool
    solve_request: StatsRequest
    stats_mode: str

    @property
    def one_pass(self) -> bool:
        """The allocation and the solve share one calibration pass."""
        return self.allocate and self.solve_from_first

    @property
    def count(self) -> int:
        """Calibration passes over the tokens (1 or 2)."""
        return (self.first_request is not None) + (not self.solve_from_first)


def stats_limit(streamed: bool, disk_free: int | None) -> int:
    """Bytes of statistics one pass may keep (module docstring): in memory, or on a disk with ``disk_free`` bytes."""
    if streamed and disk_free is not None:
        return max(CACHED_STATS_MAX_BYTES, int(DISK_STATS_SHARE * disk_free))
    return CACHED_STATS_MAX_BYTES


def plan_passes(methods: Methods, explicit_dims: bool, arch: SourceArch, n_folds: int, stats_mode: str,
                streamed: bool, disk_free: int | None = None) -> CalibrationPasses:
    """The passes for these methods (``explicit_dims``: per-layer dims given, no allocation; ``disk_free``: free bytes
    where the streamed export's working folder lives)."""
    allocate = methods.loss_aware and not explicit_dims
    fisher = allocate and methods.needs_fisher
    full = methods.stats_request()
    light = StatsRequest(rope_energy=full.rope_energy)  # what the allocation's curves read
    fits = stats_mode == "original" and cached_stats_bytes(arch, full, n_folds) <= stats_limit(streamed, disk_free)
    if streamed:
        keep = allocate and fits
        first = (full if keep else light) if allocate else None
        return CalibrationPasses(allocate, fisher, first, False, keep, full, stats_mode)
    whole_model = stats_mode == "original" and not full.mlp_moment
    keep = allocate and full.mlp_moment and fits
    if keep:
        return CalibrationPasses(allocate, fisher, full, False, True, full, stats_mode)
    if whole_model or allocate:
        return CalibrationPasses(allocate, fisher, full if whole_model else light, True, whole_model, full, stats_mode)
    return CalibrationPasses(allocate, fisher, None, False, False, full, stats_mode)
