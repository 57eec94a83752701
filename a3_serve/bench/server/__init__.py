"""``a3-bench-server``: a FastAPI service that runs dense-vs-compressed benchmarks on request.

Modules
-------
``models``     pydantic request/response bodies (the OpenAPI schema); ``CLI_FLAGS`` maps request fields to the
               flags of ``python -m a3_serve.bench``.
``settings``   the service's settings and the model-root check (symlinks and ``..`` resolved).
``store``      SQLite persistence of runs (status, progress, results); survives restarts.
``runner``     the bounded queue and the worker: one run at a time in its own ``python -m a3_serve.bench
               ... --events`` process, timeouts and cancellation by process group and run marker.
``security``   the Host check (DNS rebinding), the body guard (size limit, finite numbers), the token, and the
               access-log filter that redacts ``?token=``.
``errors``     error answers (one-line messages, 422 bodies that never echo a large input) and their docs.
``routes_service``  ``/healthz``, the dashboard ``/``, ``/openapi.json``, ``/docs``, ``/metrics``.
``routes_runs``     the runs API: queue (with the model-root and comparability checks), list, cancel, stream,
               reports and logs.
``app``        the service object (store, runner, data-dir lock) and ``create_app``, which puts them together.
``dashboard``  the self-contained HTML page at ``/`` (inline SVG charts, no CDN).
``cli``        ``a3-bench-server`` (``python -m a3_serve.bench.server``).
"""

from a3_serve.bench.server.app import create_app
from a3_serve.bench.server.service import Service
from a3_serve.bench.server.settings import Settings

__all__ = ["Service", "Settings", "create_app"]
