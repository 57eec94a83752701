"""Pure-math A3 solvers: QK, OV, MLP, budget (CR -> dims) and PSD linear algebra.

No file I/O, no models, no transformers: float64 torch tensors in, float64 torch tensors out, on the
input's device, batched over heads / KV groups. See docs/DESIGN.md ("Module contracts") and
docs/METHOD.md (§1-§7) for the math.
"""

from a3_serve.solvers.budget import COMPONENTS, DimPlan, ModelShape, plan_dims
from a3_serve.solvers.linalg import check_finite, psd_sqrt
from a3_serve.solvers.mlp import MLP_SCORE_METHODS, dropped_fraction, mlp_scores, select_neurons
from a3_serve.solvers.ov import OVFactors, ov_closed_form, ov_select, ov_wanda_scores, ov_weight_norm_scores
from a3_serve.solvers.qk import (
    PairSelection,
    QKFactors,
    group_sum,
    pair_columns,
    qk_closed_form,
    rope_pair_scores,
    select_rope_pairs,
    selection_matrix,
)

__all__ = [
    "COMPONENTS",
    "DimPlan",
    "MLP_SCORE_METHODS",
    "ModelShape",
    "OVFactors",
    "PairSelection",
    "QKFactors",
    "check_finite",
    "dropped_fraction",
    "group_sum",
    "mlp_scores",
    "ov_closed_form",
    "ov_select",
    "ov_wanda_scores",
    "ov_weight_norm_scores",
    "pair_columns",
    "plan_dims",
    "psd_sqrt",
    "qk_closed_form",
    "rope_pair_scores",
    "select_rope_pairs",
    "selection_matrix",
    "select_neurons",
]
