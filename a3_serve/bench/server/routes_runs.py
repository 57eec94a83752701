"""The runs API: queue, list, inspect, cancel and stream runs; their reports and logs (all behind the token).

A run request is checked before it is queued: its model paths must be model folders under the model roots
(403 / 422), and the two folders must be comparable (same tokenizer and vocabulary; a compressed a3-export must
be an export of the dense folder), else 422 unless the request sets ``allow_mismatch``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from a3_serve.bench.server.errors import error_responses
from a3_serve.bench.server.models import FINAL, Run, RunCreate, RunList, RunStatus
from a3_serve.bench.server.runner import WORKER_LOG, QueueFull, Runner, build_command
from a3_serve.bench.server.security import TokenAuth
from a3_serve.bench.server.settings import (
    PathRejected,
    Settings,
    check_model_dir,
    check_text_source,
)
from a3_serve.bench.server.store import Store

if TYPE_CHECKING:
    from a3_serve.bench.server.service import Service

SSE_POLL_S = 0.25


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
    out.update(request=row["request"], command=row["command"], exit_code=row.get("exit_code"),
               results=row.get("results"))
    return out


def comparability(dense: str, compressed: str) -> list[str]:
    """Why the two (checked) folders cannot be measured against each other; [] when they can."""
    from a3_serve.provenance import comparability_problems

    try:
        return comparability_problems(dense, compressed)
    except OSError as err:
        why = (f"{err.strerror or type(err).__name__}: {err.filename}" if err.filename
               else str(err) or type(err).__name__)
        return [f"the folders could not be compared ({why})"]


def _inline(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'inline; filename="{filename}"'}


class _EventStream(Response):
    media_type = "text/event-stream"


def runs_router(svc: "Service", settings: Settings, auth: TokenAuth) -> APIRouter:
    """``/runs...``: every route needs the token."""
    api = APIRouter(dependencies=[Depends(auth.require)], responses=error_responses(401))

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

    @api.post("/runs", response_model=Run, status_code=201, tags=["runs"], summary="Queue a benchmark run",
              responses={**error_responses(400, 403, 413, 429), 201: {"description": "queued; Location names the run"}})
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
        problems = comparability(request["dense"], request["compressed"])
        if problems and not body.allow_mismatch:
            raise RequestValidationError([{
                "type": "not_comparable", "loc": ["body", "compressed"],
                "msg": f"compressed model {body.compressed[:200]!r} is not comparable with dense {body.dense[:200]!r}: "
                       f"{'; '.join(problems)}; benchmark a compressed model against the dense model it was exported "
                       "from, or set \"allow_mismatch\": true to measure them anyway"}])
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
             responses=error_responses(404))
    def get_run(run_id: str) -> dict[str, Any]:
        return run_dict(get_row(run_id))

    def cancel(run_id: str) -> dict[str, Any]:
        row = get_row(run_id)
        if RunStatus(row["status"]) in FINAL:
            raise HTTPException(409, f"run {run_id} has already {row['status']}; only queued or running runs can be "
                                     "cancelled")
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
              responses=error_responses(404, 409))
    def cancel_run(run_id: str) -> dict[str, Any]:
        return cancel(run_id)

    @api.delete("/runs/{run_id}", response_model=Run, tags=["runs"], summary="Cancel a run (same as POST .../cancel)",
                responses=error_responses(404, 409))
    def delete_run(run_id: str) -> dict[str, Any]:
        return cancel(run_id)

    @api.get("/runs/{run_id}/events", tags=["runs"], summary="Progress as server-sent events",
             response_class=_EventStream,
             responses={**error_responses(404),
                        200: {"description": "`event: run` (a RunSummary as JSON) on every change; "
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
            raise HTTPException(409,
                                f"run {run_id} is {row['status']}{why}; a report exists once the run has succeeded")
        return row

    @api.get("/runs/{run_id}/report.json", tags=["reports"], summary="The throughput.json document",
             responses={**error_responses(404, 409),
                        200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
    def report_json(run_id: str) -> JSONResponse:
        row = finished_row(run_id)
        return JSONResponse(row["results"], headers=_inline(f"a3-bench-{run_id}.json"))

    @api.get("/runs/{run_id}/report.md", tags=["reports"], summary="The Markdown table",
             response_class=PlainTextResponse,
             responses={**error_responses(404, 409),
                        200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}})
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
             responses={**error_responses(404, 409),
                        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
             response_class=Response)
    def report_png(run_id: str) -> Response:
        row = finished_row(run_id)
        path = Path(row["run_dir"]) / "throughput.png"
        if not path.is_file():
            raise HTTPException(404, f"run {run_id} has no chart (no charted metric was measured); use report.json")
        return FileResponse(path, media_type="image/png", headers=_inline(f"a3-bench-{run_id}.png"))

    @api.get("/runs/{run_id}/log", tags=["runs"], summary="The end of the worker's log (stderr)",
             response_class=PlainTextResponse, responses=error_responses(404))
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

    return api
