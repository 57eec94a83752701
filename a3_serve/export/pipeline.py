"""The export pipeline: check and prepare (:mod:`~a3_serve.export.job`) → calibrate → solve → write, atomically.

Which modules do what (each has one job; data flows down this list):

* :mod:`~a3_serve.export.options` / :mod:`~a3_serve.export.methods`: what a user can ask for;
* :mod:`~a3_serve.export.job`: every input checked before anything expensive runs, and the export's plan
  (source shape, uniform dims, calibration tokens, devices, :mod:`~a3_serve.export.passes`);
* :mod:`~a3_serve.export.streamed` (default) or :mod:`~a3_serve.export.inmemory`: the calibration passes, the
  per-layer solves (:mod:`~a3_serve.export.compress_layer`, :mod:`~a3_serve.export.loss_curves`) and the write;
* :mod:`~a3_serve.export.report`, :mod:`~a3_serve.export.verify`, :mod:`~a3_serve.export.card`: config, report,
  check and model card of the finished folder; :mod:`~a3_serve.export.folder` / :mod:`~a3_serve.export.shards`:
  its files; :mod:`~a3_serve.export.dryrun`: ``--dry-run``.
"""

from __future__ import annotations

from typing import Any

from a3_serve.export.dryrun import dry_run_report
from a3_serve.export.inmemory import run_in_memory
from a3_serve.export.job import prepare_job
from a3_serve.export.options import ExportOptions
from a3_serve.export.streamed import run_streamed

__all__ = ["ExportOptions", "run_export"]


def run_export(opts: ExportOptions, progress: bool = True) -> dict[str, Any]:
    """Run the whole export; returns the report (also written as ``a3_report.json``), or with ``opts.dry_run`` the
    plan and estimate (nothing computed or written)."""
    job = prepare_job(opts)
    if opts.dry_run:
        return dry_run_report(job)
    if job.streamed:
        return run_streamed(job, progress)
    return run_in_memory(job, progress)
