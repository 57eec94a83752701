"""Quality methods end to end: optional statistics, held-out fold, layer-by-layer calibration, recipes.

The pure solvers are tested against their definitions in test_solvers_quality.py; here we check that the
statistics fed to them are the right ones (from the real model's activations) and that every recipe
exports a working checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import a3_serve  # noqa: F401
from a3_serve.calibration.sequential import capture_first_layer_inputs, sequential_calibrate
from a3_serve.calibration.stats import HeldOut, StatsRequest, collect_stats
from a3_serve.export.architectures import inspect_architecture
from a3_serve.export.compress_layer import compressed_layer
from a3_serve.export.inmemory import compress_model
from a3_serve.export.methods import DEFAULT_RECIPE, RECIPES
from a3_serve.export.pipeline import ExportOptions, run_export
from a3_serve.export.report import compressed_config
from a3_serve.runtime import read_config
from a3_serve.solvers.budget import plan_dims

from conftest import assert_one_line_error


def _load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    arch = inspect_architecture(read_config(folder))
    return model, arch


def _batches(n: int = 4, b: int = 2, t: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 5000, (n * b, t), generator=g).split(b))


@pytest.mark.parametrize("kind", ["llama3-gqa", "llama2-mha"])
def test_rope_energy_statistics_match_the_models_own_rope(kind, random_models):
    """E_rope / E_rope_c from the hooks equal Σ over sequences, query heads of a group and (m, t) pairs of the
    squared per-pair contribution to q_rot·k_rot, computed from the model's own apply_rotary_pos_emb."""
    model, arch = _load(random_models[kind])
    batches = _batches(n=2)
    st = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                       request=StatsRequest(rope_energy=True))[1]

    layer = model.model.layers[1].self_attn
    seen = {}
    hooks = [layer.q_proj.register_forward_hook(lambda m, a, o: seen.setdefault("q", []).append(o)),
             layer.k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", []).append(o))]
    with torch.no_grad():
        for b in batches:
            model.model(input_ids=b)
    for h in hooks:
        h.remove()
    hq, hkv, dh, P = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.head_dim // 2
    g = hq // hkv
    full = torch.zeros(hkv, P, dtype=torch.float64)
    causal = torch.zeros(hkv, P, dtype=torch.float64)
    n_tok = 0
    for q, k, ids in zip(seen["q"], seen["k"], batches):
        B, T = ids.shape
        n_tok += B * T
        q = q.double().view(B, T, hq, dh).transpose(1, 2)
        k = k.double().view(B, T, hkv, dh).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, torch.arange(T)[None])
        qr, kr = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for p in range(P):
            cols = [p, p + P]
            # [B, hq, T, T]
            s = torch.einsum("bhmc,bhtc->bhmt", qr[..., cols], kr[..., cols].repeat_interleave(g, dim=1))
            e = s.square()
            full[:, p] += e.sum(dim=(0, 2, 3)).view(hkv, g).sum(1)
            causal[:, p] += (e * mask).sum(dim=(0, 2, 3)).view(hkv, g).sum(1)
    # the model's cos/sin are float32, ours float64: 1e-6 relative (a wrong frequency or pairing is off by >1e-2)
    torch.testing.assert_close(st.E_rope, full / n_tok, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.E_rope_c, causal / n_tok, rtol=1e-6, atol=0)


def test_heldout_folds_partition_the_tokens(random_models):
    """Per-fold statistics are exactly those of the fold's tokens (here: whole batches, and one fold's tokens
    scattered inside batches); merged they are the plain statistics, and every held-out pair is (the other folds,
    that fold)."""
    model, arch = _load(random_models["llama3-gqa"])
    batches = _batches(n=6)
    B, T = batches[0].shape
    args = (model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    req = StatsRequest(mlp_moment=True, heldout=True, rope_energy=True)
    plain = collect_stats(*args, request=StatsRequest(mlp_moment=True, rope_energy=True))
    whole = [torch.full((B, T), f) for f in (0, 0, 1, 2, 1, 2)]
    folded = collect_stats(*args, request=req, heldout=HeldOut(whole))
    one_fold = collect_stats(*args, request=req, heldout=HeldOut([torch.zeros(B, T, dtype=torch.long)] * 6))
    unasked = collect_stats(*args, request=StatsRequest(mlp_moment=True), heldout=HeldOut(whole))
    last_only = collect_stats(*args, request=req, heldout=HeldOut(whole, cross_validate=False))
    per_fold = [collect_stats(model, [b for b, f in zip(batches, (0, 0, 1, 2, 1, 2)) if f == k], *args[2:],
                              request=StatsRequest(mlp_moment=True)) for k in range(3)]
    rest_of_1 = collect_stats(model, [b for b, f in zip(batches, (0, 0, 1, 2, 1, 2)) if f != 1], *args[2:],
                              request=StatsRequest(mlp_moment=True))
    # the last token of every sequence in fold 1, the rest in fold 0: fold 1 = exactly those tokens' rows
    last = torch.zeros(B, T, dtype=torch.long)
    last[:, -1] = 1
    scattered = collect_stats(*args, request=req, heldout=HeldOut([last] * 6))
    last_h = [[] for _ in model.model.layers]  # the down_proj inputs of the last tokens, per layer
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, a, i=i: last_h[i].append(a[0][:, -1].to(torch.float64)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model.model(input_ids=b, use_cache=False)
    for h_ in handles:
        h_.remove()
    for i, (p, f) in enumerate(zip(plain, folded)):
        assert one_fold[i].folds is None and unasked[i].folds is None  # one fold, or not asked: no held-out stats
        assert f.n_tokens == p.n_tokens and [s.n_tokens for s in f.folds] == [2 * B * T] * 3
        pairs = list(f.held_out_pairs())
        assert len(pairs) == 3 and pairs[1][1] is f.folds[1] and pairs[1][0].n_tokens == 4 * B * T
        only = list(last_only[i].held_out_pairs())  # without cross-validation: the last fold, fitted on the others
        assert len(only) == 1 and only[0][1] is last_only[i].folds[2] and only[0][0].n_tokens == 4 * B * T
        for name in ("Gq", "Go", "Gv", "h2", "H", "E_rope", "E_rope_c"):
            torch.testing.assert_close(getattr(f, name), getattr(p, name), rtol=1e-10, atol=1e-12)
            if name in ("H", "Gq", "Go", "Gv"):  # a batch's products are float32 (calibration.stats): a fold that
                # splits a batch rounds differently
                assert (getattr(scattered[i], name) - getattr(p, name)).norm() <= 1e-6 * getattr(p, name).norm()
            else:
                torch.testing.assert_close(getattr(scattered[i], name), getattr(p, name), rtol=1e-10, atol=1e-12)
        for name in ("Gq", "Go", "Gv", "h2", "H"):
            for k in range(3):
                torch.testing.assert_close(getattr(f.folds[k], name), getattr(per_fold[k][i], name), rtol=1e-10,
                                           atol=1e-12)
            torch.testing.assert_close(getattr(pairs[1][0], name), getattr(rest_of_1[i], name), rtol=1e-10,
                                       atol=1e-12)
        assert f.folds[0].E_rope is None  # pair energies are not split by token
        assert [s.n_tokens for s in scattered[i].folds] == [6 * B * (T - 1), 6 * B]
        h_last = torch.cat(last_h[i])  # [6·B, d_int]
        h_ref = h_last.T @ h_last / h_last.shape[0]
        assert (scattered[i].folds[1].H - h_ref).norm() <= 1e-6 * h_ref.norm()
        torch.testing.assert_close(torch.diagonal(p.H), p.h2, rtol=1e-6, atol=1e-12)  # H's diagonal is E[h²]


def test_sequential_original_statistics_equal_the_whole_model_pass(random_models):
    model, arch = _load(random_models["qwen2-bias"])
    batches = _batches()
    ref = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim)
    got = {}
    sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                         lambda i, st: got.setdefault(i, st) and None, mode="original")
    assert sorted(got) == list(range(arch.num_layers))
    for i, r in enumerate(ref):
        for name in ("Gq", "Gk", "Gv", "Go", "x2", "h2"):
            torch.testing.assert_close(getattr(got[i], name), getattr(r, name), rtol=1e-6, atol=1e-9)
    hidden, kwargs = capture_first_layer_inputs(model, batches[:1])
    assert hidden[0].shape == (2, 24, arch.hidden_size) and "position_embeddings" in kwargs[0]


def test_propagated_statistics_follow_the_compressed_layers(random_models):
    """Layer 0 is solved identically in both modes; layer 1's statistics are those of the dense layer 1 fed
    by the COMPRESSED layer 0 (checked on E[v vᵀ] against an explicit computation)."""
    model, arch = _load(random_models["llama3-gqa"])
    plan = plan_dims(arch, 0.3)
    cfg = compressed_config(read_config(random_models["llama3-gqa"]), arch, plan, {}, torch.float32)
    batches = _batches()
    dims = (plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size)
    methods = RECIPES["paper"][0]
    orig, _ = compress_model(model, None, arch, *dims, methods, batches=batches, stats_mode="original")
    prop, _ = compress_model(model, None, arch, *dims, methods, batches=batches, stats_mode="propagated", a3_config=cfg)
    for k in (k for k in orig if k.startswith("model.layers.0.")):
        torch.testing.assert_close(prop[k], orig[k])
    l1 = [k for k in orig if k.startswith("model.layers.1.") and orig[k].is_floating_point() and "layernorm" not in k]
    assert any((prop[k] - orig[k]).abs().max() > 1e-4 for k in l1)

    hkv, dh = arch.num_kv_heads, arch.head_dim
    comp0, dense1 = compressed_layer(model.model.layers[0], cfg, 0, prop), model.model.layers[1]
    hidden, kwargs = capture_first_layer_inputs(model, batches)
    with torch.no_grad():
        V = torch.cat([dense1.self_attn.v_proj(dense1.input_layernorm(comp0(x, **kw))).double().reshape(-1, hkv, dh)
                       for x, kw in zip(hidden, kwargs)])
    Gv_ref = torch.einsum("njc,njd->jcd", V, V) / V.shape[0]
    seen, dense_seen = {}, {}
    sequential_calibrate(model, batches, arch.num_heads, hkv, dh,
                         lambda i, st: (seen.__setitem__(i, st),
                                        compressed_layer(model.model.layers[i], cfg, i, prop))[1],
                         mode="propagated")
    sequential_calibrate(model, batches, arch.num_heads, hkv, dh, lambda i, st: dense_seen.__setitem__(i, st),
                         mode="original")
    # each batch's moment is a float32 product (stats.batch_dtype), summed in float64: equal in norm to 1e-6
    assert (seen[1].Gv - Gv_ref).norm() <= 1e-6 * Gv_ref.norm()
    assert (seen[1].Gv - dense_seen[1].Gv).abs().max() > 1e-4
    torch.testing.assert_close(seen[0].Gv, dense_seen[0].Gv)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in ("wanda", "weight-norm")])
def test_every_recipe_exports_a_working_checkpoint(recipe, random_models, tmp_path):
    src = random_models["llama3-gqa"]
    out = tmp_path / recipe
    methods = RECIPES[recipe][0]
    rep = run_export(ExportOptions(model=src, out=out, cr=0.3, nsamples=16, seqlen=32, batch_size=2, device="cpu",
                                   dtype="float32", methods=methods, recipe=recipe), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["a3"]["recipe"] == recipe and cfg["a3"]["methods"] == methods.as_dict() and rep["recipe"] == recipe
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.isfinite(model(input_ids=_batches(n=1, b=1)[0]).logits).all()
    layer = rep["layers"][1]
    if methods.ov == "a3-shrink":  # 16 samples / batch 2 = 8 batches: one held-out batch chose β per value head
        assert len(layer["ov"]["shrinkage"]) == arch_kv(src) and all(0 <= b <= 1 for b in layer["ov"]["shrinkage"])
    if methods.mlp in ("a3-refit", "greedy-refit"):
        assert layer["mlp"]["refit_gain"] >= 1.0 and (layer["mlp"]["ridge"] is None or layer["mlp"]["ridge"] > 0)


def arch_kv(folder: Path) -> int:
    return inspect_architecture(read_config(folder)).num_kv_heads


def test_refit_lowers_the_real_mlp_output_error(demo_model):
    """On SmolLM2's real activations, the least-squares refit of down_proj lowers the MLP output error on
    calibration batches it was NOT fitted on (the ridge is chosen by cross-validation over held-out folds)."""
    from transformers import AutoTokenizer

    from a3_serve.calibration.sources import load_texts, sample_calibration
    from a3_serve.export.compress_layer import layer_tensors, solve_mlp
    from a3_serve.solvers.mlp import mlp_objective, mlp_scores, select_neurons

    model, arch = _load(demo_model)
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    model.model.layers = model.model.layers[:4]
    ids = sample_calibration(tok, load_texts("wiki"), 80, 256, 0)
    fit = collect_stats(model, list(ids[:64].split(4)), arch.num_heads, arch.num_kv_heads, arch.head_dim,
                        request=StatsRequest(mlp_moment=True, heldout=True),
                        heldout=HeldOut([torch.full((4, 256), b % 3) for b in range(16)]))
    test = collect_stats(model, list(ids[64:].split(4)), arch.num_heads, arch.num_kv_heads, arch.head_dim,
                         request=StatsRequest(mlp_moment=True))
    for i in (1, 3):
        w = layer_tensors(model.model.layers[i])
        plain, _ = solve_mlp(w, fit[i], 1200, "a3")
        refit, rep = solve_mlp(w, fit[i], 1200, "a3-refit")
        assert torch.equal(plain["gate_w"], refit["gate_w"])  # same neurons, only down_proj is refitted
        sel = select_neurons(mlp_scores("a3", fit[i].h2, None, None, w["down_w"]), 1200)
        torch.testing.assert_close(plain["down_w"], w["down_w"][:, sel])
        e_plain = mlp_objective(test[i].H, w["down_w"], sel, plain["down_w"])
        e_refit = mlp_objective(test[i].H, w["down_w"], sel, refit["down_w"])
        assert e_refit < 0.9 * e_plain, (i, e_plain, e_refit, rep)


def test_float32_batch_moments_leave_the_solution_unchanged(demo_model, monkeypatch):
    """Every second moment sums each batch's products in float32 before the float64 sum (calibration.stats): on
    SmolLM2's real activations each moment (H, Gq, Gk, Gv, Go) matches the all-float64 sum to 1e-6 relative in
    norm and x2 / h2 / inv_ms to 2^-23 (one float32 rounding per square); the default recipe's whole layer solve
    makes the same discrete choices (QK pairs, OV shrinkage, MLP neurons and ridge), with weights equal to 1e-5
    relative, 5e-5 for the OV factors (measured on 3 layers: moments 0.3-2.7e-7, down_proj 0.6-1.3e-7, o_proj
    2.5-6.7e-7, v_proj 0.6-4.6e-6; q/k/gate/up identical)."""
    from transformers import AutoTokenizer

    from a3_serve.calibration import stats as calibration_stats
    from a3_serve.calibration.sources import load_texts, sample_calibration
    from a3_serve.export.compress_layer import layer_tensors, solve_layer

    model, arch = _load(demo_model)
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    model.model.layers = model.model.layers[:3]
    ids = sample_calibration(tok, load_texts("wiki"), 32, 512, 0)
    methods = RECIPES[DEFAULT_RECIPE][0]
    run = dict(request=methods.stats_request(),
               heldout=HeldOut([torch.full((4, 512), int(b == 7)) for b in range(8)], cross_validate=False))
    assert calibration_stats.OUTER_BATCH_DTYPE == torch.float32 and run["request"].mlp_moment
    f32 = collect_stats(model, list(ids.split(4)), arch.num_heads, arch.num_kv_heads, arch.head_dim, **run)
    monkeypatch.setattr(calibration_stats, "OUTER_BATCH_DTYPE", torch.float64)
    f64 = collect_stats(model, list(ids.split(4)), arch.num_heads, arch.num_kv_heads, arch.head_dim, **run)
    for i in range(3):
        for name in ("H", "Gq", "Gk", "Gv", "Go"):
            a, b = getattr(f32[i], name), getattr(f64[i], name)
            assert (a - b).norm() <= 1e-6 * b.norm(), (i, name)
            assert not torch.equal(a, b), (i, name)  # the float32 path really ran
        for name in ("x2", "h2", "inv_ms_attn", "inv_ms_mlp"):  # sums of positive terms, each square rounded once
            torch.testing.assert_close(getattr(f32[i], name), getattr(f64[i], name), rtol=2.0**-23, atol=0)
        w = layer_tensors(model.model.layers[i])
        (a, ia, ra), (b, ib, rb) = (solve_layer(w, st[i], arch, 48, 48, 1200, methods) for st in (f32, f64))
        assert torch.equal(ia, ib)  # same RoPE pairs kept
        assert ra["mlp"]["ridge"] == rb["mlp"]["ridge"] and torch.equal(a["gate_w"], b["gate_w"])  # same neurons
        assert ra["ov"]["shrinkage"] == rb["ov"]["shrinkage"]  # same OV shrinkage per value head
        for k, v in a.items():  # the OV factors may turn within nearly equal singular values: a looser bound
            if v is not None and v.is_floating_point():
                assert (v - b[k]).norm() <= (5e-5 if k in ("v_w", "o_w") else 1e-5) * b[k].norm(), (i, k)


def test_default_recipe_and_cli_record_it(random_models, tmp_path, capsys):
    from a3_serve.export.cli import main

    assert (DEFAULT_RECIPE in RECIPES
            and ExportOptions(model=Path("m"), out=Path("o"), cr=0.1).methods == RECIPES[DEFAULT_RECIPE][0])
    src = random_models["llama2-mha"]
    runs = ((["--recipe", "paper"], "paper", "original"),
            (["--recipe", "paper", "--mlp-method", "rxx"], "custom", "original"),
            (["--stats", "propagated"], DEFAULT_RECIPE, "propagated"))
    for args, recipe, stats in runs:
        out = tmp_path / f"{recipe}-{stats}"
        rc = main(["--model", str(src), "--cr", "0.2", "--out", str(out), "--nsamples", "8", "--seqlen", "32",
                   "--batch-size", "1", "--quiet", *args])
        assert rc == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["a3"]["recipe"] == recipe and cfg["a3"]["calibration"]["statistics"] == stats
        if recipe == "custom":
            assert cfg["a3"]["methods"] == {"qk": "a3", "ov": "a3", "mlp": "rxx"}
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert torch.isfinite(model(input_ids=_batches(n=1, b=1)[0]).logits).all()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(src), "--cr", "0.2", "--out", str(tmp_path / "x"), "--stats", "sideways"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    assert_one_line_error(2, capsys.readouterr().err, "--stats")


def test_per_layer_dims_export_and_load(random_models, tmp_path):
    """Explicit per-layer sizes (what a loss-aware allocation produces) reach config.json as lists, every layer's
    tensors have its own shapes, the checkpoint loads through the Auto classes, and equal per-layer sizes give
    exactly the uniform export."""
    from safetensors.torch import load_file

    src = random_models["llama3-gqa"]
    common = dict(model=src, cr=0.3, nsamples=4, seqlen=32, batch_size=2, device="cpu", dtype="float32",
                  methods=RECIPES["paper"][0], recipe="paper")
    mixed = ((64, 64, 300), (32, 32, 512))
    rep = run_export(ExportOptions(out=tmp_path / "mixed", layer_dims=mixed, **common), progress=False)
    cfg = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert cfg["layer_qk_head_dims"] == [64, 32] and cfg["layer_v_head_dims"] == [64, 32]
    assert cfg["layer_intermediate_sizes"] == [300, 512] and rep["summary"]["layer_dims"] == [list(t) for t in mixed]
    shape = inspect_architecture(read_config(src))
    assert rep["summary"]["linear_params_after"] == sum(shape.layer_linear_params(*t) for t in mixed)
    assert rep["summary"]["kv_bytes_per_token_after"] == shape.num_kv_heads * (128 + 64) * 4  # float32 checkpoint
    t = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    assert (t["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2 * 64
            and t["model.layers.1.self_attn.k_proj.weight"].shape[0] == 2 * 32)
    assert (t["model.layers.0.mlp.down_proj.weight"].shape[1] == 300
            and t["model.layers.1.self_attn.rope_freq_index"].shape == (2, 16))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mixed"), dtype=torch.float32)
    assert torch.isfinite(model(input_ids=_batches(n=1, b=1)[0]).logits).all()

    run_export(ExportOptions(out=tmp_path / "same", layer_dims=((48, 48, 400),) * 2, **common), progress=False)
    run_export(ExportOptions(out=tmp_path / "uniform", **common), progress=False)
    ucfg = json.loads((tmp_path / "uniform" / "config.json").read_text())
    # uniform plan, CR 0.3
    assert (ucfg["qk_head_dim"], ucfg["intermediate_size"], ucfg["layer_qk_head_dims"]) == (32, 409, None)
    same = load_file(str(tmp_path / "same" / "model.safetensors"))
    assert json.loads((tmp_path / "same" / "config.json").read_text())["layer_qk_head_dims"] is None
    assert same["model.layers.1.self_attn.q_proj.weight"].shape == (4 * 48, 256)
