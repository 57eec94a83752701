"""The export's methods: what each component's solver option means, and the named recipes that combine them.

* ``QK_METHODS`` / ``OV_METHODS`` / ``MLP_METHODS`` / ``ALLOCATIONS``: every option of ``--qk-method``,
  ``--ov-method``, ``--mlp-method`` and ``--allocation`` with the one-line description ``--help`` shows
  (the math: docs/METHOD.md §2-§6);
* :class:`Methods`: one choice per component and the allocation, and the calibration statistics it needs;
* ``RECIPES``: ``paper`` reproduces the publication (docs/METHOD.md §2-§4, recipes §8); ``best`` is a3-export's
  default, the combination that measured best on held-out text (docs/RESULTS.md, benchmarks/quality.py); the
  other names are single-improvement ablations and the selection baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

from a3_serve.calibration.stats import StatsRequest

QK_METHODS = {
    "a3": "the paper's RoPE pair score E[q_a²]E[k_a²] + E[q_b²]E[k_b²] per KV group (A3 'rxx-w-rxx')",
    "energy": "exact all-pairs energy of each RoPE pair's score contribution, from post-RoPE q/k (METHOD.md §2.5)",
    "energy-causal": "the exact pair energy over causal (query, key) pairs only",
    "wanda": "Wanda-like pair score with per-dim energy Σ_j E[x_j²]·W[c, j]² (input scale × weight)",
    "weight-norm": "pair score from weight norms only, ‖W_q[c]‖²·‖W_k[c]‖² (no calibration data)",
}
OV_METHODS = {
    "a3": "MHA: per-head closed form whitened by E[o oᵀ] (attention-weighted, 'axkv'); "
          "GQA: joint SVD whitened by E[v vᵀ] ('xkv')",
    "xkv": "closed form whitened by E[v vᵀ] for every model (cheaper ablation of 'a3')",
    "a3-avg": "closed form whitened by the group-averaged attention-weighted moment mean_i E[o_i o_iᵀ] (GQA; MHA: = "
              "a3)",
    "a3-shrink": "a3-avg's moment shrunk toward E[v vᵀ], (1-β)·G_o + β·(tr G_o/tr G_v)·G_v, β per value head chosen "
                 "on held-out calibration data (--heldout-folds; METHOD.md §1.5, §3.5-§3.6)",
    "svd": "plain SVD of W_v W_o without whitening (CLOVER-like baseline)",
    "wanda": "keep value dims by E[v_c²]·‖W_o[c]‖² (selection baseline)",
    "weight-norm": "keep value dims by ‖W_v[c]‖²·‖W_o[c]‖² (selection baseline, no data)",
}
MLP_METHODS = {
    "a3": "the paper's score E[h_i²]·‖W_down[:, i]‖² ('rxx-w')",
    "rxx": "activation energy E[h_i²] only ('rxx')",
    "a3-refit": "the paper's selection, then a least-squares refit of down_proj on the kept neurons (ridge chosen on "
                "held-out calibration data, --heldout-folds; METHOD.md §1.5, §4.4, §4.6)",
    "a3-refit-shrunk": "a3-refit, with the activation energies of the paper's score shrunk toward weight-only ones "
                       "by a share chosen on held-out calibration folds (METHOD.md §4.8)",
    "greedy-refit": "greedy selection on the refit objective (backward elimination), then the refit",
    "wanda": "structured Wanda: sqrt(E[h_i²])·‖W_down[:, i]‖₁",
    "weight-norm": "‖W_gate[i]‖² + ‖W_up[i]‖² + ‖W_down[:, i]‖² (no data)",
}


#: MLP methods that refit down_proj on the kept neurons (they need E[h hᵀ] and a held-out fold)
REFIT_METHODS = ("a3-refit", "a3-refit-shrunk", "greedy-refit")
#: fallbacks when the calibration set is too small for held-out folds (a3_serve.calibration.folds)
DEFAULT_SHRINKAGE = 0.3
DEFAULT_RIDGE = 1e-2


#: how the parameter budget is spread over layers and components
ALLOCATIONS = {
    "uniform": "every layer and component cut by the same ratio (the paper; head sizes rounded to --head-multiple)",
    "loss": "per-layer head sizes and MLP widths chosen by the least predicted loss increase per parameter removed: "
            "each solver's own output error, weighted by the loss's sensitivity to the residual stream where it is "
            "added (diagonal empirical Fisher, one backward pass over 4,096 calibration tokens; METHOD.md §6.3); K "
            "and V heads keep one size per layer",
    "loss-rms": "'loss' as in a3-serve 0.1: the output errors weighted by E[1/ms(h)] of the residual stream (the "
                "next RMSNorm's scale) instead of the Fisher; no backward pass",
}
#: the allocations that read per-layer loss curves (an allocation pass); "loss" also needs the Fisher pass
LOSS_ALLOCATIONS = ("loss", "loss-rms")


@dataclass(frozen=True)
class Methods:
    """Which solver each component uses, and how the budget is allocated (``ALLOCATIONS``)."""

    qk: str = "a3"
    ov: str = "a3"
    mlp: str = "a3"
    allocation: str = "uniform"

    @property
    def loss_aware(self) -> bool:
        """Per-layer dims from loss curves (an allocation pass), not the uniform cut."""
        return self.allocation in LOSS_ALLOCATIONS

    @property
    def needs_fisher(self) -> bool:
        """The loss curves are weighted by the residual Fisher (:mod:`a3_serve.calibration.fisher`)."""
        return self.allocation == "loss"

    def as_dict(self) -> dict[str, str]:
        return {"qk": self.qk, "ov": self.ov, "mlp": self.mlp}

    def stats_request(self) -> StatsRequest:
        """The optional calibration statistics these methods read."""
        refit = self.mlp in REFIT_METHODS
        return StatsRequest(
            mlp_moment=refit,
            rope_energy=self.qk in ("energy", "energy-causal"),
            heldout=refit or self.ov == "a3-shrink",
        )


#: name -> (methods, one-line description)
RECIPES: dict[str, tuple[Methods, str]] = {
    "paper": (Methods("a3", "a3", "a3"),
              "A3 as published: paper pair score, xkv/axkv OV closed form, rxx-w MLP selection"),
    "best": (Methods("energy", "a3-shrink", "a3-refit", "loss"),
             "exact RoPE pair energy, shrunk group-averaged OV moment, MLP least-squares refit where it helps on "
             "held-out calibration batches, and loss-aware per-layer head sizes and MLP widths"),
    "best+score-shrink": (Methods("energy", "a3-shrink", "a3-refit-shrunk", "loss"),
                          "best, with the MLP selection's activation energies shrunk toward weight-only ones (share "
                          "chosen on held-out folds)"),
    "best-uniform": (Methods("energy", "a3-shrink", "a3-refit"),
                     "best's solvers with the paper's uniform dims (one head size and MLP width for every layer)"),
    "best-rms": (Methods("energy", "a3-shrink", "a3-refit", "loss-rms"),
                 "best with a3-serve 0.1's allocation weight E[1/ms(h)] instead of the residual Fisher"),
    "paper+alloc": (Methods("a3", "a3", "a3", "loss"),
                    "paper, with loss-aware per-layer allocation of head sizes and MLP widths"),
    "paper+alloc-rms": (Methods("a3", "a3", "a3", "loss-rms"),
                        "paper+alloc with a3-serve 0.1's allocation weight E[1/ms(h)] instead of the residual Fisher"),
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
        heldout=any(r.heldout for r in reqs),
    )
