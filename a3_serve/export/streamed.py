"""Streamed export: calibrate, solve and write one decoder layer at a time from a safetensors checkpoint on disk.

Data flow (``L`` decoder layers, ``d`` hidden size, calibration tokens split into batches ``[B, T]``):

1. skeleton: the source model's class on ``meta`` with only the embeddings, the final norm and the RoPE tables
   real (:mod:`a3_serve.export.lazy`); the first layer's inputs ``X_0`` ``[B, T, d]`` per batch come from the
   model's own embedding code (:func:`a3_serve.calibration.sequential.capture_first_layer_inputs`);
2. Fisher pass (``--allocation loss``): the loss's sensitivity to the residual stream at every layer
   (:mod:`a3_serve.calibration.fisher`), over the first calibration windows, each layer loaded twice (forward, then
   in reverse order for the backward), the layer inputs kept in the working folder in between; the result (two
   numbers per layer) is saved in the state;
   allocation pass (loss-aware allocation only; :mod:`a3_serve.export.passes` decides): for ``l = 0..L-1``, load
   layer ``l``'s weights, run it on ``X_l`` with the statistics hooks, keep its loss curves
   (:func:`a3_serve.export.loss_curves.layer_curves`), ``X_{l+1}`` = its output, free the weights; then the
   per-layer dims (:func:`a3_serve.export.loss_curves.plan_from_curves`). In a *one-pass* export this pass gathers
   the recipe's full statistics too and keeps each layer's in the working folder (``stats-<l>.pt``);
3. solve pass: each layer is solved (:func:`a3_serve.export.compress_layer.compress_layer_into`), from the kept
   statistics or from a layer-by-layer pass of its own, and its compressed tensors and norms are written at once
   into the checkpoint's safetensors files, laid out in advance (:class:`a3_serve.export.shards.PreallocatedShards`);
   ``X_{l+1}`` = the dense layer's output (original statistics, the paper) or the compressed layer's (propagated);
4. the embeddings, final norm and untied LM head are copied from the source (each finite-checked), and the index
   file is written when the checkpoint has more than one shard;
5. config, tokenizer, modeling code, card and report are added, the folder is verified
   (:mod:`a3_serve.export.verify`) and renamed to ``--out``.

Peak memory: one layer's weights in the compute dtype, the embeddings, the activations ``X_l`` and ``X_{l+1}``
(``2·nsamples·seqlen·d`` floats) and one layer's statistics. The whole run lives in a resumable working folder
beside ``--out`` (:mod:`a3_serve.export.workdir`): after a layer the activations and the state are checkpointed
(after every layer while the activations are small, otherwise every couple of minutes), and a killed export
resumes after the last checkpointed layer with the same result. Its key (:func:`resume_key`) covers everything
that determines the result, the source's weight files and the calibration tokens included.

The result is the same checkpoint as the in-memory export's (tested tensor by tensor): the same layer inputs,
hooks, solvers and casts, only the weights come from disk one layer at a time.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import a3_serve
from a3_serve.calibration.fisher import ResidualFisher
from a3_serve.calibration.sequential import sequential_calibrate
from a3_serve.calibration.stats import (
    stats_from_tensors,
    stats_to_tensors,
)
from a3_serve.errors import A3Error, NumericalError
from a3_serve.export.card import render_model_card
from a3_serve.export.compress_layer import (
    NORMS,
    compress_layer_into,
    compressed_layer,
    layer_tensors,
)
from a3_serve.export.folder import (
    move_into_place,
    populate_folder,
    remove_stale_partials,
)
from a3_serve.export.lazy import (
    SafetensorsSource,
    fill_module,
    keep_heap_small,
    release_module,
    skeleton_with_embeddings,
)
from a3_serve.export.loss_curves import (
    fisher_pass,
    layer_curves,
    layer_weights,
    plan_from_curves,
    weighted_curves,
)
from a3_serve.export.report import (
    build_report,
    compressed_config,
    finish_report,
    timings,
)
from a3_serve.export.shards import PreallocatedShards, checkpoint_specs, parse_size
from a3_serve.export.verify import (
    FULL_VERIFY_MAX_BYTES,
    BrokenCheckpointError,
    heldout_windows,
    perplexity,
    verify_and_measure,
)
from a3_serve.export.workdir import (
    CURVES_FILE,
    HIDDEN_FILE,
    WorkDir,
    export_key,
    fisher_inputs_file,
    stats_file,
)
from a3_serve.folders import fmt_bytes, folder_size
from a3_serve.modeling import modeling_source_files
from a3_serve.modeling.modeling_a3_llama import ROPE_INDEX_NAME, rope_digest
from a3_serve.progress import progress_bar
from a3_serve.provenance import source_fingerprint, weights_stamp
from a3_serve.runtime import describe_os_error, dtype_name
from a3_serve.solvers.allocate import LayerCurves
from a3_serve.solvers.budget import DimPlan
from a3_serve.solvers.linalg import all_finite

log = logging.getLogger("a3_serve.export")

#: the activations after a layer are checkpointed when they are this small, or when this long has passed since the
#: last checkpoint (at 128 x 2048 calibration tokens of a 4096-wide model they are 4 GB: not worth writing per layer)
CHEAP_CHECKPOINT_BYTES = 64 * 2**20
CHECKPOINT_EVERY_S = 120.0
#: the layout of the working folder (part of the resume key: a folder written by another layout, e.g. one shard per
#: layer in the first version, is never resumed into this one)
WORKDIR_FORMAT = 5  # 3: the allocation pass may cache every layer's statistics (one pass); 4: held-out folds;
# 5: the Fisher pass


def resume_key(job) -> str:
    """What identifies a streamed export's result, hashed (:func:`a3_serve.export.workdir.export_key`): the options
    that change it, the source's config and weight files (name, size, modification time, inode: a re-download at
    the same path is another source) and the calibration tokens themselves."""
    opts = job.opts
    fields = {
        "a3_serve": a3_serve.__version__, "workdir_format": WORKDIR_FORMAT, "source": str(job.model_dir.resolve()),
        "config": job.src_cfg, "weights": weights_stamp(job.model_dir), "calibration_tokens": job.tokens_digest,
        "cr": opts.cr, "calib": opts.calib, "calib_split": opts.calib_split, "nsamples": opts.nsamples,
        "seqlen": opts.seqlen, "seed": opts.seed, "batch_size": opts.batch_size, "dtype": dtype_name(job.dtype),
        "device": job.device.type,
        "save_dtype": opts.save_dtype, "head_multiple": opts.head_multiple, "components": list(opts.components),
        "methods": [opts.methods.qk, opts.methods.ov, opts.methods.mlp, opts.methods.allocation], "damp": opts.damp,
        "layer_dims": opts.layer_dims, "stats": opts.stats, "kv_cr": job.kv_cr,
        "mlp_multiple": opts.mlp_multiple, "heldout_folds": opts.heldout_folds,
    }
    return export_key(fields)


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


def _plan_from_json(d: dict[str, Any]) -> DimPlan:
    d = dict(d)
    d["components"] = tuple(d["components"])
    if d.get("layers") is not None:
        d["layers"] = tuple(tuple(t) for t in d["layers"])
    return DimPlan(**d)


class _StreamedRun:
    """The state of one streamed export: the job, the working folder, the source and the meta skeleton."""

    def __init__(self, job, work: WorkDir, progress: bool):
        self.job, self.work, self.progress = job, work, progress
        self.arch = job.arch
        self.L = job.arch.num_layers
        self.st = work.state
        self.timings = self.st.setdefault("timings", {})
        t0 = time.perf_counter()
        keep_heap_small()
        self.source = SafetensorsSource(job.model_dir)
        self.model = skeleton_with_embeddings(job.model_dir, self.source, job.dtype, job.device)
        self.params_before = sum(p.numel() for name, p in self.model.named_parameters()
                                 if not (self.arch.tie_word_embeddings and name == "lm_head.weight"))
        self.batches, self.heldout = job.batches, job.heldout
        self.t_load = time.perf_counter() - t0

    def bar(self, desc: str, start: int):
        return progress_bar(total=self.L, initial=start, desc=desc, unit="layer",
                            force=None if self.progress else False)

    def load(self, i: int) -> None:
        fill_module(self.model, f"model.layers.{i}", self.source, self.job.dtype, self.job.device)

    def read_checked(self, name: str) -> torch.Tensor:
        """One source tensor in the compute dtype, refused (one line) when it holds NaN or Inf."""
        v = self.source.read([name], dtype=self.job.dtype)[name]
        if not all_finite(v):
            raise NumericalError(f"source weight {name} contains NaN or Inf; the checkpoint is corrupt: "
                                 "re-download or re-convert it")
        return v

    def release(self, i: int) -> None:
        release_module(self.model, f"model.layers.{i}")

    def resume_point(self, pass_name: str) -> tuple[int, list[torch.Tensor] | None]:
        """Where an interrupted ``pass_name`` pass continues, with the activations saved there."""
        if self.st.get("pass") == pass_name and self.st.get("done", 0) > 0:
            log.info("resuming the %s pass at layer %d of %d (%s)", "allocation" if pass_name == "alloc" else "solve",
                     self.st["done"], self.L, self.work.path)
            return self.st["done"], self.work.load_tensors(HIDDEN_FILE)
        return 0, None

    # -- step 2 ----------------------------------------------------------------------------------------------------
    def fisher(self) -> ResidualFisher:
        """The residual Fisher of the dense model, from the state or from a Fisher pass (saved in the state)."""
        if self.st.get("fisher") is not None:
            return ResidualFisher.from_dict(self.st["fisher"])
        work, arch = self.work, self.arch
        t0 = time.perf_counter()
        if arch.tie_word_embeddings:
            head = self.model.get_input_embeddings().weight
        else:
            head = self.read_checked("lm_head.weight").to(self.job.device)

        def save(i: int, hidden: list[torch.Tensor]) -> None:
            work.save_tensors(fisher_inputs_file(i), [h.detach().cpu() for h in hidden])

        def load(i: int) -> list[torch.Tensor]:
            hidden = [h.to(self.job.device) for h in work.load_tensors(fisher_inputs_file(i))]
            (work.path / fisher_inputs_file(i)).unlink()
            return hidden

        fisher = fisher_pass(self.job, self.model, self.progress, before_layer=self.load, after_layer=self.release,
                             save=save, load=load, lm_head_weight=head)
        del head
        self.timings["fisher_s"] = time.perf_counter() - t0
        self.st["fisher"] = fisher.as_dict()
        work.save_state()
        return fisher

    def allocation_pass(self) -> tuple[DimPlan, float]:
        """Per-layer loss curves of every layer (and, in a one-pass export, every layer's statistics) -> the plan."""
        job, work, passes = self.job, self.work, self.job.passes
        opts = job.opts
        t_before = float(self.timings.get("alloc_s", 0.0))
        start, hidden = self.resume_point("alloc")
        curves: list[dict[str, torch.Tensor]] = work.load_tensors(CURVES_FILE) if start else []
        keep = passes.solve_from_first
        fisher = self.fisher() if passes.fisher else None
        ta = time.perf_counter()
        ckpt = _Checkpointer(self.L)

        def on_layer(i: int, layer_stats) -> None:
            c = weighted_curves(layer_curves(layer_tensors(self.model.model.layers[i]), layer_stats, self.arch,
                                             opts.methods, opts.damp),
                                *layer_weights(opts.methods, layer_stats, fisher, i))
            curves.append({"qk": c.qk, "ov": c.ov, "mlp": c.mlp})
            if keep:
                work.save_tensors(stats_file(i), stats_to_tensors(layer_stats))

        def after_layer(i: int, nxt: list[torch.Tensor]) -> None:
            self.release(i)
            if ckpt.due(i, nxt):
                work.save_tensors(CURVES_FILE, curves)
                self.timings["alloc_s"] = t_before + time.perf_counter() - ta
                work.finish_layer("alloc", i, nxt, {"cached_stats": keep})

        with self.bar("calibrating (all statistics)" if keep else "allocation pass", start) as bar:
            sequential_calibrate(self.model, self.batches, self.arch.num_heads, self.arch.num_kv_heads,
                                 self.arch.head_dim, on_layer, mode="original", request=passes.first_request,
                                 progress=bar.update, start=start, hidden=hidden, before_layer=self.load,
                                 after_layer=after_layer, heldout=self.heldout)
        plan = plan_from_curves([LayerCurves(qk=c["qk"], ov=c["ov"], mlp=c["mlp"]) for c in curves], self.arch, opts.cr,
                                 tuple(opts.components), opts.head_multiple, kv_cr=job.kv_cr,
                                 mlp_multiple=opts.mlp_multiple)
        job.check_serving(plan, "the loss-aware allocation's dims")
        t_alloc = self.timings["alloc_s"] = t_before + time.perf_counter() - ta
        self.st.update(plan=asdict(plan), cached_stats=keep, **{"pass": "solve", "done": 0, "reports": []})
        (work.path / HIDDEN_FILE).unlink(missing_ok=True)
        (work.path / CURVES_FILE).unlink(missing_ok=True)
        work.save_state()
        return plan, t_alloc

    # -- step 3 ----------------------------------------------------------------------------------------------------
    def solve_pass(self, plan: DimPlan, shards: PreallocatedShards) -> tuple[list[dict[str, Any]], float]:
        """Solve and write every layer; returns the per-layer reports and the pass's wall time."""
        job, work, st = self.job, self.work, self.st
        opts = job.opts
        dims = plan.dim_lists(self.L)
        a3_config = compressed_config(job.src_cfg, self.arch, plan, {}, job.dtype)
        from_stats = bool(st.get("cached_stats"))
        if from_stats:
            start, hidden = (st["done"] if st.get("pass") == "solve" else 0), None
        else:
            start, hidden = self.resume_point("solve")
        reports: list[dict[str, Any]] = list(st.get("reports", [])) if start else []
        t_before = float(self.timings.get("solve_pass_s", 0.0)) if start else 0.0
        tc = time.perf_counter()

        def solve_and_write(i: int, layer_stats) -> torch.nn.Module | None:
            dense = self.model.model.layers[i]
            layer_state: dict[str, torch.Tensor] = {}
            reports.append(compress_layer_into(layer_state, dense, i, layer_stats, self.arch,
                                               (dims[0][i], dims[1][i], dims[2][i]), opts.methods, opts.damp))
            for norm in NORMS:  # finite: fill_module checked every tensor it loaded
                layer_state[f"model.layers.{i}.{norm}"] = dense.get_parameter(norm).detach()
            compressed = compressed_layer(dense, a3_config, i, layer_state) if opts.stats == "propagated" else None
            for k in list(layer_state):  # one tensor at a time in the save dtype
                v = layer_state.pop(k)
                shards.write({k: v.to(job.save_dtype) if v.is_floating_point() else v}, sync=False)
                del v
            shards.sync()  # the layer is on disk before the working folder may record it as done
            return compressed

        def record(i: int) -> None:
            self.timings["solve_pass_s"] = t_before + time.perf_counter() - tc

        if from_stats:  # the allocation pass kept every layer's statistics: no second forward pass
            if start:
                log.info("resuming the solve pass at layer %d of %d (%s)", start, self.L, work.path)
            with self.bar("solving (statistics of the calibration pass)", start) as bar:
                for i in range(start, self.L):
                    self.load(i)
                    solve_and_write(i, stats_from_tensors(work.load_tensors(stats_file(i))))
                    self.release(i)
                    record(i)
                    work.state.update({"pass": "solve", "done": i + 1, "reports": reports})
                    work.save_state()  # the layer's tensors are already in the files (fsynced)
                    (work.path / stats_file(i)).unlink(missing_ok=True)
                    bar.update(1)
        else:
            ckpt = _Checkpointer(self.L)

            def after_layer(i: int, nxt: list[torch.Tensor]) -> None:
                self.release(i)
                record(i)
                if ckpt.due(i, nxt):  # the layer's tensors are already in the files (fsynced)
                    work.finish_layer("solve", i, nxt, {"reports": reports})

            with self.bar(f"calibrating + solving ({opts.stats} statistics)", start) as bar:
                sequential_calibrate(self.model, self.batches, self.arch.num_heads, self.arch.num_kv_heads,
                                     self.arch.head_dim, solve_and_write, mode=opts.stats,
                                     request=job.passes.solve_request, progress=bar.update, start=start,
                                     hidden=hidden, before_layer=self.load, after_layer=after_layer,
                                     heldout=self.heldout)
        return reports, float(self.timings.get("solve_pass_s", 0.0))

    # -- step 4 ----------------------------------------------------------------------------------------------------
    def copy_rest(self, shards: PreallocatedShards) -> None:
        """Embeddings, final norm and untied LM head, through the compute dtype as the in-memory path, each checked."""
        release_module(self.model, "model")  # calibration is over: drop the embeddings before copying them
        for name in [n for n in shards.where if not n.startswith("model.layers.")]:
            v = self.read_checked(name)
            shards.write({name: v.to(self.job.save_dtype) if v.is_floating_point() else v}, sync=False)
            del v
        shards.sync()
        shards.write_index()


def _export_into(job, work: WorkDir, progress: bool) -> tuple[dict[str, Any], float]:
    """Steps 1-5 of the module docstring in ``work``; returns the report (the folder is still ``work.path``) and
    when its writing phase began."""
    opts = job.opts
    run = _StreamedRun(job, work, progress)
    st = run.st
    t_alloc = float(run.timings.get("alloc_s", 0.0))
    if job.passes.allocate and st.get("plan") is None:
        plan, t_alloc = run.allocation_pass()
    elif st.get("plan") is not None:
        plan = _plan_from_json(st["plan"])
    else:
        plan = job.plan
        st["plan"] = asdict(plan)
        work.save_state()

    specs = checkpoint_specs(compressed_config(job.src_cfg, job.arch, plan, {}, job.dtype),
                             job.save_dtype, layer_order=run.L)
    shards = PreallocatedShards(work.path, specs, parse_size(opts.max_shard_size))
    shards.create()
    reports, t_pass = run.solve_pass(plan, shards)
    run.copy_rest(shards)
    t_solve = sum(r["seconds"] for r in reports)
    params_after = sum(int(torch.Size(s.shape).numel()) for s in specs if not s.name.endswith(ROPE_INDEX_NAME))
    digest = rope_digest(job.arch.head_dim,
                         [shards.read(f"model.layers.{i}.self_attn.{ROPE_INDEX_NAME}") for i in range(run.L)])

    fisher = ResidualFisher.from_dict(st["fisher"]) if st.get("fisher") is not None else None
    config, report = build_report(job, plan, reports, run.params_before, params_after, digest,
                                  source_fingerprint(job.model_dir, job.src_cfg), fisher)
    report["resumed"] = work.resumed
    t_fisher = float(run.timings.get("fisher_s", 0.0))
    report["timings"] = timings(run.t_load, t_pass - t_solve + t_alloc + t_fisher, t_solve, job.tokens.numel())
    t_write0 = time.perf_counter()  # write_s: the eval, the folder's other files, the check and the move
    eval_windows = dense_ppl = None
    if opts.eval_tokens:
        eval_windows = heldout_windows(job)
        dense = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=job.dtype).to(job.device).eval()
        dense_ppl = perplexity(dense, eval_windows, opts.batch_size)
        del dense
    populate_folder(work.path, job.model_dir, config, modeling_source_files(), render_model_card(report), report)
    verify_and_measure(work.path, job, report, eval_windows, dense_ppl,
                       full=shards.total_bytes <= FULL_VERIFY_MAX_BYTES)
    return report, t_write0


def run_streamed(job, progress: bool = True) -> dict[str, Any]:
    """The streamed export of ``job`` (an :class:`~a3_serve.export.job.ExportJob`) in a resumable working folder
    beside --out; returns the report.

    A failure that a re-run cannot get past (bad input, a numerical error or a checkpoint that fails verification:
    the same arguments would fail again, other arguments make another working folder) removes the working folder;
    any other failure (disk full, Ctrl-C, a bug) keeps it for the resume and says where it is and how large."""
    remove_stale_partials(job.out_dir)  # left by killed in-memory exports
    work = WorkDir(job.out_dir, resume_key(job), resume=job.opts.resume)
    try:
        report, t0 = _export_into(job, work, progress)
        work.clear_work_files()
        move_into_place(work.path, job.out_dir, job.opts.overwrite)
    except (A3Error, BrokenCheckpointError):
        work.release()
        shutil.rmtree(work.path, ignore_errors=True)
        raise
    except OSError as err:
        raise describe_os_error(err, _kept_note(work)) from None
    except BaseException:
        if work.path.exists():
            print(f"note: {_kept_note(work)}", file=sys.stderr)
        raise
    finally:
        work.release()
    return finish_report(report, job.out_dir, t0, job.t_start, job.device)


def _kept_note(work: WorkDir) -> str:
    return (f"the unfinished export is kept in {work.path} ({fmt_bytes(folder_size(work.path))}): re-run the same "
            "command to resume, or delete that folder")
