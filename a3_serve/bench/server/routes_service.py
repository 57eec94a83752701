"""The service's own endpoints: ``/healthz`` and the dashboard ``/`` (no token needed; the dashboard asks for it),
and ``/openapi.json``, ``/docs`` and ``/metrics`` (behind the token)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

import a3_serve
from a3_serve.bench.server.dashboard import PAGE, UNAUTHORIZED_PAGE
from a3_serve.bench.server.errors import error_responses
from a3_serve.bench.server.models import Health
from a3_serve.bench.server.security import COOKIE, TokenAuth
from a3_serve.bench.server.settings import Settings

if TYPE_CHECKING:
    from a3_serve.bench.server.service import Service


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
    def __init__(self, service: "Service"):
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


def public_router(svc: "Service", settings: Settings, auth: TokenAuth) -> APIRouter:
    """``/healthz`` and ``/`` (the dashboard, which shows a token page when the token is missing)."""
    api = APIRouter()

    @api.get("/healthz", response_model=Health, tags=["service"], summary="Liveness (no token needed)")
    def healthz() -> dict[str, Any]:
        runner = svc.runner
        assert runner is not None
        return {"status": "ok", "version": a3_serve.__version__, "worker_busy": runner.busy,
                "queue_length": runner.queue_length, "auth": bool(settings.token)}

    @api.get("/", response_class=HTMLResponse, tags=["dashboard"], summary="The dashboard (HTML)",
             responses={303: {"description": "?token was given: the cookie is set (when right) and the browser is sent "
                                             "to / so the token leaves the address bar"},
                        401: {"description": "missing or wrong token", "content": {"text/html": {}}}})
    def dashboard(request: Request, token: Optional[str] = Query(None, max_length=4096,
                                                                 description="the bearer token; sets a cookie and "
                                                                             "redirects")):
        if token is not None:  # never leave the token in the address bar (or in the history / a Referer)
            if settings.token and not auth.ok(token):
                return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401, headers={"Cache-Control": "no-store"})
            resp = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
            if settings.token:
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return resp
        if not auth.request_ok(request):
            return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    return api


def protected_router(svc: "Service", auth: TokenAuth) -> APIRouter:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/metrics`` (Prometheus), behind the token."""
    api = APIRouter(dependencies=[Depends(auth.require)], responses=error_responses(401))

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    assets = _swagger_assets()

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        kw = {"swagger_js_url": "/docs/assets/swagger-ui-bundle.js",
              "swagger_css_url": "/docs/assets/swagger-ui.css"} if assets else {}
        return get_swagger_ui_html(openapi_url="/openapi.json", title="a3-bench-server: API",
                                   swagger_favicon_url="data:,", **kw)

    @api.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in assets:
            raise HTTPException(404, f"no asset {name[:64]!r}")
        return FileResponse(assets[name])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Metrics(svc))  # type: ignore[arg-type]

    @api.get("/metrics", tags=["service"], summary="Prometheus metrics",
             response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return api
