"""Numerical checks of the pure-math solvers (a3_serve.solvers) against brute force and the paper's d×d forms.

Synthetic, correlated "LLM-like" activations (power-law spectrum, outlier channels, non-zero mean, AR(1)
along the sequence), fixed seeds, float64. Tolerances are tight enough that a wrong factor, a transposed
block or a wrong RoPE layout fails by many orders of magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch

from a3_serve.errors import BudgetError, InputError, NumericalError
from a3_serve.solvers import linalg, mlp, ov, qk

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# ----------------------------------------------------------------------------------------------------------
def make_acts(n_seq, T, d, gen, rho=0.9, n_outlier=3, outlier_scale=15.0, mean_scale=0.5, alpha=0.8):
    """Port of reference common.make_acts: returns [n_seq, T, d] float64."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    spec = torch.arange(1, d + 1, dtype=F64) ** -alpha
    M = (Q * spec) @ Q.T
    scale = torch.ones(d, dtype=F64)
    scale[torch.randperm(d, generator=gen)[:n_outlier]] = outlier_scale
    mu = mean_scale * torch.randn(d, generator=gen, dtype=F64) * spec.mean()
    e = torch.randn(n_seq, T, d, generator=gen, dtype=F64)
    z = torch.empty_like(e)
    z[:, 0] = e[:, 0]
    c = math.sqrt(1 - rho**2)
    for t in range(1, T):
        z[:, t] = rho * z[:, t - 1] + c * e[:, t]
    return (z @ M) * scale + mu


def eig_sqrt(R):
    """Plain (undamped) symmetric square root and inverse square root via eigh, for full-rank R."""
    lam, Q = torch.linalg.eigh(0.5 * (R + R.mT))
    return (Q * lam.sqrt().unsqueeze(-2)) @ Q.mT, (Q * lam.rsqrt().unsqueeze(-2)) @ Q.mT


def rel_fro(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def moment(Y):
    """E[y yᵀ] over tokens: Y [..., L, n] -> [..., n, n]."""
    return Y.mT @ Y / Y.shape[-2]


D, DH, L_SEQ, T_SEQ = 48, 16, 4, 128
L = L_SEQ * T_SEQ


@pytest.fixture(scope="module")
def X():
    gen = torch.Generator().manual_seed(0)
    return make_acts(L_SEQ, T_SEQ, D, gen).reshape(-1, D)  # [L, d]


def head_weights(gen, h, d=D, dh=DH):
    Wq = torch.randn(h, d, dh, generator=gen, dtype=F64) / math.sqrt(d) * torch.linspace(2.0, 0.3, dh, dtype=F64)
    Wk = torch.randn(h, d, dh, generator=gen, dtype=F64) / math.sqrt(d) * torch.linspace(0.3, 2.0, dh, dtype=F64)
    return Wq, Wk


# ----------------------------------------------------------------------------------------------------------
# linalg
# ----------------------------------------------------------------------------------------------------------
def test_psd_sqrt_well_conditioned():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 10, 10, generator=gen, dtype=F64)
    G = A @ A.mT + 0.5 * torch.eye(10, dtype=F64)
    S, S_inv = linalg.psd_sqrt(G)
    assert S.dtype == F64 and S.shape == G.shape
    assert rel_fro(S @ S, G) < 1e-12
    assert rel_fro(S @ S_inv, torch.eye(10, dtype=F64).expand_as(G)) < 1e-12
    assert rel_fro(S, S.mT) < 1e-14
    # float32 input is accepted and the result is float64
    S32, _ = linalg.psd_sqrt(G.float())
    assert S32.dtype == F64 and rel_fro(S32, S) < 1e-6


def test_psd_sqrt_damps_rank_deficient_and_zero():
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(3, 12, 4, generator=gen, dtype=F64)
    G = B @ B.mT  # rank 4 of 12
    eps = 1e-4
    S, S_inv = linalg.psd_sqrt(G, eps=eps)
    assert torch.isfinite(S).all() and torch.isfinite(S_inv).all()
    assert rel_fro(S @ S_inv, torch.eye(12, dtype=F64).expand_as(G)) < 1e-8
    lam = torch.linalg.eigvalsh(S @ S)
    mean = torch.linalg.eigvalsh(G).clamp_min(0).mean(-1, keepdim=True)
    assert bool((lam >= eps * mean * (1 - 1e-6)).all())
    # the damped square root still reproduces G on its range (only tiny eigenvalues were lifted)
    assert rel_fro(S @ S, G) < 1e-3
    # an all-zero matrix gives finite factors
    Z, Z_inv = linalg.psd_sqrt(torch.zeros(2, 5, 5, dtype=F64))
    assert torch.isfinite(Z).all() and torch.isfinite(Z_inv).all()


def test_all_finite_fast_path_is_exact():
    """A finite sum proves finiteness; a non-finite sum must fall back to the elementwise check, so huge but finite
    values whose sum overflows (float32 and float64) are still finite, and any NaN / ±Inf is caught."""
    for dtype in (torch.float32, torch.float64):
        big = torch.full((4, 4), torch.finfo(dtype).max / 2, dtype=dtype)
        assert not torch.isfinite(big.sum()) and linalg.all_finite(big)
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.randn(50, 50, dtype=dtype)
            t[17, 3] = bad
            assert not linalg.all_finite(t)
            assert not linalg.all_finite(torch.cat([big.reshape(-1), t.reshape(-1)]))
        assert linalg.all_finite(torch.randn(50, 50, dtype=dtype))
    assert linalg.all_finite(torch.arange(5))  # integers are always finite


def test_gram_upper_blocks_equals_the_full_product():
    """The block-triangular Gram matrix (the MLP moment's accumulation) is aᵀa to float64 rounding, for column counts
    that do and do not divide into the blocks, and mirrors its off-diagonal blocks exactly."""
    torch.manual_seed(0)
    for n, blocks in ((1536, 4), (1001, 3), (257, 4), (100, 4)):
        a = torch.randn(700, n, dtype=F64) * torch.logspace(-3, 3, n, dtype=F64)  # columns of very different scale
        g, ref = linalg.gram(a, blocks), a.T @ a
        assert g.shape == (n, n)
        scale = torch.sqrt(torch.diagonal(ref)[:, None] * torch.diagonal(ref)[None, :])  # Cauchy-Schwarz bound
        assert ((g - ref).abs() / scale).max() < 1e-13
        if n >= 256:  # smaller ones take the plain product
            lo = n // blocks
            assert torch.equal(g[lo:, :lo], g[:lo, lo:].T)


def test_check_finite_and_bad_inputs():
    linalg.check_finite("ok", torch.ones(3), None, torch.arange(3))
    bad = torch.ones(2, 3, 3, dtype=F64)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(NumericalError) as ei:
        linalg.check_finite("layer 3 Gq", torch.ones(2), bad)
    msg = str(ei.value)
    assert "layer 3 Gq" in msg and "NaN or Inf" in msg and "\n" not in msg
    with pytest.raises(NumericalError):
        linalg.psd_sqrt(bad)
    with pytest.raises(NumericalError):
        qk.qk_closed_form(bad, torch.ones(2, 3, 3), 2)
    with pytest.raises(InputError):
        linalg.psd_sqrt(torch.eye(3), eps=-1.0)


# ----------------------------------------------------------------------------------------------------------
# QK closed form
# ----------------------------------------------------------------------------------------------------------
def qk_objective(Gq, Gk, A, B):
    """‖G_q^{1/2}(I − A Bᵀ)G_k^{1/2}‖² = tr((I−P)ᵀ G_q (I−P) G_k), P = A Bᵀ."""
    E = torch.eye(Gq.shape[-1], dtype=F64) - A @ B.mT
    return torch.einsum("...ij,...ik,...kl,...jl->...", E, Gq, E, Gk)


@pytest.mark.parametrize("r", [12, 6])
def test_qk_matches_brute_force_and_paper_formula(X, r):
    gen = torch.Generator().manual_seed(3)
    h = 3
    Wq, Wk = head_weights(gen, h)
    Q, K = X @ Wq, X @ Wk  # [h, L, d_h]
    f = qk.qk_closed_form(moment(Q), moment(K), r, eps=0.0)
    assert f.A.shape == (h, DH, r) and f.B.shape == (h, DH, r) and f.sv.shape == (h, DH)
    full = Q @ K.mT
    approx = (Q @ f.A) @ (K @ f.B).mT
    err = (full - approx).square().sum((1, 2)) / L**2  # pooled all-pairs objective
    tot = full.square().sum((1, 2)) / L**2
    assert torch.allclose(f.total, tot, rtol=1e-10, atol=0)
    assert float(((err - f.loss).abs() / f.total).max()) < 1e-9
    assert float(((err - f.loss).abs() / f.loss).max()) < 1e-7
    assert float((f.loss / f.total).min()) > 1e-7  # non-trivial truncation

    # paper's d×d formula: W̃ = R^{-1/2} SVD_r(R^{1/2} W_qk R^{1/2}) R^{-1/2}
    R = moment(X)
    Rh, Rih = eig_sqrt(R)
    M = Rh @ (Wq @ Wk.mT) @ Rh
    U, s, Vh = torch.linalg.svd(M)
    W_paper = Rih @ (U[..., :r] * s[..., None, :r]) @ Vh[..., :r, :] @ Rih
    W_ours = Wq @ f.A @ f.B.mT @ Wk.mT
    assert rel_fro(W_ours, W_paper) < 1e-8
    # same singular values (Eckart–Young certificate)
    assert torch.allclose(f.sv, s[..., :DH], rtol=1e-9, atol=1e-12 * float(s.max()))
    assert torch.allclose(f.loss, s[..., r:].square().sum(-1), rtol=1e-8, atol=0)


def test_qk_gqa_group_sum_is_joint_svd(X):
    gen = torch.Generator().manual_seed(4)
    h_kv, g, r = 2, 3, 6
    Wq, _ = head_weights(gen, h_kv * g)
    _, Wk = head_weights(gen, h_kv)
    Q, K = X @ Wq, X @ Wk  # [h_q, L, d_h], [h_kv, L, d_h]
    Gq = qk.group_sum(moment(Q), h_kv)
    assert Gq.shape == (h_kv, DH, DH)
    f = qk.qk_closed_form(Gq, moment(K), r, eps=0.0)
    R = moment(X)
    Rh, Rih = eig_sqrt(R)
    for j in range(h_kv):
        idx = range(j * g, (j + 1) * g)
        M = torch.cat([Rh @ Wq[i] @ Wk[j].T @ Rh for i in idx])  # (g·d × d)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        brute = 0.0
        for b, i in enumerate(idx):
            W_paper = Rih @ U[b * D:(b + 1) * D, :r] @ (s[:r, None] * Vh[:r]) @ Rih
            W_ours = Wq[i] @ f.A[j] @ f.B[j].T @ Wk[j].T
            assert rel_fro(W_ours, W_paper) < 1e-8
            full = Q[i] @ K[j].T
            brute += float((full - (Q[i] @ f.A[j]) @ (K[j] @ f.B[j]).T).square().sum()) / L**2
        tail = float(s[r:].square().sum())
        assert abs(brute - tail) / float(f.total[j]) < 1e-9
        assert abs(float(f.loss[j]) - tail) / float(f.total[j]) < 1e-9


def test_qk_perturbations_never_help(X):
    gen = torch.Generator().manual_seed(5)
    Wq, Wk = head_weights(gen, 2)
    Gq, Gk = moment(X @ Wq), moment(X @ Wk)
    f = qk.qk_closed_form(Gq, Gk, 8, eps=0.0)
    best = qk_objective(Gq, Gk, f.A, f.B)
    assert torch.allclose(best, f.loss, rtol=1e-9, atol=0)
    for scale in (1e-3, 1e-1):
        for _ in range(20):
            dA = torch.randn(f.A.shape, generator=gen, dtype=F64) * scale * f.A.abs().mean()
            dB = torch.randn(f.B.shape, generator=gen, dtype=F64) * scale * f.B.abs().mean()
            assert bool((qk_objective(Gq, Gk, f.A + dA, f.B + dB) >= best * (1 - 1e-12)).all())


def test_qk_full_rank_is_exact_and_rank_checks(X):
    gen = torch.Generator().manual_seed(6)
    Wq, Wk = head_weights(gen, 2)
    Q, K = X @ Wq, X @ Wk
    f = qk.qk_closed_form(moment(Q), moment(K), DH)
    full = Q @ K.mT
    assert rel_fro((Q @ f.A) @ (K @ f.B).mT, full) < 1e-10
    assert float((f.loss / f.total).max()) < 1e-20
    for bad_r in (0, DH + 1, 2.5):
        with pytest.raises(BudgetError):
            qk.qk_closed_form(moment(Q), moment(K), bad_r)


# ----------------------------------------------------------------------------------------------------------
# RoPE pair selection (HF rotate_half layout)
# ----------------------------------------------------------------------------------------------------------
def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def rope(x, invf):
    """HF rotate_half RoPE. x [h, T, r]; invf [h, r/2] (or [r/2])."""
    pos = torch.arange(x.shape[-2], dtype=F64)
    ang = pos[:, None] * invf[..., None, :]  # [h, T, r/2]
    emb = torch.cat([ang, ang], -1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def test_rope_pair_scores_hand_example_and_selection():
    eq = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ek = torch.tensor([[5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(qk.rope_pair_scores(eq, ek), torch.tensor([[1 * 5 + 3 * 7, 2 * 6 + 4 * 8]], dtype=F64))
    # scores [3, 1, 3, 2] -> keep {0, 2}; ties resolved to the lower index; keep ascending
    eq = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0], [1.0] * 8])
    ek = torch.ones(2, 8)
    sel = qk.select_rope_pairs(eq, ek, 2)
    assert sel.keep.dtype == torch.long
    assert sel.keep.tolist() == [[0, 2], [0, 1]]
    assert sel.scores.shape == (2, 4)
    assert torch.allclose(sel.loss, torch.tensor([3.0, 4.0], dtype=F64))
    assert torch.allclose(sel.total, torch.tensor([9.0, 8.0], dtype=F64))
    sel3 = qk.select_rope_pairs(torch.tensor([[1.0, 9.0, 5.0, 7.0, 0.0, 0.0, 0.0, 0.0]]), torch.ones(1, 8), 3)
    assert sel3.keep.tolist() == [[1, 2, 3]]
    assert qk.pair_columns(torch.tensor([[1, 3]]), 8).tolist() == [[1, 3, 5, 7]]
    for bad in (0, 5):
        with pytest.raises(BudgetError):
            qk.select_rope_pairs(eq, ek, bad)


def test_selection_matrix_gathers_columns():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    cols = torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6]])
    E = qk.selection_matrix(cols, 8)
    assert E.shape == (2, 8, 4) and E.dtype == F64
    assert torch.equal(q @ E, torch.gather(q, 2, cols[:, None, :].expand(2, 5, 4)))


@pytest.fixture(scope="module")
def rope_setup():
    gen = torch.Generator().manual_seed(8)
    d, dh, h, T = 48, 16, 3, 64
    Xr = make_acts(1, T, d, gen, alpha=0.5)[0]
    Wq = torch.randn(h, d, dh, generator=gen, dtype=F64) / math.sqrt(d)
    Wk = torch.randn(h, d, dh, generator=gen, dtype=F64) / math.sqrt(d)
    inv_freq = 10000.0 ** (-torch.arange(0, dh, 2, dtype=F64) / dh)
    return Xr @ Wq, Xr @ Wk, inv_freq, dh


def test_rope_keep_all_pairs_is_exact(rope_setup):
    Q, K, inv_freq, dh = rope_setup
    gen = torch.Generator().manual_seed(9)
    sel = qk.select_rope_pairs(torch.rand(3, dh, generator=gen), torch.rand(3, dh, generator=gen), dh // 2)
    E = qk.selection_matrix(qk.pair_columns(sel.keep, dh), dh)
    invf = inv_freq[sel.keep]
    full = rope(Q, inv_freq) @ rope(K, inv_freq).mT
    red = rope(Q @ E, invf) @ rope(K @ E, invf).mT
    assert float((red - full).abs().max()) <= 1e-12 * float(full.abs().max())
    assert float(sel.loss.abs().max()) == 0.0


def test_rope_pair_subset_equals_zeroed_full_model(rope_setup):
    Q, K, inv_freq, dh = rope_setup
    n_pairs = 5
    sel = qk.select_rope_pairs(torch.diagonal(moment(Q), dim1=-2, dim2=-1),
                               torch.diagonal(moment(K), dim1=-2, dim2=-1), n_pairs)
    cols = qk.pair_columns(sel.keep, dh)
    E = qk.selection_matrix(cols, dh)
    mask = E.sum(-1)  # [h, d_h] 1 on kept dims
    ref = rope(Q * mask[:, None, :], inv_freq) @ rope(K * mask[:, None, :], inv_freq).mT
    red = rope(Q @ E, inv_freq[sel.keep]) @ rope(K @ E, inv_freq[sel.keep]).mT
    assert float((red - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    full = rope(Q, inv_freq) @ rope(K, inv_freq).mT
    assert rel_fro(red, full) > 1e-3  # it really dropped something

    # guard the layout: adjacent (2p, 2p+1) "pairs" in the HF layout do NOT reproduce the zeroed model
    adj = torch.sort(torch.cat([2 * sel.keep, 2 * sel.keep + 1], -1), -1).values  # [h, 2·n_pairs]
    E2 = qk.selection_matrix(adj, dh)
    m2 = E2.sum(-1)
    ref2 = rope(Q * m2[:, None, :], inv_freq) @ rope(K * m2[:, None, :], inv_freq).mT
    invf2 = inv_freq[adj[:, :n_pairs] % (dh // 2)]
    red2 = rope(Q @ E2, invf2) @ rope(K @ E2, invf2).mT
    assert rel_fro(red2, ref2) > 0.1


# ----------------------------------------------------------------------------------------------------------
# OV closed form
# ----------------------------------------------------------------------------------------------------------
def causal_softmax_attention(Xs, Wq, Wk):
    """Xs [n_seq, T, d]; Wq/Wk [h, d, d_h] -> A' [h, n_seq, T, T]."""
    q = torch.einsum("std,hde->hste", Xs, Wq)
    k = torch.einsum("std,hde->hste", Xs, Wk)
    z = q @ k.mT / math.sqrt(Wq.shape[-1])
    T = Xs.shape[1]
    z = z.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(z, -1)


def ov_objective(G, Wo, T, Wo_new):
    """Σ_i tr((W_o,i − T W̃_o,i)ᵀ G (W_o,i − T W̃_o,i))."""
    E = Wo - T[:, None] @ Wo_new  # [n, g, d_h, d]
    return torch.einsum("ngcd,nce,nged->n", E, G, E)


@pytest.fixture(scope="module")
def mha_ov(X):
    gen = torch.Generator().manual_seed(10)
    h = 3
    Xs = X.reshape(L_SEQ, T_SEQ, D)
    Wq_att = torch.randn(h, D, DH, generator=gen, dtype=F64) / math.sqrt(D) * 2.5
    Wk_att = torch.randn(h, D, DH, generator=gen, dtype=F64) / math.sqrt(D) * 2.5
    Attn = causal_softmax_attention(Xs, Wq_att, Wk_att)
    P = (Attn @ Xs).reshape(h, L, D)  # attention-weighted inputs per head
    Wv = torch.randn(h, D, DH, generator=gen, dtype=F64) / math.sqrt(D) * torch.linspace(2, 0.2, DH, dtype=F64)
    Wo = torch.randn(h, 1, DH, D, generator=gen, dtype=F64) / math.sqrt(DH)
    return P, Wv, Wo


@pytest.mark.parametrize("r", [12, 6])
def test_ov_mha_matches_brute_force_and_paper_formula(mha_ov, r):
    P, Wv, Wo = mha_ov
    out = P @ Wv  # per-head attention output (o_proj input) [h, L, d_h]
    f = ov.ov_closed_form(moment(out), Wo, r, eps=0.0)
    h = P.shape[0]
    assert f.T.shape == (h, DH, r) and f.Wo_new.shape == (h, 1, r, D) and f.sv.shape == (h, DH)
    Wvo = Wv @ Wo[:, 0]
    Wvo_new = Wv @ f.T @ f.Wo_new[:, 0]
    err = (P @ (Wvo - Wvo_new)).square().sum((1, 2)) / L
    tot = (P @ Wvo).square().sum((1, 2)) / L
    assert torch.allclose(f.total, tot, rtol=1e-10, atol=0)
    assert float(((err - f.loss).abs() / f.total).max()) < 1e-9
    assert float(((err - f.loss).abs() / f.loss).max()) < 1e-7
    assert float((f.loss / f.total).min()) > 1e-7
    # paper: W̃_vo = R_P^{-1/2} SVD_r(R_P^{1/2} W_vo)
    Rh, Rih = eig_sqrt(moment(P))
    U, s, Vh = torch.linalg.svd(Rh @ Wvo)
    W_paper = Rih @ (U[..., :r] * s[..., None, :r]) @ Vh[..., :r, :]
    assert rel_fro(Wvo_new, W_paper) < 1e-8
    assert torch.allclose(f.sv, s[..., :DH], rtol=1e-9, atol=1e-12 * float(s.max()))
    # optimality: perturbing the factors never helps
    G = moment(out)
    best = ov_objective(G, Wo, f.T, f.Wo_new)
    assert torch.allclose(best, f.loss, rtol=1e-9, atol=0)
    gen = torch.Generator().manual_seed(11)
    for scale in (1e-3, 1e-1):
        for _ in range(10):
            dT = torch.randn(f.T.shape, generator=gen, dtype=F64) * scale * f.T.abs().mean()
            dW = torch.randn(f.Wo_new.shape, generator=gen, dtype=F64) * scale * f.Wo_new.abs().mean()
            assert bool((ov_objective(G, Wo, f.T + dT, f.Wo_new + dW) >= best * (1 - 1e-12)).all())


@pytest.mark.parametrize("g", [1, 4])
def test_ov_full_rank_reconstructs_wo_exactly(g):
    gen = torch.Generator().manual_seed(12)
    n, d = 3, 40
    Wo = torch.randn(n, g, DH, d, generator=gen, dtype=F64)
    A = torch.randn(n, DH, DH, generator=gen, dtype=F64)
    for G in (A @ A.mT, A[..., :3] @ A[..., :3].mT):  # full rank and rank 3 (damped)
        f = ov.ov_closed_form(G, Wo, DH)
        rec = f.T[:, None] @ f.Wo_new
        assert float((rec - Wo).abs().max()) <= 1e-10 * float(Wo.abs().max())
        assert float((f.loss / f.total).max()) < 1e-20


def test_ov_gqa_joint_matches_horizontal_concat_svd(X):
    gen = torch.Generator().manual_seed(13)
    h_kv, g, r = 2, 3, 6
    Wv = torch.randn(h_kv, D, DH, generator=gen, dtype=F64) / math.sqrt(D) * torch.linspace(2, 0.2, DH, dtype=F64)
    Wo = torch.randn(h_kv, g, DH, D, generator=gen, dtype=F64) / math.sqrt(DH)
    V = X @ Wv
    f = ov.ov_closed_form(moment(V), Wo, r, eps=0.0)
    assert f.T.shape == (h_kv, DH, r) and f.Wo_new.shape == (h_kv, g, r, D)
    Rh, Rih = eig_sqrt(moment(X))
    for j in range(h_kv):
        M = torch.cat([Rh @ Wv[j] @ Wo[j, i] for i in range(g)], dim=1)  # d × g·d
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        Wv_paper = Rih @ U[:, :r] * s[:r]
        brute = 0.0
        for i in range(g):
            Wo_paper = Vh[:r, i * D:(i + 1) * D]
            ours = Wv[j] @ f.T[j] @ f.Wo_new[j, i]
            assert rel_fro(ours, Wv_paper @ Wo_paper) < 1e-8
            brute += float((X @ (Wv[j] @ Wo[j, i] - ours)).square().sum()) / L
        tail = float(s[r:].square().sum())
        assert abs(brute - tail) / float(f.total[j]) < 1e-9
        assert abs(float(f.loss[j]) - tail) / float(f.total[j]) < 1e-9


def test_ov_select_and_scores():
    gen = torch.Generator().manual_seed(14)
    n, g, dh, d, r = 2, 2, 8, 5, 3
    Wo = torch.randn(n, g, dh, d, generator=gen, dtype=F64)
    Wv = torch.randn(n, dh, d, generator=gen, dtype=F64)
    gv = torch.rand(n, dh, generator=gen, dtype=F64)
    wn = ov.ov_weight_norm_scores(Wv, Wo)
    wa = ov.ov_wanda_scores(gv, Wo)
    for j in range(n):
        for c in range(dh):
            o2 = sum(float(Wo[j, i, c].square().sum()) for i in range(g))
            assert math.isclose(float(wn[j, c]), float(Wv[j, c].square().sum()) * o2, rel_tol=1e-12)
            assert math.isclose(float(wa[j, c]), float(gv[j, c]) * o2, rel_tol=1e-12)
    scores = torch.tensor([[5.0, 1, 7, 0, 2, 9, 3, 4], [1.0, 1, 1, 1, 1, 1, 1, 1]])
    res = ov.ov_select(scores, Wo, r)
    assert res.keep.tolist() == [[0, 2, 5], [0, 1, 2]]
    assert res.T.shape == (n, dh, r) and res.Wo_new.shape == (n, g, r, d)
    for j in range(n):
        assert torch.equal(res.Wo_new[j], Wo[j][:, res.keep[j]])
        mask = torch.zeros(dh, dtype=F64)
        mask[res.keep[j]] = 1
        assert torch.equal(res.T[j] @ res.Wo_new[j], Wo[j] * mask[:, None])
    assert torch.allclose(res.loss, torch.tensor([10.0, 5.0], dtype=F64))
    assert torch.allclose(res.total, torch.tensor([31.0, 8.0], dtype=F64))
    with pytest.raises(BudgetError):
        ov.ov_select(scores, Wo, dh + 1)


# ----------------------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------------------
def test_mlp_a3_score_equals_paper_cur_score():
    gen = torch.Generator().manual_seed(15)
    d, d_int = 32, 64
    Xm = make_acts(2, 256, d, gen, alpha=0.5).reshape(-1, d)
    w_gate = torch.randn(d_int, d, generator=gen, dtype=F64) / math.sqrt(d)
    w_up = torch.randn(d_int, d, generator=gen, dtype=F64) / math.sqrt(d)
    w_down = torch.randn(d, d_int, generator=gen, dtype=F64) / math.sqrt(d_int) * torch.exp(
        0.7 * torch.randn(d_int, generator=gen, dtype=F64)
    )
    H = torch.nn.functional.silu(Xm @ w_gate.T) * (Xm @ w_up.T)
    R = moment(H)
    Rh, _ = eig_sqrt(R)
    paper = Rh.square().sum(0) * w_down.square().sum(0)  # ‖col_i(R^{1/2})‖²·‖W_down[:, i]‖²
    ours = mlp.mlp_scores("a3", H.square().mean(0), w_gate, w_up, w_down)
    assert ours.shape == (d_int,) and ours.dtype == F64
    assert float((ours - paper).abs().max()) <= 1e-10 * float(paper.max())
    assert torch.allclose(mlp.mlp_scores("rxx", H.square().mean(0).float(), None, None, None),
                          torch.diagonal(R), rtol=1e-6)


def test_mlp_methods_rank_constructed_example():
    h2 = torch.tensor([100.0, 1.0, 1.0, 0.01], dtype=F64)
    w_down = torch.tensor(
        [[0.1, 3.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=F64
    )  # columns: l2² = [0.01, 9, 4, 1], l1 = [0.1, 3, 4, 1]
    w_gate = torch.zeros(4, 3, dtype=F64)
    w_gate[3, 0] = 10.0
    w_up = torch.zeros(4, 3, dtype=F64)
    expected = {
        "a3": ([1.0, 9.0, 4.0, 0.01], [1, 2, 0, 3]),
        "rxx": ([100.0, 1.0, 1.0, 0.01], [0, 1, 2, 3]),
        "wanda": ([1.0, 3.0, 4.0, 0.1], [2, 1, 0, 3]),
        "weight-norm": ([0.01, 9.0, 4.0, 101.0], [3, 1, 2, 0]),
    }
    for method, (vals, order) in expected.items():
        s = mlp.mlp_scores(method, h2, w_gate, w_up, w_down)
        assert torch.allclose(s, torch.tensor(vals, dtype=F64), rtol=1e-12), method
        assert torch.sort(s, descending=True, stable=True).indices.tolist() == order, method
        assert mlp.select_neurons(s, 1).tolist() == [order[0]], method
    with pytest.raises(ValueError, match="a3, rxx, wanda, weight-norm"):
        mlp.mlp_scores("magnitude", h2, w_gate, w_up, w_down)


def test_select_neurons_and_dropped_fraction():
    s = torch.tensor([1.0, 5.0, 3.0, 5.0, 0.0])
    assert mlp.select_neurons(s, 2).tolist() == [1, 3]
    keep = mlp.select_neurons(s, 3)
    assert keep.dtype == torch.long and keep.tolist() == [1, 2, 3]
    assert math.isclose(mlp.dropped_fraction(s, keep), 1.0 / 14.0, rel_tol=1e-12)
    assert mlp.dropped_fraction(s, torch.arange(5)) == 0.0
    assert mlp.dropped_fraction(torch.zeros(3), torch.tensor([0])) == 0.0
    for bad in (0, 6):
        with pytest.raises(BudgetError):
            mlp.select_neurons(s, bad)


# ----------------------------------------------------------------------------------------------------------
# devices: the same results on CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_solvers_on_cuda_match_cpu(X):
    gen = torch.Generator().manual_seed(16)
    Wq, Wk = head_weights(gen, 4)
    Gq, Gk = moment(X @ Wq), moment(X @ Wk)
    Wo = torch.randn(4, 2, DH, D, generator=gen, dtype=F64)
    cpu_qk = qk.qk_closed_form(Gq, Gk, 8)
    cpu_ov = ov.ov_closed_form(Gq, Wo, 8)
    gpu_qk = qk.qk_closed_form(Gq.cuda().float(), Gk.cuda(), 8)
    gpu_ov = ov.ov_closed_form(Gq.cuda(), Wo.cuda().float().double(), 8)
    assert gpu_qk.A.is_cuda and gpu_ov.T.is_cuda and gpu_ov.T.dtype == F64
    P_cpu = cpu_qk.A @ cpu_qk.B.mT
    P_gpu = (gpu_qk.A @ gpu_qk.B.mT).cpu()
    assert rel_fro(P_gpu, P_cpu) < 1e-5  # Gq went through float32 on the GPU side
    assert rel_fro((gpu_ov.T[:, None] @ gpu_ov.Wo_new).cpu(), cpu_ov.T[:, None] @ cpu_ov.Wo_new) < 1e-8
    sel = qk.select_rope_pairs(torch.diagonal(Gq, dim1=-2, dim2=-1).cuda(),
                               torch.diagonal(Gk, dim1=-2, dim2=-1).cuda(), 4)
    assert sel.keep.is_cuda
    E = qk.selection_matrix(qk.pair_columns(sel.keep, DH), DH)
    assert E.is_cuda
    keep = mlp.select_neurons(torch.rand(32, device="cuda"), 8)
    assert keep.is_cuda
    res = ov.ov_select(torch.rand(4, DH, device="cuda"), Wo.cuda(), 8)
    assert res.Wo_new.is_cuda
