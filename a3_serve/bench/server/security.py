"""What guards the service before (and around) its routes: the Host check, the body guard, the token, the log.

* :class:`HostCheck` (ASGI middleware, outermost) answers 400 to a request whose ``Host`` header names none of
  the service's own names: the bound address, ``localhost``, ``127.0.0.1``, ``[::1]`` and the names given by
  ``--allowed-host`` / ``$A3_BENCH_ALLOWED_HOSTS`` (``*``: any). A web page that rebinds its own DNS name to
  127.0.0.1 (DNS rebinding) sends its own name, so it cannot reach the service even without a token. When the
  service binds every interface (``0.0.0.0`` / ``::``) any IP-address Host is accepted too (an IP address cannot
  be rebound); names it is reached by must then be listed with ``--allowed-host``.
* :class:`BodyGuard` (ASGI middleware) refuses a request body over ``--max-body-bytes`` with 413 before reading
  more of it (by ``Content-Length``, and by counting a streamed body), and a JSON body holding ``NaN``,
  ``Infinity`` or a number too large for a float with 422, instead of letting it reach the routes.
* :class:`TokenAuth`: the bearer token (``Authorization: Bearer`` or the dashboard's cookie), compared in
  constant time.
* :class:`RedactQueryToken`: a filter for uvicorn's access log that replaces the value of any ``token`` query
  parameter (the dashboard's ``/?token=...`` login) with ``[redacted]``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import unquote_plus

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "a3_bench_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
#: the longest Host header value quoted back in an error
_SHOWN = 100


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def host_name(value: str) -> Optional[str]:
    """The name or address of a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``), lower case,
    without brackets, port or trailing dot; None when the value is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in "/\\@ \t?#"):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` headers the service answers (module docstring)."""

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()):
        extra = [a.strip() for a in allowed if a and a.strip()]
        self.any_host = "*" in extra
        bind = bind_host.strip().strip("[]").lower()
        self.any_ip = bind in WILDCARD_BINDS
        names = set(LOOPBACK_NAMES)
        if not self.any_ip:
            names.add(bind.rstrip("."))
        for a in extra:
            if a != "*":
                names.add(host_name(a) or a.lower())
        self.names = frozenset(names)

    def allows(self, host: Optional[str]) -> bool:
        if self.any_host:
            return True
        name = host_name(host) if host is not None else None
        if name is None:
            return False
        return name in self.names or (self.any_ip and _is_ip(name))

    def describe(self) -> str:
        shown = sorted(self.names)
        if self.any_ip:
            shown.append("any IP address")
        return ", ".join(shown)


class HostCheck:
    """ASGI middleware: 400 ``{"detail": ...}`` for a Host header the :class:`HostPolicy` does not allow."""

    def __init__(self, app: ASGIApp, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if self.policy.allows(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = "no Host header" if host is None else f"Host {host[:_SHOWN]!r}"
        detail = (f"{shown} is not a name of this service (it answers {self.policy.describe()}); open it by one of "
                  "those, or start it with --allowed-host NAME (or A3_BENCH_ALLOWED_HOSTS) for the name you use")
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


# -- the request body ------------------------------------------------------------------------------------------
class _NonFinite:
    """Stands for a NaN / Infinity token or an overflowing number while the body is parsed."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def non_finite_number(body: bytes) -> Optional[tuple[list[Any], str]]:
    """``(location, token)`` of the first NaN / Infinity / overflowing number of a JSON body; None when there is
    none or the body is not JSON at all (the route's own parser reports that)."""
    found: list[_NonFinite] = []

    def constant(text: str) -> _NonFinite:
        found.append(_NonFinite(text))
        return found[-1]

    try:
        doc = json.loads(body, parse_constant=constant, parse_float=_parse_float)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    stack: list[tuple[list[Any], Any]] = [([], doc)]
    while stack:  # iterative: a deeply nested body must not exhaust the interpreter's stack
        loc, value = stack.pop()
        if isinstance(value, _NonFinite):
            return loc, value.text
        if isinstance(value, dict):
            stack.extend((loc + [k], v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((loc + [i], v) for i, v in reversed(list(enumerate(value))))
    return None


def _is_json(content_type: Optional[str]) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (none given counts, as in FastAPI)."""
    if not content_type:
        return True
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class BodyGuard:
    """ASGI middleware: 413 for a body over ``max_bytes`` (never read in full), 422 for non-finite JSON numbers.

    A body within the limit is read here and handed on unchanged; what the route reads after it (a
    disconnect) comes from the server as before."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": f"the request body is larger than {self.max_bytes} bytes (the service's "
                                       "--max-body-bytes); send a smaller body"}, status_code=413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if length is None and not chunked:  # no body (a GET): nothing to guard
            await self.app(scope, receive, send)
            return
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(_header(scope, b"content-type")):
            bad = non_finite_number(body)
            if bad is not None:
                loc, token = bad
                where = ".".join(str(p) for p in loc) or "body"
                msg = (f"{where}: {token[:40]} is not a finite number; JSON numbers must be finite (no NaN or "
                       "Infinity, nothing beyond a double's range)")
                await JSONResponse({"detail": [{"type": "finite_number", "loc": ["body", *loc], "msg": msg}],
                                    "message": msg}, status_code=422)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the token -------------------------------------------------------------------------------------------------
class TokenAuth:
    """The service's bearer token (None: no auth); :meth:`require` is the routes' dependency."""

    def __init__(self, token: Optional[str]):
        self.token = token
        self.bearer = HTTPBearer(auto_error=False, description="the service's --token (or A3_BENCH_TOKEN)")

        def require(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Depends(self.bearer)) -> None:
            if not self.ok(creds.credentials if creds is not None else request.cookies.get(COOKIE)):
                raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                         "server's --token (A3_BENCH_TOKEN)", headers={"WWW-Authenticate": "Bearer"})

        self.require = require

    def ok(self, supplied: Optional[str]) -> bool:
        if not self.token:
            return True
        return supplied is not None and hmac.compare_digest(supplied.encode("utf-8", "replace"), self.token.encode())

    def request_ok(self, request: Request) -> bool:
        """The cookie or the Authorization header carries the token (the dashboard page)."""
        return self.ok(request.cookies.get(COOKIE)) or self.ok(bearer_header(request))


def bearer_header(request: Request) -> Optional[str]:
    value = request.headers.get("authorization", "")
    scheme, _, cred = value.partition(" ")
    return cred.strip() if scheme.lower() == "bearer" and cred.strip() else None


# -- the access log --------------------------------------------------------------------------------------------
REDACTED = "[redacted]"
SECRET_PARAMS = ("token",)


def redact_query(text: str) -> str:
    """``text`` (a path with a query) with the value of every ``token`` parameter replaced by ``[redacted]``;
    parameter names are compared as the service decodes them (``%74oken`` is ``token``)."""
    path, sep, query = text.partition("?")
    if not sep:
        return text
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        if unquote_plus(name).strip().lower() in SECRET_PARAMS:
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"


class RedactQueryToken(logging.Filter):
    """Logging filter: redact ``token`` query parameters in a record's arguments and message (uvicorn.access)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) and "?" in a else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query(v) if isinstance(v, str) and "?" in v else v for k, v in record.args.items()}
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = redact_query(record.msg)
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactQueryToken` on its access-log handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query_token"] = {"()": RedactQueryToken}
    for name, handler in config.get("handlers", {}).items():
        handler.setdefault("filters", []).append("redact_query_token")
    for name in ("uvicorn.access", "uvicorn.error"):
        config.get("loggers", {}).setdefault(name, {}).setdefault("filters", []).append("redact_query_token")
    return config
