"""Hardening of the benchmark and its service, each check against the real thing.

* Comparability: the benchmark (``python -m a3_serve.bench`` / ``benchmarks/throughput.py``) and the service
  refuse a dense / "compressed" pair that does not share the tokenizer and vocabulary, or whose compressed side is
  an a3-export of another model; ``--allow-mismatch`` (``allow_mismatch`` in a run request) measures them anyway
  and the report says so. The folders are real: the demo SmolLM2, its real export, and copies of the demo's
  config and tokenizer with the vocabulary (or the depth) changed, whose weights are links to the demo's.
* The service (uvicorn in a subprocess, real HTTP): the Host check against DNS rebinding, the dashboard's
  ``/?token=`` login never reaching the access log, NaN / Infinity in a body (422, not 500), and the body-size
  limit (413 without reading a 5 MB body; a 422 never echoes a large input).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import assert_one_line_error

TOKEN = "hardening-SECRET-4242"
WRONG = "wrong-SECRET-7777"


# -- real folders that do not match ----------------------------------------------------------------------------
def _relinked(src: Path, dst: Path, config_change: dict[str, Any]) -> Path:
    """``dst``: src's config (changed) and tokenizer files (copied), its weight files linked (not copied)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_change)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def pair(demo_model: Path, tmp_path_factory) -> dict[str, Path]:
    """``dense`` (the demo SmolLM2); ``other_vocab``: the demo with one token added to its tokenizer and vocabulary
    (another tokenizer, as a 152k-vocabulary model against a 49k one); ``root``: their model root."""
    root = tmp_path_factory.mktemp("hardening_models")
    other = _relinked(demo_model, root / "other-vocab", {"vocab_size": json.loads((demo_model / "config.json")
                                                                                  .read_text())["vocab_size"] + 1})
    tok = json.loads((other / "tokenizer.json").read_text())
    new_id = max(t["id"] for t in tok["added_tokens"]) + 1
    tok["added_tokens"].append({"id": max(new_id, max(tok["model"]["vocab"].values()) + 1), "content": "<|extra|>",
                                "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return {"dense": demo_model, "other_vocab": other, "root": root}


def bench_main(capsys, *args: str) -> tuple[int, str]:
    """``python -m a3_serve.bench ARGS`` in this process (each interpreter start costs ~10 s here)."""
    from a3_serve.bench.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        code = main(list(args))
    except SystemExit as exc:  # an argparse error
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, capsys.readouterr().err


def test_cli_refuses_another_tokenizer_and_vocabulary(pair, tmp_path, capsys):
    d, o = str(pair["dense"]), str(pair["other_vocab"])
    for dense, comp in ((d, o), (o, d)):
        code, err = bench_main(capsys, "--engine", "hf", "--dense", dense, "--compressed", comp,
                               "--out-dir", str(tmp_path))
        assert_one_line_error(code, err, "not comparable", "different tokenizers", "vocabulary sizes differ (",
                              "--allow-mismatch")
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_cli_refuses_an_export_of_another_model(demo_model, smol_a3_cr01, tmp_path, capsys):
    """The real export of SmolLM2 against a dense folder that is not its source (a deeper SmolLM2 config): the
    export's recorded source (fingerprint, or the source shape for exports without one) does not match."""
    deeper = _relinked(demo_model, tmp_path / "deeper", {"num_hidden_layers": 31})
    code, err = bench_main(capsys, "--engine", "hf", "--dense", str(deeper), "--compressed", str(smol_a3_cr01),
                           "--out-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not comparable", "--allow-mismatch")
    assert "tokenizer" not in err and "vocabulary" not in err, err  # the same tokenizer: only the source differs
    # the export against its own source passes the check (and stops at the next, unrelated input error)
    code, err = bench_main(capsys, "--engine", "hf", "--dense", str(demo_model), "--compressed", str(smol_a3_cr01),
                           "--input-len", "0", "--out-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--input-len")


def test_allow_mismatch_measures_and_the_report_says_so(pair, tmp_path, capsys, monkeypatch):
    """--allow-mismatch passes the check; the report's config and Markdown name the problems. (The engine is
    replaced by fixed figures: the mismatched folder's weights are the demo's, which its larger vocabulary cannot
    load; what is tested is the check and the report.)"""
    import a3_serve.bench.cli as cli

    d, o = str(pair["dense"]), str(pair["other_vocab"])
    code, err = bench_main(capsys, "--allow-mismatch", "--engine", "hf", "--dense", d, "--compressed", o,
                           "--input-len", "0", "--out-dir", str(tmp_path))
    assert_one_line_error(code, err, "--input-len")  # past the comparability check
    assert "--allow-mismatch" in cli.build_parser().format_help()

    def fake_worker(spec: dict[str, Any], timeout: float, label: str, env=None) -> dict[str, float]:
        return {"output_tokens_per_s": 100.0 if spec["model"] == str(Path(d).resolve()) else 120.0, "elapsed_s": 1.0}

    monkeypatch.setattr(cli, "_run_worker", fake_worker)
    out = tmp_path / "report"
    code, err = bench_main(capsys, "--allow-mismatch", "--engine", "hf", "--dense", d, "--compressed", o,
                           "--num-prompts", "1", "--repeats", "1", "--quiet", "--out-dir", str(out))
    assert code == 0, err
    report = json.loads((out / "throughput.json").read_text())
    comp = report["config"]["comparability"]
    assert comp["allow_mismatch"] is True and comp["checked"] is True
    assert any("tokenizer" in p for p in comp["problems"]) and any("vocabulary" in p for p in comp["problems"])
    assert report["ratios"]["output_tokens_per_s"] == pytest.approx(1.2)
    md = (out / "throughput.md").read_text()
    assert "not comparable" in md and "--allow-mismatch" in md
    # a comparable pair records an empty list, and no warning
    code, err = bench_main(capsys, "--engine", "hf", "--dense", d, "--compressed", d, "--num-prompts", "1",
                           "--repeats", "1", "--quiet", "--out-dir", str(out))
    assert code == 0, err
    report = json.loads((out / "throughput.json").read_text())
    assert report["config"]["comparability"] == {"checked": True, "problems": [], "allow_mismatch": False}
    assert "not comparable" not in (out / "throughput.md").read_text()


# -- the service -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``python -m a3_serve.bench.server`` in its own session, at the default log level (access log on)."""

    def __init__(self, data: Path, roots: list[Path], *extra: str, allowed_hosts: str = ""):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / "server.log"
        cmd = [sys.executable, "-m", "a3_serve.bench.server", "--port", str(self.port), "--data-dir", str(data), *extra]
        for root in roots:
            cmd += ["--model-root", str(root)]
        env = dict(os.environ, A3_SERVE_NO_PROGRESS="1", PYTHONUNBUFFERED="1", A3_BENCH_TOKEN=TOKEN)
        env["A3_BENCH_ALLOWED_HOSTS"] = allowed_hosts
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_up(self, timeout: float = 180) -> "Service":
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, (f"server exited with {self.proc.returncode}:\n"
                                              f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def client(self, token: Optional[str] = TOKEN, **kw: Any):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"} if token else {},
                            timeout=60, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def service(pair, tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("hardening_service") / "data", [pair["root"], pair["dense"].parent],
                  "--kill-grace", "1", allowed_hosts="bench.internal.test").wait_up()
    yield svc
    svc.stop()


def _one_line(r) -> str:
    body = r.json()
    msg = body.get("message") or body["detail"]
    assert isinstance(msg, str) and msg and "\n" not in msg, body
    return msg


def test_host_header_must_name_the_service(service):
    port = service.port
    with service.client() as c:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "localhost:80:80", "[::1"):
            for method, path in (("GET", "/healthz"), ("GET", "/runs"), ("POST", "/runs"), ("GET", "/")):
                r = c.request(method, path, headers={"Host": host}, json={} if method == "POST" else None)
                assert r.status_code == 400, (host, method, path, r.status_code, r.text[:200])
                assert (r.headers["content-type"] == "application/json"
                        and "--allowed-host" in r.json()["detail"]), r.text
        for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "bench.internal.test",
                     f"bench.internal.test:{port}"):
            assert c.get("/runs", headers={"Host": host}).status_code == 200, host
        assert c.get("/runs").json()["runs"] == []  # the rejected POSTs queued nothing


def test_allowed_host_option_and_env(tmp_path, capsys, monkeypatch):
    """--allowed-host / A3_BENCH_ALLOWED_HOSTS are read and checked (a URL is not a host name: one error line);
    bound to every interface, the service answers any IP address but only the names it was given."""
    from a3_serve.bench.server.cli import build_parser, main
    from a3_serve.bench.server.security import HostPolicy

    wild = HostPolicy("0.0.0.0", ["bench.example.org"])
    for host, ok in (("10.1.2.3:8800", True), ("[fe80::1]:8800", True), ("localhost:8800", True),
                     ("bench.example.org:8800", True), ("evil.example:8800", False), ("0.0.0.0.evil.example", False)):
        assert wild.allows(host) is ok, host
    assert not HostPolicy("127.0.0.1").allows("10.1.2.3") and HostPolicy("10.1.2.3").allows("10.1.2.3:80")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything.example")

    text = build_parser().format_help()
    assert "--allowed-host" in text and "A3_BENCH_ALLOWED_HOSTS" in text and "--max-body-bytes" in text
    for argv, env, needle in ((["--allowed-host", "http://bench.example.org/"], None, "--allowed-host"),
                              ([], "ok.example, https://x/", "--allowed-host 'https://x/'"),
                              (["--max-body-bytes", "10"], None, "--max-body-bytes")):
        if env is None:
            monkeypatch.delenv("A3_BENCH_ALLOWED_HOSTS", raising=False)
        else:
            monkeypatch.setenv("A3_BENCH_ALLOWED_HOSTS", env)
        code = main(argv + ["--data-dir", str(tmp_path / "data"), "--model-root", str(tmp_path)])
        assert_one_line_error(code, capsys.readouterr().err, needle)


def test_token_login_never_reaches_the_access_log(service):
    with service.client(token=None) as anon:
        r = anon.get("/", params={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        assert anon.get("/runs").status_code == 200  # the cookie works
        assert anon.get("/", params={"token": WRONG}).status_code == 401
        assert anon.get(f"/runs?limit=5&%74oken={TOKEN}").status_code == 200  # the name as the service decodes it
        assert anon.get("/", params={"token": TOKEN}, follow_redirects=True).status_code == 200
    deadline = time.monotonic() + 10
    while "[redacted]" not in service.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = service.log.read_text()
    assert "GET /?token=[redacted]" in log, log[-2000:]  # the access log is on, and redacted
    assert "SECRET" not in log, [ln for ln in log.splitlines() if "SECRET" in ln]


def test_nan_and_infinity_are_422_not_500(service, pair):
    d = str(pair["dense"])
    bodies = [
        ('{"dense": "%s", "compressed": "%s", "workload": {"num_prompts": NaN}}', "workload.num_prompts"),
        ('{"dense": "%s", "compressed": "%s", "timeout_s": Infinity}', "timeout_s"),
        ('{"dense": "%s", "compressed": "%s", "engine_options": {"kv_cache_gib": -Infinity}}',
         "engine_options.kv_cache_gib"),
        ('{"dense": "%s", "compressed": "%s", "engine_options": {"gpu_memory_utilization": 1e999}}',
         "engine_options.gpu_memory_utilization"),
        ('{"dense": "%s", "compressed": "%s", "label": [NaN]}', "label.0"),
    ]
    with service.client() as c:
        for template, where in bodies:
            r = c.post("/runs", content=(template % (d, d)).encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (template, r.status_code, r.text[:300])
            msg = _one_line(r)
            assert msg.startswith(where) and "finite" in msg, msg
        assert c.get("/runs").json()["runs"] == []


def test_large_bodies_are_413_unread_and_422s_stay_short(service, pair):
    d = str(pair["dense"])
    big = json.dumps({"dense": d, "compressed": d, "label": "x" * 5_000_000}).encode()
    with service.client() as c:
        r = c.post("/runs", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and len(r.content) < 300 and "--max-body-bytes" in r.json()["detail"], r.text[:300]

        def chunks():  # no Content-Length: the service counts what it reads
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        r = c.post("/runs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and len(r.content) < 300, r.text[:300]
        # under the limit, a 422 quotes at most 200 characters of what it refuses
        r = c.post("/runs", json={"dense": d, "compressed": d, "label": "y" * 60_000})
        assert r.status_code == 422 and len(r.content) < 1500, (r.status_code, len(r.content))
        assert "label" in _one_line(r)
        assert c.get("/healthz").status_code == 200 and c.get("/runs").json()["runs"] == []
    # an oversized Content-Length is answered before a byte of the body is sent
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
        sock.sendall(f"POST /runs HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_service_refuses_a_mismatched_pair_unless_allowed(service, pair):
    from a3_serve.bench.server.runner import marked_pids

    d, o = str(pair["dense"]), str(pair["other_vocab"])
    with service.client() as c:
        r = c.post("/runs", json={"dense": d, "compressed": o, "engine": "hf"})
        assert r.status_code == 422, r.text
        msg = _one_line(r)
        assert "not comparable" in msg and "tokenizer" in msg and "allow_mismatch" in msg, msg
        assert r.json()["detail"][0]["loc"] == ["body", "compressed"]
        assert c.get("/runs").json()["runs"] == []
        r = c.post("/runs", json={"dense": d, "compressed": o, "engine": "hf", "allow_mismatch": True,
                                  "workload": {"num_prompts": 1, "input_len": 4, "output_len": 2, "repeats": 1}})
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["request"]["allow_mismatch"] is True and "--allow-mismatch" in run["command"], run["command"]
        r = c.post(f"/runs/{run['id']}/cancel")
        assert r.status_code in (200, 409) and r.json().get("status", "cancelled") in ("cancelled", "failed"), r.text
    end = time.monotonic() + 30
    while marked_pids(run["id"]):
        assert time.monotonic() < end, "the cancelled run's worker is still alive"
        time.sleep(0.2)
