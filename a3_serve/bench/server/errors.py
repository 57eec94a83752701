"""Error answers of the service: one-line messages, short bodies, and their OpenAPI documentation.

* 422 (a request that does not validate): ``{"detail": [{"type", "loc", "msg", "input"?}, ...], "message": "one
  line"}``; an offending ``input`` longer than :data:`MAX_INPUT` characters of JSON (or holding a non-finite
  number) is cut to that many characters of text, so a large body is never echoed back.
* 405 lists every method of the path in ``Allow``.
* Every other error is ``{"detail": "one line naming the problem and the fix"}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from a3_serve.bench.server.models import ErrorBody

#: the most characters of an offending input a 422 answer quotes
MAX_INPUT = 200
#: the most errors a 422 answer lists, and the most characters of one error's message
MAX_ERRORS = 20
MAX_MSG = 1000

_TEXT = {400: "the body could not be parsed (not UTF-8 JSON)", 401: "missing or wrong bearer token",
         403: "a path lies outside the model roots", 404: "no such run", 409: "the run is in the wrong state for this",
         413: "the request body is larger than the service's --max-body-bytes", 429: "the queue is full"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes (each a JSON :class:`ErrorBody`)."""
    schema = ErrorBody.model_json_schema()  # inline: error bodies are JSON whatever the route's own media type
    return {c: {"description": _TEXT[c], "content": {"application/json": {"schema": schema}}} for c in codes}


def short_input(value: Any) -> Any:
    """``value`` as JSON when that is short and finite, else at most :data:`MAX_INPUT` characters of its text."""
    try:
        encoded = jsonable_encoder(value)
        text = json.dumps(encoded, allow_nan=False)
        if len(text) <= MAX_INPUT:
            return encoded
    except (ValueError, TypeError, RecursionError):  # NaN / Infinity, or something JSON cannot hold
        try:
            text = json.dumps(jsonable_encoder(value), default=str)
        except (ValueError, TypeError, RecursionError):
            text = repr(value)
    return text[:MAX_INPUT] + ("..." if len(text) > MAX_INPUT else "")


def validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The 422 document: the errors (inputs shortened, no ctx/url) and a one-line ``message``."""
    shown = []
    for e in errors[:MAX_ERRORS]:
        item = {k: v for k, v in e.items() if k not in ("ctx", "url", "input")}
        item["msg"] = " ".join(str(e.get("msg", "invalid")).split())[:MAX_MSG]
        if "input" in e:
            item["input"] = short_input(e["input"])
        shown.append(item)
    parts = []
    for e in shown[:3]:
        loc = [str(p) for p in e.get("loc", ())]
        where = ".".join(loc[1:] if len(loc) > 1 and loc[0] in ("body", "query", "path") else loc) or "request"
        msg = e["msg"]
        parts.append(msg if msg.startswith(loc[-1] if loc else "\0") else f"{where}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return jsonable_encoder({"detail": shown, "message": "; ".join(parts) + more})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_body(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Allow must list every method of the path, not only those of one route
            methods: set[str] = set()
            for route in request.app.router.routes:
                match, _ = route.matches(request.scope)
                if match != Match.NONE:
                    methods |= set(getattr(route, "methods", None) or ())
            if methods:
                return JSONResponse({"detail": f"method {request.method} not allowed here; use "
                                               f"{', '.join(sorted(methods))}"},
                                    status_code=405, headers={"Allow": ", ".join(sorted(methods))})
        return await http_exception_handler(request, exc)
