"""``a3-bench-server``: a FastAPI service that runs dense-vs-compressed benchmarks on request.

Modules
-------
``models``     pydantic request/response bodies (the OpenAPI schema); ``CLI_FLAGS`` maps request fields to the
               flags of ``python -m a3_serve.bench``.
``settings``   the service's settings and the model-root check (symlinks and ``..`` resolved).
``store``      SQLite persistence of runs (status, progress, results); survives restarts.
``runner``     the bounded queue and the worker: one run at a time in its own ``python -m a3_serve.bench
               ... --events`` process, timeouts and cancellation by process group and run marker.
``app``        the FastAPI application: REST, server-sent events, reports, /metrics, /docs, the dashboard.
``dashboard``  the self-contained HTML page at ``/`` (inline SVG charts, no CDN).
``cli``        ``a3-bench-server`` (``python -m a3_serve.bench.server``).
"""

from a3_serve.bench.server.app import Service, create_app
from a3_serve.bench.server.settings import Settings

__all__ = ["Service", "Settings", "create_app"]
