"""The built-in ``austen`` corpus: Jane Austen's six novels, a second English domain (fiction).

The text comes from Debian's ``r-cran-janeaustenr`` package (the R package janeaustenr, MIT; the novels
are in the public domain, from Project Gutenberg). Only its data files are used, read without R by
:mod:`a3_serve.calibration.rdata`; ``scripts/setup.sh`` extracts them into
``${A3_SERVE_CACHE:-~/.cache/a3-serve}/texts/janeaustenr`` (an installed Debian package at
``/usr/lib/R/site-library/janeaustenr`` is used as well).

Documents are chapters: the printed lines of each paragraph are joined with spaces, paragraphs are
separated by a blank line, and the chapter/volume heading lines are dropped. Splits, by novel, so the
held-out text shares no sentence with calibration:

* ``heldout``: *Persuasion* and *Northanger Abbey* (about 180k SmolLM2 tokens);
* ``calibration``: *Sense and Sensibility*, *Pride and Prejudice*, *Mansfield Park*, *Emma*.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from a3_serve.calibration.rdata import read_lazyload_index, read_lazyload_object
from a3_serve.errors import CalibrationError
from a3_serve.runtime import default_cache_root

DEBIAN_PACKAGE = "r-cran-janeaustenr"
SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
#: novel variable names in the R package, in publication order
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
SPLITS = {
    "calibration": ("sensesensibility", "prideprejudice", "mansfieldpark", "emma"),
    "heldout": ("northangerabbey", "persuasion"),
}
_HEADING = re.compile(r"^(chapter|volume)\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)


def cache_dir() -> Path:
    """Where scripts/setup.sh puts the package's data files: ``$A3_SERVE_CACHE/texts/janeaustenr``."""
    return default_cache_root() / "texts" / "janeaustenr"


def data_dir() -> Path:
    """The folder holding ``Rdata.rdx`` and ``Rdata.rdb`` (the cache first, then the Debian install)."""
    for d in (cache_dir(), SYSTEM_DIR):
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            return d
    raise CalibrationError(
        f"the built-in 'austen' corpus is not installed; run scripts/setup.sh (it extracts Debian's {DEBIAN_PACKAGE} "
        f"into {cache_dir()}) or `apt-get install {DEBIAN_PACKAGE}`"
    )


@lru_cache(maxsize=1)
def _novels() -> dict[str, list[str]]:
    d = data_dir()
    try:
        index = read_lazyload_index(d / "Rdata.rdx")
        novels = {name: read_lazyload_object(d / "Rdata.rdb", *index[name]) for name in NOVELS}
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"cannot read the Austen corpus in {d} ({exc}); re-run scripts/setup.sh") from exc
    return {name: [line if isinstance(line, str) else "" for line in lines] for name, lines in novels.items()}


def chapters(lines: list[str]) -> list[str]:
    """Reflow a novel's printed lines into chapter documents (see the module docstring).

    The front matter before the first heading becomes its own (short) document; empty chapters are dropped.
    """
    docs: list[list[str]] = [[]]
    para: list[str] = []

    def end_paragraph():
        if para:
            docs[-1].append(" ".join(para))
            para.clear()

    for raw in lines:
        line = raw.strip()
        if _HEADING.match(line):
            end_paragraph()
            if docs[-1]:
                docs.append([])
        elif not line:
            end_paragraph()
        else:
            para.append(line)
    end_paragraph()
    return ["\n\n".join(d) for d in docs if d]


@lru_cache(maxsize=2)
def documents(split: str) -> tuple[str, ...]:
    """The chapters of the novels in ``split`` (``calibration`` or ``heldout``), in publication order."""
    if split not in SPLITS:
        raise CalibrationError(f"unknown split '{split}' of the austen corpus; use one of {', '.join(SPLITS)}")
    novels = _novels()
    return tuple(doc for name in SPLITS[split] for doc in chapters(novels[name]))
