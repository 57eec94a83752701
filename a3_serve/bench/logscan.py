"""The engine's real error in a crashed worker's or server's log: the first line that names an exception.

vLLM logs a failure as a traceback (often twice: the engine core's root cause, then the caller's "Engine core
initialization failed. See root cause above"), every line prefixed by its process (``(EngineCore pid=12) ``,
``[rank0]: ``). The last line of such a log is noise (pydantic's "For further information visit ..."), and so is
the caller's summary; the first exception line is the cause. A pydantic ``ValidationError`` names its cause on the
next line ("Value error, invalid literal for int() ..."), which is joined to it.
"""

from __future__ import annotations

import re
from typing import Optional

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: process / rank prefixes vLLM puts before every line of a child's output
_PREFIX = re.compile(r"^\s*(?:\[rank\d+\]:\s*|\([\w.\-]+ pid=\d+\)\s*)+")
#: ``pkg.mod.SomeError: message`` (also ``...Exception``), at the start of a line once the prefixes are gone
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
#: pydantic's trailer and the ``[type=..., input_value=...]`` tail of its message lines
_PYDANTIC_TAIL = re.compile(r"\s*\[type=[^\]]*$|\s*\[type=.*\]\s*$")


def _clean(line: str) -> str:
    return _PREFIX.sub("", _ANSI.sub("", line)).rstrip()


def engine_error_line(text: str, limit: int = 400) -> Optional[str]:
    """``"ExceptionName: message"`` of the first exception a log names, or None when it names none.

    Our own one-line ``error: ...`` (the worker's ``run_cli``) counts too, but only when no exception line comes
    before it: an engine traceback printed first is the cause the user needs to see."""
    lines = [_clean(ln) for ln in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")[:limit]
        m = _EXCEPTION.match(line)
        if not m or line.startswith(("Traceback", "During handling")):
            continue
        name, msg = m.group(1), (m.group(2) or "").strip()
        if name == "ValidationError":  # pydantic: the cause is on the next indented line
            for nxt in lines[i + 1:i + 4]:
                s = nxt.strip()
                if s and not s.startswith("For further information"):
                    msg = f"{msg}: {_PYDANTIC_TAIL.sub('', s)}" if msg else _PYDANTIC_TAIL.sub("", s)
                    break
        return (f"{name}: {msg}" if msg else name)[:limit]
    return None


def failure_reason(text: str, limit: int = 400) -> str:
    """What to tell the user about a dead process from its log: the first exception line, else the last non-empty
    line, else ``"no output"``."""
    found = engine_error_line(text, limit)
    if found:
        return found
    lines = [_clean(ln) for ln in text.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else "no output"
