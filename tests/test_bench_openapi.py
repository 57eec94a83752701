"""OpenAPI fuzzing of the live a3-bench-server with schemathesis (its `schemathesis run` command line).

The service runs for real (uvicorn in a subprocess, a bearer token, real HTTP). Its only model root is an EMPTY
folder, so no generated request can name a model: POST /runs is fuzzed like every other operation and is always
refused (403 outside the root, 422 otherwise) before a worker could start; the last test checks that no run was
created. All of schemathesis' checks run (no 5xx, documented status codes / content types / headers / body
schemas, invalid input rejected, the token enforced, Allow headers of 405s) except `positive_data_acceptance`:
schema-valid run requests name folders that do not exist, which the service rightly answers with 422.
(schemathesis' pytest plugin, `schemathesis.pytest.from_fixture`, does not work with pytest 9: it sets the removed
`Function._nodeid`; the command line is the supported way.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_server import TOKEN, BenchServer

ST = Path(sys.executable).parent / "schemathesis"

EXAMPLES = 20  # per operation and phase; the whole run takes about 20 s


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_root")  # empty: no request can name a model, so no run ever starts
    server = BenchServer(tmp_path_factory.mktemp("fuzz") / "data", [root], token=TOKEN,
                         extra=("--queue-size", "1", "--run-timeout", "60")).start()
    yield server
    server.stop()


def test_schemathesis_finds_no_failure(fuzz_server, tmp_path):
    cmd = [str(ST), "run", f"{fuzz_server.url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES),
           "--seed", "1", "--workers", "1", "--generation-database", "none", "--no-color", "--request-timeout", "30",
           "--report", "junit", "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "13 passed" in out or "passed" in out, out[-3000:]
    assert "5xx" not in out.split("SUMMARY")[-1]


def test_fuzzing_started_no_run_and_the_service_is_healthy(fuzz_server):
    with fuzz_server.client() as c:
        assert c.get("/runs").json()["runs"] == []
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["worker_busy"] is False
        assert 'a3_bench_runs{status="running"} 0.0' in c.get("/metrics").text


def test_every_documented_operation_needs_the_token(fuzz_server):
    with fuzz_server.client() as c:
        spec = c.get("/openapi.json").json()
    anon = fuzz_server.client(token=None)
    checked = 0
    for path, ops in spec["paths"].items():
        url = path.replace("{run_id}", "abc123")
        for method in ops:
            r = anon.request(method.upper(), url)
            if path == "/healthz":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                checked += 1
    assert checked >= 10
