"""The FastAPI application, :func:`create_app`, around a :class:`~.service.Service` (store, runner, data-dir lock).

The routes live in :mod:`.routes_service` (``/healthz``, the dashboard, docs, metrics) and :mod:`.routes_runs`
(the runs API and reports); what guards them (Host check, body limits, token, access-log redaction) in
:mod:`.security`; error answers in :mod:`.errors`. Every endpoint except ``/healthz`` needs the bearer token
when the service has one (``Authorization: Bearer TOKEN``; the dashboard and the docs in a browser use a cookie
set by opening ``/?token=TOKEN`` once, which redirects to ``/`` at once).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI

import a3_serve
from a3_serve.bench.server.errors import install_error_handlers
from a3_serve.bench.server.routes_runs import runs_router
from a3_serve.bench.server.routes_service import protected_router, public_router
from a3_serve.bench.server.security import BodyGuard, HostCheck, HostPolicy, TokenAuth
from a3_serve.bench.server.service import Service
from a3_serve.bench.server.settings import Settings

DESCRIPTION = """\
Runs dense-vs-compressed serving benchmarks (`python -m a3_serve.bench`) on request, one at a time, each in its
own worker process, and keeps every run, its progress and its report in SQLite.

* `POST /runs` queues a run (429 when the queue is full); `GET /runs/{id}` polls it; `GET /runs/{id}/events`
  streams its progress as server-sent events (`run` on every change, `end` once it is final);
  `POST /runs/{id}/cancel` (or `DELETE /runs/{id}`) stops it.
* Reports: `report.json` (schema `a3-serve/throughput/1`), `report.md`, `report.png`; the dashboard is `/`.
* Model paths must lie under the service's `--model-root` folders (symlinks and `..` resolved), and the two
  models must be comparable (same tokenizer and vocabulary; an a3-export of the dense model): else 422, unless
  the request sets `"allow_mismatch": true` (the report then lists the problems).
* Auth: `Authorization: Bearer TOKEN` on every endpoint except `/healthz` when the service has a token.
* Requests whose `Host` header is not a name of the service get 400 (DNS rebinding); bodies over the service's
  `--max-body-bytes` get 413; JSON with `NaN` / `Infinity` gets 422.
"""


def create_app(settings: Settings, service: Optional[Service] = None) -> FastAPI:
    """The application; ``service`` (opened by the CLI before it binds the port) is created when not given.

    Requests pass the Host check, then the body guard (size limit, finite numbers), then the routes: the
    service's own (:mod:`.routes_service`) and the runs API (:mod:`.routes_runs`)."""
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
    auth = TokenAuth(settings.token)
    install_error_handlers(app)
    app.include_router(public_router(svc, settings, auth))
    app.include_router(protected_router(svc, auth))
    app.include_router(runs_router(svc, settings, auth))
    # the last added middleware runs first: the Host check, then the body guard
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheck, policy=HostPolicy(settings.host, settings.allowed_hosts))
    return app
