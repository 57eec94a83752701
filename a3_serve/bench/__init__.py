"""Dense vs compressed serving benchmarks: one engine per fresh process, alternating repeats, side-by-side report.

Entry points: ``python benchmarks/throughput.py`` (the user-facing script) and ``python -m a3_serve.bench``
(the same command line; the benchmarking service runs it in a worker subprocess).

Modules
-------
``workload``  the request mix (random token prompts, fixed input / output lengths), identical for both models.
``engines``   one measurement of one model: the vLLM offline engine, a running OpenAI-compatible server
              (ours, launched with ``vllm serve``, or a URL given by the user) or the transformers reference
              (``--engine hf``). Each offline / hf measurement runs in a fresh subprocess (``python -m
              a3_serve.bench.worker``) so peak memory is that engine's alone and a crash stays contained.
``report``    medians over repeats, compressed / dense ratios, JSON, Markdown and PNG charts.
``cli``       argument parsing, the alternating schedule, progress (a bar, or JSON events for the service).
``kvbound``   the KV-bound scenario (``--scenario kv-bound``): KV bytes for N dense requests, the concurrency levels,
              the sweep of one running server.
``enginestats`` the engine's own counts during a server run, sampled from its Prometheus ``/metrics`` (requests
              running / waiting, preemptions, KV usage, generated tokens).
``curve``     the KV-bound report: per-level table, summary (capacity ratio vs throughput gain), curve PNG.
``preload``   vLLM on CPU as its guide asks: tcmalloc and Intel OpenMP in ``LD_PRELOAD``, no legacy
              ``VLLM_CPU_KVCACHE_SPACE`` (``python -m a3_serve.bench.preload`` prints the value for shell launches).
``logscan``   the first exception a dead engine's log names (the error the user sees).

Report contract (``throughput.json``, schema ``a3-serve/throughput/1``)
----------------------------------------------------------------------
``{"schema", "command", "created", "environment": {...}, "config": {...},
   "models": {"dense": M, "compressed": M}, "ratios": {metric: compressed / dense}, "metrics": [META...]}``
where ``M = {"path", "runs": [{metric: value}], "median": {metric: value}}`` and ``META = {"key", "label",
"unit", "better": "higher" | "lower"}`` lists every metric present, in display order (see
:data:`a3_serve.bench.report.METRICS`). A metric an engine does not measure is absent, never guessed.
``config.comparability`` is ``{"checked", "problems": [...], "allow_mismatch"}``: the two model folders are
compared (tokenizer, vocabulary, an a3 export's recorded source; :func:`a3_serve.provenance.comparability_problems`)
before anything is measured, and a non-empty ``problems`` list appears only in a report made with --allow-mismatch.
A ``--scenario kv-bound`` report has the same keys plus ``"curve"`` (:mod:`a3_serve.bench.curve`: every concurrency
level and a summary); its ``models`` and ``ratios`` describe the highest level, where both caches are saturated.

Events contract (``--events``: one JSON object per line on stdout, nothing else there)
------------------------------------------------------------------------------------
``{"event": "start", "total": N}``, then per finished step ``{"event": "progress", "done": i, "total": N,
"message": "..."}``, then ``{"event": "done", "report": "/abs/path/throughput.json"}``. On failure the
process exits non-zero with a one-line ``error: ...`` on stderr (exit 2: bad input, 1: an engine failed).
"""
