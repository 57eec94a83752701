"""What an export writes besides the weights: the compressed ``config.json`` and the report (``a3_report.json``,
the model card's source).

The compressed config keeps every source field and adds the reduced sizes, the per-layer lists of a per-layer
plan, the ``auto_map`` of the copied modeling code and the ``a3`` provenance block (docs/DESIGN.md, "The
compressed checkpoint"): format and package version, the source's name and content fingerprint
(:func:`a3_serve.provenance.source_fingerprint`), target and achieved CR, methods, allocation, calibration, and
the RoPE digest that ties ``head_dim`` and every ``rope_freq_index`` to this export
(:func:`a3_serve.modeling.modeling_a3_llama.rope_digest`).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

import a3_serve
from a3_serve.calibration.fisher import ResidualFisher
from a3_serve.export.methods import RECIPES
from a3_serve.modeling import AUTO_MAP
from a3_serve.modeling.modeling_a3_llama import ROPE_DIGEST_KEY, ROPE_INDEX_NAME
from a3_serve.runtime import dtype_name
from a3_serve.solvers.budget import DimPlan

FORMAT_VERSION = 1


def compressed_config(src_cfg: dict[str, Any], arch, plan: DimPlan, a3_block: dict[str, Any],
                      save_dtype: torch.dtype) -> dict[str, Any]:
    """The ``a3_llama`` config dict of a checkpoint compressed from ``src_cfg`` (``arch``: its
    :class:`~a3_serve.export.architectures.SourceArch`) with ``plan``'s dims."""
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
        auto_map=dict(AUTO_MAP),
    )
    cfg.pop("torch_dtype", None)
    for key in ("use_sliding_window", "max_window_layers", "layer_types"):  # Qwen2: checked to be all full attention
        cfg.pop(key, None)
    return cfg


def count_params(state: dict[str, torch.Tensor], tied: bool) -> int:
    """Parameters of a checkpoint state dict (a tied LM head counted once; RoPE index buffers not counted)."""
    return sum(t.numel() for k, t in state.items() if not (tied and k == "lm_head.weight")
               and not k.endswith(ROPE_INDEX_NAME))


def rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_report(job, plan: DimPlan, layer_reports: list[dict[str, Any]], params_before: int, params_after: int,
                 rope_digest: str, source_fingerprint: dict[str, Any],
                 fisher: ResidualFisher | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compressed config.json and the export report of ``job`` (an :class:`~a3_serve.export.job.ExportJob`)
    solved with ``plan``; ``fisher``: the residual Fisher that weighted the allocation (recorded per layer)."""
    opts, arch, src_cfg = job.opts, job.arch, job.src_cfg
    bpe = torch.finfo(job.save_dtype).bits // 8
    source_name = job.source.repo_id or str(src_cfg.get("_name_or_path") or job.model_dir.resolve().name)
    methods = opts.methods.as_dict()
    recipe = opts.recipe if opts.recipe in RECIPES and RECIPES[opts.recipe][0] == opts.methods else "custom"
    summary = {
        "target_cr": opts.cr,
        "achieved_cr": plan.achieved_cr,
        "components": list(opts.components),
        "head_multiple": opts.head_multiple,
        "mlp_multiple": opts.mlp_multiple,
        "head_dim": arch.head_dim,
        "qk_head_dim": plan.qk_head_dim,
        "v_head_dim": plan.v_head_dim,
        "intermediate_size": arch.intermediate_size,
        "new_intermediate_size": plan.intermediate_size,
        "linear_params_before": arch.linear_params(arch.head_dim, arch.head_dim, arch.intermediate_size),
        "linear_params_after": plan.linear_params(arch),
        "params_before": params_before,
        "params_after": params_after,
        "kv_dtype": dtype_name(job.save_dtype),
        "kv_bytes_per_token_before": arch.kv_bytes_per_token(arch.head_dim, arch.head_dim, bpe),
        "kv_bytes_per_token_after": plan.kv_bytes_per_token(arch, bpe),
        "target_kv_cr": plan.target_kv_cr,
        "achieved_kv_cr": plan.achieved_kv_cr(arch),
        "notes": list(plan.notes),
        "layer_dims": [list(t) for t in plan.layers] if plan.layers else None,
    }
    a3_block = {
        "format_version": FORMAT_VERSION,
        "a3_serve_version": a3_serve.__version__,
        "source_model": source_name,
        "source_revision": job.source.revision,
        "source_architecture": arch.model_type,
        "source_head_dim": arch.head_dim,
        "source_intermediate_size": arch.intermediate_size,
        "source_fingerprint": source_fingerprint,
        "target_cr": opts.cr,
        "achieved_cr": plan.achieved_cr,
        "target_kv_cr": plan.target_kv_cr,
        "achieved_kv_cr": plan.achieved_kv_cr(arch),
        "components": list(opts.components),
        "recipe": recipe,
        "methods": methods,
        "allocation": opts.methods.allocation if opts.layer_dims is None else "explicit",
        "head_multiple": opts.head_multiple,
        "mlp_multiple": opts.mlp_multiple,
        "calibration": job.calibration,
        ROPE_DIGEST_KEY: rope_digest,
    }
    if job.serving is not None:  # --quant-scheme: the rules every size was chosen to pass (a3-quantize reads it)
        a3_block["size_rules"] = summary["size_rules"] = job.serving.record()
    config = compressed_config(src_cfg, arch, plan, a3_block, job.save_dtype)
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "a3_serve_version": a3_serve.__version__,
        "source": {"name": source_name, "path": str(job.model_dir.resolve()), "revision": job.source.revision,
                   "architecture": arch.model_type,
                   "attention": arch.attention_kind},
        "summary": summary,
        "recipe": recipe,
        "methods": methods,
        "allocation": a3_block["allocation"],
        "calibration": job.calibration,
        "device": str(job.device),
        "compute_dtype": dtype_name(job.dtype),
        "streamed": job.streamed,
        "layers": layer_reports,
    }
    if fisher is not None:
        report["residual_fisher"] = fisher.as_dict()
    return config, report


def timings(load_s: float, calibration_s: float, solve_s: float, n_tokens: int) -> dict[str, Any]:
    """The report's ``timings`` block before the write (``write_s`` and ``total_s`` come with :func:`finish_report`)."""
    return {"load_s": load_s, "calibration_s": calibration_s, "solve_s": solve_s,
            "calibration_tokens_per_s": n_tokens / calibration_s if calibration_s > 0 else None}


def finish_report(report: dict[str, Any], out: Path, t_write0: float, t_start: float,
                  device: torch.device) -> dict[str, Any]:
    """Add the write time, total time and peak memory, and refresh ``a3_report.json`` in the finished folder."""
    report["timings"]["write_s"] = time.perf_counter() - t_write0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    report["peak_rss_mb"] = rss_mb()
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["output"] = str(Path(out).resolve())
    (Path(out) / "a3_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
