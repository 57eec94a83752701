"""The built-in ``pydoc`` corpus: the Python 3.11 documentation as plain prose, a third English domain
(technical text) next to ``wiki`` (encyclopedic) and ``austen`` (fiction).

The text comes from Debian's ``python3.11-doc`` package (the CPython documentation, PSF License; the
package's ``copyright`` file is kept beside it). Only its Sphinx sources (``html/_sources/**/*.rst.txt``,
497 files) are used; ``scripts/setup.sh`` extracts them into
``${A3_SERVE_CACHE:-~/.cache/a3-serve}/texts/python3.11-doc/sources`` (an installed Debian package at
``/usr/share/doc/python3.11/html/_sources`` is used as well).

reST to prose (:func:`rst_to_sections`, deterministic, no docutils): one document per section (the text
between two headings; the headings themselves are dropped), paragraphs reflowed onto one line and separated by
a blank line. Dropped: code (``::`` literal blocks, ``>>>`` doctest paragraphs, ``code-block``/``doctest``/
``testcode``/``productionlist`` and every other directive not listed below, with its indented body),
tables, comments, targets, footnotes, substitution definitions, field lists and transitions. Kept: the body
of admonitions (``note``, ``warning``, ``seealso``, ...) and of object descriptions (``function``,
``method``, ``class``, ... minus their signature lines), and ``versionadded``/``versionchanged``/
``deprecated`` as Sphinx prints them ("Changed in version 3.2: ..."). Inline markup becomes its text:
``:func:`x``` -> ``x()`` (Sphinx adds the parentheses), ``:class:`~a.B``` -> ``B``, ``:ref:`text <label>```
-> ``text`` (a bare ``:ref:`label``` -> the title of the section it labels), ``:pep:`8``` -> ``PEP 8``,
```` ``code`` ```` -> ``code``, ```text <url>`_`` -> ``text``, ``*em*``/``**strong**`` -> their text;
list markers are removed (each item is a paragraph) and a definition-list term is a paragraph of its own.

Splits, by source FILE so the held-out text shares no file with calibration: the files are ordered by the
SHA-256 of their path relative to ``_sources`` (``library/json.rst.txt``; a fixed shuffle, so every part of
the documentation is in both splits and the first held-out tokens are not all from one folder); the file at
0-based position ``i`` in that order is held out when ``i % 5 == 4`` (every 5th file: 99 files), the other
398 are ``calibration``. Documents keep that file order, sections in document order. The few held-out
sections whose text also occurs verbatim in a calibration file (boilerplate such as "New in version 3.2.")
are dropped from ``heldout``, so the two splits share no document.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from a3_serve.errors import CalibrationError
from a3_serve.runtime import default_cache_root

DEBIAN_PACKAGE = "python3.11-doc"
SYSTEM_DIR = Path("/usr/share/doc/python3.11/html/_sources")
SUFFIX = ".rst.txt"
#: every HELDOUT_EVERY-th file (in SHA-256 order of its relative path) is held out
HELDOUT_EVERY = 5
SPLITS = ("calibration", "heldout")
#: the version strings Sphinx substitutes for |version| and |release|
VERSION = "3.11"

# directives whose indented body is prose (their arguments/signature are dropped)
_ADMONITIONS = {"note", "warning", "important", "caution", "attention", "danger", "error", "hint", "tip",
                "seealso", "impl-detail", "admonition", "glossary", "describe"}
_OBJECTS = {"function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
            "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "module-attribute",
            "c:function", "c:member", "c:type", "c:macro", "c:var", "c:struct", "c:union", "c:enum", "c:enumerator",
            "opcode", "cmdoption", "option", "envvar", "pdbcommand", "object", "2to3fixer", "monitoring-event",
            "awaitablemethod", "awaitablefunction", "property", "py:function", "py:method", "py:class",
            "py:attribute", "py:data", "py:exception"}
_VERSIONS = {"versionadded": ("New in version {}", "."), "versionchanged": ("Changed in version {}", "."),
             "deprecated": ("Deprecated since version {}", "."),
             "deprecated-removed": ("Deprecated since version {}, will be removed in version {}", ".")}

_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.+-]+)::(.*)$")
_EXPLICIT = re.compile(r"^\.\.(\s|$)")
_TARGET = re.compile(r"^\.\.\s+_([^:]+):\s*$")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+.:_<>])\1{2,}\s*$")
_GRID_TABLE = re.compile(r"^\+[-=+]+\+\s*$")
_SIMPLE_TABLE = re.compile(r"^=+( +=+)+\s*$")
_FIELD = re.compile(r"^:[A-Za-z][\w -]*:(\s|$)")
_BULLET = re.compile(r"^([*+\-\u2022]|#\.|\d+\.|\(?[a-zA-Z0-9]\))\s+")
_LINE_BLOCK = re.compile(r"^\|(\s+|$)")
_INLINE = re.compile(
    r"``(?P<lit>.+?)``(?!`)"
    r"|(?P<role>(?::[\w.+-]+)+):`(?P<rtext>(?:[^`\\]|\\.)+)`"
    r"|`(?P<link>[^`]+)`_{0,2}"
    r"|\*\*(?P<strong>(?:[^*\\]|\\.)+?)\*\*"
    r"|(?<![\w*\\])\*(?P<em>(?:[^\s*\\]|\\.)(?:(?:[^*\\]|\\.)*?(?:[^\s*\\]|\\.))?)\*(?![\w*])"
    r"|\s?\[(?:#[\w-]*|\d+|\*)\]_"
    r"|\|(?P<subst>[\w -]+)\|(?:_{1,2})?(?![\w|])"
    r"|\\(?P<esc>.)"
    r"|\\$"
)
_TEXT_ROLES = {"file", "samp", "kbd", "command", "program", "option", "envvar", "source", "menuselection", "guilabel",
               "dfn", "abbr", "term", "makevar", "mailheader", "mimetype", "newsgroup", "regexp"}
_PAREN_ROLES = {"func", "meth", "py:func", "py:meth", "c:func", "c:macro"}


def cache_dir() -> Path:
    """Where scripts/setup.sh puts the package's Sphinx sources: ``$A3_SERVE_CACHE/texts/python3.11-doc``."""
    return default_cache_root() / "texts" / "python3.11-doc"


def sources_dir() -> Path:
    """The folder holding the ``*.rst.txt`` Sphinx sources (the cache first, then the Debian install)."""
    for d in (cache_dir() / "sources", SYSTEM_DIR):
        if (d / "library" / f"json{SUFFIX}").is_file():
            return d
    raise CalibrationError(
        f"the built-in 'pydoc' corpus is not installed; run scripts/setup.sh (it extracts Debian's {DEBIAN_PACKAGE} "
        f"into {cache_dir()}) or `apt-get install {DEBIAN_PACKAGE}`"
    )


def _file_key(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _files() -> tuple[tuple[str, str], ...]:
    """``(relative path, text)`` of every source file, in SHA-256 order of the relative path."""
    d = sources_dir()
    paths = sorted(d.rglob(f"*{SUFFIX}"))
    if not paths:
        raise CalibrationError(f"no *{SUFFIX} files in {d}; re-run scripts/setup.sh")
    out = []
    try:
        for p in paths:
            out.append((p.relative_to(d).as_posix(), p.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read the Python documentation in {d} ({exc}); re-run scripts/setup.sh") from exc
    return tuple(sorted(out, key=lambda ft: _file_key(ft[0])))


def split_files(split: str) -> tuple[str, ...]:
    """The relative paths of the files in ``split`` (see the module docstring), in split order."""
    if split not in SPLITS:
        raise CalibrationError(f"unknown split '{split}' of the pydoc corpus; use one of {', '.join(SPLITS)}")
    held = split == "heldout"
    return tuple(rel for i, (rel, _) in enumerate(_files()) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held)


# --------------------------------------------------------------------------------------------- reST -> prose
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_heading(lines: list[str], i: int) -> int:
    """Number of lines (2 or 3) of a section title starting at ``lines[i]``, else 0."""
    line = lines[i]
    if not line.strip() or line[0] == " ":
        return 0
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if _ADORNMENT.match(line) and i + 2 < len(lines):  # overline, title, underline
        title, under = lines[i + 1], lines[i + 2]
        if title.strip() and under.rstrip() == line.rstrip() and not _ADORNMENT.match(title):
            return 3
        return 0
    if _ADORNMENT.match(nxt) and not _ADORNMENT.match(line) and len(nxt.rstrip()) >= min(len(line.rstrip()), 3):
        return 2
    return 0


def section_labels(text: str) -> dict[str, str]:
    """``label -> section title`` for the ``.. _label:`` targets placed right before a heading."""
    lines = text.expandtabs(8).splitlines()
    labels: dict[str, str] = {}
    pending: list[str] = []
    for i, line in enumerate(lines):
        m = _TARGET.match(line)
        if m:
            pending.append(m.group(1).strip().lower())
            continue
        if not line.strip() or _EXPLICIT.match(line) or line.startswith(" "):  # e.g. ".. program::" between
            continue
        n = _is_heading(lines, i)
        if n and pending:
            title = lines[i + 1] if n == 3 else line
            for label in pending:
                labels[label] = inline_text(title.strip())
        pending = []
    return labels


def _role_text(role: str, text: str, labels: dict[str, str]) -> str:
    role = role.strip(":")
    text = text.replace("\\`", "`")
    m = re.match(r"^(.*?)\s*<([^<>]+)>$", text, re.DOTALL)
    if m and m.group(1):
        return m.group(1)
    target = m.group(2) if m else text
    if role in ("ref", "std:ref"):
        label = target.lower()
        return labels.get(label, label.replace("-", " ").replace("_", " "))
    if role == "doc":
        return target.rstrip("/").rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
    if role in ("pep", "rfc"):
        number = target.split("#", 1)[0].strip()
        return f"{role.upper()} {number}"
    if role in ("samp", "file"):
        target = re.sub(r"(?<!\\)[{}]", "", target)
    target = target.lstrip("!")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    if role not in _TEXT_ROLES:
        target = target.lstrip(".")  # ".datetime": a name looked up relative to the current module
    if role in _PAREN_ROLES and not target.endswith(")"):
        target += "()"
    return target


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "" if m.group(1).isspace() else m.group(1), text)


def inline_text(text: str, labels: Optional[dict[str, str]] = None) -> str:
    """reST inline markup replaced by its text (see the module docstring); runs of spaces collapsed."""
    labels = labels or {}

    def repl(m: re.Match) -> str:
        if m.group("lit") is not None:
            return m.group("lit")
        if m.group("role") is not None:
            return _role_text(m.group("role"), m.group("rtext"), labels)
        if m.group("link") is not None:
            link = m.group("link")
            mm = re.match(r"^(.*?)\s*<[^<>]+>$", link, re.DOTALL)
            return mm.group(1) if mm and mm.group(1) else link.strip("<>")
        if m.group("strong") is not None:
            return _unescape(m.group("strong"))
        if m.group("em") is not None:
            return _unescape(m.group("em"))
        if m.group("subst") is not None:
            return VERSION if m.group("subst") in ("version", "release") else m.group("subst")
        if m.group("esc") is not None:
            return "" if m.group("esc").isspace() else m.group("esc")
        return ""

    return re.sub(r"[ \t]+", " ", _INLINE.sub(repl, text)).strip()


def rst_to_sections(text: str, labels: Optional[dict[str, str]] = None) -> list[str]:
    """One reST source as prose documents, one per section (see the module docstring)."""
    lines = text.expandtabs(8).replace("\r\n", "\n").replace("\r", "\n").splitlines()
    sections: list[list[str]] = [[]]
    para: list[str] = []
    para_indent = 0  # indent of the paragraph's text (after a list marker)
    para_start = 0  # indent of the paragraph's first line
    para_is_item = False  # the paragraph is a list item (so a bullet at its indent starts the next item)
    skip_above: Optional[int] = None  # skip blank lines and lines indented more than this
    header_above: Optional[int] = None  # skip a directive's option lines (``:opt:``) indented more than this
    prefix: Optional[str] = None  # "Changed in version 3.2:" waiting for the directive's first paragraph

    def end_paragraph() -> None:
        nonlocal para, skip_above
        if not para:
            return
        body = " ".join(para)
        para = []
        if body.startswith(">>>"):
            return
        if body.endswith("::"):  # a literal block follows: drop it; "Text::" -> "Text:", "Text ::" -> "Text"
            skip_above = para_start
            body = body[:-1] if not body[:-2].endswith((" ", "\t")) else body[:-2]
        out = inline_text(body, labels)
        if out and re.search(r"[A-Za-z]", out):
            sections[-1].append(out)

    def take_prefix(first: str) -> str:
        nonlocal prefix
        if prefix is None:
            return first
        p, prefix = prefix, None
        return f"{p}: {first}" if first else p

    i = 0
    n = len(lines)
    while i < n:
        line = lines[i].rstrip()
        ind = _indent(line)
        if skip_above is not None:
            if not line or ind > skip_above:
                i += 1
                continue
            skip_above = None
        if header_above is not None:
            if line and ind > header_above and _FIELD.match(line.lstrip()):
                i += 1
                continue
            header_above = None
        if not line:
            end_paragraph()
            i += 1
            continue
        stripped = line.lstrip()
        heading = _is_heading(lines, i)
        if heading:
            end_paragraph()
            if prefix is not None:
                sections[-1].append(prefix + ".")
                prefix = None
            if sections[-1]:
                sections.append([])
            i += heading
            continue
        if ind == 0 and _ADORNMENT.match(line):  # a transition
            end_paragraph()
            i += 1
            continue
        if _EXPLICIT.match(stripped):
            end_paragraph()
            m = _DIRECTIVE.match(stripped)
            name, arg = (m.group(1), m.group(2).strip()) if m else ("", "")
            if name in _VERSIONS:
                fmt, end = _VERSIONS[name]
                parts = arg.split(None, 2 if name == "deprecated-removed" else 1)
                nver = 2 if name == "deprecated-removed" else 1
                versions = (parts + ["?", "?"])[:nver]
                rest = " ".join(parts[nver:])
                j = i + 1
                while j < n and not lines[j].strip():
                    j += 1
                has_body = j < n and _indent(lines[j]) > ind
                label = fmt.format(*versions)
                if rest:
                    para, para_start, para_indent, para_is_item = [f"{label}: {rest}"], ind, ind + 3, False
                elif has_body:
                    prefix = label
                else:
                    sections[-1].append(label + end)
                header_above = ind
                i += 1
                continue
            if name in _ADMONITIONS:
                if arg and name not in ("admonition", "describe"):
                    para, para_start, para_indent, para_is_item = [arg], ind, ind + 3, False
                header_above = ind
                i += 1
                continue
            if name in _OBJECTS:
                j = i + 1  # the signature may continue on the following lines, up to a blank line
                while j < n and lines[j].strip():
                    j += 1
                i = j
                continue
            skip_above = ind  # any other directive, comment, target, footnote: drop it with its body
            i += 1
            continue
        if _GRID_TABLE.match(stripped):
            end_paragraph()
            while i < n and lines[i].strip():
                i += 1
            continue
        if _SIMPLE_TABLE.match(stripped):
            end_paragraph()
            i += 1
            while i < n:
                s = lines[i].strip()
                i += 1
                if _SIMPLE_TABLE.match(s) and (i >= n or not lines[i].strip()):
                    break
            continue
        if _FIELD.match(stripped):
            end_paragraph()
            skip_above = ind
            i += 1
            continue
        if stripped.startswith("**Source code:**"):
            end_paragraph()
            i += 1
            continue
        bullet = _BULLET.match(stripped)
        if bullet and (not para or (para_is_item and ind == para_start)):  # reST: an item after a blank line or an item
            end_paragraph()
            item = stripped[bullet.end():]
            para_start, para_indent = ind, ind + bullet.end()
            if not _EXPLICIT.match(item):  # "*  .. _target:" opens an item with a target: drop that line
                para, para_is_item = [take_prefix(item)], True
            i += 1
            continue
        if _LINE_BLOCK.match(stripped):
            stripped = stripped[1:].strip()
        if para and ind != para_indent:  # a definition after its term, or the end of a list item
            end_paragraph()
        if not para:
            para_start = para_indent = ind
            para_is_item = False
            stripped = take_prefix(stripped)
        para.append(stripped)
        i += 1
    end_paragraph()
    if prefix is not None:
        sections[-1].append(prefix + ".")
    return ["\n\n".join(s) for s in sections if s]


@lru_cache(maxsize=1)
def _labels() -> dict[str, str]:
    labels: dict[str, str] = {}
    for _, text in sorted(_files()):
        labels.update(section_labels(text))
    return labels


@lru_cache(maxsize=1)
def _sections_by_file() -> dict[str, tuple[str, ...]]:
    labels = _labels()
    return {rel: tuple(rst_to_sections(text, labels)) for rel, text in _files()}


@lru_cache(maxsize=2)
def documents(split: str) -> tuple[str, ...]:
    """The sections of the files in ``split`` (``calibration`` or ``heldout``), in split order."""
    by_file = _sections_by_file()
    docs = tuple(doc for rel in split_files(split) for doc in by_file[rel])
    if split == "heldout":
        seen = set(documents("calibration"))
        docs = tuple(d for d in docs if d not in seen)
    return docs
