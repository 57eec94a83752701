"""Command line of ``benchmarks/throughput.py`` / ``python -m a3_serve.bench``: dense vs compressed, side by side."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from a3_serve.bench.report import MODELS, build_report, to_markdown, write_report
from a3_serve.bench.workload import Workload
from a3_serve.errors import EngineError, InputError
from a3_serve.runtime import OneLineArgumentParser, run_cli

DESCRIPTION = """\
Serve a dense model and its compressed export on the same engine and workload, and report them side by side:
output / total tokens/s and requests/s, TTFT / TPOT / ITL (server mode and --engine hf), the KV-cache capacity
and maximum concurrency the engine reports, weight bytes, peak process (and GPU) memory, and optionally held-out
perplexity. Repeats alternate the two models (dense first, then compressed first, ...) so a drifting machine
affects both alike; each figure is the median over repeats, and every ratio is compressed / dense.

engines and modes:
  --engine vllm (default)  offline: vllm.LLM in a fresh subprocess per measurement, all requests at once.
                           --mode server: launches `vllm serve` for each model (or measures the running servers
                           given by --dense-url/--compressed-url) and streams /v1/completions requests.
  --engine hf              the transformers reference (greedy decode with KV cache, timed per step), for
                           machines without vLLM; --device cuda on a GPU.

scenarios:
  standard (default)       one workload, as above.
  kv-bound                 the regime KV-cache compression is for: both servers get the same KV-cache memory, sized
                           so the dense model holds --kv-sequences requests of input + output tokens (or
                           --kv-cache-gib), and a sweep of --concurrency levels (multiples of that capacity, or request
                           counts) offers more long requests than the dense cache holds. Per level: output tokens/s,
                           TTFT / TPOT percentiles, and from the server's /metrics the requests the engine ran at once,
                           its queue, preemptions and KV usage. Implies --mode server.

outputs (in --out-dir): throughput.json (machine-readable, schema a3-serve/throughput/1; a kv-bound run adds its
"curve"), throughput.md (the table below) and throughput.png (bar charts; for kv-bound, curves against offered
concurrency).
"""

EPILOG = """\
examples:
  python benchmarks/throughput.py --dense ./Llama-3.1-8B --compressed ./compressed
  python benchmarks/throughput.py --dense D --compressed C --num-prompts 64 --input-len 512 --output-len 256 --repeats 3
  python benchmarks/throughput.py --dense D --compressed C --mode server --max-concurrency 16
  python benchmarks/throughput.py --dense-url http://127.0.0.1:8000 --compressed-url http://127.0.0.1:8001 --tokenizer D
  python benchmarks/throughput.py --dense D --compressed C --engine hf --device cuda --batch-size 16
  python benchmarks/throughput.py --dense D --compressed C --ppl-data wiki:heldout --ppl-tokens 8192
  python benchmarks/throughput.py --dense D --compressed C --scenario kv-bound --kv-sequences 12 \\
      --input-len 384 --output-len 128 --concurrency 0.5x,1x,2x

comparability: --dense and --compressed must share the tokenizer and vocabulary, and an a3-export folder must be
an export of --dense (its config's a3.source_fingerprint, or for older exports its recorded source shape);
otherwise the benchmark stops with an error, since ratios (perplexity above all) of unrelated models mean nothing.
--allow-mismatch measures them anyway and records the problems in the report.

on CPU: --dtype auto means float32 (vLLM would downcast fp32 checkpoints to bf16, which is slow on most CPUs),
the KV cache gets --kv-cache-gib GiB for both models alike (vLLM's byte-level kv_cache_memory_bytes; the legacy
whole-GiB VLLM_CPU_KVCACHE_SPACE, which would override it, is removed from the engines' environment), and vLLM runs
with tcmalloc and Intel OpenMP in LD_PRELOAD as its CPU guide asks, where scripts/setup.sh found them
(--cpu-preload off measures without).
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="throughput.py", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--dense", help="dense Hugging Face model folder")
    m.add_argument("--compressed", help="compressed (a3-export) model folder")
    m.add_argument("--dense-url",
                   help="base URL of a running OpenAI-compatible server for the dense model (implies --mode server)")
    m.add_argument("--compressed-url", help="base URL of the server for the compressed model (implies --mode server)")
    m.add_argument("--tokenizer", help="tokenizer folder for building prompts in URL mode (default: --dense)")
    m.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for the servers (default: $OPENAI_API_KEY)")
    m.add_argument("--allow-mismatch", action="store_true",
                   help="measure the two folders even when they are not comparable (different tokenizer or vocabulary, "
                        "or a compressed model exported from another source than --dense); by default that is refused, "
                        "and with this flag the report records the problems found")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                   help="vllm (default) or hf (transformers reference)")
    e.add_argument("--mode", choices=["offline", "server"], default=None,
                   help="vllm only: offline engine (default) or HTTP server")
    e.add_argument("--dtype", default="auto",
                   help="model dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, float16")
    e.add_argument("--device", default="auto", help="--engine hf: cpu, cuda, cuda:N or auto")
    e.add_argument("--batch-size", type=int, default=0, help="--engine hf: prompts per batch (default: all at once)")
    e.add_argument("--kv-cache-gib", type=float, default=None,
                   help="vLLM: KV-cache memory for each model in GiB, fractions allowed (passed in bytes); default 1 "
                        "on CPU, on GPU vLLM's own sizing from --gpu-memory-utilization")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM on GPU: fraction of GPU memory (vLLM's default 0.9)")
    e.add_argument("--enforce-eager", action="store_true",
                   help="vLLM: no torch.compile / CUDA graphs (faster start, slower steps)")
    e.add_argument("--cpu-preload", choices=["on", "off"], default="on",
                   help="vLLM on CPU: preload tcmalloc and Intel OpenMP where installed (default on; off: without)")
    e.add_argument("--max-concurrency", type=int, default=0, help="server mode: requests in flight (default: all)")
    e.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one measurement may take before it counts as failed (default 1800)")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=32, help="requests per measurement (default 32)")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    w.add_argument("--output-len", type=int, default=128,
                   help="generated tokens per request, EOS ignored (default 128)")
    w.add_argument("--max-model-len", type=int, default=0, help="engine context length (default: input + output)")
    w.add_argument("--repeats", type=int, default=2, help="alternating measurements per model (default 2)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    k = p.add_argument_group("scenario")
    k.add_argument("--scenario", choices=["standard", "kv-bound"], default="standard",
                   help="standard (default) or kv-bound: a fixed KV cache and a concurrency sweep (see above)")
    k.add_argument("--kv-sequences", type=int, default=None,
                   help="kv-bound: size the KV cache so the dense model holds this many requests of input + output "
                        "tokens (default 16 unless --kv-cache-gib is given)")
    k.add_argument("--concurrency", default="0.5x,1x,2x",
                   help="kv-bound: requests in flight per level, as multiples of the dense capacity (2x) or counts "
                        "(24), comma-separated (default 0.5x,1x,2x)")
    k.add_argument("--waves", type=float, default=2.0,
                   help="kv-bound: requests per level = waves x level (default 2)")
    q = p.add_argument_group("quality (optional)")
    q.add_argument("--ppl-data", default=None,
                   help="also measure perplexity on this held-out text (e.g. wiki:heldout), with transformers")
    q.add_argument("--ppl-tokens", type=int, default=8192, help="tokens of --ppl-data to score (default 8192)")
    q.add_argument("--ppl-seqlen", type=int, default=512, help="window length for perplexity (default 512)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="throughput-report",
                   help="folder for throughput.json/.md/.png (default ./throughput-report)")
    o.add_argument("--events", action="store_true",
                   help="print progress as JSON lines on stdout (for the benchmarking service)")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    return p


def _check_args(args: argparse.Namespace) -> None:
    url_mode = bool(args.dense_url or args.compressed_url)
    if args.scenario == "kv-bound":
        _check_kv_bound(args, url_mode)
    elif args.kv_sequences is not None or args.concurrency != "0.5x,1x,2x" or args.waves != 2.0:
        raise InputError("--kv-sequences, --concurrency and --waves belong to --scenario kv-bound")
    if args.kv_cache_gib is not None and not (0 < args.kv_cache_gib <= 4096):  # NaN fails both comparisons
        raise InputError(f"--kv-cache-gib must be a size in GiB above 0 (fractions allowed), got {args.kv_cache_gib}")
    if url_mode:
        if not (args.dense_url and args.compressed_url):
            raise InputError("give both --dense-url and --compressed-url (or neither, to let the benchmark start the "
                             "engines)")
        if args.engine != "vllm":
            raise InputError("--dense-url/--compressed-url measure OpenAI-compatible servers; drop --engine hf")
        if args.mode == "offline":
            raise InputError("--dense-url/--compressed-url need --mode server (the default with URLs)")
        args.mode = "server"
        if not (args.tokenizer or args.dense):
            raise InputError("URL mode builds prompts with a tokenizer: pass --tokenizer DIR (or --dense DIR)")
    else:
        if not args.dense or not args.compressed:
            raise InputError("give --dense DIR and --compressed DIR (or --dense-url and --compressed-url for running "
                             "servers)")
        if args.engine == "hf" and args.mode == "server":
            raise InputError("--mode server is for --engine vllm; drop it with --engine hf")
        args.mode = args.mode or "offline"
    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    if args.ppl_data and args.ppl_tokens < args.ppl_seqlen:
        raise InputError(f"--ppl-tokens {args.ppl_tokens} is less than one window of --ppl-seqlen {args.ppl_seqlen}")
    if args.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            if args.mode == "offline" or not url_mode:
                raise InputError("vLLM is not installed here; run scripts/setup.sh, use --engine hf, or measure "
                                 "running servers with --dense-url/--compressed-url") from None


def _check_kv_bound(args: argparse.Namespace, url_mode: bool) -> None:
    from a3_serve.bench.kvbound import parse_levels

    if args.engine != "vllm":
        raise InputError("--scenario kv-bound measures vLLM servers; drop --engine hf")
    if args.mode == "offline":
        raise InputError("--scenario kv-bound runs in server mode (it reads the servers' /metrics); drop --mode "
                         "offline")
    if args.max_concurrency:
        raise InputError("--scenario kv-bound sets the requests in flight per level with --concurrency; drop "
                         "--max-concurrency")
    if args.kv_sequences is not None and args.kv_cache_gib is not None:
        raise InputError("give --kv-sequences (the dense model's capacity in requests) or --kv-cache-gib, not both")
    if url_mode and (args.kv_sequences is not None or args.kv_cache_gib is not None):
        raise InputError("the running servers of --dense-url/--compressed-url keep their own KV cache; drop "
                         "--kv-sequences/--kv-cache-gib (start them with the same --kv-cache-memory-bytes)")
    if args.kv_sequences is not None and args.kv_sequences < 1:
        raise InputError(f"--kv-sequences must be >= 1, got {args.kv_sequences}")
    if not (args.waves > 0 and args.waves <= 1000):
        raise InputError(f"--waves must be above 0, got {args.waves}")
    parse_levels(args.concurrency)
    if not url_mode and args.kv_cache_gib is None and args.kv_sequences is None:
        args.kv_sequences = 16
    args.mode = "server"


def _comparability(dense: Optional[str], compressed: Optional[str], allow: bool) -> list[str]:
    """The reasons the two folders are not comparable ([] when they are, or when a folder is not given).

    Raises InputError when there are any and ``allow`` (--allow-mismatch) is not set."""
    from a3_serve.provenance import comparability_problems

    if not (dense and compressed):
        return []
    try:
        problems = comparability_problems(dense, compressed)
    except OSError as err:
        why = (f"{err.strerror or type(err).__name__}: {err.filename}" if err.filename
               else str(err) or type(err).__name__)
        problems = [f"the folders could not be compared ({why})"]
    if problems and not allow:
        raise InputError(f"--dense and --compressed are not comparable: {'; '.join(problems)}; benchmark a compressed "
                         "model against the dense model it was exported from, or pass --allow-mismatch to measure them "
                         "anyway")
    return problems


def _quantization(args: argparse.Namespace, paths: dict[str, Optional[str]]) -> dict[str, Any]:
    """Each folder's weight quantization (:func:`a3_serve.provenance.quantization_info`; None: unquantized), checked
    against what vLLM 0.32's CPU backend can run before any engine starts (docs/QUANTIZATION.md): INT4 weight-only
    layers only with bf16/fp16 activations (its kernel has no float32 path), 8-bit weight-only layers not at all."""
    from a3_serve.provenance import quantization_info

    info = {name: quantization_info(paths[name]) if paths[name] else None for name in MODELS}
    if args.engine != "vllm" or _cuda() or args.dense_url or args.compressed_url:
        return info
    for name, q in info.items():
        if not q or q.get("activation_bits") is not None:
            continue
        if q.get("weight_bits") == 8:
            raise InputError(f"--{name} is {q['scheme']} (8-bit weight-only): vLLM's CPU backend has no kernel for "
                             "it; measure it on a GPU, or quantize with a3-quantize --scheme w8a8 or w4a16")
        if q.get("weight_bits") == 4 and _engine_dtype(args) == "float32":
            raise InputError(f"--{name} is {q['scheme']} (INT4 weights): vLLM's CPU INT4 kernel has no float32 "
                             "path; measure both models with --dtype bfloat16")
    return info


def _engine_dtype(args: argparse.Namespace) -> str:
    import torch

    if args.dtype != "auto":
        return args.dtype
    return "auto" if torch.cuda.is_available() else "float32"


def _environment() -> dict[str, Any]:
    import torch

    import a3_serve

    env: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                           "python": platform.python_version(),
                           "torch": torch.__version__, "a3_serve": a3_serve.__version__}
    for pkg in ("vllm", "transformers"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:
            pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["machine"] += f", {env['gpu']}"
    return env


def _run_worker(spec: dict[str, Any], timeout: float, label: str,
                env: Optional[dict[str, str]] = None) -> dict[str, float]:
    """One measurement in a fresh ``python -m a3_serve.bench.worker`` process; EngineError on crash or timeout, with
    the engine's own error (the first exception its log names, :mod:`a3_serve.bench.logscan`)."""
    from a3_serve.bench.logscan import failure_reason

    with tempfile.TemporaryDirectory(prefix="a3-bench-") as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "worker.log"
        cmd = [sys.executable, "-m", "a3_serve.bench.worker", "--spec", json.dumps(spec), "--out", str(out)]
        with open(log, "w") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ if env is None else env, A3_SERVE_NO_PROGRESS="1"))
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise EngineError(f"{label} took longer than --timeout {timeout:.0f} s and was stopped") from None
            except BaseException:  # Ctrl-C / SIGTERM: take the engine worker (its own session) down with us
                _kill_group(proc)
                raise
        if code != 0 or not out.is_file():
            reason = failure_reason(log.read_text(errors="replace")) if code != 0 else "it wrote no result"
            raise EngineError(f"{label} failed (exit code {code}): {reason}")
        return json.loads(out.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class _Engines:
    """How this run starts vLLM: KV-cache bytes (None: the engine's own sizing), the engines' environment, and the
    libraries it preloads."""

    kv_bytes: Optional[int]
    env: dict[str, str]
    preload: list[str]
    dense_capacity: Optional[float] = None  # whole requests of the workload the dense model holds in kv_bytes


def _engines(args: argparse.Namespace, dense: Optional[str], workload: Workload) -> _Engines:
    from a3_serve.bench.preload import LEGACY_KV_ENV, engine_env, preloaded

    if args.engine != "vllm" or args.mode == "server" and args.dense_url:
        return _Engines(None, dict(os.environ), [])
    from a3_serve.bench.kvbound import dense_capacity, kv_bytes_for_sequences
    from a3_serve.runtime import DTYPES, read_config

    cpu = not _cuda()
    dtype = _engine_dtype(args)
    itemsize = DTYPES[dtype].itemsize if dtype != "auto" else 2  # auto on GPU: the checkpoint's 16-bit dtype
    kv_bytes = None
    if args.kv_sequences is not None:
        kv_bytes = kv_bytes_for_sequences(read_config(dense), itemsize, args.kv_sequences, workload)
    elif args.kv_cache_gib is not None or cpu:
        kv_bytes = int((args.kv_cache_gib if args.kv_cache_gib is not None else 1.0) * 2**30)
    capacity = None
    if kv_bytes is not None and args.scenario == "kv-bound":
        capacity = dense_capacity(read_config(dense), itemsize, kv_bytes, workload)
    if cpu:
        env = engine_env(preload=args.cpu_preload == "on")
    else:  # GPU: the caller's environment as it is (the preloads are a CPU-backend recommendation)
        env = {k: v for k, v in os.environ.items() if k != LEGACY_KV_ENV}
    return _Engines(kv_bytes, env, preloaded(env) if cpu else [], capacity)


def _server_measurement(args, name: str, path: Optional[str], workload: Workload, tokenizer, log_dir: Path,
                        engines: _Engines, measure: Optional[Callable[[str, Optional[Callable[[], int]]], Any]] = None):
    """One model's server measurement: ``measure(url, rss_sampler)`` (default: the standard workload, sampled by
    the engine's /metrics) on the --dense-url/--compressed-url server, or on a `vllm serve` launched for it."""
    from a3_serve.bench.engines import VllmServer, measure_server
    from a3_serve.bench.enginestats import engine_figures, server_metrics_fetcher

    def standard(url: str, rss_sampler: Optional[Callable[[], int]]) -> dict[str, float]:
        fetch = server_metrics_fetcher(url, args.api_key if not rss_sampler else None)
        try:
            res, figures = engine_figures(fetch, lambda: measure_server(
                url, workload, tokenizer, max_concurrency=args.max_concurrency,
                token=args.api_key if not rss_sampler else None, rss_sampler=rss_sampler))
        finally:
            fetch.close()
        return {**res, **figures}

    measure = measure or standard
    url = getattr(args, f"{name}_url")
    try:
        if url:
            return measure(url, None)
        extra = ("--enforce-eager",) if args.enforce_eager else ()
        if args.gpu_memory_utilization is not None:
            extra += ("--gpu-memory-utilization", str(args.gpu_memory_utilization))
        if engines.kv_bytes is not None:
            extra += ("--kv-cache-memory-bytes", str(engines.kv_bytes))
        with VllmServer(path, workload, dtype=_engine_dtype(args), log=log_dir / f"vllm-serve-{name}.log",
                        extra_args=extra, env=engines.env) as server:
            res = measure(server.url, server.rss_bytes)
        dtype = _engine_dtype(args)
        if dtype != "auto":  # the served dtype is known only when we chose it
            from a3_serve.bench.engines import checkpoint_bytes
            from a3_serve.runtime import DTYPES

            weight_bytes = float(checkpoint_bytes(path, DTYPES[dtype].itemsize))
            for point in res if isinstance(res, list) else [res]:
                point["weight_bytes"] = weight_bytes
        return res
    except EngineError:
        raise
    except Exception as err:
        raise EngineError(f"{name} server measurement failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:800] if str(err) else ''}") from None


def run(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Measure both models as the arguments say; returns the report (also written to --out-dir)."""
    from a3_serve.bench.engines import check_model_dir

    _check_args(args)
    paths = {"dense": args.dense, "compressed": args.compressed}
    for name in MODELS:
        if paths[name]:
            paths[name] = check_model_dir(paths[name], name)
    mismatch = _comparability(paths["dense"], paths["compressed"], args.allow_mismatch)
    quantization = _quantization(args, paths)
    workload = Workload(args.num_prompts, args.input_len, args.output_len, args.seed, args.max_model_len)
    engines = _engines(args, paths["dense"], workload)
    out_dir = Path(args.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    schedule = [(r, name) for r in range(args.repeats) for name in (MODELS if r % 2 == 0 else MODELS[::-1])]
    tokenizer = None
    if args.mode == "server":
        from a3_serve.eval.ppl import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or paths["dense"])
    if args.scenario == "kv-bound":
        from a3_serve.bench.kvbound import parse_levels

        levels = parse_levels(args.concurrency)
        steps = len(levels) * len(schedule)
    else:
        steps = len(schedule)
    total = steps + (2 if args.ppl_data else 0)
    emit({"event": "start", "total": total})
    progress = _Progress(emit, total)
    if args.scenario == "kv-bound":
        runs, curve = _kv_bound_runs(args, paths, workload, tokenizer, out_dir, engines, schedule, levels, progress)
    else:
        runs, curve = _standard_runs(args, paths, workload, tokenizer, out_dir, engines, schedule, progress), None
    extra: dict[str, dict[str, float]] = {name: {} for name in MODELS}
    if args.ppl_data:
        for name in MODELS:
            if not paths[name]:
                raise InputError("--ppl-data needs the model folders (--dense/--compressed) next to the URLs")
            res = _run_worker({"task": "ppl", "model": paths[name],
                               "options": {"data": args.ppl_data, "seqlen": args.ppl_seqlen,
                                           "max_tokens": args.ppl_tokens,
                                           "device": args.device if args.engine == "hf" else "cpu"}},
                              args.timeout, f"perplexity of the {name} model")
            extra[name]["perplexity"] = res["perplexity"]
            progress.step(f"{name} perplexity {res['perplexity']:.3f}")
    config = {"engine": args.engine, "mode": args.mode, "scenario": args.scenario, **workload.to_dict(),
              "model_len": workload.model_len, "repeats": args.repeats,
              "dtype": _engine_dtype(args) if args.engine == "vllm" else args.dtype,
              "order": [name for _, name in schedule]}
    if engines.kv_bytes is not None:
        config["kv_cache_bytes"] = engines.kv_bytes
        config["kv_cache_gib"] = engines.kv_bytes / 2**30
    if args.engine == "vllm" and not _cuda() and not args.dense_url:
        config["cpu_preload"] = engines.preload
    config["quantization"] = quantization
    config["comparability"] = {"checked": bool(paths["dense"] and paths["compressed"]), "problems": mismatch,
                               "allow_mismatch": bool(args.allow_mismatch)}
    if args.engine == "hf":
        config.update(device=args.device, batch_size=args.batch_size or workload.num_prompts)
    if args.mode == "server":
        config.update(urls={"dense": args.dense_url, "compressed": args.compressed_url})
        if curve is None:
            config["max_concurrency"] = args.max_concurrency or workload.num_prompts
    if curve is not None:
        config.update(kv_sequences=args.kv_sequences, concurrency=args.concurrency, waves=args.waves,
                      offered=[lv["offered"] for lv in curve["levels"]])
        config.pop("num_prompts")
    if args.ppl_data:
        config.update(ppl_data=args.ppl_data, ppl_tokens=args.ppl_tokens, ppl_seqlen=args.ppl_seqlen)
    report = build_report(command=" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
                          created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          environment=_environment(), config=config,
                          paths={n: paths[n] or getattr(args, f"{n}_url") for n in MODELS}, runs=runs, extra=extra)
    if curve is not None:
        from a3_serve.bench import curve as curve_report

        report["curve"] = curve
        files = write_report(report, out_dir, markdown=curve_report.to_markdown, charts=curve_report.write_charts)
    else:
        files = write_report(report, out_dir)
    report["_files"] = {k: str(v) for k, v in files.items()}
    emit({"event": "done", "report": str(files["json"])})
    return report


class _Progress:
    def __init__(self, emit: Callable[[dict[str, Any]], None], total: int):
        self.emit, self.total, self.done = emit, total, 0

    def step(self, message: str) -> None:
        self.done += 1
        self.emit({"event": "progress", "done": self.done, "total": self.total, "message": message})


def _standard_runs(args, paths, workload, tokenizer, out_dir, engines, schedule, progress):
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in MODELS}
    for r, name in schedule:
        label = f"{name} model (repeat {r + 1}/{args.repeats})"
        if args.mode == "server":
            res = _server_measurement(args, name, paths[name], workload, tokenizer, out_dir, engines)
        else:
            opts: dict[str, Any]
            if args.engine == "vllm":
                opts = {"dtype": _engine_dtype(args), "enforce_eager": args.enforce_eager,
                        "gpu_memory_utilization": args.gpu_memory_utilization,
                        "kv_cache_memory_bytes": engines.kv_bytes}
            else:
                opts = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
            res = _run_worker({"task": args.engine, "model": paths[name],
                               "workload": workload.to_dict(), "options": opts},
                              args.timeout, f"{args.engine} on the {label}", env=engines.env)
        runs[name].append(res)
        progress.step(f"{label}: {res['output_tokens_per_s']:.1f} output tok/s")
    return runs


def _kv_bound_runs(args, paths, workload, tokenizer, out_dir, engines, schedule, levels, progress):
    """Every level on one server per model and repeat; ``(runs at the highest level, the curve section)``."""
    from a3_serve.bench.curve import build_curve
    from a3_serve.bench.engines import server_cache_capacity
    from a3_serve.bench.kvbound import level_label, resolve_levels, sweep

    if engines.dense_capacity is not None:  # as sized; the report holds what the engines really hold
        capacity = engines.dense_capacity
    else:
        capacity = server_cache_capacity(args.dense_url, workload).get("max_concurrency") or 0.0
        if not capacity and any(rel for _, rel in levels):
            raise EngineError(f"the dense server at {args.dense_url} does not report its KV capacity on /metrics "
                              "(vllm:cache_config_info); give --concurrency as request counts")
    offered = resolve_levels(levels, capacity)
    labels = [level_label(v, rel) for v, rel in levels]
    server_workload = Workload(max(offered), workload.input_len, workload.output_len, workload.seed,
                               workload.max_model_len)  # --max-num-seqs: the KV cache, not the scheduler, limits
    per_level: dict[str, list[list[dict[str, float]]]] = {name: [[] for _ in offered] for name in MODELS}
    for r, name in schedule:
        def on_level(i: int, point: dict[str, float], name=name, r=r) -> None:
            per_level[name][i].append(point)
            running = point.get("running_saturated_mean", point.get("running_mean", 0.0))
            progress.step(f"{name} model (repeat {r + 1}/{args.repeats}) at {labels[i]} = {offered[i]} in flight: "
                          f"{point['output_tokens_per_s']:.1f} output tok/s, {running:.1f} running at once, "
                          f"{point.get('preemptions', 0):.0f} preemptions")

        def measure(url: str, rss: Optional[Callable[[], int]], on_level=on_level) -> list[dict[str, float]]:
            return sweep(url, workload, tokenizer, offered, waves=args.waves,
                         token=args.api_key if rss is None else None, rss_sampler=rss, on_level=on_level)

        _server_measurement(args, name, paths[name], server_workload, tokenizer, out_dir, engines, measure)
    curve = build_curve(labels, offered, per_level, kv_cache_bytes=engines.kv_bytes, kv_sequences=args.kv_sequences,
                        waves=args.waves, sequence_len=workload.sequence_len)
    return {name: per_level[name][-1] for name in MODELS}, curve


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so workers and launched servers are stopped on the way out."""
    import signal

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _interrupt_on_sigterm()

    def command() -> int:
        if args.events:
            def emit(ev: dict[str, Any]) -> None:
                print(json.dumps(ev), flush=True)

            run(args, emit)
            return 0
        from a3_serve.progress import progress_bar

        bar = None

        def emit(ev: dict[str, Any]) -> None:
            nonlocal bar
            if ev["event"] == "start" and not args.quiet:
                bar = progress_bar(total=ev["total"], desc="benchmark", unit="run", force=None)
            elif ev["event"] == "progress" and bar is not None:
                bar.set_postfix_str(ev["message"])
                bar.update(1)
            elif ev["event"] == "done" and bar is not None:
                bar.close()
            if ev["event"] == "progress" and not args.quiet:
                print(f"[bench] {ev['done']}/{ev['total']} {ev['message']}", file=sys.stderr, flush=True)

        report = run(args, emit)
        if not args.quiet:
            print(to_markdown(report))
            for kind, path in report["_files"].items():
                print(f"wrote {kind}: {path}")
        return 0

    return run_cli(command, interrupted="interrupted; engine workers and servers were stopped")


if __name__ == "__main__":
    sys.exit(main())
