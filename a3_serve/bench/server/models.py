"""Request and response bodies of the benchmarking service (pydantic v2; they are the OpenAPI schema).

A run request mirrors the command line of ``python -m a3_serve.bench`` (see :data:`CLI_FLAGS`): the two model
folders, the engine, a ``workload`` (what is measured) and ``engine_options`` (how the engines run). Every
field has the CLI's default, so ``{"dense": D, "compressed": C}`` is a complete request.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the longest path or text a request may carry (bytes are cheap, but the worker gets them on its command line)
MAX_TEXT = 4096


class RunStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"


#: a run in one of these states never changes again
FINAL = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.interrupted})
ACTIVE = frozenset({RunStatus.queued, RunStatus.running})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN / Infinity are never a valid setting


class Workload(_Strict):
    """What is measured: the request mix (random token prompts), repeats, dtype and optional perplexity."""

    num_prompts: int = Field(32, ge=1, le=100_000, description="requests per measurement (--num-prompts)")
    input_len: int = Field(128, ge=1, le=1_048_576, description="prompt tokens per request (--input-len)")
    output_len: int = Field(128, ge=1, le=1_048_576,
                            description="generated tokens per request, EOS ignored (--output-len)")
    repeats: int = Field(2, ge=1, le=100, description="alternating measurements per model (--repeats)")
    max_model_len: int = Field(0, ge=0, le=10_000_000,
                               description="engine context length; 0: input_len + output_len (--max-model-len)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the random prompts (--seed)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model dtype; auto: float32 on CPU, the checkpoint's on GPU (--dtype)")
    ppl_data: Optional[str] = Field(
        None, min_length=1, max_length=MAX_TEXT,
        description="also measure held-out perplexity on this text: 'wiki', 'wiki:heldout', 'austen', 'hf:NAME...', "
                    "or a file/folder under a model root (--ppl-data)")
    ppl_tokens: int = Field(8192, ge=1, le=100_000_000, description="tokens of ppl_data to score (--ppl-tokens)")
    ppl_seqlen: int = Field(512, ge=2, le=1_048_576, description="window length for perplexity (--ppl-seqlen)")
    scenario: Literal["standard", "kv-bound"] = Field(
        "standard", description="standard, or kv-bound: a fixed KV cache for both models and a concurrency sweep of "
                                "long requests on `vllm serve` (--scenario)")
    kv_sequences: Optional[int] = Field(
        None, ge=1, le=100_000, description="kv-bound: size the KV cache so the dense model holds this many requests "
                                            "(default 16 unless engine_options.kv_cache_gib is set) (--kv-sequences)")
    concurrency: str = Field("0.5x,1x,2x", max_length=200, pattern=r"^\d{1,6}(\.\d{1,3})?x?(,\d{1,6}(\.\d{1,3})?x?)*$",
                             description="kv-bound: requests in flight per level, multiples of the dense capacity (2x) "
                                         "or counts, comma-separated (--concurrency)")
    waves: float = Field(2.0, gt=0, le=1000, description="kv-bound: requests per level = waves x level (--waves)")

    @model_validator(mode="after")
    def _consistent(self) -> "Workload":
        if self.max_model_len and self.max_model_len < self.input_len + self.output_len:
            raise ValueError(f"max_model_len {self.max_model_len} is shorter than input_len + output_len "
                             f"({self.input_len + self.output_len}); raise it, set 0, or shorten the requests")
        if self.ppl_data and self.ppl_tokens < self.ppl_seqlen:
            raise ValueError(f"ppl_tokens {self.ppl_tokens} is less than one window of ppl_seqlen {self.ppl_seqlen}")
        return self


class EngineOptions(_Strict):
    """How the engines run (all optional; the CLI's defaults)."""

    mode: Optional[Literal["offline", "server"]] = Field(
        None, description="engine vllm: offline engine (default) or `vllm serve` + HTTP requests (--mode)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$",
                        description="engine hf: cpu, cuda, cuda:N or auto (--device)")
    batch_size: int = Field(0, ge=0, le=100_000,
                            description="engine hf: prompts per batch; 0: all at once (--batch-size)")
    kv_cache_gib: Optional[float] = Field(
        None, gt=0, le=4096, description="vLLM: KV-cache GiB for each model, fractions allowed; default 1 on CPU, "
                                         "vLLM's own sizing on GPU (--kv-cache-gib)")
    cpu_preload: Literal["on", "off"] = Field(
        "on", description="vLLM on CPU: tcmalloc and Intel OpenMP in LD_PRELOAD where installed (--cpu-preload)")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1,
                                                    description="vLLM on GPU (--gpu-memory-utilization)")
    enforce_eager: bool = Field(False, description="vLLM: no torch.compile / CUDA graphs (--enforce-eager)")
    max_concurrency: int = Field(0, ge=0, le=100_000,
                                 description="server mode: requests in flight; 0: all (--max-concurrency)")
    measurement_timeout: float = Field(1800.0, gt=0, le=7 * 86400,
                                       description="seconds one measurement may take before it fails (--timeout)")


class RunCreate(_Strict):
    """A dense-vs-compressed benchmark to run. Model paths must lie under one of the service's model roots
    (relative paths are looked up under each root in turn)."""

    dense: str = Field(min_length=1, max_length=MAX_TEXT, description="dense Hugging Face model folder (--dense)")
    compressed: str = Field(min_length=1, max_length=MAX_TEXT,
                            description="compressed (a3-export) model folder (--compressed)")
    engine: Literal["vllm", "hf"] = Field("vllm",
                                          description="vllm (default) or hf, the transformers reference (--engine)")
    workload: Workload = Field(default_factory=Workload)
    engine_options: EngineOptions = Field(default_factory=EngineOptions)
    timeout_s: Optional[float] = Field(None, gt=0, le=30 * 86400,
                                       description="wall-clock limit of the whole run; default and maximum: the "
                                                   "service's --run-timeout")
    label: Optional[str] = Field(None, max_length=200, description="free text shown in the run list")
    allow_mismatch: bool = Field(
        False, description="measure the two folders even when they are not comparable (different tokenizer or "
                           "vocabulary, or a compressed model exported from another source); by default such a request "
                           "is refused with 422, with this set the report lists the problems (--allow-mismatch)")

    @model_validator(mode="after")
    def _consistent(self) -> "RunCreate":
        if self.engine == "hf" and self.engine_options.mode == "server":
            raise ValueError("engine_options.mode 'server' is for engine 'vllm'; drop it with engine 'hf'")
        w, e = self.workload, self.engine_options
        if w.scenario == "kv-bound":
            if self.engine != "vllm" or e.mode == "offline":
                raise ValueError("workload.scenario 'kv-bound' runs vLLM servers: engine 'vllm', mode 'server'")
            if e.max_concurrency:
                raise ValueError("workload.scenario 'kv-bound' sets the requests in flight with workload.concurrency; "
                                 "drop engine_options.max_concurrency")
            if w.kv_sequences is not None and e.kv_cache_gib is not None:
                raise ValueError("give workload.kv_sequences or engine_options.kv_cache_gib, not both")
        elif w.kv_sequences is not None or w.concurrency != "0.5x,1x,2x" or w.waves != 2.0:
            raise ValueError("workload.kv_sequences, concurrency and waves belong to workload.scenario 'kv-bound'")
        return self


#: request field -> flag of ``python -m a3_serve.bench`` (booleans are bare flags, None values are left out)
CLI_FLAGS: dict[str, str] = {
    "engine": "--engine",
    "workload.num_prompts": "--num-prompts",
    "workload.input_len": "--input-len",
    "workload.output_len": "--output-len",
    "workload.repeats": "--repeats",
    "workload.max_model_len": "--max-model-len",
    "workload.seed": "--seed",
    "workload.dtype": "--dtype",
    "workload.ppl_data": "--ppl-data",
    "workload.ppl_tokens": "--ppl-tokens",
    "workload.ppl_seqlen": "--ppl-seqlen",
    "workload.scenario": "--scenario",
    "workload.kv_sequences": "--kv-sequences",
    "workload.concurrency": "--concurrency",
    "workload.waves": "--waves",
    "engine_options.mode": "--mode",
    "engine_options.device": "--device",
    "engine_options.batch_size": "--batch-size",
    "engine_options.kv_cache_gib": "--kv-cache-gib",
    "engine_options.cpu_preload": "--cpu-preload",
    "engine_options.gpu_memory_utilization": "--gpu-memory-utilization",
    "engine_options.enforce_eager": "--enforce-eager",
    "engine_options.max_concurrency": "--max-concurrency",
    "engine_options.measurement_timeout": "--timeout",
    "allow_mismatch": "--allow-mismatch",
}


class Progress(BaseModel):
    done: int = Field(0, description="finished steps (one per measurement, plus one per perplexity)")
    total: Optional[int] = Field(None, description="steps in the run, known once the worker has started")
    message: str = Field("", description="the latest progress message")


class RunLinks(BaseModel):
    self: str
    events: str
    cancel: str
    report_json: str
    report_md: str
    report_png: str
    log: str


class RunSummary(BaseModel):
    id: str
    status: RunStatus
    label: Optional[str] = None
    created: str = Field(description="ISO 8601, UTC")
    started: Optional[str] = None
    finished: Optional[str] = None
    dense: str
    compressed: str
    engine: str
    progress: Progress
    error: Optional[str] = Field(None, description="why the run failed, was cancelled or interrupted (one line)")
    ratios: Optional[dict[str, float]] = Field(None, description="compressed / dense, once the run succeeded")
    links: RunLinks


class Run(RunSummary):
    request: dict[str, Any] = Field(description="the request as run (model paths resolved)")
    command: list[str] = Field(description="the worker's command line")
    exit_code: Optional[int] = Field(None, description="the worker's exit status; negative: killed by that signal")
    results: Optional[dict[str, Any]] = Field(None,
                                              description="the throughput.json document (schema a3-serve/throughput/1)")


class RunList(BaseModel):
    runs: list[RunSummary]
    queue_length: int
    worker_busy: bool


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    worker_busy: bool
    queue_length: int
    auth: bool = Field(description="whether a bearer token is required")


class ErrorBody(BaseModel):
    detail: str = Field(description="one line naming the problem and the fix")
