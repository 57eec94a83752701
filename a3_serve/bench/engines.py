"""One measurement of one model on one engine; every number is the engine's own or a clock's.

Engines
-------
``vllm`` (offline)  ``vllm.LLM`` in this process (the caller runs it in a fresh worker subprocess): a short
                    warm-up, then every prompt submitted at once and timed to the last token. Throughput =
                    tokens / wall time. KV-cache capacity = the engine's ``num_gpu_blocks * block_size``; maximum
                    concurrency = whole sequences of the workload's length that fit in those blocks; weight bytes
                    = the checkpoint's tensor elements x the engine dtype's size; peak RSS = this process's
                    ``ru_maxrss`` (engine core and worker run in-process); peak GPU memory = torch's peak
                    allocation on CUDA.
``server``          an OpenAI-compatible server (``vllm serve``): streamed ``/v1/completions`` requests with
                    token-id prompts, ``ignore_eos``, ``max_concurrency`` in flight. Per request: TTFT = first
                    streamed token - send; ITL = gaps between streamed chunks; TPOT = (end - first token) /
                    (tokens - 1). KV capacity from the server's Prometheus ``vllm:cache_config_info``; peak RSS
                    of a server we launched = the largest sampled RSS sum of its process tree.
``hf``              the transformers reference (no vLLM needed, e.g. on a GPU box without it): batches of
                    ``batch_size`` prompts, one prefill forward then one forward per generated token with the
                    model's KV cache (greedy; what ``generate`` does, timed per step). TTFT = prefill + first
                    token of the batch; TPOT = ITL = mean decode step. KV bytes per token = the bytes of the
                    cache tensors after the run / cached positions.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from a3_serve.bench.workload import Workload, prompt_token_ids
from a3_serve.errors import InputError


def _percentiles(prefix: str, values_s: list[float]) -> dict[str, float]:
    """``{prefix_ms_mean, _median, _p99}`` of durations given in seconds (p99: nearest-rank)."""
    if not values_s:
        return {}
    ms = sorted(v * 1000.0 for v in values_s)
    p99 = ms[min(len(ms) - 1, max(0, int(round(0.99 * len(ms) + 0.5)) - 1))]
    return {f"{prefix}_ms_mean": statistics.fmean(ms), f"{prefix}_ms_median": statistics.median(ms),
            f"{prefix}_ms_p99": p99}


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _throughput(n_requests: int, prompt_tokens: int, output_tokens: int, elapsed: float) -> dict[str, float]:
    return {"elapsed_s": elapsed, "requests_per_s": n_requests / elapsed,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed}


def _capacity(num_blocks: int, block_size: int, workload: Workload) -> dict[str, float]:
    blocks_per_seq = -(-workload.sequence_len // block_size)
    return {"kv_cache_tokens": float(num_blocks * block_size), "max_concurrency": num_blocks / blocks_per_seq,
            "kv_block_size": float(block_size)}


# ------------------------------------------------------------------------------------------------ vLLM offline
def measure_vllm_offline(model: str, workload: Workload, *, dtype: str = "auto", enforce_eager: bool = False,
                         gpu_memory_utilization: Optional[float] = None, tensor_parallel_size: int = 1,
                         kv_cache_memory_bytes: Optional[int] = None) -> dict[str, float]:
    """Throughput, KV capacity, weight bytes and peak memory of ``model`` in vLLM's offline engine
    (``kv_cache_memory_bytes``: the KV cache's size, else vLLM's own sizing)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: its memory is ours to read
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = dict(model=model, dtype=dtype, max_model_len=workload.model_len, seed=workload.seed,
                              enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                              max_num_seqs=max(1, workload.num_prompts))
    if tensor_parallel_size == 1:
        kw["distributed_executor_backend"] = "uni"
    if gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    llm = LLM(**kw)
    try:
        tokenizer = llm.get_tokenizer()
        vocab = llm.llm_engine.model_config.get_vocab_size()
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_token_ids(tokenizer, workload, vocab)]
        params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
        warm = SamplingParams(temperature=0.0, max_tokens=min(8, workload.output_len), ignore_eos=True)
        llm.generate(prompts[: min(2, len(prompts))], warm, use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(o.prompt_token_ids or []) for o in outs)
        if n_out != workload.num_prompts * workload.output_len:
            raise RuntimeError(f"vLLM generated {n_out} tokens, expected {workload.num_prompts * workload.output_len}")
        res = _throughput(len(outs), n_in, n_out, elapsed)
        cache = llm.llm_engine.vllm_config.cache_config
        res.update(_capacity(int(cache.num_gpu_blocks or 0), int(cache.block_size), workload))
        res["weight_bytes"] = float(checkpoint_bytes(model, llm.llm_engine.model_config.dtype.itemsize))
        res["peak_rss_bytes"] = float(_peak_rss_bytes())
        if torch.cuda.is_available():
            res["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated())
        return res
    finally:
        del llm
        gc.collect()


# ------------------------------------------------------------------------------------------------ transformers
def measure_hf(model: str, workload: Workload, *, device: str = "auto", dtype: str = "auto",
               batch_size: int = 0) -> dict[str, float]:
    """Throughput, latency, KV bytes per token and memory of the transformers model (greedy, KV cache)."""
    import torch

    import a3_serve  # noqa: F401  (registers a3_llama with the Auto classes)
    from a3_serve.eval.ppl import load_model, load_tokenizer
    from a3_serve.runtime import resolve_device

    dev = resolve_device(device)
    net = load_model(model, dev, dtype)
    tokenizer = load_tokenizer(model)
    prompts = torch.tensor(prompt_token_ids(tokenizer, workload, net.config.vocab_size), dtype=torch.long)
    bs = batch_size or workload.num_prompts
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run_batch(ids: torch.Tensor, n_new: int, timings: Optional[dict[str, list[float]]]):
        ids = ids.to(dev)
        sync()
        t0 = time.perf_counter()
        out = net(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.past_key_values
        sync()
        t_first = time.perf_counter()
        steps = []
        for _ in range(n_new - 1):
            t = time.perf_counter()
            out = net(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
            sync()
            steps.append(time.perf_counter() - t)
        if timings is not None:
            timings["ttft"].append(t_first - t0)
            timings["itl"].extend(steps)
        return cache

    with torch.inference_mode():
        run_batch(prompts[: min(bs, 2)], min(4, workload.output_len), None)  # warm-up
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings: dict[str, list[float]] = {"ttft": [], "itl": []}
        t0 = time.perf_counter()
        cache = None
        for start in range(0, workload.num_prompts, bs):
            cache = run_batch(prompts[start:start + bs], workload.output_len, timings)
        elapsed = time.perf_counter() - t0
    res = _throughput(workload.num_prompts, workload.num_prompts * workload.input_len,
                      workload.num_prompts * workload.output_len, elapsed)
    res.update(_percentiles("ttft", timings["ttft"]))
    res.update(_percentiles("itl", timings["itl"]))
    res.update({k.replace("itl", "tpot"): v for k, v in _percentiles("itl", timings["itl"]).items()})
    kv = _cache_bytes(cache)
    last_batch = workload.num_prompts - (workload.num_prompts - 1) // bs * bs
    positions = last_batch * (workload.sequence_len - 1)  # the last generated token is never fed back
    if kv:
        res["kv_bytes_per_token"] = kv / positions
    res["weight_bytes"] = float(sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers())))
    res["peak_rss_bytes"] = float(_peak_rss_bytes())
    if dev.type == "cuda":
        res["peak_gpu_bytes"] = float(torch.cuda.max_memory_allocated())
    return res


def _cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (any Cache class or legacy tuple), counting each tensor once."""
    import torch

    seen, total = set(), 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x)
        elif hasattr(obj, "layers"):
            for layer in obj.layers:
                visit([getattr(layer, "keys", None), getattr(layer, "values", None)])
        elif hasattr(obj, "key_cache"):
            visit([obj.key_cache, obj.value_cache])

    visit(cache)
    return total


# ------------------------------------------------------------------------------------------------ server
def _http_json(url: str, timeout: float = 10.0, token: Optional[str] = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(url, timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.json() if "json" in r.headers.get("content-type", "") else r.text


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)


def server_cache_capacity(base_url: str, workload: Workload) -> dict[str, float]:
    """KV capacity from the server's Prometheus metrics (``vllm:cache_config_info`` labels)."""
    try:
        text = _http_json(base_url.rstrip("/") + "/metrics")
    except Exception:
        return {}
    m = _CACHE_INFO.search(text if isinstance(text, str) else "")
    if not m:
        return {}
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    try:
        return _capacity(int(labels["num_gpu_blocks"]), int(labels["block_size"]), workload)
    except (KeyError, ValueError):
        return {}


def _one_streamed_request(client, url: str, model_name: str, prompt: list[int], workload: Workload) -> dict[str, Any]:
    body = {"model": model_name, "prompt": prompt, "max_tokens": workload.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunk_times, n_tokens = [], None
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"server answered {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                n_tokens = msg["usage"].get("completion_tokens")
            if msg.get("choices") and msg["choices"][0].get("text") is not None:
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    if not chunk_times:
        raise RuntimeError("the server streamed no tokens")
    n = n_tokens if n_tokens is not None else len(chunk_times)
    return {"ttft": chunk_times[0] - t0, "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "tpot": (end - chunk_times[0]) / (n - 1) if n > 1 else None, "tokens": n, "end": end, "start": t0}


def measure_server(base_url: str, workload: Workload, tokenizer, *, max_concurrency: int = 0,
                   token: Optional[str] = None, rss_sampler: Optional[Callable[[], int]] = None) -> dict[str, float]:
    """Latency and throughput of a running OpenAI-compatible server (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    models = _http_json(base + "/v1/models", token=token)
    model_name = models["data"][0]["id"]
    prompts = prompt_token_ids(tokenizer, workload)
    conc = max_concurrency or workload.num_prompts
    url = base + "/v1/completions"
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_sampler())
            done.wait(0.2)

    with httpx.Client(timeout=httpx.Timeout(600.0), headers=headers,
                      limits=httpx.Limits(max_connections=conc + 1)) as client:
        _one_streamed_request(client, url, model_name, prompts[0][:8], Workload(1, 8, min(4, workload.output_len)))
        sampler = threading.Thread(target=sample, daemon=True) if rss_sampler else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(conc) as pool:
                results = list(pool.map(lambda p: _one_streamed_request(client, url, model_name, p, workload), prompts))
        finally:
            done.set()
        elapsed = time.perf_counter() - t0
    n_out = sum(r["tokens"] for r in results)
    if n_out != workload.num_prompts * workload.output_len:
        raise RuntimeError(f"the server generated {n_out} tokens, expected "
                           f"{workload.num_prompts * workload.output_len}")
    res = _throughput(len(results), workload.num_prompts * workload.input_len, n_out, elapsed)
    res.update(_percentiles("ttft", [r["ttft"] for r in results]))
    res.update(_percentiles("tpot", [r["tpot"] for r in results if r["tpot"] is not None]))
    res.update(_percentiles("itl", [x for r in results for x in r["itl"]]))
    res.update(server_cache_capacity(base, workload))
    if rss_sampler and peak[0]:
        res["peak_rss_bytes"] = float(peak[0])
    return res


class VllmServer:
    """``vllm serve MODEL`` on 127.0.0.1:PORT as a child process group; a context manager that waits for health."""

    def __init__(self, model: str, workload: Workload, *, dtype: str = "auto", port: int = 0,
                 log: Optional[Path] = None, extra_args: tuple[str, ...] = (), startup_timeout: float = 900.0,
                 env: Optional[dict[str, str]] = None):
        self.model, self.workload, self.dtype = model, workload, dtype
        self.env = env
        self.port = port or _free_port()
        self.log = log
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "VllmServer":
        vllm = Path(sys.executable).parent / "vllm"
        cmd = [str(vllm) if vllm.exists() else "vllm", "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", self.dtype, "--max-model-len", str(self.workload.model_len),
               "--max-num-seqs", str(max(1, self.workload.num_prompts)), *self.extra_args]
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                from a3_serve.bench.logscan import failure_reason

                text = self.log.read_text(errors="replace") if self.log else ""
                raise RuntimeError(f"vllm serve {self.model} exited with code {self.proc.returncode} before it was "
                                   f"ready: {failure_reason(text)}" + (f" (log: {self.log})" if self.log else ""))
            try:
                import httpx

                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except Exception:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"vllm serve {self.model} was not ready after {self.startup_timeout:.0f} s")

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its children (the engine core runs in a child)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: bytes per element of the safetensors dtypes a checkpoint's non-float tensors use (quantized weights, packed INT4
#: in int32, scales' zero points, A3's rope index)
_INT_ITEMSIZE = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
                 "F8_E4M3": 1, "F8_E5M2": 1}


def checkpoint_bytes(folder: str, float_itemsize: int) -> int:
    """Served weight bytes of a folder's safetensors files, read from the headers (no data loaded): floating-point
    tensors at ``float_itemsize`` (the dtype the engine runs: vLLM casts them), every other tensor (INT8 / packed
    INT4 weights of a quantized checkpoint, integer indices) at its stored size.

    Counted from the files rather than the loaded parameters: vLLM's CPU backend repacks linear weights into oneDNN
    buffers and empties the parameters, so counting those undercounts there."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for dim in sl.get_shape():
                    n *= dim
                total += n * _INT_ITEMSIZE.get(sl.get_dtype(), float_itemsize)
    return total


def check_model_dir(path: str, role: str) -> str:
    """An existing Hugging Face folder (config.json + weights), or a Hub id (``org/name[@revision]``, resolved as
    a3-export resolves ``--model``: the local cache first, a download where allowed), as an absolute path;
    InputError otherwise."""
    from a3_serve.runtime import read_config, resolve_model

    folder = resolve_model(path, f"--{role}").path
    try:
        read_config(folder)
    except InputError as err:
        raise InputError(f"--{role}: {err}") from None
    return str(folder.expanduser().resolve())
