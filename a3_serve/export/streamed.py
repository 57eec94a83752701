"""Streamed export: calibrate, solve and write one decoder layer at a time from a safetensors checkpoint on disk.

Data flow (``L`` decoder layers, ``d`` hidden size, calibration tokens split into batches ``[B, T]``):

1. skeleton: the source model's class on ``meta`` with only the embeddings, the final norm and the RoPE tables
   real (:mod:`a3_serve.export.lazy`); the first layer's inputs ``X_0`` ``[B, T, d]`` per batch come from the
   model's own embedding code (:func:`a3_serve.export.sequential.capture_first_layer_inputs`);
2. allocation pass (loss-aware allocation only): for ``l = 0..L-1``, load layer ``l``'s weights, run it on
   ``X_l`` with the statistics hooks, keep its loss curves (:func:`a3_serve.export.allocation.layer_curves`),
   ``X_{l+1}`` = its output, free the weights; then the per-layer dims for the CR
   (:func:`a3_serve.export.allocation.plan_from_curves`). With original-model statistics that fit the cache limit
   (:func:`a3_serve.export.allocation.one_pass_allocation`) this pass gathers the recipe's full statistics and keeps
   each layer's in the working folder: step 3 then solves every layer from them without a second forward pass.
   Otherwise it gathers only the light moments the curves need;
3. solve pass: the same loop with the recipe's statistics (or, after a one-pass allocation, each layer's weights
   and cached statistics read back); each layer is solved
   (:func:`a3_serve.export.solve.solve_layer`) and its compressed tensors and norms are written at once into the
   checkpoint's safetensors files, laid out in advance (:mod:`a3_serve.export.shardwriter`); ``X_{l+1}`` = the dense layer's output (original statistics, the paper)
   or the compressed layer's (propagated statistics);
4. the embeddings, final norm and untied LM head are copied from the source, and the index file is written when
   the checkpoint has more than one shard.

Peak memory: one layer's weights in the compute dtype, the embeddings, the activations ``X_l`` and ``X_{l+1}``
(``2·nsamples·seqlen·d`` floats) and one layer's statistics (the MLP refit's ``d_int x d_int`` moments when the
recipe uses them); a one-pass allocation adds every layer's statistics on disk (at most
``allocation.CACHED_STATS_MAX_BYTES``), not in memory. After a layer, the activations and the state are checkpointed in the working folder
(:mod:`a3_serve.export.workdir`): after every layer while the activations are small, otherwise every couple of
minutes; a killed export resumes after the last checkpointed layer with the same result.

The result is the same checkpoint as the in-memory pipeline's (tested tensor by tensor): the same layer
inputs, hooks, solvers and casts, only the weights come from disk one layer at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from a3_serve.calibration.stats import StatsRequest, stats_from_tensors, stats_to_tensors
from a3_serve.export.allocation import layer_curves, one_pass_allocation, plan_from_curves
from a3_serve.export.architectures import SourceArch
from a3_serve.export.lazy import SafetensorsSource, fill_module, keep_heap_small, release_module, skeleton_with_embeddings
from a3_serve.export.sequential import sequential_calibrate
from a3_serve.export.shardwriter import PreallocatedShards, checkpoint_specs
from a3_serve.export.solve import Methods, layer_tensors
from a3_serve.export.workdir import CURVES_FILE, HIDDEN_FILE, WorkDir, stats_file
from a3_serve.solvers.allocate import LayerCurves
from a3_serve.solvers.budget import DimPlan, ModelShape

log = logging.getLogger("a3_serve.export")

NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
#: the activations after a layer are checkpointed when they are this small, or when this long has passed since the
#: last checkpoint (at 128 x 2048 calibration tokens of a 4096-wide model they are 4 GB: not worth writing per layer)
CHEAP_CHECKPOINT_BYTES = 64 * 2**20
CHECKPOINT_EVERY_S = 120.0


class _Checkpointer:
    """Decides after which layers the resumable state is written (see the constants above)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.last = time.monotonic()

    def due(self, idx: int, hidden: list[torch.Tensor]) -> bool:
        if idx == self.num_layers - 1:  # the pass is over; its result is saved right after
            return False
        nbytes = sum(h.numel() * h.element_size() for h in hidden)
        if nbytes <= CHEAP_CHECKPOINT_BYTES or time.monotonic() - self.last >= CHECKPOINT_EVERY_S:
            self.last = time.monotonic()
            return True
        return False


@dataclass
class StreamedResult:
    """What the streamed export hands back to :func:`a3_serve.export.pipeline.run_export`."""

    plan: DimPlan
    reports: list[dict[str, Any]]
    params_before: int  # source parameters (a tied LM head counted once)
    params_after: int  # written parameters (same rule; RoPE index buffers not counted)
    weight_bytes: int  # bytes of all written tensors
    t_load: float
    t_alloc: float
    t_calib: float
    t_solve: float


def _plan_to_json(plan: DimPlan) -> dict[str, Any]:
    return asdict(plan)


def _plan_from_json(d: dict[str, Any]) -> DimPlan:
    d = dict(d)
    d["components"] = tuple(d["components"])
    if d.get("layers") is not None:
        d["layers"] = tuple(tuple(t) for t in d["layers"])
    return DimPlan(**d)


def export_streamed(
    *,
    model_dir: Path,
    work: WorkDir,
    arch: SourceArch,
    shape: ModelShape,
    plan: DimPlan,
    allocate: dict[str, Any] | None,
    tokens: torch.Tensor,
    batch_size: int,
    methods: Methods,
    stats_mode: str,
    damp: float,
    dtype: torch.dtype,
    save_dtype: torch.dtype,
    device: torch.device,
    a3_config_for: Callable[[DimPlan], dict[str, Any]],
    max_shard_bytes: int = 5_000_000_000,
    progress: bool = True,
) -> StreamedResult:
    """Run steps 1-4 of the module docstring into ``work.path``; returns the plan and per-layer reports.

    ``allocate`` (``{"cr", "components", "head_multiple"}``) asks for the loss-aware allocation pass; None keeps
    ``plan``. ``a3_config_for(plan)`` builds the compressed config dict (needed to run compressed layers with
    propagated statistics).
    """
    from a3_serve.export.pipeline import _a3_layer, _solve_layer_into
    from a3_serve.progress import progress_bar

    t0 = time.perf_counter()
    keep_heap_small()
    source = SafetensorsSource(model_dir)
    model = skeleton_with_embeddings(model_dir, source, dtype, device)
    L = arch.num_layers
    params_before = sum(p.numel() for name, p in model.named_parameters()
                        if not (arch.tie_word_embeddings and name == "lm_head.weight"))
    batches = list(tokens.split(batch_size))
    t_load = time.perf_counter() - t0
    st = work.state
    timings = st.setdefault("timings", {})

    def load(i: int) -> None:
        fill_module(model, f"model.layers.{i}", source, dtype, device)

    def resume_point(pass_name: str) -> tuple[int, list[torch.Tensor] | None]:
        if st.get("pass") == pass_name and st.get("done", 0) > 0:
            log.info("resuming the %s pass at layer %d of %d (%s)", "allocation" if pass_name == "alloc" else "solve",
                     st["done"], L, work.path)
            return st["done"], work.load_tensors(HIDDEN_FILE)
        return 0, None

    # -- allocation pass ---------------------------------------------------------------------------------------
    t_alloc = float(timings.get("alloc_s", 0.0))
    if allocate is not None and st.get("plan") is None:
        start, hidden = resume_point("alloc")
        curves_obj = work.load_tensors(CURVES_FILE) if start else []
        full_request = methods.stats_request()
        # one pass: this pass gathers the solve's statistics too and keeps them in the working folder
        cached = one_pass_allocation(arch, full_request, len(batches), stats_mode)
        request = full_request if cached else StatsRequest(rope_energy=full_request.rope_energy)
        ta = time.perf_counter()

        def curve_fn(i: int, layer_stats) -> None:
            c = layer_curves(layer_tensors(model.model.layers[i]), layer_stats, arch, methods, damp)
            curves_obj.append({"qk": c.qk, "ov": c.ov, "mlp": c.mlp})
            if cached:
                work.save_tensors(stats_file(i), stats_to_tensors(layer_stats))
            return None

        ckpt = _Checkpointer(L)

        def after_alloc(i: int, nxt: list[torch.Tensor]) -> None:
            release_module(model, f"model.layers.{i}")
            if ckpt.due(i, nxt):
                work.save_tensors(CURVES_FILE, curves_obj)
                timings["alloc_s"] = t_alloc + time.perf_counter() - ta
                work.finish_layer("alloc", i, nxt, {"cached_stats": cached})

        desc = "calibrating (all statistics)" if cached else "allocation pass"
        with progress_bar(total=L, initial=start, desc=desc, unit="layer", force=None if progress else False) as bar:
            sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, curve_fn, mode="original",
                                 request=request, progress=bar.update, start=start, hidden=hidden,
                                 before_layer=load, after_layer=after_alloc)
        curves = [LayerCurves(qk=c["qk"], ov=c["ov"], mlp=c["mlp"]) for c in curves_obj]
        plan = plan_from_curves(curves, arch, shape, allocate["cr"], allocate["components"], allocate["head_multiple"])
        t_alloc = timings["alloc_s"] = t_alloc + time.perf_counter() - ta
        st.update(plan=_plan_to_json(plan), cached_stats=cached, **{"pass": "solve", "done": 0, "reports": []})
        (work.path / HIDDEN_FILE).unlink(missing_ok=True)
        (work.path / CURVES_FILE).unlink(missing_ok=True)
        work.save_state()
    elif st.get("plan") is not None:
        plan = _plan_from_json(st["plan"])
    else:
        st["plan"] = _plan_to_json(plan)
        work.save_state()

    # -- solve pass --------------------------------------------------------------------------------------------
    r_lists = plan.dim_lists(L)
    a3_config = a3_config_for(plan)
    specs = checkpoint_specs(a3_config, save_dtype, layer_order=L)
    shards = PreallocatedShards(work.path, specs, max_shard_bytes)
    shards.create()
    if st.get("cached_stats"):
        start, hidden = (st["done"] if st.get("pass") == "solve" else 0), None
    else:
        start, hidden = resume_point("solve")
    reports: list[dict[str, Any]] = list(st.get("reports", [])) if start else []
    tc = time.perf_counter()
    solve_before = float(timings.get("solve_pass_s", 0.0)) if start else 0.0

    def solve_fn(i: int, layer_stats) -> torch.nn.Module | None:
        layer_state: dict[str, torch.Tensor] = {}
        reports.append(_solve_layer_into(layer_state, model.model.layers[i], i, layer_stats, arch,
                                         r_lists[0][i], r_lists[1][i], r_lists[2][i], methods, damp))
        dense = model.model.layers[i]
        for norm in NORMS:
            layer_state[f"model.layers.{i}.{norm}"] = dense.get_parameter(norm).detach()
        compressed = _a3_layer(model, a3_config, i, layer_state) if stats_mode == "propagated" else None
        for k in list(layer_state):  # one tensor at a time in the save dtype
            v = layer_state.pop(k)
            shards.write({k: v.to(save_dtype) if v.is_floating_point() else v}, sync=False)
            del v
        shards.sync()  # the layer is on disk before the working folder may record it as done
        return compressed

    if st.get("cached_stats"):
        # the allocation pass kept every layer's statistics: solve each layer from them, no second forward pass
        def after_cached(i: int) -> None:
            release_module(model, f"model.layers.{i}")
            timings["solve_pass_s"] = solve_before + time.perf_counter() - tc
            work.state.update({"pass": "solve", "done": i + 1, "reports": reports})
            work.save_state()  # the layer's tensors are already in the files (fsynced)
            (work.path / stats_file(i)).unlink(missing_ok=True)

        if start:
            log.info("resuming the solve pass at layer %d of %d (%s)", start, L, work.path)
        with progress_bar(total=L, initial=start, desc="solving (statistics of the calibration pass)", unit="layer",
                          force=None if progress else False) as bar:
            for i in range(start, L):
                load(i)
                solve_fn(i, stats_from_tensors(work.load_tensors(stats_file(i))))
                after_cached(i)
                bar.update(1)
    else:
        ckpt = _Checkpointer(L)

        def after_solve(i: int, nxt: list[torch.Tensor]) -> None:
            release_module(model, f"model.layers.{i}")
            timings["solve_pass_s"] = solve_before + time.perf_counter() - tc
            if ckpt.due(i, nxt):  # the layer's tensors are already in the files (fsynced)
                work.finish_layer("solve", i, nxt, {"reports": reports})

        desc = f"calibrating + solving ({stats_mode} statistics)"
        with progress_bar(total=L, initial=start, desc=desc, unit="layer", force=None if progress else False) as bar:
            sequential_calibrate(model, batches, arch.num_heads, arch.num_kv_heads, arch.head_dim, solve_fn, mode=stats_mode,
                                 request=methods.stats_request(), progress=bar.update, start=start, hidden=hidden,
                                 before_layer=load, after_layer=after_solve)
    t_solve = sum(r["seconds"] for r in reports)
    t_calib = float(timings.get("solve_pass_s", 0.0)) - t_solve + t_alloc

    # -- embeddings, final norm, LM head; index -----------------------------------------------------------------
    release_module(model, "model")  # calibration is over: drop the embeddings before copying them
    for name in [spec.name for spec in specs if not spec.name.startswith("model.layers.")]:
        v = source.read([name], dtype=dtype)[name]  # through the compute dtype, as the in-memory path
        shards.write({name: v.to(save_dtype) if v.is_floating_point() else v}, sync=False)
        del v
    shards.sync()
    shards.write_index()
    params_after = sum(int(torch.Size(spec.shape).numel()) for spec in specs if not spec.name.endswith("rope_freq_index"))
    return StreamedResult(plan=plan, reports=reports, params_before=params_before, params_after=params_after,
                          weight_bytes=shards.total_bytes, t_load=t_load, t_alloc=t_alloc, t_calib=t_calib, t_solve=t_solve)
