"""``a3-bench-server``: serve the benchmarking API and dashboard with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from a3_serve.bench.server.settings import (
    ALLOWED_HOSTS_ENV,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    TOKEN_ENV,
    Settings,
    default_data_dir,
    default_model_roots,
)

DESCRIPTION = """\
Run dense-vs-compressed serving benchmarks on request. Each run is `python -m a3_serve.bench --dense D
--compressed C ... --events` in its own worker process, one run at a time; queued runs wait in a bounded queue.
Runs, their progress and their reports are kept in SQLite under --data-dir and survive restarts (runs that
were queued or running when the service stopped are marked `interrupted`).

endpoints:
  /             dashboard: the runs, live progress, dense-vs-compressed charts (open /?token=T once with a token)
  /docs         OpenAPI docs (the schema is /openapi.json)
  /runs         POST a run {"dense": D, "compressed": C, "engine": "vllm", "workload": {...}}, GET the list
  /runs/ID      status, progress, error, results; /runs/ID/events (server-sent events), /runs/ID/cancel,
                /runs/ID/report.json|.md|.png, /runs/ID/log
  /healthz      liveness (never needs the token);  /metrics  Prometheus metrics

checks: a run whose two models are not comparable (another tokenizer or vocabulary, or a compressed model that
is not an export of the dense one) is refused with 422 unless the request sets "allow_mismatch": true. Requests
must name the service in their Host header (the --host address, localhost, 127.0.0.1, [::1], any IP address when
bound to 0.0.0.0, or an --allowed-host name), so a web page cannot reach it by DNS rebinding; bodies over
--max-body-bytes get 413. The Host check is no substitute for a token: on 0.0.0.0 or another reachable address,
anyone who can reach the port can start runs unless --token is set.
"""

EPILOG = f"""\
examples:
  a3-bench-server                                    # 127.0.0.1:{DEFAULT_PORT}, models under the current folder
  a3-bench-server --model-root /models --model-root ~/exports --port 9000
  A3_BENCH_TOKEN=secret a3-bench-server --host 0.0.0.0 --model-root /models --allowed-host bench.example.org
  curl -s -X POST 127.0.0.1:{DEFAULT_PORT}/runs -H 'Content-Type: application/json' \\
       -d '{{"dense": "/models/dense", "compressed": "/models/compressed", "workload": {{"num_prompts": 8}}}}'
"""


class _Parser(argparse.ArgumentParser):
    """Bad options give one line, ``error: ...; see `a3-bench-server --help```, and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="a3-bench-server", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, then set "
                        "a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help=f"folder for the run database (runs.sqlite3) and each run's reports and logs "
                        f"(default {default_data_dir()}; $A3_SERVE_CACHE moves it)")
    p.add_argument("--model-root", dest="model_roots", type=Path, action="append", default=None, metavar="DIR",
                   help="a folder that model paths of requests must lie in (symlinks and '..' resolved); repeat for "
                        "several; relative request paths are looked up under each (default: the current folder and "
                        f"{default_model_roots()[1]})")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every endpoint except /healthz (default: "
                        f"${TOKEN_ENV}; none: no auth)")
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=None, metavar="NAME",
                   help="a further name that requests may carry in their Host header (a DNS name the service is "
                        "reached by, e.g. behind a proxy); repeat for several; '*' turns the check off (default: "
                        f"${ALLOWED_HOSTS_ENV}, comma-separated; the --host address, localhost, 127.0.0.1 and [::1] "
                        "are always allowed, and any IP address when --host is 0.0.0.0 or ::)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="largest request body in bytes; larger ones get HTTP 413 unread (default "
                        f"{DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="runs that may wait behind the running one; more get HTTP 429 (default 8)")
    p.add_argument("--run-timeout", type=float, default=6 * 3600.0, metavar="SECONDS",
                   help="seconds a run may take before its worker is killed and the run fails; also the most a "
                        "request's timeout_s may ask for (default 21600)")
    p.add_argument("--kill-grace", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL when a run is cancelled or times out (default 10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   metavar="LEVEL",
                   help="critical, error, warning, info (default) or debug: log level of the service and uvicorn")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _port_free(host: str, port: int) -> Optional[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return (f"--host {host!r} is not an address of this machine ({err.strerror}); use 127.0.0.1, 0.0.0.0 or an "
                "interface address")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as err:
            return f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop what uses it"
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        return _fail(f"--port {args.port} is not a TCP port; use 1-65535")
    if args.queue_size < 1:
        return _fail(f"--queue-size must be >= 1, got {args.queue_size}")
    if not args.run_timeout > 0:
        return _fail(f"--run-timeout must be > 0 seconds, got {args.run_timeout:g}")
    if not args.kill_grace >= 0:
        return _fail(f"--kill-grace must be >= 0 seconds, got {args.kill_grace:g}")
    if args.max_body_bytes < 1024:
        return _fail(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    allowed = args.allowed_hosts if args.allowed_hosts is not None else os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
    allowed = [a.strip() for a in allowed if a.strip()]
    from a3_serve.bench.server.security import host_name

    for name in allowed:
        if name != "*" and host_name(name) is None:
            return _fail(f"--allowed-host {name[:100]!r} is not a host name; give a name such as bench.example.org "
                         "(no scheme or path), an IP address, or '*'")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        return _fail(f"the token is empty; pass --token TOKEN (or set {TOKEN_ENV}) or leave both unset for no auth")
    roots = args.model_roots or default_model_roots()
    for root in args.model_roots or []:
        if not root.expanduser().is_dir():
            return _fail(f"--model-root {str(root)!r} is not an existing folder; create it or pass the folder your "
                         "models are in")
    roots = [r for r in roots if r.expanduser().is_dir()] or [Path.cwd()]
    data_dir = (args.data_dir or default_data_dir()).expanduser()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        return _fail(f"--data-dir {str(data_dir)!r} is not a writable folder ({err.strerror}); pass another --data-dir")
    busy = _port_free(args.host, args.port)
    if busy:
        return _fail(busy)

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    settings = Settings(data_dir=data_dir, model_roots=tuple(roots), token=token.strip() if token else None,
                        queue_size=args.queue_size, run_timeout=args.run_timeout, kill_grace=args.kill_grace,
                        host=args.host, allowed_hosts=tuple(allowed), max_body_bytes=args.max_body_bytes)
    from a3_serve.bench.server.app import create_app
    from a3_serve.bench.server.security import uvicorn_log_config
    from a3_serve.bench.server.service import DataDirBusy, Service

    service = Service(settings)
    try:
        service.open()
    except DataDirBusy as err:
        return _fail(str(err))
    except Exception as err:  # e.g. a database written by a newer version, or a corrupt file
        return _fail(f"cannot open the run database in {settings.data_dir}: {err}")
    if service.recovered:
        print(f"a3-bench-server: marked {len(service.recovered)} run(s) left queued/running by the previous service as "
              f"interrupted: {', '.join(service.recovered)}", file=sys.stderr)
    if any(root == Path(root.anchor) for root in settings.model_roots):
        print("warning: a model root is the file-system root: requests may name any folder on this machine; "
              "pass narrower --model-root folders", file=sys.stderr)
    if not settings.token and not _loopback(args.host):
        print(f"warning: listening on {args.host} without a token: anyone who can reach this port can start runs; "
              f"set --token or {TOKEN_ENV}", file=sys.stderr)
    if "*" in allowed:
        print("warning: --allowed-host '*' turns the Host check off: a web page can reach the service by DNS rebinding"
              + ("" if settings.token else "; set --token"), file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"a3-bench-server: http://{shown}:{args.port}/ (dashboard), /docs (API); data dir {settings.data_dir}; "
          f"model roots {', '.join(str(r) for r in settings.model_roots)}; auth {'on' if settings.token else 'off'}",
          file=sys.stderr, flush=True)
    import uvicorn

    app = create_app(settings, service)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                    proxy_headers=False, server_header=False, log_config=uvicorn_log_config())
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
