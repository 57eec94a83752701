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

outputs (in --out-dir): throughput.json (machine-readable, schema a3-serve/throughput/1), throughput.md
(the table below) and throughput.png (bar charts).
"""

EPILOG = """\
examples:
  python benchmarks/throughput.py --dense ./Llama-3.1-8B --compressed ./compressed
  python benchmarks/throughput.py --dense D --compressed C --num-prompts 64 --input-len 512 --output-len 256 --repeats 3
  python benchmarks/throughput.py --dense D --compressed C --mode server --max-concurrency 16
  python benchmarks/throughput.py --dense-url http://127.0.0.1:8000 --compressed-url http://127.0.0.1:8001 --tokenizer D
  python benchmarks/throughput.py --dense D --compressed C --engine hf --device cuda --batch-size 16
  python benchmarks/throughput.py --dense D --compressed C --ppl-data wiki:heldout --ppl-tokens 8192

comparability: --dense and --compressed must share the tokenizer and vocabulary, and an a3-export folder must be
an export of --dense (its config's a3.source_fingerprint, or for older exports its recorded source shape);
otherwise the benchmark stops with an error, since ratios (perplexity above all) of unrelated models mean nothing.
--allow-mismatch measures them anyway and records the problems in the report.

on CPU: --dtype auto means float32 (vLLM would downcast fp32 checkpoints to bf16, which is slow on most CPUs)
and the KV cache gets --kv-cache-gib GiB (VLLM_CPU_KVCACHE_SPACE) for both models alike.
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
    e.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="vLLM on CPU: KV-cache memory for each model (default 1)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM on GPU: fraction of GPU memory (vLLM's default 0.9)")
    e.add_argument("--enforce-eager", action="store_true",
                   help="vLLM: no torch.compile / CUDA graphs (faster start, slower steps)")
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


def _run_worker(spec: dict[str, Any], timeout: float, label: str) -> dict[str, float]:
    """One measurement in a fresh ``python -m a3_serve.bench.worker`` process; EngineError on crash or timeout."""
    with tempfile.TemporaryDirectory(prefix="a3-bench-") as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "worker.log"
        cmd = [sys.executable, "-m", "a3_serve.bench.worker", "--spec", json.dumps(spec), "--out", str(out)]
        with open(log, "w") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, A3_SERVE_NO_PROGRESS="1"))
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise EngineError(f"{label} took longer than --timeout {timeout:.0f} s and was stopped") from None
            except BaseException:  # Ctrl-C / SIGTERM: take the engine worker (its own session) down with us
                _kill_group(proc)
                raise
        if code != 0 or not out.is_file():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if ln.startswith("error:")),
                          lines[-1] if lines else f"exit code {code}")
            raise EngineError(f"{label} failed (exit code {code}): {reason.removeprefix('error: ')[:400]}")
        return json.loads(out.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _server_measurement(args, name: str, path: Optional[str], workload: Workload, tokenizer,
                        log_dir: Path) -> dict[str, float]:
    from a3_serve.bench.engines import VllmServer, measure_server

    url = getattr(args, f"{name}_url")
    try:
        if url:
            return measure_server(url, workload, tokenizer, max_concurrency=args.max_concurrency, token=args.api_key)
        extra = ("--enforce-eager",) if args.enforce_eager else ()
        if args.gpu_memory_utilization is not None:
            extra += ("--gpu-memory-utilization", str(args.gpu_memory_utilization))
        with VllmServer(path, workload, dtype=_engine_dtype(args), log=log_dir / f"vllm-serve-{name}.log",
                        extra_args=extra) as server:
            res = measure_server(server.url, workload, tokenizer, max_concurrency=args.max_concurrency,
                                 rss_sampler=server.rss_bytes)
        dtype = _engine_dtype(args)
        if dtype != "auto":  # the served dtype is known only when we chose it
            from a3_serve.bench.engines import checkpoint_numel
            from a3_serve.runtime import DTYPES

            res["weight_bytes"] = float(checkpoint_numel(path) * DTYPES[dtype].itemsize)
        return res
    except EngineError:
        raise
    except Exception as err:
        raise EngineError(f"{name} server measurement failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None


def run(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Measure both models as the arguments say; returns the report (also written to --out-dir)."""
    from a3_serve.bench.engines import check_model_dir

    _check_args(args)
    paths = {"dense": args.dense, "compressed": args.compressed}
    for name in MODELS:
        if paths[name]:
            paths[name] = check_model_dir(paths[name], name)
    mismatch = _comparability(paths["dense"], paths["compressed"], args.allow_mismatch)
    workload = Workload(args.num_prompts, args.input_len, args.output_len, args.seed, args.max_model_len)
    if args.engine == "vllm" and not _cuda():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    out_dir = Path(args.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    schedule = [(r, name) for r in range(args.repeats) for name in (MODELS if r % 2 == 0 else MODELS[::-1])]
    total = len(schedule) + (2 if args.ppl_data else 0)
    emit({"event": "start", "total": total})
    done = 0
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in MODELS}
    tokenizer = None
    if args.mode == "server":
        from a3_serve.eval.ppl import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or paths["dense"])
    for r, name in schedule:
        label = f"{name} model (repeat {r + 1}/{args.repeats})"
        if args.mode == "server":
            res = _server_measurement(args, name, paths[name], workload, tokenizer, out_dir)
        else:
            opts: dict[str, Any]
            if args.engine == "vllm":
                opts = {"dtype": _engine_dtype(args), "enforce_eager": args.enforce_eager,
                        "gpu_memory_utilization": args.gpu_memory_utilization}
            else:
                opts = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size}
            res = _run_worker({"task": args.engine, "model": paths[name],
                               "workload": workload.to_dict(), "options": opts},
                              args.timeout, f"{args.engine} on the {label}")
        runs[name].append(res)
        done += 1
        emit({"event": "progress", "done": done, "total": total,
              "message": f"{label}: {res['output_tokens_per_s']:.1f} output tok/s"})
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
            done += 1
            emit({"event": "progress", "done": done, "total": total,
                  "message": f"{name} perplexity {res['perplexity']:.3f}"})
    config = {"engine": args.engine, "mode": args.mode, **workload.to_dict(), "model_len": workload.model_len,
              "repeats": args.repeats, "dtype": _engine_dtype(args) if args.engine == "vllm" else args.dtype,
              "order": [name for _, name in schedule]}
    if args.engine == "vllm" and not _cuda():
        config["kv_cache_gib"] = args.kv_cache_gib
    config["comparability"] = {"checked": bool(paths["dense"] and paths["compressed"]), "problems": mismatch,
                               "allow_mismatch": bool(args.allow_mismatch)}
    if args.engine == "hf":
        config.update(device=args.device, batch_size=args.batch_size or workload.num_prompts)
    if args.mode == "server":
        config.update(max_concurrency=args.max_concurrency or workload.num_prompts,
                      urls={"dense": args.dense_url, "compressed": args.compressed_url})
    if args.ppl_data:
        config.update(ppl_data=args.ppl_data, ppl_tokens=args.ppl_tokens, ppl_seqlen=args.ppl_seqlen)
    report = build_report(command=" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
                          created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          environment=_environment(), config=config,
                          paths={n: paths[n] or getattr(args, f"{n}_url") for n in MODELS}, runs=runs, extra=extra)
    files = write_report(report, out_dir)
    report["_files"] = {k: str(v) for k, v in files.items()}
    emit({"event": "done", "report": str(files["json"])})
    return report


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
