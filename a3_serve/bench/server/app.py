"""The FastAPI application: REST endpoints, server-sent events, reports, metrics, docs and the dashboard.

Every endpoint except ``/healthz`` needs the bearer token when the service has one (``Authorization: Bearer
TOKEN``; the dashboard and the docs in a browser use a cookie set by opening ``/?token=TOKEN`` once).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import fcntl
import hmac
import importlib.util
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import a3_serve
from a3_serve.bench.server.dashboard import PAGE, UNAUTHORIZED_PAGE
from a3_serve.bench.server.models import FINAL, ErrorBody, Health, Run, RunCreate, RunList, RunStatus
from a3_serve.bench.server.runner import WORKER_LOG, QueueFull, Runner, build_command, reap_leftovers
from a3_serve.bench.server.settings import PathRejected, Settings, check_model_dir, check_text_source
from a3_serve.bench.server.store import Store

log = logging.getLogger("a3_serve.bench.server")

COOKIE = "a3_bench_token"
SSE_POLL_S = 0.25
DESCRIPTION = """\
Runs dense-vs-compressed serving benchmarks (`python -m a3_serve.bench`) on request, one at a time, each in its
own worker process, and keeps every run, its progress and its report in SQLite.

* `POST /runs` queues a run (429 when the queue is full); `GET /runs/{id}` polls it; `GET /runs/{id}/events`
  streams its progress as server-sent events (`run` on every change, `end` once it is final);
  `POST /runs/{id}/cancel` (or `DELETE /runs/{id}`) stops it.
* Reports: `report.json` (schema `a3-serve/throughput/1`), `report.md`, `report.png`; the dashboard is `/`.
* Model paths must lie under the service's `--model-root` folders (symlinks and `..` resolved).
* Auth: `Authorization: Bearer TOKEN` on every endpoint except `/healthz` when the service has a token.
"""


class DataDirBusy(RuntimeError):
    pass


class Service:
    """The store, the runner and the data-dir lock of one service instance."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Optional[Store] = None
        self.runner: Optional[Runner] = None
        self._lock_file = None
        self.recovered: list[str] = []
        self._closed = False

    def open(self) -> None:
        """Lock the data dir, open the database, mark runs left queued/running as interrupted (killing leftovers)."""
        if self.store is not None:
            return
        data = self.settings.data_dir
        (data / "runs").mkdir(parents=True, exist_ok=True)
        lock = open(data / "server.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise DataDirBusy(f"data dir {data} is in use by another a3-bench-server (pid {holder}); stop it or pass "
                              "another --data-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        self.store = Store(data / "runs.sqlite3")
        left = self.store.active()
        for run in left:
            n = reap_leftovers(run["id"], run.get("pgid"))
            if n:
                log.warning("run %s: killed %d leftover worker process(es) of the previous service", run["id"], n)
        self.store.mark_interrupted(left, "the service stopped")
        self.recovered = [r["id"] for r in left]
        self.runner = Runner(self.store, self.settings)

    def start(self) -> None:
        self.open()
        assert self.runner is not None
        self.runner.start()

    def close(self) -> None:
        """Stop the runner (marking its runs interrupted), close the database, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.runner is not None:
            self.runner.stop()
        if self.store is not None:
            self.store.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


# -- serialisation -------------------------------------------------------------------------------------------
def _iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def _links(run_id: str) -> dict[str, str]:
    base = f"/runs/{run_id}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel", "report_json": f"{base}/report.json",
            "report_md": f"{base}/report.md", "report_png": f"{base}/report.png", "log": f"{base}/log"}


def summary_dict(row: dict[str, Any]) -> dict[str, Any]:
    req = row["request"]
    results = row.get("results")
    return {"id": row["id"], "status": row["status"], "label": row.get("label"), "created": _iso(row["created"]),
            "started": _iso(row.get("started")), "finished": _iso(row.get("finished")), "dense": req["dense"],
            "compressed": req["compressed"], "engine": req.get("engine", "vllm"),
            "progress": {"done": row.get("done") or 0, "total": row.get("total"), "message": row.get("message") or ""},
            "error": row.get("error"), "ratios": results.get("ratios") if isinstance(results, dict) else None,
            "links": _links(row["id"])}


def run_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = summary_dict(row)
    out.update(request=row["request"], command=row["command"], exit_code=row.get("exit_code"), results=row.get("results"))
    return out


def _err(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "the body could not be parsed (not UTF-8 JSON)", 401: "missing or wrong bearer token", 403: "a path lies outside the model roots", 404: "no such run",
            409: "the run is in the wrong state for this", 429: "the queue is full"}
    schema = ErrorBody.model_json_schema()  # inline: error bodies are JSON whatever the route's own media type
    return {c: {"description": text[c], "content": {"application/json": {"schema": schema}}} for c in codes}


def _swagger_assets() -> dict[str, Path]:
    """Swagger UI's JS/CSS vendored by vLLM (so /docs works offline); {} when vLLM is not installed."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    static = Path(list(spec.submodule_search_locations)[0]) / "entrypoints" / "serve" / "instrumentator" / "static"
    files = {name: static / name for name in ("swagger-ui-bundle.js", "swagger-ui.css")}
    return files if all(p.is_file() for p in files.values()) else {}


class _Metrics:
    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        store, runner = self.service.store, self.service.runner
        runs = GaugeMetricFamily("a3_bench_runs", "Benchmark runs in the database, by status", labels=["status"])
        for status, n in (store.counts() if store else {}).items():
            runs.add_metric([status], n)
        yield runs
        yield GaugeMetricFamily("a3_bench_queue_length", "Runs waiting for the worker",
                                value=runner.queue_length if runner else 0)
        yield GaugeMetricFamily("a3_bench_queue_capacity", "Most runs that may wait (--queue-size)",
                                value=self.service.settings.queue_size)
        yield GaugeMetricFamily("a3_bench_worker_busy", "1 while a benchmark worker runs, else 0",
                                value=int(runner.busy) if runner else 0)


def create_app(settings: Settings, service: Optional[Service] = None) -> FastAPI:
    """The application; ``service`` (opened by the CLI before it binds the port) is created when not given."""
    svc = service or Service(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, svc.close)

    app = FastAPI(title="a3-bench-server", version=a3_serve.__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    bearer = HTTPBearer(auto_error=False, description="the service's --token (or A3_BENCH_TOKEN)")

    def supplied_token(request: Request, creds: Optional[HTTPAuthorizationCredentials]) -> Optional[str]:
        return creds.credentials if creds is not None else request.cookies.get(COOKIE)

    def token_ok(supplied: Optional[str]) -> bool:
        if not settings.token:
            return True
        return supplied is not None and hmac.compare_digest(supplied.encode("utf-8", "replace"), settings.token.encode())

    def require_token(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not token_ok(supplied_token(request, creds)):
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                     "server's --token (A3_BENCH_TOKEN)", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k not in ("ctx", "url")} for e in exc.errors()]
        parts = []
        for e in errors[:3]:
            loc = [str(p) for p in e.get("loc", ())]
            where = ".".join(loc[1:] if len(loc) > 1 and loc[0] in ("body", "query", "path") else loc) or "request"
            msg = str(e.get("msg", "invalid"))
            parts.append(msg if msg.startswith(loc[-1] if loc else "\0") else f"{where}: {msg}")
        return JSONResponse(status_code=422, content=jsonable_encoder(
            {"detail": errors, "message": "; ".join(parts) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")}))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Allow must list every method of the path, not only those of one route
            methods: set[str] = set()
            for route in app.router.routes:
                match, _ = route.matches(request.scope)
                if match != Match.NONE:
                    methods |= set(getattr(route, "methods", None) or ())
            if methods:
                return JSONResponse({"detail": f"method {request.method} not allowed here; use {', '.join(sorted(methods))}"},
                                    status_code=405, headers={"Allow": ", ".join(sorted(methods))})
        return await http_exception_handler(request, exc)

    def store() -> Store:
        assert svc.store is not None
        return svc.store

    def runner() -> Runner:
        assert svc.runner is not None
        return svc.runner

    def get_row(run_id: str) -> dict[str, Any]:
        row = store().get(run_id)
        if row is None:
            raise HTTPException(404, f"no run {run_id[:64]!r}; GET /runs lists them")
        return row

    # -- unauthenticated -----------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["service"], summary="Liveness (no token needed)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": a3_serve.__version__, "worker_busy": runner().busy,
                "queue_length": runner().queue_length, "auth": bool(settings.token)}

    @app.get("/", response_class=HTMLResponse, tags=["dashboard"], summary="The dashboard (HTML)",
             responses={401: {"description": "missing or wrong token", "content": {"text/html": {}}}})
    def dashboard(request: Request, token: Optional[str] = Query(None, max_length=4096,
                                                                 description="the bearer token; sets a cookie and redirects")):
        if settings.token and token is not None:
            if not token_ok(token):
                return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401)
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return resp
        if not token_ok(request.cookies.get(COOKIE)) and not token_ok(_bearer_header(request)):
            return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    # -- everything else needs the token -------------------------------------------------------------------
    api = APIRouter(dependencies=[Depends(require_token)], responses=_err(401))

    @api.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    assets = _swagger_assets()

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        kw = {"swagger_js_url": "/docs/assets/swagger-ui-bundle.js", "swagger_css_url": "/docs/assets/swagger-ui.css"} if assets else {}
        return get_swagger_ui_html(openapi_url="/openapi.json", title="a3-bench-server: API", swagger_favicon_url="data:,",
                                   **kw)

    @api.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in assets:
            raise HTTPException(404, f"no asset {name[:64]!r}")
        return FileResponse(assets[name])

    @api.get("/metrics", tags=["service"], summary="Prometheus metrics",
             response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(svc))  # type: ignore[arg-type]

    @api.post("/runs", response_model=Run, status_code=201, tags=["runs"], summary="Queue a benchmark run",
              responses={**_err(400, 403, 429), 201: {"description": "queued; Location names the run"}})
    def create_run(body: RunCreate, response: Response) -> dict[str, Any]:
        roots = settings.model_roots
        request = body.model_dump(mode="json")
        try:
            request["dense"] = str(check_model_dir(body.dense, roots, "dense"))
            request["compressed"] = str(check_model_dir(body.compressed, roots, "compressed"))
            if body.workload.ppl_data:
                request["workload"]["ppl_data"] = check_text_source(body.workload.ppl_data, roots)
        except PathRejected as rej:
            if rej.status == 403:
                raise HTTPException(403, rej.message) from None
            loc = ["body", "workload", "ppl_data"] if rej.field == "ppl_data" else ["body", rej.field]
            raise RequestValidationError([{"type": "model_path", "loc": loc, "msg": rej.message}]) from None
        if body.timeout_s is not None and body.timeout_s > settings.run_timeout:
            raise RequestValidationError([{"type": "less_than_equal", "loc": ["body", "timeout_s"],
                                           "msg": f"timeout_s {body.timeout_s:g} exceeds the service's --run-timeout "
                                                  f"{settings.run_timeout:g}; ask for less"}])
        run_id = uuid.uuid4().hex[:12]
        run_dir = settings.data_dir / "runs" / run_id
        command = build_command(settings, request, run_dir)
        try:
            row = runner().enqueue(lambda: store().create(run_id, request=request, command=command,
                                                          run_dir=str(run_dir), label=body.label))
        except QueueFull as err:
            raise HTTPException(429, str(err), headers={"Retry-After": "60"}) from None
        response.headers["Location"] = f"/runs/{run_id}"
        return run_dict(row)

    @api.get("/runs", response_model=RunList, tags=["runs"], summary="List runs, newest first")
    def list_runs(status: Optional[RunStatus] = Query(None, description="only runs in this state"),
                  limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        rows = store().list(status.value if status else None, limit)
        return {"runs": [summary_dict(r) for r in rows], "queue_length": runner().queue_length,
                "worker_busy": runner().busy}

    @api.get("/runs/{run_id}", response_model=Run, tags=["runs"], summary="One run, with its results",
             responses=_err(404))
    def get_run(run_id: str) -> dict[str, Any]:
        return run_dict(get_row(run_id))

    def cancel(run_id: str) -> dict[str, Any]:
        row = get_row(run_id)
        if RunStatus(row["status"]) in FINAL:
            raise HTTPException(409, f"run {run_id} has already {row['status']}; only queued or running runs can be cancelled")
        runner().cancel(run_id)
        # wait (in this worker thread) until the worker is gone, so the answer shows the final state
        deadline = time.monotonic() + settings.kill_grace + 5
        while time.monotonic() < deadline:
            row = get_row(run_id)
            if RunStatus(row["status"]) in FINAL:
                break
            time.sleep(0.1)
        return run_dict(row)

    @api.post("/runs/{run_id}/cancel", response_model=Run, tags=["runs"], summary="Cancel a queued or running run",
              responses=_err(404, 409))
    def cancel_run(run_id: str) -> dict[str, Any]:
        return cancel(run_id)

    @api.delete("/runs/{run_id}", response_model=Run, tags=["runs"], summary="Cancel a run (same as POST .../cancel)",
                responses=_err(404, 409))
    def delete_run(run_id: str) -> dict[str, Any]:
        return cancel(run_id)

    @api.get("/runs/{run_id}/events", tags=["runs"], summary="Progress as server-sent events",
             response_class=_EventStream,
             responses={**_err(404), 200: {"description": "`event: run` (a RunSummary as JSON) on every change; "
                                                          "`event: end` with the final state, then the stream closes",
                                           "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def run_events(run_id: str, request: Request) -> EventSourceResponse:
        get_row(run_id)

        async def stream() -> AsyncIterator[dict[str, str]]:
            last, n = None, 0
            while True:
                rev = store().revision(run_id)
                if rev is None:
                    return
                if rev != last:
                    last = rev
                    row = get_row(run_id)
                    data = json.dumps(summary_dict(row))
                    n += 1
                    yield {"event": "run", "id": str(n), "data": data}
                    if RunStatus(row["status"]) in FINAL:
                        yield {"event": "end", "id": str(n + 1), "data": data}
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(SSE_POLL_S)

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def finished_row(run_id: str) -> dict[str, Any]:
        row = get_row(run_id)
        if row["status"] != RunStatus.succeeded.value or not row.get("results"):
            why = f": {row['error']}" if row.get("error") else ""
            raise HTTPException(409, f"run {run_id} is {row['status']}{why}; a report exists once the run has succeeded")
        return row

    @api.get("/runs/{run_id}/report.json", tags=["reports"], summary="The throughput.json document",
             responses={**_err(404, 409), 200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
    def report_json(run_id: str) -> JSONResponse:
        row = finished_row(run_id)
        return JSONResponse(row["results"], headers=_inline(f"a3-bench-{run_id}.json"))

    @api.get("/runs/{run_id}/report.md", tags=["reports"], summary="The Markdown table", response_class=PlainTextResponse,
             responses={**_err(404, 409), 200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}})
    def report_md(run_id: str) -> Response:
        row = finished_row(run_id)
        path = Path(row["run_dir"]) / "throughput.md"
        if path.is_file():
            text = path.read_text(errors="replace")
        else:
            from a3_serve.bench.report import to_markdown

            text = to_markdown(row["results"])
        return Response(text, media_type="text/markdown; charset=utf-8", headers=_inline(f"a3-bench-{run_id}.md"))

    @api.get("/runs/{run_id}/report.png", tags=["reports"], summary="Bar charts (PNG)",
             responses={**_err(404, 409), 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
             response_class=Response)
    def report_png(run_id: str) -> Response:
        row = finished_row(run_id)
        path = Path(row["run_dir"]) / "throughput.png"
        if not path.is_file():
            raise HTTPException(404, f"run {run_id} has no chart (no charted metric was measured); use report.json")
        return FileResponse(path, media_type="image/png", headers=_inline(f"a3-bench-{run_id}.png"))

    @api.get("/runs/{run_id}/log", tags=["runs"], summary="The end of the worker's log (stderr)",
             response_class=PlainTextResponse, responses=_err(404))
    def run_log(run_id: str, lines: int = Query(200, ge=1, le=100_000)) -> PlainTextResponse:
        row = get_row(run_id)
        path = Path(row["run_dir"]) / WORKER_LOG
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4 * 1024 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        return PlainTextResponse("\n".join(text.splitlines()[-lines:]) + ("\n" if text else ""))

    app.include_router(api)
    return app


class _EventStream(Response):
    media_type = "text/event-stream"


def _bearer_header(request: Request) -> Optional[str]:
    value = request.headers.get("authorization", "")
    scheme, _, cred = value.partition(" ")
    return cred.strip() if scheme.lower() == "bearer" and cred.strip() else None


def _inline(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'inline; filename="{filename}"'}

