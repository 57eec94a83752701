"""The service's settings (what ``a3-bench-server`` options set) and the model-root check for request paths."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from a3_serve.errors import InputError
from a3_serve.runtime import HUB_ID, default_cache_root, resolve_model

DEFAULT_PORT = 8800
TOKEN_ENV = "A3_BENCH_TOKEN"
ALLOWED_HOSTS_ENV = "A3_BENCH_ALLOWED_HOSTS"
#: the largest request body the service reads (a run request is well under 2 KiB)
DEFAULT_MAX_BODY_BYTES = 64 * 1024


def default_data_dir() -> Path:
    return default_cache_root() / "bench-server"


def default_model_roots() -> list[Path]:
    """The current directory and the a3-serve model cache (where `a3-demo-model` puts its model)."""
    return [Path.cwd(), default_cache_root() / "models"]


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    model_roots: tuple[Path, ...] = field(default_factory=lambda: tuple(default_model_roots()))
    token: Optional[str] = None
    queue_size: int = 8
    run_timeout: float = 6 * 3600.0
    kill_grace: float = 10.0
    python: str = sys.executable
    #: the address the service binds (its Host headers are accepted); see :mod:`a3_serve.bench.server.security`
    host: str = "127.0.0.1"
    #: further names the Host header may carry (--allowed-host, $A3_BENCH_ALLOWED_HOSTS); "*" accepts any
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.model_roots = tuple(Path(r).expanduser().resolve() for r in self.model_roots)
        self.allowed_hosts = tuple(self.allowed_hosts)


class PathRejected(Exception):
    """A request path is unusable; ``status`` is 403 (outside the model roots) or 422 (not a model folder)."""

    def __init__(self, status: int, message: str, field: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_under_roots(raw: str, roots: tuple[Path, ...], what: str) -> Path:
    """``raw`` as an absolute path with symlinks and ``..`` resolved, or PathRejected(403) if that lies outside
    every root. A relative path is looked up under each root in turn (the first that exists wins)."""
    roots_txt = ", ".join(str(r) for r in roots) or "(none)"
    try:
        given = Path(raw).expanduser()
        if given.is_absolute():
            candidates = [given.resolve()]
        else:
            candidates = [(root / given).resolve() for root in roots]
    except (OSError, ValueError, RuntimeError) as err:
        raise PathRejected(422, f"{what} {raw[:200]!r} is not a usable path ({err})", what) from None
    inside = [c for c in candidates if _inside(c, roots)]
    if not inside:
        shown = candidates[0] if candidates else raw
        raise PathRejected(403, f"{what} {raw[:200]!r} resolves to {str(shown)[:300]!r}, outside the allowed model "
                                f"roots ({roots_txt}); move or link the model under a root, or start the server with "
                                "--model-root", what)
    try:
        return next((c for c in inside if c.exists()), inside[0])
    except (OSError, ValueError):
        return inside[0]


def _cached_hub_model(raw: str, roots: tuple[Path, ...], what: str) -> Optional[Path]:
    """The cached snapshot of Hub id ``raw``; None when ``raw`` is not a Hub id or names a folder under a root."""
    if not HUB_ID.match(raw) or Path(raw).is_absolute() or any((root / raw).exists() for root in roots):
        return None
    try:
        return resolve_model(raw, what, local_only=True).path
    except InputError as err:
        raise PathRejected(422, f"{err}; the service only serves models that are already in the cache", what) from None


def check_model_dir(raw: str, roots: tuple[Path, ...], what: str) -> Path:
    """A Hugging Face model folder under the roots: config.json and *.safetensors / *.bin weights. A Hub id
    (``org/name[@revision]``) that names no folder under a root is taken from the local Hugging Face cache, never
    downloaded (a request must not start a download of gigabytes): the cache is an implicit read-only root."""
    path = _cached_hub_model(raw, roots, what) or resolve_under_roots(raw, roots, what)
    try:
        if not path.is_dir():
            raise PathRejected(422, f"{what} {raw[:200]!r} ({path}) "
                               + ("is a file, not a model folder" if path.exists() else "does not exist")
                               + "; pass a Hugging Face model folder with config.json and weights", what)
        if not (path / "config.json").is_file():
            raise PathRejected(422, f"{what} {raw[:200]!r} ({path}) has no config.json; pass the folder that holds "
                                    "config.json and the *.safetensors weights", what)
        if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            raise PathRejected(422, f"{what} {raw[:200]!r} ({path}) has a config.json but no *.safetensors/*.bin "
                                    "weights", what)
    except OSError as err:
        raise PathRejected(422, f"{what} {raw[:200]!r} cannot be read: {err}", what) from None
    return path


def _builtin_texts() -> tuple[str, ...]:
    from a3_serve.calibration.sources import BUILTIN_CORPORA

    return BUILTIN_CORPORA


BUILTIN_TEXTS = _builtin_texts()  # wiki, austen, pydoc, mix


def check_text_source(spec: str, roots: tuple[Path, ...]) -> str:
    """``ppl_data``: built-in corpora (``wiki``, ``austen``, ``pydoc``, ``mix``, each ``[:split]``), ``hf:...``
    datasets, or files under the roots; ``+`` joins several. Returns the spec with file parts replaced by resolved
    absolute paths."""
    parts = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise PathRejected(422, f"ppl_data {spec[:200]!r} has an empty part; write e.g. 'wiki:heldout' or "
                                    "'wiki+austen'", "ppl_data")
        if part.split(":", 1)[0] in BUILTIN_TEXTS or part.startswith("hf:"):
            parts.append(part)
            continue
        path = resolve_under_roots(part, roots, "ppl_data")
        if not path.exists():
            raise PathRejected(422, f"ppl_data {part[:200]!r} ({path}) does not exist; use 'wiki:heldout', 'austen' or "
                                    "a .txt/.jsonl file or folder under a model root", "ppl_data")
        parts.append(str(path))
    return "+".join(parts)
