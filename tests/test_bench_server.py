"""a3-bench-server end to end: the real service (uvicorn in a subprocess, real HTTP on 127.0.0.1) running real
benchmarks (`python -m a3_serve.bench` workers, vLLM on CPU) of the demo SmolLM2 against its A3 export.

One service (with a token) serves the whole file: at start it gets a run whose compressed checkpoint has a
truncated safetensors file (the engine crashes) and then a good run; the tests watch both, then cancel, time out,
fill the queue, and kill / restart the service on the same data dir. test_bench_dashboard.py reuses the service
and its finished run (session fixtures, memoised here so that one export and one good run serve both files).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

if os.environ.get("A3_SERVE_SKIP_VLLM") == "1":
    pytest.skip("A3_SERVE_SKIP_VLLM=1: the benchmark runs use vLLM", allow_module_level=True)

import httpx  # noqa: E402

from a3_serve.bench.server.models import CLI_FLAGS  # noqa: E402
from a3_serve.bench.server.runner import marked_pids  # noqa: E402

from conftest import hf_param_bytes, link_model  # noqa: E402

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKLOAD = {"num_prompts": 4, "input_len": 16, "output_len": 8, "repeats": 1}
EAGER = {"enforce_eager": True}  # vLLM starts faster without torch.compile
RUN_WAIT = 480  # seconds one real run may take on a busy 2-core machine
FINAL = {"succeeded", "failed", "cancelled", "interrupted"}
BIN = Path(sys.executable).parent
_SHARED: dict[str, Any] = {}  # session fixtures are imported by test_bench_dashboard.py: build them once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """`python -m a3_serve.bench.server` in its own session; start / kill -9 / stop (SIGTERM) / restart."""

    def __init__(self, data_dir: Path, roots: list[Path], token: Optional[str] = TOKEN, extra: tuple[str, ...] = ()):
        self.data_dir, self.roots, self.token, self.extra = data_dir, roots, token, extra
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "BenchServer":
        cmd = [sys.executable, "-m", "a3_serve.bench.server", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--log-level", "warning", *self.extra]
        for root in self.roots:
            cmd += ["--model-root", str(root)]
        env = dict(os.environ, A3_SERVE_NO_PROGRESS="1")
        env.pop("A3_BENCH_TOKEN", None)
        if self.token:
            env["A3_BENCH_TOKEN"] = self.token
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the service (its workers live on in their own sessions, as after a crash)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (uvicorn's graceful shutdown); SIGKILL if it hangs. Returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server ignored SIGTERM for {timeout} s") from None

    def client(self, token: Optional[str] = TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url,
                            headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=60)


def submit(client: httpx.Client, dense: Path, compressed: Path, **kw: Any) -> dict[str, Any]:
    body = {"dense": str(dense), "compressed": str(compressed), "engine": "vllm", "workload": dict(WORKLOAD),
            "engine_options": dict(EAGER), **kw}
    r = client.post("/runs", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/runs/{r.json()['id']}"
    return r.json()


def wait_run(client: httpx.Client, run_id: str, until: set[str], timeout: float = RUN_WAIT,
             seen: Optional[list[dict[str, Any]]] = None, check=None) -> dict[str, Any]:
    """Poll GET /runs/{id} until its status is in ``until`` (or ``check(run)`` holds); records what it saw."""
    end = time.monotonic() + timeout
    while True:
        run = client.get(f"/runs/{run_id}").json()
        if seen is not None and (not seen or seen[-1]["progress"] != run["progress"]
                                 or seen[-1]["status"] != run["status"]):
            seen.append(run)
        if run["status"] in until or (check is not None and check(run)):
            return run
        assert time.monotonic() < end, f"run {run_id} still {run['status']} after {timeout} s: {run['progress']}"
        time.sleep(0.5)


def wait_gone(run_id: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while marked_pids(run_id):
        assert time.monotonic() < end, f"processes of run {run_id} still alive: {marked_pids(run_id)}"
        time.sleep(0.2)


def worker_started(run: dict[str, Any]) -> bool:
    """The worker has printed its start event (so `python -m a3_serve.bench` is past its imports)."""
    return run["status"] == "running" and run["progress"]["total"] is not None


def wait_worker(client: httpx.Client, run_id: str) -> dict[str, Any]:
    run = wait_run(client, run_id, FINAL, timeout=180, check=worker_started)
    assert worker_started(run), run
    return run


# -- shared fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bench_models(demo_model: Path, smol_a3_cr01: Path, tmp_path_factory) -> dict[str, Path]:
    """dense (the demo model), compressed (the shared CR 0.1 export), a copy of it with truncated safetensors, and a
    model folder outside the roots (reached through a symlink inside one). The root is the export's own folder."""
    if "models" not in _SHARED:
        compressed = smol_a3_cr01
        root = compressed.parent
        broken = root / "broken"
        link_model(compressed, broken)
        weights = broken / "model.safetensors"
        half = weights.read_bytes()[: weights.stat().st_size // 2]
        weights.unlink()  # a hard link to the shared export's weights: replace it, never truncate it
        weights.write_bytes(half)
        outside = tmp_path_factory.mktemp("outside_roots") / "model"
        outside.mkdir()
        shutil.copy(compressed / "config.json", outside / "config.json")
        (outside / "model.safetensors").write_bytes(b"\0" * 16)
        (root / "escape").symlink_to(outside, target_is_directory=True)
        (root / "not-a-model").mkdir()
        _SHARED["models"] = {"dense": demo_model, "compressed": compressed, "broken": broken, "root": root,
                             "outside": outside, "escape": root / "escape", "empty": root / "not-a-model"}
    return _SHARED["models"]


@pytest.fixture(scope="session")
def bench_server(bench_models, tmp_path_factory):
    """The service (token, queue of 2, 5 s kill grace), started with a crashing run and then a good run queued."""
    if "server" not in _SHARED:
        data = tmp_path_factory.mktemp("bench_service") / "data"
        server = BenchServer(data, [bench_models["root"], bench_models["dense"].parent],
                             extra=("--queue-size", "2", "--kill-grace", "5", "--run-timeout", "1200")).start()
        with server.client() as c:
            # the transformers engine crashes the same way on truncated weights and starts far faster than vLLM
            crash = submit(c, bench_models["dense"], bench_models["broken"], label="truncated safetensors", engine="hf",
                           engine_options={})
            good = submit(c, bench_models["dense"], bench_models["compressed"], label="good")
        server.runs = {"crash": crash["id"], "good": good["id"]}  # type: ignore[attr-defined]
        _SHARED["server"] = server
    server = _SHARED["server"]
    yield server
    if server.proc is not None and server.proc.poll() is None:
        for run in server.client().get("/runs").json()["runs"]:
            if run["status"] in ("queued", "running"):
                server.client().post(f"/runs/{run['id']}/cancel")
        server.stop()


@pytest.fixture(scope="session")
def finished_run(bench_server) -> dict[str, Any]:
    """The good run, once it has succeeded (restarting the service if an earlier test left it stopped)."""
    if bench_server.proc is None or bench_server.proc.poll() is not None:
        bench_server.start()
    with bench_server.client() as c:
        run = wait_run(c, bench_server.runs["good"], FINAL)
    assert run["status"] == "succeeded", run
    return run


@pytest.fixture()
def client(bench_server):
    with bench_server.client() as c:
        yield c


# -- auth, validation, paths -----------------------------------------------------------------------------------
def test_token_required_everywhere_but_healthz(bench_server):
    assert httpx.get(bench_server.url + "/healthz").json()["auth"] is True
    rid = bench_server.runs["good"]
    anon = bench_server.client(token=None)
    wrong = bench_server.client(token="wrong")
    for method, path in (("GET", "/runs"), ("GET", f"/runs/{rid}"), ("GET", f"/runs/{rid}/events"),
                         ("GET", f"/runs/{rid}/report.json"), ("GET", f"/runs/{rid}/report.md"),
                         ("GET", f"/runs/{rid}/log"), ("POST", f"/runs/{rid}/cancel"), ("DELETE", f"/runs/{rid}"),
                         ("POST", "/runs"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("GET", "/")):
        for c in (anon, wrong):
            r = c.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
    r = anon.get("/runs")
    assert r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["detail"]
    # the browser way: /?token=T sets a cookie (HttpOnly, SameSite=Strict) and redirects; the cookie then works
    r = anon.get("/", params={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    assert anon.get("/runs").status_code == 200  # httpx kept the cookie
    assert wrong.get("/", params={"token": "nope"}).status_code == 401
    with bench_server.client() as c:
        assert c.get("/runs").status_code == 200


def test_malformed_payloads_are_422(client, bench_models):
    d, c = str(bench_models["dense"]), str(bench_models["compressed"])
    bad = [
        ("not json", None, "json"),
        ({"dense": d}, None, "compressed"),
        ({"dense": d, "compressed": c, "engine": "tgi"}, None, "engine"),
        ({"dense": d, "compressed": c, "workload": {"num_prompts": 0}}, None, "num_prompts"),
        ({"dense": d, "compressed": c, "workload": {"input_len": "many"}}, None, "input_len"),
        ({"dense": d, "compressed": c, "workload": {"input_len": 64, "output_len": 64, "max_model_len": 100}},
         None, "max_model_len"),
        ({"dense": d, "compressed": c, "workload": {"dtype": "int3"}}, None, "dtype"),
        ({"dense": d, "compressed": c, "surprise": 1}, None, "surprise"),
        ({"dense": d, "compressed": c, "engine": "hf", "engine_options": {"mode": "server"}}, None, "server"),
        ({"dense": d, "compressed": c, "timeout_s": 5000}, None, "--run-timeout"),
        ({"dense": "", "compressed": c}, None, "dense"),
        ({"dense": d, "compressed": c + "\0x"}, None, "compressed"),
        ([1, 2], None, "body"),
    ]
    before = client.get("/runs").json()["runs"]
    for body, _, needle in bad:
        r = client.post("/runs", content=body, headers={"Content-Type": "application/json"}) if isinstance(body, str) \
            else client.post("/runs", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        payload = r.json()
        assert isinstance(payload["detail"], list) and payload["detail"][0]["loc"], payload
        assert needle in payload["message"] or needle in json.dumps(payload["detail"]), (needle, payload)
        assert "\n" not in payload["message"]
    assert len(client.get("/runs").json()["runs"]) == len(before)  # nothing was queued


def test_model_paths_must_lie_under_the_roots(client, bench_models):
    d, root = str(bench_models["dense"]), bench_models["root"]
    forbidden = [
        ("/etc", "dense"),                                               # absolute, outside
        (str(bench_models["outside"]), "compressed"),                    # a real-looking model folder, outside
        (str(root / "compressed" / ".." / ".." / bench_models["outside"].parent.name / "model"), "compressed"),  # '..'
        (str(bench_models["escape"]), "compressed"),                    # symlink inside a root pointing outside
        ("../../etc", "compressed"),                                     # relative, climbs out of every root
    ]
    for path, field in forbidden:
        body = {"dense": path if field == "dense" else d, "compressed": path if field == "compressed" else d}
        r = client.post("/runs", json=body)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "outside the allowed model roots" in r.json()["detail"] and "--model-root" in r.json()["detail"], r.text
    unusable = [(str(root / "missing"), "does not exist"), (str(bench_models["empty"]), "no config.json"),
                (str(bench_models["compressed"] / "config.json"), "is a file")]
    for path, needle in unusable:
        r = client.post("/runs", json={"dense": d, "compressed": path})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "compressed"] and needle in r.json()["message"], r.text
    r = client.post("/runs", json={"dense": d, "compressed": d, "workload": {"ppl_data": "/etc/passwd"}})
    assert r.status_code == 403 and "ppl_data" in r.json()["detail"], r.text
    assert client.get("/runs/does-not-exist").status_code == 404
    assert client.post("/runs/does-not-exist/cancel").status_code == 404
    assert client.get("/runs/does-not-exist/events").status_code == 404


def test_docs_openapi_and_metrics(client):
    html = client.get("/docs").text
    assert "swagger" in html.lower() and "/openapi.json" in html
    if "/docs/assets/" in html:  # vLLM's vendored Swagger UI: the docs work offline
        assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/runs", "/runs/{run_id}", "/runs/{run_id}/cancel", "/runs/{run_id}/events",
                 "/runs/{run_id}/report.json", "/runs/{run_id}/report.md", "/runs/{run_id}/report.png", "/healthz",
                 "/metrics"):
        assert path in spec["paths"], path
    text = client.get("/metrics").text
    for needle in ('a3_bench_runs{status="queued"}', 'a3_bench_runs{status="interrupted"}', "a3_bench_queue_length",
                   "a3_bench_worker_busy"):
        assert needle in text, needle


# -- real runs -------------------------------------------------------------------------------------------------
def test_engine_crash_fails_the_run_with_its_reason(bench_server):
    with bench_server.client() as c:
        run = wait_run(c, bench_server.runs["crash"], FINAL)
        assert run["status"] == "failed", run
        assert run["exit_code"] == 1, run
        assert "compressed" in run["error"] and "SafetensorError" in run["error"], run["error"]
        assert "\n" not in run["error"]
        assert run["progress"]["total"] == 2 and run["progress"]["done"] == 1  # the dense measurement finished
        assert run["results"] is None
        r = c.get(f"/runs/{run['id']}/report.json")
        assert r.status_code == 409 and "failed" in r.json()["detail"]
        assert "SafetensorError" in c.get(f"/runs/{run['id']}/log", params={"lines": 50}).text
        assert c.get("/healthz").json()["status"] == "ok"  # the service shrugged it off
    wait_gone(run["id"])


# -- the command line (while the good run runs) --------------------------------------------------------------
def test_cli_help_and_one_line_errors(tmp_path, capsys):
    """The console script's --help explains every option; bad options are one `error:` line and exit 2."""
    from a3_serve.bench.server.cli import main

    exe = BIN / "a3-bench-server"
    assert exe.is_file(), "a3-bench-server missing: pip install -e . (pyproject's console script)"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--host", "--port", "--data-dir", "--model-root", "--token", "A3_BENCH_TOKEN", "--queue-size",
                "--run-timeout", "--kill-grace", "--log-level", "127.0.0.1", "/healthz", "/metrics", "/docs"):
        assert opt in proc.stdout, opt
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [(["--bogus"], "--bogus"), (["--port", "70000"], "--port 70000"), (["--port", "x"], "--port"),
             (["--model-root", str(tmp_path / "nope")], "--model-root"), (["--queue-size", "0"], "--queue-size"),
             (["--run-timeout", "0"], "--run-timeout"), (["--token", " "], "token is empty"),
             (["--data-dir", "/proc/a3"], "--data-dir"),
             (["--port", str(taken.getsockname()[1])], "pick another --port"),
             (["--data-dir", str(bench_data_dir_in_use(tmp_path))], "in use by another a3-bench-server")]
    for argv, needle in cases:
        try:
            code = main(argv + ([] if "--data-dir" in argv else ["--data-dir", str(tmp_path / "data")]))
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (
            argv, code, err)
    taken.close()


def bench_data_dir_in_use(tmp_path: Path) -> Path:
    """A data dir whose lock is held (as by a running service)."""
    import fcntl

    data = tmp_path / "busy"
    data.mkdir()
    lock = open(data / "server.lock", "w")
    lock.write("12345")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _SHARED.setdefault("locks", []).append(lock)
    return data


def test_request_fields_mirror_the_benchmark_cli():
    """Every request field the service passes on is an option of `python -m a3_serve.bench`."""
    from a3_serve.bench.cli import build_parser

    options = {s for a in build_parser()._actions for s in a.option_strings}
    assert set(CLI_FLAGS.values()) <= options, set(CLI_FLAGS.values()) - options
    for flag in ("--dense", "--compressed", "--out-dir", "--events"):
        assert flag in options


def test_next_run_succeeds_with_progress_and_reports(bench_server, finished_run, bench_models):
    run = finished_run
    with bench_server.client() as c:
        assert run["progress"] == {"done": 2, "total": 2, "message": "finished"}
        assert run["error"] is None and run["exit_code"] == 0
        assert run["command"][1:3] == ["-m", "a3_serve.bench"] and run["command"][-1] == "--events"
        assert run["command"][run["command"].index("--out-dir") + 1].startswith(str(bench_server.data_dir))
        res = run["results"]
        assert res["schema"] == "a3-serve/throughput/1"
        assert res["models"]["dense"]["path"] == str(bench_models["dense"])
        assert res["models"]["compressed"]["path"] == str(bench_models["compressed"])
        assert res["config"]["num_prompts"] == 4 and res["config"]["repeats"] == 1
        for key in ("output_tokens_per_s", "kv_cache_tokens", "peak_rss_bytes"):
            for name in ("dense", "compressed"):
                assert res["models"][name]["median"][key] > 0
            assert res["ratios"][key] > 0
        # the engine's own figures: same KV memory, capacity scales with the head size (64 -> 48); whole 24-token
        # sequences per block count; weight bytes = the transformers model's parameters (fp32)
        assert res["ratios"]["kv_cache_tokens"] == pytest.approx(64 / 48, rel=0.02)
        for name in ("dense", "compressed"):
            m, block = res["models"][name]["median"], res["models"][name]["runs"][0]["kv_block_size"]
            assert m["max_concurrency"] == pytest.approx(m["kv_cache_tokens"] / block / -(-24 // block))
            assert m["weight_bytes"] == pytest.approx(hf_param_bytes(bench_models[name]), rel=0.002)
            assert m["requests_per_s"] == pytest.approx(m["output_tokens_per_s"] / 8)
        assert run["ratios"] == res["ratios"]
        assert c.get(f"/runs/{run['id']}/report.json").json() == res
        md = c.get(f"/runs/{run['id']}/report.md")
        assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
        assert "| metric | dense | compressed | compressed / dense |" in md.text and "KV-cache capacity" in md.text
        png = c.get(f"/runs/{run['id']}/report.png")
        assert (png.status_code == 200 and png.headers["content-type"] == "image/png"
                and png.content[:8] == b"\x89PNG\r\n\x1a\n")
        listed = {r["id"]: r for r in c.get("/runs").json()["runs"]}
        assert listed[run["id"]]["status"] == "succeeded" and listed[run["id"]]["ratios"] == res["ratios"]
        assert [r["id"] for r in c.get("/runs", params={"status": "succeeded"}).json()["runs"]] == [run["id"]]
        # the stream of a finished run: its final state once, then `end`, then the stream closes
        events = read_events(c, run["id"], timeout=30)
        assert [e["event"] for e in events] == ["run", "end"] and events[-1]["data"]["status"] == "succeeded"
        assert c.post(f"/runs/{run['id']}/cancel").status_code == 409
        metrics = c.get("/metrics").text
        assert 'a3_bench_runs{status="succeeded"} 1.0' in metrics and 'a3_bench_runs{status="failed"} 1.0' in metrics
    wait_gone(run["id"])


def read_events(client: httpx.Client, run_id: str, timeout: float, sink: Optional[list] = None) -> list[dict[str, Any]]:
    """Read /runs/{id}/events until `end` (or the stream closes); each event as {"event", "id", "data"}."""
    events = sink if sink is not None else []
    cur: dict[str, Any] = {}
    with client.stream("GET", f"/runs/{run_id}/events", timeout=httpx.Timeout(timeout, read=timeout)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if cur:
                    events.append(cur)
                    if cur.get("event") == "end":
                        break
                cur = {}
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            cur[key] = json.loads(value) if key == "data" else value
    return events


def test_stream_cancel_and_queue_limit(bench_server, finished_run, bench_models):
    """A live run streams its progress; the queue (size 2) turns a fourth run away with 429; queued runs cancel at
    once, the running one within the kill grace, and none of its processes survive."""
    dense, comp = bench_models["dense"], bench_models["compressed"]
    with bench_server.client() as c:
        live = submit(c, dense, comp, label="to cancel")
        events: list[dict[str, Any]] = []
        reader = threading.Thread(target=read_events, args=(bench_server.client(), live["id"], 300, events),
                                  daemon=True)
        reader.start()
        wait_worker(c, live["id"])
        q1 = submit(c, dense, comp, label="queued 1")
        q2 = submit(c, dense, comp, label="queued 2")
        full = c.post("/runs", json={"dense": str(dense), "compressed": str(comp)})
        assert full.status_code == 429 and "queue is full" in full.json()["detail"] and full.headers["retry-after"]
        health = c.get("/healthz").json()
        assert health["worker_busy"] is True and health["queue_length"] == 2, health
        assert c.delete(f"/runs/{q1['id']}").json()["status"] == "cancelled"
        r = c.post(f"/runs/{q2['id']}/cancel").json()
        assert r["status"] == "cancelled" and r["error"] == "cancelled before it started"
        assert marked_pids(live["id"]), "the worker should be running"
        t0 = time.monotonic()
        r = c.post(f"/runs/{live['id']}/cancel")
        assert (r.status_code == 200 and r.json()["status"] == "cancelled"
                and r.json()["error"] == "cancelled by request")
        assert time.monotonic() - t0 < 20
        reader.join(timeout=30)
        assert not reader.is_alive()
        statuses = [e["data"]["status"] for e in events]
        assert events[-1]["event"] == "end" and statuses[-1] == "cancelled", statuses
        assert "running" in statuses and any(e["data"]["progress"]["total"] == 2 for e in events), events
        assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
        assert c.get("/healthz").json()["worker_busy"] is False
    wait_gone(live["id"], timeout=10)


def test_timeout_kills_the_worker(bench_server, finished_run, bench_models):
    with bench_server.client() as c:
        run = submit(c, bench_models["dense"], bench_models["compressed"], timeout_s=3, label="timeout")
        run = wait_run(c, run["id"], FINAL, timeout=60)
        assert run["status"] == "failed" and run["error"].startswith("timed out after 3 s"), run
    wait_gone(run["id"], timeout=10)


def test_restart_keeps_runs_and_marks_running_ones_interrupted(bench_server, finished_run, bench_models):
    dense, comp = bench_models["dense"], bench_models["compressed"]
    with bench_server.client() as c:
        before = {r["id"]: r["status"] for r in c.get("/runs", params={"limit": 1000}).json()["runs"]}
        victim = submit(c, dense, comp, label="killed with the service")
        wait_worker(c, victim["id"])
    bench_server.kill()  # kill -9: no shutdown code runs; the worker lives on in its own session
    assert marked_pids(victim["id"]), "the worker should have outlived the service"
    bench_server.start()
    wait_gone(victim["id"], timeout=15)  # the new service killed the leftovers at start-up
    with bench_server.client() as c:
        after = {r["id"]: r for r in c.get("/runs", params={"limit": 1000}).json()["runs"]}
        assert {k: after[k]["status"] for k in before} == before
        run = c.get(f"/runs/{victim['id']}").json()
        assert run["status"] == "interrupted" and "service stopped while the run was running" in run["error"], run
        good = c.get(f"/runs/{finished_run['id']}").json()
        assert good["status"] == "succeeded" and good["results"] == finished_run["results"]
        assert c.get(f"/runs/{finished_run['id']}/report.json").json() == finished_run["results"]
        # a graceful stop (SIGTERM) stops the running worker and marks its run at once
        second = submit(c, dense, comp, label="stopped with the service")
        wait_worker(c, second["id"])
    assert bench_server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert "Traceback" not in bench_server.log.read_text()
    wait_gone(second["id"], timeout=15)
    bench_server.start()
    with bench_server.client() as c:
        run = c.get(f"/runs/{second['id']}").json()
        assert run["status"] == "interrupted" and "service stopped" in run["error"], run
        assert c.get("/healthz").json()["worker_busy"] is False
        metrics = c.get("/metrics").text
        assert ('a3_bench_runs{status="interrupted"} 2.0' in metrics
                and 'a3_bench_runs{status="succeeded"} 1.0' in metrics)
