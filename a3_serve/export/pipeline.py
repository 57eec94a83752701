"""The export pipeline: load → calibrate → solve layer by layer → write (atomically).

Everything a user can get wrong is checked before the expensive steps (model load, calibration), in
this order: options, source folder and architecture, dimension budget, destination, calibration text.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import a3_serve
from a3_serve.calibration.stats import CompactStatsList, StatsRequest, collect_stats
from a3_serve.export.allocation import allocate_plan, one_pass_allocation
from a3_serve.export.sequential import sequential_calibrate
from a3_serve.errors import InputError, NumericalError
from a3_serve.export.architectures import SourceArch, inspect_architecture
from a3_serve.export.card import render_model_card
from a3_serve.export.recipes import DEFAULT_RECIPE, RECIPES
from a3_serve.export.sequential import MODES as STATS_MODES
from a3_serve.export.solve import ALLOCATIONS, LAYER_TENSORS, MLP_METHODS, OV_METHODS, PROJECTIONS, QK_METHODS, Methods, layer_tensors, solve_layer
from a3_serve.export.writer import check_destination, parse_size, write_checkpoint
from a3_serve.runtime import DTYPES, dtype_name, read_config, resolve_device, resolve_dtype
from a3_serve.solvers.budget import DimPlan, ModelShape, plan_dims, plan_per_layer
from a3_serve.solvers.linalg import all_finite

log = logging.getLogger("a3_serve.export")

FORMAT_VERSION = 1
COMPONENTS = ("qk", "ov", "mlp")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportOptions:
    """Everything `a3-export` takes; see `a3-export --help` for the meaning of each field."""

    model: Path
    out: Path
    cr: float
    calib: str = "mix"
    calib_split: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "auto"
    head_multiple: int = 16
    components: tuple[str, ...] = COMPONENTS
    methods: Methods = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE][0])
    recipe: str | None = DEFAULT_RECIPE  # the named recipe the methods came from (None: hand-picked)
    damp: float = 1e-6
    overwrite: bool = False
    eval_data: str = "wiki:heldout"
    eval_tokens: int = 0
    eval_seqlen: int = 512
    layer_dims: tuple | None = None  # Python API: explicit per-layer (r_qk, r_vo, r_int), overriding cr
    stats: str = "original"  # "original" (the paper) or "propagated" (through the compressed earlier layers)
    verify: bool = True  # load the written folder and run a forward pass before it is renamed into place
    allow_zero_cr: bool = False  # Python API only: CR 0 runs the whole pipeline without removing anything
    stream: bool = True  # layer by layer from the safetensors files (False: load the whole model, the reference path)
    resume: bool = True  # continue an interrupted streamed export with the same arguments
    dry_run: bool = False  # validate and print the plan and the estimated cost; compute nothing
    max_shard_size: str = "5GB"  # safetensors shard limit, as transformers' save_pretrained


def validate_options(opts: ExportOptions) -> None:
    """One-line errors for option values that can never work."""
    lo_ok = opts.cr >= 0 if (opts.allow_zero_cr or opts.layer_dims is not None) else opts.cr > 0
    if not (lo_ok and opts.cr < 1):
        raise InputError(
            f"--cr must be between 0 and 1 (exclusive), got {opts.cr:g}; e.g. --cr 0.1 removes 10% of the decoder's linear-layer parameters"
        )
    if opts.nsamples < 1 or opts.seqlen < 2:
        raise InputError(f"--nsamples ({opts.nsamples}) must be >= 1 and --seqlen ({opts.seqlen}) >= 2; e.g. --nsamples 64 --seqlen 512")
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.head_multiple < 2 or opts.head_multiple % 2:
        raise InputError(
            f"--head-multiple must be an even number >= 2 (RoPE dims come in pairs), got {opts.head_multiple}; use 16 for vLLM on CPU, 8 for GPU"
        )
    bad = [c for c in opts.components if c not in COMPONENTS]
    if bad or not opts.components:
        raise InputError(f"--components takes a comma-separated subset of qk,ov,mlp, got {','.join(opts.components) or 'nothing'}")
    for comp, table, value in (("qk", QK_METHODS, opts.methods.qk), ("ov", OV_METHODS, opts.methods.ov), ("mlp", MLP_METHODS, opts.methods.mlp)):
        if value not in table:
            raise InputError(f"--{comp}-method {value!r} is unknown; choose one of {', '.join(table)}")
    if opts.methods.allocation not in ALLOCATIONS:
        raise InputError(f"--allocation {opts.methods.allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}")
    if opts.save_dtype != "auto" and opts.save_dtype not in SAVE_DTYPES:
        raise InputError(f"--save-dtype {opts.save_dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    if opts.eval_tokens < 0:
        raise InputError(f"--eval-tokens must be >= 0, got {opts.eval_tokens}")
    if opts.stats not in STATS_MODES:
        raise InputError(f"--stats {opts.stats!r} is unknown; use original (the paper) or propagated")
    parse_size(opts.max_shard_size)
    if opts.damp <= 0:
        raise InputError(f"--damp must be > 0, got {opts.damp:g}; the default 1e-6 is a good start")


def model_shape(arch: SourceArch) -> ModelShape:
    return ModelShape(
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size,
    )


def _check_weights_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not all_finite(p):
            raise NumericalError(
                f"source weight {name} contains NaN or Inf; the checkpoint is corrupt: re-download or re-convert it"
            )


def _compressed_config(src_cfg: dict[str, Any], arch: SourceArch, plan: DimPlan, a3_block: dict[str, Any], save_dtype: torch.dtype) -> dict[str, Any]:
    cfg = dict(src_cfg)
    for key in ("auto_map", "quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(
        model_type="a3_llama",
        architectures=["A3LlamaForCausalLM"],
        head_dim=arch.head_dim,
        qk_head_dim=plan.qk_head_dim,
        v_head_dim=plan.v_head_dim,
        intermediate_size=plan.intermediate_size,
        layer_qk_head_dims=[t[0] for t in plan.layers] if plan.layers else None,
        layer_v_head_dims=[t[1] for t in plan.layers] if plan.layers else None,
        layer_intermediate_sizes=[t[2] for t in plan.layers] if plan.layers else None,
        num_key_value_heads=arch.num_kv_heads,
        qkv_bias=arch.qkv_bias,
        o_bias=arch.o_bias,
        mlp_bias=arch.mlp_bias,
        sliding_window=None,
        dtype=dtype_name(save_dtype),
        a3=a3_block,
        auto_map={
            "AutoConfig": "configuration_a3_llama.A3LlamaConfig",
            "AutoModelForCausalLM": "modeling_a3_llama.A3LlamaForCausalLM",
        },
    )
    cfg.pop("torch_dtype", None)
    for key in ("use_sliding_window", "max_window_layers", "layer_types"):  # Qwen2: checked to be all full attention
        cfg.pop(key, None)
    return cfg


def _count_params(state: dict[str, torch.Tensor], tied: bool) -> int:
    return sum(t.numel() for k, t in state.items() if not (tied and k == "lm_head.weight") and not k.endswith("rope_freq_index"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _solve_layer_into(
    new_state: dict[str, torch.Tensor], layer: torch.nn.Module, i: int, st, arch: SourceArch,
    r_qk: int, r_vo: int, r_int: int, methods: Methods, damp: float,
) -> dict[str, Any]:
    """Solve decoder layer ``i`` and put its compressed tensors into ``new_state`` (checkpoint names)."""
    tl = time.perf_counter()
    new, rope_index, rep = solve_layer(layer_tensors(layer), st, arch, r_qk, r_vo, r_int, methods, damp)
    prefix = f"model.layers.{i}."
    for key in LAYER_TENSORS:
        t = new[key]
        if t is None:
            continue
        if not all_finite(t):
            raise NumericalError(f"layer {i}: solved {key} contains NaN/Inf; raise --damp (e.g. 1e-4) or use more calibration text")
        base, kind = key.split("_")
        new_state[prefix + PROJECTIONS[base] + (".weight" if kind == "w" else ".bias")] = t
    new_state[prefix + "self_attn.rope_freq_index"] = rope_index
    rep["layer"] = i
    rep["seconds"] = round(time.perf_counter() - tl, 4)
    return rep


def _a3_layer(model: torch.nn.Module, a3_config: dict[str, Any], i: int, new_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The compressed decoder layer ``i`` as a module (for propagating calibration activations)."""
    from a3_serve.modeling import A3LlamaConfig
    from a3_serve.modeling.modeling_a3_llama import A3LlamaDecoderLayer

    cfg = A3LlamaConfig.from_dict(a3_config)
    cfg._attn_implementation = model.config._attn_implementation
    dense = model.model.layers[i]
    p = next(dense.parameters())
    layer = A3LlamaDecoderLayer(cfg, i).to(device=p.device, dtype=p.dtype).eval()
    prefix = f"model.layers.{i}."
    sd = {k[len(prefix):]: v for k, v in new_state.items() if k.startswith(prefix)}
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        sd[name] = dense.get_submodule(name.rsplit(".", 1)[0]).weight
    layer.load_state_dict(sd, strict=True)
    return layer


def compress_model(
    model: torch.nn.Module,
    stats: list | None,
    arch: SourceArch,
    r_qk: int | Sequence[int],
    r_vo: int | Sequence[int],
    r_int: int | Sequence[int],
    methods: Methods,
    damp: float = 1e-6,
    progress: bool = False,
    batches: list[torch.Tensor] | None = None,
    stats_mode: str = "original",
    a3_config: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Solve every layer of a loaded dense model; returns (compressed state dict, per-layer reports).

    ``r_qk``/``r_vo``/``r_int`` are one size for every layer or one per layer.
    With ``stats`` (one LayerStats per layer, from :func:`collect_stats`), every layer is solved from those
    original-model statistics. With ``stats=None``, ``batches`` of calibration tokens are run layer by layer
    (:mod:`a3_serve.export.sequential`) in ``stats_mode`` ``"original"`` or ``"propagated"`` (the latter needs
    ``a3_config``, the compressed config dict, to build each compressed layer).

    The state dict uses the checkpoint's tensor names (embeddings, norms and an untied lm_head are
    carried over unchanged; a tied lm_head is left out). The dense model is not modified, so several
    recipes can be solved from one set of statistics.
    """
    from a3_serve.progress import progress_bar

    new_state: dict[str, torch.Tensor] = {}
    reports = []
    layers = model.model.layers
    per_layer = [r if isinstance(r, (list, tuple)) else [r] * len(layers) for r in (r_qk, r_vo, r_int)]
    dims_of = lambda i: (per_layer[0][i], per_layer[1][i], per_layer[2][i])  # noqa: E731
    desc = "solving" if stats is not None else f"calibrating + solving ({stats_mode} statistics)"
    with progress_bar(total=arch.num_layers, desc=desc, unit="layer", force=None if progress else False) as bar:
        if stats is not None:
            for i, layer in enumerate(layers):
                reports.append(_solve_layer_into(new_state, layer, i, stats[i], arch, *dims_of(i), methods, damp))
                bar.update(1)
        else:
            if batches is None:
                raise ValueError("compress_model needs either stats or calibration batches")
            if stats_mode == "propagated" and a3_config is None:
                raise ValueError("propagated statistics need the compressed config (a3_config)")

            def solve_fn(i: int, st) -> torch.nn.Module | None:
                reports.append(_solve_layer_into(new_state, layers[i], i, st, arch, *dims_of(i), methods, damp))
                return _a3_layer(model, a3_config, i, new_state) if stats_mode == "propagated" else None

            sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, solve_fn,
                                 mode=stats_mode, request=methods.stats_request(), progress=bar.update)
    for k, v in model.state_dict().items():  # embeddings, norms, lm_head
        if ".self_attn." in k or ".mlp." in k:
            continue
        if arch.tie_word_embeddings and k == "lm_head.weight":
            continue
        new_state[k] = v
    return new_state, reports


def build_a3_model(config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An in-memory A3LlamaForCausalLM from a compressed config dict and state dict (for quality checks)."""
    from a3_serve.modeling import A3LlamaConfig, A3LlamaForCausalLM

    cfg = A3LlamaConfig.from_dict(config)
    model = A3LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"compressed state does not match the A3 model: missing={missing[:5]} unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def run_export(opts: ExportOptions, progress: bool = True) -> dict[str, Any]:
    """Run the whole export; returns the report (also written as a3_report.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from a3_serve.calibration.sources import calibration_windows, describe_source, sources_overlap
    from a3_serve.modeling import modeling_source_files
    from a3_serve.progress import progress_bar

    t_start = time.perf_counter()
    validate_options(opts)
    src_cfg = read_config(opts.model)
    arch = inspect_architecture(src_cfg)
    shape = model_shape(arch)
    if opts.layer_dims is not None:
        plan = plan_per_layer(shape, opts.layer_dims, head_multiple=opts.head_multiple)
    else:
        plan = plan_dims(shape, opts.cr, components=tuple(opts.components), head_multiple=opts.head_multiple)
    check_destination(Path(opts.out), opts.overwrite, Path(opts.model))
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    log.info(
        "%s (%s, %d layers, %d/%d heads of %d, MLP %d) -> heads %d/%d, MLP %d (target CR %.3f, achieved %.4f)",
        opts.model, arch.model_type, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim,
        arch.intermediate_size, plan.qk_head_dim, plan.v_head_dim, plan.intermediate_size, opts.cr, plan.achieved_cr,
    )
    if opts.methods.allocation == "loss" and opts.layer_dims is None:
        log.info("those are the uniform dims; the loss-aware allocation replaces them with per-layer dims after calibration")

    # calibration text -> tokens (fails fast on too little text, before loading the model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(opts.model))
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is a broken folder for the user
        raise InputError(f"cannot load the tokenizer of {str(opts.model)!r} ({type(err).__name__}); the folder needs tokenizer files") from None
    tokens = calibration_windows(tokenizer, opts.calib, opts.calib_split, opts.nsamples, opts.seqlen, opts.seed)
    calib_desc = describe_source(opts.calib, opts.calib_split)
    if opts.eval_tokens and sources_overlap(opts.calib, opts.calib_split, opts.eval_data, None):
        raise InputError(f"--eval-data {opts.eval_data} is the calibration text; evaluate on held-out text such as wiki:heldout")

    if opts.dry_run:
        from a3_serve.export.dryrun import dry_run_report

        return dry_run_report(opts, src_cfg, arch, shape, plan, tokens, calib_desc, device, dtype)
    save_dtype = _save_dtype(opts, src_cfg)
    streamed = opts.stream and any(Path(opts.model).glob("*.safetensors"))
    if opts.stream and not streamed:
        log.info("the source has no safetensors files: loading the whole model (the streamed export reads safetensors lazily)")
    calibration = {"source": opts.calib, "split": opts.calib_split, "description": calib_desc, "nsamples": opts.nsamples,
                   "seqlen": opts.seqlen, "seed": opts.seed, "n_tokens": int(tokens.numel()), "statistics": opts.stats}
    if streamed:
        return _run_streamed(opts, src_cfg, arch, shape, plan, tokens, tokenizer, calibration, device, dtype, save_dtype, progress, t_start)

    # model
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(opts.model), dtype=dtype)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"cannot load the model weights of {str(opts.model)!r}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    model.to(device).eval()
    _check_weights_finite(model)
    t_load = time.perf_counter() - t0

    batches = list(tokens.split(opts.batch_size))
    src_state = model.state_dict()
    stats = None
    request = opts.methods.stats_request()
    whole_model = opts.stats == "original" and not request.mlp_moment
    allocate = opts.methods.allocation == "loss" and opts.layer_dims is None
    # the MLP moment with the allocation: every layer's statistics from one layer-by-layer pass (as the streamed
    # export does), kept compact until the plan is known, when they fit (allocation.one_pass_allocation)
    cached = allocate and request.mlp_moment and one_pass_allocation(arch, request, len(batches), opts.stats)
    t_alloc = 0.0
    if cached:
        t0 = time.perf_counter()
        kept = CompactStatsList()
        with progress_bar(total=arch.num_layers, desc="calibrating (all statistics)", unit="layer",
                          force=None if progress else False) as bar:
            sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                 lambda _i, st: kept.append(st), mode="original", request=request, progress=bar.update)
        stats = kept
        t_alloc = time.perf_counter() - t0
    elif whole_model or allocate:
        # original-model statistics of every layer in one pass: for solving (whole_model) and/or for the allocation
        if not whole_model:  # the allocation reads only the light moments; the solve pass gathers the rest
            request = StatsRequest(rope_energy=request.rope_energy)
        t0 = time.perf_counter()
        desc = "calibrating" if whole_model else "calibrating (allocation pass)"
        with progress_bar(total=opts.nsamples, desc=desc, unit="seq", force=None if progress else False) as bar:
            stats = collect_stats(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, progress=bar.update,
                                  request=request)
        t_alloc = time.perf_counter() - t0
    if allocate:
        plan = allocate_plan(model, stats, arch, shape, opts.cr, opts.methods, tuple(opts.components), opts.head_multiple, opts.damp)
    dims = plan.dim_lists(arch.num_layers)
    if whole_model or cached:
        t_calib = t_alloc
        t0 = time.perf_counter()
        new_state, layer_reports = compress_model(model, stats, arch, *dims, opts.methods, opts.damp, progress=progress)
        t_solve = time.perf_counter() - t0
    else:
        # one layer at a time over cached hidden states: needed for propagated statistics, and bounds memory when a
        # method needs the d_int x d_int MLP moment (one layer's statistics alive at a time, not all of them)
        t0 = time.perf_counter()
        new_state, layer_reports = compress_model(
            model, None, arch, *dims, opts.methods, opts.damp, progress=progress, batches=batches, stats_mode=opts.stats,
            a3_config=_compressed_config(src_cfg, arch, plan, {}, dtype),
        )
        t_solve = sum(r["seconds"] for r in layer_reports)
        t_calib = time.perf_counter() - t0 - t_solve + t_alloc

    new_state = {k: (v.to(save_dtype) if v.is_floating_point() else v).detach().cpu() for k, v in new_state.items()}
    config, report = _build_report(opts, src_cfg, arch, shape, plan, calibration, save_dtype, device, dtype, layer_reports,
                                   _count_params(src_state, arch.tie_word_embeddings),
                                   _count_params(new_state, arch.tie_word_embeddings), streamed=False)
    eval_windows_ = dense_ppl = None
    if opts.eval_tokens:
        eval_windows_ = _heldout_windows(opts, tokenizer)
        dense_ppl = _ppl(model, eval_windows_, opts.batch_size)
    del model, src_state, stats
    report["timings"] = {"load_s": t_load, "calibration_s": t_calib, "solve_s": t_solve,
                         "calibration_tokens_per_s": tokens.numel() / t_calib if t_calib > 0 else None}

    t0 = time.perf_counter()
    out = write_checkpoint(
        Path(opts.out), Path(opts.model), config, new_state, modeling_source_files(), render_model_card(report), report,
        overwrite=opts.overwrite, max_shard_size=opts.max_shard_size,
        before_rename=lambda tmp: _verify_and_measure(tmp, opts, report, tokens, dtype, device, eval_windows_, dense_ppl, full=True),
    )
    return _finish_report(report, out, t0, t_start, device)


def _save_dtype(opts: ExportOptions, src_cfg: dict[str, Any]) -> torch.dtype:
    """The dtype of the written weights: the source checkpoint's unless asked otherwise."""
    if opts.save_dtype == "auto":
        name = str(src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "float32")
        return DTYPES.get(name, torch.float32)
    return DTYPES[opts.save_dtype]


def _build_report(
    opts: ExportOptions, src_cfg: dict[str, Any], arch: SourceArch, shape: ModelShape, plan: DimPlan, calibration: dict[str, Any],
    save_dtype: torch.dtype, device: torch.device, dtype: torch.dtype, layer_reports: list[dict[str, Any]],
    params_before: int, params_after: int, streamed: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compressed config.json and the export report (a3_report.json, the model card's source)."""
    bpe = torch.finfo(save_dtype).bits // 8
    source_name = str(src_cfg.get("_name_or_path") or Path(opts.model).resolve().name)
    methods = opts.methods.as_dict()
    recipe = opts.recipe if opts.recipe in RECIPES and RECIPES[opts.recipe][0] == opts.methods else "custom"
    summary = {
        "target_cr": opts.cr,
        "achieved_cr": plan.achieved_cr,
        "components": list(opts.components),
        "head_multiple": opts.head_multiple,
        "head_dim": arch.head_dim,
        "qk_head_dim": plan.qk_head_dim,
        "v_head_dim": plan.v_head_dim,
        "intermediate_size": arch.intermediate_size,
        "new_intermediate_size": plan.intermediate_size,
        "linear_params_before": shape.linear_params(arch.head_dim, arch.head_dim, arch.intermediate_size),
        "linear_params_after": plan.linear_params(shape),
        "params_before": params_before,
        "params_after": params_after,
        "kv_dtype": dtype_name(save_dtype),
        "kv_bytes_per_token_before": shape.kv_bytes_per_token(arch.head_dim, arch.head_dim, bpe),
        "kv_bytes_per_token_after": plan.kv_bytes_per_token(shape, bpe),
        "notes": list(plan.notes),
        "layer_dims": [list(t) for t in plan.layers] if plan.layers else None,
    }
    a3_block = {
        "format_version": FORMAT_VERSION,
        "a3_serve_version": a3_serve.__version__,
        "source_model": source_name,
        "source_architecture": arch.model_type,
        "source_head_dim": arch.head_dim,
        "source_intermediate_size": arch.intermediate_size,
        "target_cr": opts.cr,
        "achieved_cr": plan.achieved_cr,
        "components": list(opts.components),
        "recipe": recipe,
        "methods": methods,
        "allocation": opts.methods.allocation if opts.layer_dims is None else "explicit",
        "head_multiple": opts.head_multiple,
        "calibration": calibration,
    }
    config = _compressed_config(src_cfg, arch, plan, a3_block, save_dtype)
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "a3_serve_version": a3_serve.__version__,
        "source": {"name": source_name, "path": str(Path(opts.model).resolve()), "architecture": arch.model_type, "attention": arch.attention_kind},
        "summary": summary,
        "recipe": recipe,
        "methods": methods,
        "allocation": a3_block["allocation"],
        "calibration": calibration,
        "device": str(device),
        "compute_dtype": dtype_name(dtype),
        "streamed": streamed,
        "layers": layer_reports,
    }
    return config, report


def _verify_and_measure(
    tmp: Path, opts: ExportOptions, report: dict[str, Any], tokens: torch.Tensor, dtype: torch.dtype, device: torch.device,
    eval_windows_: torch.Tensor | None, dense_ppl: float | None, full: bool,
) -> None:
    """Check the finished folder as a user would load it; measure quality; refresh card and report.

    ``full``: load it through the Auto classes and run a forward pass; otherwise (a streamed export too large to
    load cheaply) check every tensor's name, shape and finiteness against the model class built from config.json.
    """
    from a3_serve.export.lazy import check_checkpoint_structure

    if not opts.verify and eval_windows_ is None:
        return
    if full or eval_windows_ is not None:
        from transformers import AutoModelForCausalLM as Auto

        try:
            comp = Auto.from_pretrained(str(tmp), dtype=dtype).to(device).eval()
        except Exception as err:  # noqa: BLE001 - a checkpoint we cannot load must not reach --out
            raise RuntimeError(f"the written checkpoint does not load: {type(err).__name__}: {err}") from err
        probe = tokens[:1, : min(16, tokens.shape[1])].to(device)
        with torch.no_grad():
            logits = comp(input_ids=probe).logits
        if not torch.isfinite(logits).all():
            raise NumericalError("the compressed model produces NaN/Inf logits; raise --damp or use more calibration text")
        if eval_windows_ is not None:
            report["quality"] = {"data": opts.eval_data, "seqlen": opts.eval_seqlen, "n_tokens": int(eval_windows_.numel()),
                                 "dense_ppl": dense_ppl, "compressed_ppl": _ppl(comp, eval_windows_, opts.batch_size)}
        del comp
        report["verified"] = "loaded with transformers, forward pass finite"
    else:
        check_checkpoint_structure(tmp)
        report["verified"] = "every tensor's name and shape checked against the model class (too large to load cheaply)"
    (tmp / "README.md").write_text(render_model_card(report))
    (tmp / "a3_report.json").write_text(json.dumps(report, indent=2) + "\n")


def _finish_report(report: dict[str, Any], out: Path, t_write0: float, t_start: float, device: torch.device) -> dict[str, Any]:
    report["timings"]["write_s"] = time.perf_counter() - t_write0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    report["peak_rss_mb"] = _rss_mb()
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["output"] = str(Path(out).resolve())
    # the final numbers (write time, total, RSS) are known only now: refresh the report file
    (Path(out) / "a3_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


#: the layout of a streamed export's working folder (part of the resume key: a folder written by another layout,
#: e.g. one shard per layer in the first version, is never resumed into this one)
WORKDIR_FORMAT = 3  # 3: the allocation pass may cache every layer's statistics (one pass)
#: a streamed export loads its result for the final check only up to this many bytes of weights
FULL_VERIFY_MAX_BYTES = 4 * 2**30


def resume_key(opts: ExportOptions, src_cfg: dict[str, Any], dtype: torch.dtype, device: torch.device) -> str:
    """What identifies a streamed export's result, hashed (:func:`a3_serve.export.workdir.export_key`)."""
    from a3_serve.export.workdir import export_key

    fields = {
        "a3_serve": a3_serve.__version__, "workdir_format": WORKDIR_FORMAT, "source": str(Path(opts.model).resolve()), "config": src_cfg,
        "cr": opts.cr, "calib": opts.calib, "calib_split": opts.calib_split, "nsamples": opts.nsamples, "seqlen": opts.seqlen,
        "seed": opts.seed, "batch_size": opts.batch_size, "dtype": dtype_name(dtype), "device": device.type,
        "save_dtype": opts.save_dtype, "head_multiple": opts.head_multiple, "components": list(opts.components),
        "methods": [opts.methods.qk, opts.methods.ov, opts.methods.mlp, opts.methods.allocation], "damp": opts.damp,
        "layer_dims": opts.layer_dims, "stats": opts.stats,
    }
    return export_key(fields)


def _run_streamed(
    opts: ExportOptions, src_cfg: dict[str, Any], arch: SourceArch, shape: ModelShape, plan: DimPlan, tokens: torch.Tensor,
    tokenizer, calibration: dict[str, Any], device: torch.device, dtype: torch.dtype, save_dtype: torch.dtype, progress: bool, t_start: float,
) -> dict[str, Any]:
    """The streamed export (:mod:`a3_serve.export.streamed`) in a resumable working folder beside --out."""
    import shutil

    from a3_serve.errors import A3Error
    from a3_serve.export.streamed import export_streamed
    from a3_serve.export.workdir import WorkDir
    from a3_serve.export.writer import move_into_place, populate_folder, remove_stale_partials
    from a3_serve.modeling import modeling_source_files

    remove_stale_partials(Path(opts.out))  # left by killed in-memory exports
    work = WorkDir(Path(opts.out), resume_key(opts, src_cfg, dtype, device), resume=opts.resume)
    allocate = None
    if opts.methods.allocation == "loss" and opts.layer_dims is None:
        allocate = {"cr": opts.cr, "components": tuple(opts.components), "head_multiple": opts.head_multiple}
    res = export_streamed(
        model_dir=Path(opts.model), work=work, arch=arch, shape=shape, plan=plan, allocate=allocate, tokens=tokens,
        batch_size=opts.batch_size, methods=opts.methods, stats_mode=opts.stats, damp=opts.damp, dtype=dtype,
        save_dtype=save_dtype, device=device, progress=progress, max_shard_bytes=parse_size(opts.max_shard_size),
        a3_config_for=lambda p: _compressed_config(src_cfg, arch, p, {}, dtype),
    )
    config, report = _build_report(opts, src_cfg, arch, shape, res.plan, calibration, save_dtype, device, dtype, res.reports,
                                   res.params_before, res.params_after, streamed=True)
    report["resumed"] = work.resumed
    report["timings"] = {"load_s": res.t_load, "calibration_s": res.t_calib, "solve_s": res.t_solve,
                         "calibration_tokens_per_s": tokens.numel() / res.t_calib if res.t_calib > 0 else None}
    eval_windows_ = dense_ppl = None
    if opts.eval_tokens:
        from transformers import AutoModelForCausalLM

        eval_windows_ = _heldout_windows(opts, tokenizer)
        dense = AutoModelForCausalLM.from_pretrained(str(opts.model), dtype=dtype).to(device).eval()
        dense_ppl = _ppl(dense, eval_windows_, opts.batch_size)
        del dense
    t0 = time.perf_counter()
    populate_folder(work.path, Path(opts.model), config, modeling_source_files(), render_model_card(report), report)
    try:
        _verify_and_measure(work.path, opts, report, tokens, dtype, device, eval_windows_, dense_ppl,
                            full=res.weight_bytes <= FULL_VERIFY_MAX_BYTES)
    except (A3Error, RuntimeError):
        shutil.rmtree(work.path, ignore_errors=True)  # a broken result: nothing to resume
        raise
    work.clear_work_files()
    move_into_place(work.path, Path(opts.out), opts.overwrite)
    return _finish_report(report, Path(opts.out), t0, t_start, device)


def _heldout_windows(opts: ExportOptions, tokenizer) -> torch.Tensor:
    """Evaluation windows from --eval-data (checked up front not to overlap the calibration text)."""
    from a3_serve.calibration.sources import eval_windows, load_texts

    return eval_windows(tokenizer, load_texts(opts.eval_data), opts.eval_seqlen, opts.eval_tokens)


def _ppl(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    from a3_serve.eval.ppl import evaluate_ppl

    return float(evaluate_ppl(model, windows, batch_size=batch_size)["ppl"])
