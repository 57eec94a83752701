"""Named method recipes: which solver each component (QK, OV, MLP) uses.

``paper`` reproduces the publication (A3_METHOD.md sections 4-6); ``best`` is a3-export's default, the
combination that measured best on held-out text (docs/RESULTS.md, benchmarks/quality.py); the other
names are single-improvement ablations and the selection baselines.
"""

from __future__ import annotations

from a3_serve.calibration.stats import StatsRequest
from a3_serve.export.solve import HELDOUT_EVERY, Methods

#: name -> (methods, one-line description)
RECIPES: dict[str, tuple[Methods, str]] = {
    "paper": (Methods("a3", "a3", "a3"), "A3 as published: paper pair score, xkv/axkv OV closed form, rxx-w MLP selection"),
    "best": (Methods("energy", "a3-shrink", "a3-refit", "loss"),
             "exact RoPE pair energy, shrunk group-averaged OV moment, MLP least-squares refit where it helps on held-out "
             "calibration batches, and loss-aware per-layer head sizes and MLP widths"),
    "best-uniform": (Methods("energy", "a3-shrink", "a3-refit"),
                     "best's solvers with the paper's uniform dims (one head size and MLP width for every layer)"),
    "paper+alloc": (Methods("a3", "a3", "a3", "loss"), "paper, with loss-aware per-layer allocation of head sizes and MLP widths"),
    "paper+energy": (Methods("energy", "a3", "a3"), "paper, with the exact all-pairs RoPE energy score"),
    "paper+energy-causal": (Methods("energy-causal", "a3", "a3"), "paper, with the causal RoPE energy score"),
    "paper+ov-avg": (Methods("a3", "a3-avg", "a3"), "paper, with the group-averaged attention-weighted OV moment"),
    "paper+ov-shrink": (Methods("a3", "a3-shrink", "a3"), "paper, with the shrunk group-averaged OV moment"),
    "paper+refit": (Methods("a3", "a3", "a3-refit"), "paper, with the least-squares down_proj refit"),
    "paper+greedy-refit": (Methods("a3", "a3", "greedy-refit"), "paper, with greedy MLP selection + refit"),
    "wanda": (Methods("wanda", "wanda", "wanda"), "Wanda-like structured selection everywhere (baseline)"),
    "weight-norm": (Methods("weight-norm", "weight-norm", "weight-norm"), "weight-norm selection, no data (baseline)"),
}
DEFAULT_RECIPE = "best"


def union_request(methods: list[Methods]) -> StatsRequest:
    """One statistics request that serves every recipe in ``methods`` (for solving several from one pass)."""
    reqs = [m.stats_request() for m in methods]
    return StatsRequest(
        mlp_moment=any(r.mlp_moment for r in reqs),
        rope_energy=any(r.rope_energy for r in reqs),
        heldout_every=HELDOUT_EVERY if any(r.heldout_every for r in reqs) else 0,
    )
