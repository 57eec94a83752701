"""The engine's own counts during a run: a thread samples a vLLM server's Prometheus ``/metrics``.

What is read (vLLM 0.32 names; a metric with several label sets, e.g. one per engine, is summed):

- ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``: requests the scheduler runs in a step / keeps
  queued (gauges);
- ``vllm:kv_cache_usage_perc``: the fraction of KV-cache blocks in use (gauge, 0-1);
- ``vllm:num_preemptions_total``: requests evicted from the KV cache to make room (counter);
- ``vllm:generation_tokens_total``: tokens generated (counter), for the engine-side throughput while saturated.

The summary (:func:`summarize`) covers the samples between ``start()`` and ``stop()``. "Saturated" samples are
those with a non-empty waiting queue: the server had more requests than the engine admitted, so the running count
then is what the engine could hold at once.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from typing import Any, Callable, Optional

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions_total"
GENERATED = "vllm:generation_tokens_total"
WANTED = (RUNNING, WAITING, KV_USAGE, PREEMPTIONS, GENERATED)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str, names: tuple[str, ...] = WANTED) -> dict[str, float]:
    """``{name: value}`` of the Prometheus text exposition ``text``, label sets summed, for ``names`` present."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in names:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


class EngineSampler:
    """Samples ``fetch()`` (the text of ``/metrics``) every ``interval`` s in a daemon thread."""

    def __init__(self, fetch: Callable[[], str], interval: float = 0.25):
        self.fetch, self.interval = fetch, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _take(self) -> None:
        try:
            values = parse_metrics(self.fetch())
        except Exception:
            self.errors += 1
            return
        if values:
            self.samples.append((time.perf_counter(), values))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def start(self) -> "EngineSampler":
        self._take()  # the counters' values before the run
        self._thread = threading.Thread(target=self._loop, daemon=True, name="engine-metrics")
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._take()  # the counters' values after the run
        return summarize(self.samples)


def summarize(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The run's engine figures from timed samples (first and last bracket the run); {} without samples.

    ``running_max``, ``running_mean`` (samples with anything running), ``running_saturated_mean`` (samples with a
    waiting queue; absent when it never formed), ``waiting_max``, ``kv_usage_max`` (0-1), ``preemptions`` (counter
    delta), ``engine_samples``, ``queued_fraction`` (the share of the run between the first and the last saturated
    sample) and ``saturated_output_tokens_per_s``: generated tokens per second over that stretch (absent when it
    covers less than half the run: a queue that forms only while the first prompts prefill)."""
    if not samples:
        return {}
    res: dict[str, float] = {"engine_samples": float(len(samples))}
    running = [v.get(RUNNING, 0.0) for _, v in samples]
    waiting = [v.get(WAITING, 0.0) for _, v in samples]
    busy = [r for r in running if r > 0]
    res["running_max"] = max(running)
    if busy:
        res["running_mean"] = statistics.fmean(busy)
    res["waiting_max"] = max(waiting)
    saturated = [(t, v) for t, v in samples if v.get(WAITING, 0.0) > 0]
    if saturated:
        res["running_saturated_mean"] = statistics.fmean(v.get(RUNNING, 0.0) for _, v in saturated)
    span = samples[-1][0] - samples[0][0]
    if len(saturated) >= 2 and all(GENERATED in v for _, v in saturated):
        (t0, v0), (t1, v1) = saturated[0], saturated[-1]
        # a rate only where the queue lasted through most of the run: a queue that forms while the first prompts
        # prefill says nothing about the sustained rate
        if t1 > t0 and t1 - t0 >= 0.5 * span:
            res["saturated_output_tokens_per_s"] = (v1[GENERATED] - v0[GENERATED]) / (t1 - t0)
    if saturated and span > 0:
        res["queued_fraction"] = (saturated[-1][0] - saturated[0][0]) / span
    usage = [v[KV_USAGE] for _, v in samples if KV_USAGE in v]
    if usage:
        res["kv_usage_max"] = max(usage)
    pre = [v[PREEMPTIONS] for _, v in samples if PREEMPTIONS in v]
    if pre:
        res["preemptions"] = pre[-1] - pre[0]
    return res


def server_metrics_fetcher(base_url: str, token: Optional[str] = None) -> Callable[[], str]:
    """A ``fetch`` for :class:`EngineSampler`: GET ``base_url/metrics`` (one connection, reused)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(timeout=10.0, headers=headers)
    url = base_url.rstrip("/") + "/metrics"

    def fetch() -> str:
        r = client.get(url)
        r.raise_for_status()
        return r.text

    fetch.close = client.close  # type: ignore[attr-defined]
    return fetch


def engine_figures(fetch: Callable[[], str], run: Callable[[], Any], interval: float = 0.25) -> tuple[Any, dict]:
    """``run()`` while sampling the engine; its result and the summary."""
    sampler = EngineSampler(fetch, interval).start()
    try:
        result = run()
    finally:
        figures = sampler.stop()
    return result, figures
