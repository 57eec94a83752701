"""Text sources (txt / jsonl / folder / wiki / austen / pydoc / mix / hf) and token sampling for calibration and
evaluation."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from a3_serve.calibration import sources as S
from a3_serve.calibration.sources import (
    describe_source,
    eval_windows,
    load_texts,
    sample_calibration,
    sources_overlap,
    tokenize_corpus,
)
from a3_serve.errors import CalibrationError, InputError

os.environ.setdefault("A3_SERVE_NO_PROGRESS", "1")


class WordTokenizer:
    """A fake tokenizer: word ``wN`` -> id ``N + 10``; EOS is 1. Every token of a synthetic corpus is unique,
    so a window's tokens tell exactly where in the stream it came from."""

    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [[int(w[1:]) + 10 for w in t.split()] for t in texts]}


def _corpus(n_docs: int, words_per_doc: int) -> list[str]:
    return [" ".join(f"w{d * words_per_doc + i}" for i in range(words_per_doc)) for d in range(n_docs)]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from a3_serve.demo import build_demo_model

    return AutoTokenizer.from_pretrained(str(build_demo_model()))


# --------------------------------------------------------------------------------------------- parsing
def test_txt_documents_split_at_blank_lines(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("First doc line one.\nline two.\n\nSecond doc.\n   \n\n\nThird doc.\r\n\r\nFourth.\n")
    assert load_texts(str(p)) == ["First doc line one.\nline two.", "Second doc.", "Third doc.", "Fourth."]


def test_jsonl_default_and_named_field(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "alpha", "body": "one"}\n\n{"text": "beta", "body": "two"}\n{"text": "  ", "body": '
                 '"three"}\n')
    assert load_texts(str(p)) == ["alpha", "beta"]
    assert load_texts(f"{p}:body") == ["one", "two", "three"]
    assert describe_source(f"{p}:body") == f"{p.resolve()}:body"


def test_jsonl_errors_name_line_and_fix(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:2: not valid JSON"):
        load_texts(str(p))
    q = tmp_path / "nofield.jsonl"
    q.write_text('{"content": "x"}\n')
    with pytest.raises(CalibrationError,
                       match=r"no field 'text' \(fields: content\); name the text field as nofield\.jsonl:FIELD"):
        load_texts(str(q))


def test_folder_reads_sorted_txt_files_one_document_each(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("bravo\n\nstill bravo\n")
    (d / "a.txt").write_text("alpha\n")
    (d / "c.md").write_text("ignored")
    (d / "empty.txt").write_text("\n")
    assert load_texts(str(d)) == ["alpha", "bravo\n\nstill bravo"]
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(CalibrationError, match="has no .txt files"):
        load_texts(str(tmp_path / "nodocs"))


def test_missing_and_empty_sources(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalibrationError, match=r"nope\.txt does not exist"):
        load_texts(str(missing))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(str(tmp_path / "nothing-here"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CalibrationError, match="contains no text"):
        load_texts(str(empty))
    with pytest.raises(InputError, match="applies only to built-in"):
        load_texts(str(empty), "heldout")


def test_messages_are_one_line(tmp_path):
    for call in (lambda: load_texts(str(tmp_path / "x.txt")), lambda: load_texts("wiki", "test"),
                 lambda: load_texts("wiki:heldout", "calibration"), lambda: load_texts("hf:")):
        with pytest.raises((CalibrationError, InputError)) as info:
            call()
        assert "\n" not in str(info.value)


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(CalibrationError, match=r"needs the 'datasets' package .* network access"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test")
    assert describe_source("hf:wikitext:wikitext-2-raw-v1") == "hf:wikitext:wikitext-2-raw-v1:train"
    assert describe_source("hf:wikitext", "validation") == "hf:wikitext::validation"


# --------------------------------------------------------------------------------------------- wiki
def test_wiki_splits_are_disjoint_deterministic_and_cover_the_corpus():
    cal, held = load_texts("wiki"), load_texts("wiki", "heldout")
    assert cal == load_texts("wiki:calibration") == load_texts("wiki", "calibration")
    assert held == load_texts("wiki:heldout") == load_texts("wiki:heldout", "heldout")
    assert len(cal) > 0 and len(held) > 0
    assert not set(cal) & set(held)
    assert len(cal) + len(held) == 10033
    assert len(held) == 10033 // S.WIKI_HELDOUT_EVERY  # every 5th document, in title order
    assert describe_source("wiki") == "wiki:calibration"
    assert describe_source("wiki", "heldout") == "wiki:heldout"
    with pytest.raises(InputError, match="names split 'heldout' but split 'calibration'"):
        load_texts("wiki:heldout", "calibration")
    with pytest.raises(InputError, match="unknown split 'test'"):
        load_texts("wiki", "test")


def test_sources_overlap(tmp_path):
    assert not sources_overlap("wiki", None, "wiki", "heldout")
    assert not sources_overlap("wiki:calibration", None, "wiki:heldout", None)
    assert sources_overlap("wiki", None, "wiki:calibration", None)
    assert sources_overlap("wiki:heldout", None, "wiki", "heldout")
    f = tmp_path / "data" / "a.txt"
    f.parent.mkdir()
    f.write_text("hello")
    assert sources_overlap(str(f), None, describe_source(str(f)), None)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert sources_overlap("data/a.txt", None, str(f), None)  # relative vs absolute
    finally:
        os.chdir(cwd)
    assert sources_overlap(str(f.parent), None, str(f), None)  # file inside a folder source
    assert not sources_overlap(str(f), None, str(tmp_path / "other.txt"), None)
    assert sources_overlap("/gone/calib.txt", None, "/gone/calib.txt", None)  # need not exist
    assert not sources_overlap(str(f), None, "wiki:heldout", None)
    assert sources_overlap("hf:c4:en", None, "hf:c4:en:train", None)
    assert not sources_overlap("hf:c4:en:train", None, "hf:c4:en:validation", None)


# --------------------------------------------------------------------------------------------- tokens
def test_tokenize_corpus_separates_documents_with_eos():
    stream = tokenize_corpus(WordTokenizer(), ["w0 w1", "w2"])
    assert stream.dtype == torch.long
    assert stream.tolist() == [10, 11, 1, 12, 1]


def test_tokenize_corpus_real_tokenizer(smol_tokenizer):
    texts = ["The capital of France is Paris.", "Second document."]
    stream = tokenize_corpus(smol_tokenizer, texts)
    eos = smol_tokenizer.eos_token_id
    expect = []
    for t in texts:
        expect += smol_tokenizer(t, add_special_tokens=False).input_ids + [eos]
    assert stream.tolist() == expect
    assert smol_tokenizer.bos_token_id not in stream.tolist()


def test_sampling_is_reproducible_non_overlapping_and_from_the_text():
    tok, texts = WordTokenizer(), _corpus(50, 40)  # 50 * 41 = 2,050 tokens
    stream = tokenize_corpus(tok, texts).tolist()
    pos = {t: i for i, t in enumerate(stream) if t != 1}
    a = sample_calibration(tok, texts, 16, 64, seed=0)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, sample_calibration(tok, texts, 16, 64, seed=0))
    assert not torch.equal(a, sample_calibration(tok, texts, 16, 64, seed=1))
    spans = []
    for row in a.tolist():
        first = next(i for i, t in enumerate(row) if t != 1)
        start = pos[row[first]] - first
        assert stream[start : start + 64] == row  # a contiguous piece of the token stream
        spans.append((start, start + 64))
    spans.sort()
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))  # no two windows share a token
    # all the text: windows tile the stream exactly when there is no slack
    full = sample_calibration(tok, _corpus(4, 15), 4, 16, seed=3)
    assert sorted(full.flatten().tolist()) == sorted(tokenize_corpus(tok, _corpus(4, 15)).tolist())


def test_sampling_real_tokens_come_from_the_text(smol_tokenizer):
    texts = load_texts("wiki", "heldout")[:40]
    stream = tokenize_corpus(smol_tokenizer, texts)
    windows = sample_calibration(smol_tokenizer, texts, 4, 128, seed=0)
    for row in windows:
        hits = (stream.unfold(0, 128, 1) == row).all(dim=1)
        assert hits.any()


def test_too_little_text_names_the_numbers():
    tok, texts = WordTokenizer(), _corpus(3, 9)  # 30 tokens
    with pytest.raises(CalibrationError) as info:
        sample_calibration(tok, texts, 128, 2048, seed=0)
    msg = str(info.value)
    assert "calibration text has 30 tokens but --nsamples 128 x --seqlen 2048 needs 262,144" in msg
    assert "give more text or lower --nsamples/--seqlen" in msg
    with pytest.raises(InputError, match="--nsamples must be an integer >= 1"):
        sample_calibration(tok, texts, 0, 8, seed=0)


def test_eval_windows_are_consecutive_from_the_start():
    tok, texts = WordTokenizer(), _corpus(10, 9)  # 100 tokens
    stream = tokenize_corpus(tok, texts)
    w = eval_windows(tok, texts, 16)
    assert w.shape == (6, 16)
    assert torch.equal(w.flatten(), stream[:96])
    w2 = eval_windows(tok, texts, 16, max_tokens=40)  # rounded down to whole windows
    assert torch.equal(w2, w[:2])
    with pytest.raises(CalibrationError, match="fewer than one window of --seqlen 128"):
        eval_windows(tok, texts, 128)
    with pytest.raises(InputError, match="less than one window"):
        eval_windows(tok, texts, 16, max_tokens=8)


def test_wiki_token_counts(smol_tokenizer):
    """The held-out split is big enough for the default evaluation (32,768 tokens) many times over."""
    held = eval_windows(smol_tokenizer, load_texts("wiki", "heldout"), 512, max_tokens=32768)
    assert held.shape == (64, 512)


# ------------------------------------------------------------------------------------------ austen + A+B
def test_rdata_reader_decodes_a_handmade_serialization():
    """The R XDR reader on bytes built by hand from the format spec: a named list with a character vector
    (including NA and UTF-8), an integer vector with NA, and a double vector."""
    import struct

    from a3_serve.calibration.rdata import unserialize

    def i(v):
        return struct.pack(">i", v)

    def chars(s):
        if s is None:
            return i(9) + i(-1)
        b = s.encode()
        return i(9 | (1 << 12) * 8) + i(len(b)) + b  # CHARSXP with a UTF-8 "levels" flag

    def sym(s):
        return i(1) + chars(s)

    body = (i(19 | (1 << 9)) + i(3)  # VECSXP of length 3 with attributes
            + i(16) + i(3) + chars("It is a truth") + chars(None) + chars("café")
            + i(13) + i(2) + i(7) + i(-(2**31))
            + i(14) + i(1) + struct.pack(">d", 2.5)
            + i(2 | (1 << 10)) + sym("names") + i(16) + i(3) + chars("text") + chars("ints") + chars("real") + i(254))
    data = b"X\n" + i(3) + i(0x040300) + i(0x030500) + i(5) + b"UTF-8" + body
    obj = unserialize(data)
    assert obj.named() == {"text": ["It is a truth", None, "café"], "ints": [7, None], "real": [2.5]}
    with pytest.raises(ValueError, match="X"):
        unserialize(b"A\n" + data[2:])


def test_austen_chapters_reflow_lines_and_drop_headings():
    from a3_serve.calibration.austen import chapters

    lines = ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "Chapter 1", "", "It is a truth universally",
             "acknowledged.", "", "Second paragraph.", "", "CHAPTER II.", "", "Next chapter text", "here."]
    docs = chapters(lines)
    assert docs == ["PRIDE AND PREJUDICE\n\nBy Jane Austen",
                    "It is a truth universally acknowledged.\n\nSecond paragraph.", "Next chapter text here."]


def test_austen_splits_are_whole_novels_and_disjoint():
    pytest.importorskip("a3_serve.calibration.austen")
    try:
        cal, held = load_texts("austen"), load_texts("austen:heldout")
    except CalibrationError as err:
        pytest.fail(f"the austen corpus is part of the set-up (scripts/setup.sh): {err}")
    assert 200 < len(cal) < 240 and 50 < len(held) < 65  # chapters (plus front matter)
    assert held[0].startswith("NORTHANGER ABBEY") and any(d.startswith("Persuasion") for d in held)
    assert any("It is a truth universally acknowledged" in d for d in cal)
    assert not any("It is a truth universally acknowledged" in d for d in held)
    assert not set(cal) & set(held)
    assert sum(map(len, held)) > 800_000  # about 180k SmolLM2 tokens of held-out fiction
    assert all("\n" not in p for d in held for p in d.split("\n\n"))  # printed lines were reflowed


def test_austen_missing_is_a_clear_error(monkeypatch, tmp_path):
    from a3_serve.calibration import austen

    monkeypatch.setenv("A3_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(austen, "SYSTEM_DIR", tmp_path / "nowhere")
    austen._novels.cache_clear()
    austen.documents.cache_clear()
    try:
        with pytest.raises(CalibrationError, match="scripts/setup.sh"):
            load_texts("austen:heldout")
    finally:
        austen._novels.cache_clear()
        austen.documents.cache_clear()


def test_combined_sources_concatenate_describe_and_overlap(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("doc one\n\ndoc two\n")
    combined = load_texts(f"{a}+wiki")
    wiki = load_texts("wiki")
    assert combined[:2] == ["doc one", "doc two"] and combined[2:] == wiki
    assert describe_source(f"{a}+wiki:heldout") == f"{a}+wiki:heldout"
    assert describe_source("wiki+austen", "heldout") == "wiki:heldout+austen:heldout"
    assert sources_overlap("wiki+austen", None, "austen", None)
    assert sources_overlap("wiki+austen", None, "wiki:calibration", None)
    assert not sources_overlap("wiki+austen", None, "austen:heldout", None)
    assert not sources_overlap("wiki+austen", None, "wiki+austen", "heldout")
    with pytest.raises(InputError, match="empty part"):
        load_texts("wiki++austen")
    with pytest.raises(InputError, match="unknown split"):
        load_texts("austen:train")


# ------------------------------------------------------------------------------------------- pydoc + mix
def _pydoc():
    from a3_serve.calibration import pythondoc

    try:
        pythondoc.sources_dir()
    except CalibrationError as err:
        pytest.fail(f"the pydoc corpus is part of the set-up (scripts/setup.sh): {err}")
    return pythondoc


def test_rst_to_sections_turns_markup_into_prose():
    from a3_serve.calibration.pythondoc import rst_to_sections, section_labels

    rst = """\
.. _json-intro:

:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

**Source code:** :source:`Lib/json/__init__.py`

--------------

`JSON <https://json.org>`_, specified by :rfc:`7159` [#f1]_, is a *lightweight* format; see :pep:`8`.

Encoding basic objects::

    >>> import json
    >>> json.dumps([1])

.. code-block:: shell-session

    $ python -m json.tool

+-------+-------+
| a     | b     |
+=======+=======+
| 1     | 2     |
+-------+-------+

=====  =====
 A      B
=====  =====
 1      2
=====  =====

Basic Usage
-----------

.. function:: dump(obj, fp, *, skipkeys=False, \\
                   indent=None)

   Serialize *obj* to ``fp`` with :func:`~json.dumps` and :class:`!JSONEncoder`,
   as in :ref:`json-intro`.

   .. versionchanged:: 3.2
      Allow strings for *indent*.

   .. note::

      Order is kept.

* first item
  continued
* second :meth:`.dump` item

term
   Its definition.

.. toctree::
   :maxdepth: 2

   tutorial.rst

.. versionadded:: 3.5

>>> 1 + 1
2
"""
    labels = section_labels(rst)
    assert labels == {"json-intro": "json --- JSON encoder"}
    docs = rst_to_sections(rst, labels)
    assert docs == [
        "JSON, specified by RFC 7159, is a lightweight format; see PEP 8.\n\nEncoding basic objects:",
        "Serialize obj to fp with dumps() and JSONEncoder, as in json --- JSON encoder.\n\n"
        "Changed in version 3.2: Allow strings for indent.\n\nOrder is kept.\n\nfirst item continued\n\n"
        "second dump() item\n\nterm\n\nIts definition.\n\nNew in version 3.5.",
    ]
    assert rst_to_sections(rst, labels) == docs  # deterministic


def test_pydoc_splits_are_whole_files_and_disjoint():
    P = _pydoc()
    cal, held = load_texts("pydoc"), load_texts("pydoc:heldout")
    assert cal == load_texts("pydoc", "calibration") and held == load_texts("pydoc", "heldout")
    files_cal, files_held = P.split_files("calibration"), P.split_files("heldout")
    assert not set(files_cal) & set(files_held)
    assert len(files_cal) + len(files_held) == 497  # every *.rst.txt of python3.11-doc 3.11.2
    assert len(files_held) == 497 // P.HELDOUT_EVERY  # every 5th file in SHA-256 order of its path
    assert "library/faulthandler.rst.txt" == files_held[0] and "library/json.rst.txt" in files_cal
    assert {f.split("/")[0] for f in files_held} >= {"library", "c-api", "howto", "whatsnew"}
    assert not set(cal) & set(held)
    assert 3000 < len(cal) < 4000 and 700 < len(held) < 1000  # sections
    assert sum(map(len, cal)) > 5_000_000 and sum(map(len, held)) > 1_200_000  # characters of prose
    assert any(d.startswith("JSON (JavaScript Object Notation), specified by RFC 7159") for d in cal)
    assert describe_source("pydoc") == "pydoc:calibration"
    assert (not sources_overlap("pydoc", None, "pydoc:heldout", None)
            and sources_overlap("pydoc", None, "pydoc", "calibration"))


def test_pydoc_documents_are_prose_without_rest_markup():
    P = _pydoc()
    docs = load_texts("pydoc") + load_texts("pydoc:heldout")
    assert all(d.strip() == d and d for d in docs)
    for d in docs:
        for para in d.split("\n\n"):
            assert para and "\n" not in para, d[:200]  # one reflowed line per paragraph
            assert not para.startswith((".. ", ">>>")), para[:200]
            assert not para.rstrip().endswith("::"), para[:200]
            assert not re.search(r":[\w:]+:`|``|^[=\-~^*]{4,}$|^\+-+\+", para), para[:200]
    # deterministic: the same file converts to the same sections again
    rel = "library/json.rst.txt"
    text = (P.sources_dir() / rel).read_text(encoding="utf-8")
    assert P.rst_to_sections(text, P._labels()) == list(P._sections_by_file()[rel])


def test_mix_interleaves_three_domains_in_equal_shares():
    _pydoc()
    for split in ("calibration", "heldout"):
        mix = load_texts("mix", split)
        assert mix == list(S.mix_documents.__wrapped__(split))  # deterministic
        parts = {name: set(load_texts(name, split)) for name in S.MIX_PARTS}
        chars = {name: sum(len(d) for d in mix if d in docs) for name, docs in parts.items()}
        assert sum(chars.values()) == sum(map(len, mix))  # every document comes from one of the three
        longest = max(len(d) for d in mix)
        assert max(chars.values()) - min(chars.values()) <= longest  # equal shares to within one document
        assert min(chars.values()) > (800_000 if split == "heldout" else 3_000_000)
        head = mix[:20]  # interleaved from the start, not three long runs
        assert all(any(d in parts[name] for d in head) for name in S.MIX_PARTS)
    assert not set(load_texts("mix")) & set(load_texts("mix:heldout"))
    assert describe_source("mix") == "mix:calibration" and describe_source("mix", "heldout") == "mix:heldout"
    for part in S.MIX_PARTS:
        assert (sources_overlap("mix", None, part, None)
                and sources_overlap(f"{part}:heldout", None, "mix:heldout", None))
        assert not sources_overlap("mix", None, f"{part}:heldout", None)
    assert not sources_overlap("wiki", None, "pydoc", None)
    with pytest.raises(InputError, match="unknown split 'test'"):
        load_texts("mix:test")


def test_pydoc_missing_is_a_one_line_error(monkeypatch, tmp_path):
    from a3_serve.calibration import pythondoc

    monkeypatch.setenv("A3_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(pythondoc, "SYSTEM_DIR", tmp_path / "nowhere")
    caches = (pythondoc._files, pythondoc._labels, pythondoc._sections_by_file, pythondoc.documents, S.mix_documents)
    for c in caches:
        c.cache_clear()
    try:
        with pytest.raises(CalibrationError,
                           match=r"'pydoc' corpus is not installed; run scripts/setup\.sh .*python3\.11-doc"):
            load_texts("pydoc:heldout")
        for spec in ("pydoc:heldout", "mix"):  # (mix may stop at another missing part first: same set-up fix)
            with pytest.raises(CalibrationError, match=r"run scripts/setup\.sh") as info:
                load_texts(spec)
            assert "\n" not in str(info.value)
    finally:
        for c in caches:
            c.cache_clear()


def test_builtin_token_stream_is_cached(smol_tokenizer, tmp_path, monkeypatch):
    """Built-in corpora are tokenized once and read back from the cache; the windows are those of the uncached path."""
    from a3_serve.calibration.sources import calibration_windows, corpus_token_stream

    monkeypatch.setenv("A3_SERVE_CACHE", str(tmp_path))
    fresh = calibration_windows(smol_tokenizer, "wiki", None, 8, 64, 5)
    cached_files = list((tmp_path / "tokens").glob("*.pt"))
    assert len(cached_files) == 1
    assert torch.equal(fresh, sample_calibration(smol_tokenizer, load_texts("wiki"), 8, 64, 5))
    assert torch.equal(calibration_windows(smol_tokenizer, "wiki:calibration", None, 8, 64, 5), fresh)
    assert torch.equal(corpus_token_stream(smol_tokenizer, "wiki"), tokenize_corpus(smol_tokenizer, load_texts("wiki")))
    cached_files[0].write_bytes(b"damaged")  # a damaged entry is rebuilt, not trusted
    assert torch.equal(calibration_windows(smol_tokenizer, "wiki", None, 8, 64, 5), fresh)
    text = tmp_path / "mine.txt"  # files are never cached (they may change)
    text.write_text("\n\n".join(f"Document {i} talks about topic {i * 7} at some length." for i in range(200)))
    calibration_windows(smol_tokenizer, str(text), None, 2, 16, 0)
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1
