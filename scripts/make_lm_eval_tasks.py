#!/usr/bin/env python3
"""Build the local lm-evaluation-harness tasks shipped in ``a3_serve/eval/lm_eval_tasks/`` from held-out text.

usage: python scripts/make_lm_eval_tasks.py [--out DIR] [--per-domain N] [--seed S]

Two tasks, ``--per-domain`` items (default 100) from each of the ``heldout`` splits of the built-in ``wiki``,
``austen`` and ``pydoc`` corpora (a3_serve/calibration/sources.py), none of which a3-export calibrates on:

``a3_lastword`` (a3_lastword.jsonl: ``context``, ``target``)
    last-word prediction in the style of LAMBADA: a passage of whole sentences (30-90 words) cut just before the
    last word of its last sentence; the target is that word (letters only, 4+ characters), and it occurs earlier
    in the passage as a whole word, so the passage gives the reader a reason to predict it. lm-eval scores the
    target's log-likelihood given the context; ``acc`` is 1 when the target is the model's greedy continuation.
``a3_cloze`` (a3_cloze.jsonl: ``context``, ``choices`` (4), ``label``)
    multiple-choice cloze: 2-5 sentences of a document (25-90 words) and four candidate next sentences, the true
    one and three distractors drawn from other documents of the same domain with a similar length (0.67-1.5x the
    true sentence's characters); the true one's position is random. ``acc`` / ``acc_norm`` (log-likelihood summed
    / per byte) as in lm-eval's multiple-choice tasks; chance is 0.25.

Every string an item holds (its context, target and choices) occurs in the held-out documents it was taken from
and occurs nowhere in the same corpus's calibration split (whitespace normalised); items never overlap within a
document. The output depends only on the corpora and ``--seed``: running the script twice writes identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DOMAINS = ("wiki", "austen", "pydoc")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "a3_serve" / "eval" / "lm_eval_tasks"
DEFAULT_PER_DOMAIN = 100
DEFAULT_SEED = 1234

#: sentence boundary: end punctuation (optionally a closing quote or bracket), space, then a capital or quote
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z])")
_WORD_TAIL = re.compile(r"^(.*\s)([A-Za-z]{4,})([.!?][\"')\]]?)$")


def normalise(text: str) -> str:
    """Collapse every run of whitespace to one space."""
    return " ".join(text.split())


def sentences(document: str) -> list[str]:
    """A document's sentences, paragraph by paragraph, whitespace normalised; empty pieces dropped."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", document):
        para = normalise(paragraph)
        if para:
            out.extend(s for s in _SENTENCE_END.split(para) if s)
    return out


def _prose(sentence: str) -> bool:
    """A sentence worth asking about: mostly letters, no leftover markup, at least 6 words."""
    letters = sum(c.isalpha() for c in sentence)
    return (len(sentence.split()) >= 6 and letters >= 0.7 * len(sentence.replace(" ", ""))
            and not any(ch in sentence for ch in "<>{}|=_*`\\"))


def _context(sents: list[str], end: int, lo: int, hi: int) -> tuple[int, str] | None:
    """The longest run of whole sentences ending before ``end`` with ``lo``..``hi`` words, as (start, text)."""
    words, start = 0, end
    while start > 0 and words + len(sents[start - 1].split()) <= hi:
        start -= 1
        words += len(sents[start].split())
    if words < lo or not all(_prose(s) or len(s.split()) < 6 for s in sents[start:end]):
        return None
    return start, " ".join(sents[start:end])


class Domain:
    """One corpus's held-out documents as sentences, and its calibration text for the overlap check."""

    def __init__(self, name: str):
        from a3_serve.calibration.sources import load_texts

        self.name = name
        self.docs = [sentences(d) for d in load_texts(name, "heldout")]
        self.calibration = "\n".join(normalise(d) for d in load_texts(name, "calibration"))

    def unseen(self, *texts: str) -> bool:
        """True when none of ``texts`` occurs in this corpus's calibration split."""
        return not any(t in self.calibration for t in texts)


def lastword_candidates(dom: Domain) -> list[dict]:
    """Every (document, sentence) where a last-word item can end, in corpus order."""
    out = []
    for d, sents in enumerate(dom.docs):
        for i, sent in enumerate(sents):
            m = _WORD_TAIL.match(sent)
            if not m or not _prose(sent):
                continue
            ctx = _context(sents, i, 20, 80)
            if ctx is None:
                continue
            start, before = ctx
            context = (before + " " + m.group(1)).rstrip()
            target = m.group(2)
            if not re.search(rf"\b{re.escape(target)}\b", context) or len(context.split()) < 30:
                continue
            out.append({"doc": d, "span": (start, i + 1), "context": context, "target": target,
                        "texts": (context + " " + target,)})
    return out


def cloze_candidates(dom: Domain) -> list[dict]:
    """Every (document, sentence) that can be a cloze answer, with its context, in corpus order."""
    out = []
    for d, sents in enumerate(dom.docs):
        for i in range(2, len(sents)):
            answer = sents[i]
            if not _prose(answer) or not 40 <= len(answer) <= 220:
                continue
            ctx = _context(sents, i, 25, 90)
            if ctx is None or i - ctx[0] < 2 or i - ctx[0] > 5:
                continue
            out.append({"doc": d, "span": (ctx[0], i + 1), "context": ctx[1], "answer": answer,
                        "texts": (ctx[1], answer)})
    return out


def _pick(dom: Domain, candidates: list[dict], n: int, rng: random.Random, name: str) -> list[dict]:
    """``n`` candidates in a seeded random order, skipping any that overlaps one already taken in its document or
    whose text occurs in the calibration split (checked only for the candidates reached: the check is slow)."""
    order = list(range(len(candidates)))
    rng.shuffle(order)
    taken: list[dict] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    for k in order:
        c = candidates[k]
        a, b = c["span"]
        if any(a < y and x < b for x, y in spans.get(c["doc"], [])) or not dom.unseen(*c["texts"]):
            continue
        spans.setdefault(c["doc"], []).append((a, b))
        taken.append(c)
        if len(taken) == n:
            return sorted(taken, key=lambda c: (c["doc"], c["span"]))
    raise SystemExit(f"error: only {len(taken)} non-overlapping {name} items in this corpus, {n} asked; lower "
                     "--per-domain")


def _distractors(dom: Domain, item: dict, pool: list[tuple[int, str]], rng: random.Random) -> list[str]:
    """Three sentences of other documents of the domain, 0.67-1.5x the answer's length, all different."""
    n = len(item["answer"])
    fits = [s for d, s in pool if d != item["doc"] and 0.67 * n <= len(s) <= 1.5 * n and s != item["answer"]
            and s not in item["context"]]
    chosen: list[str] = []
    while len(chosen) < 3:
        s = fits[rng.randrange(len(fits))]
        if s not in chosen and dom.unseen(s):
            chosen.append(s)
    return chosen


def build(per_domain: int = DEFAULT_PER_DOMAIN, seed: int = DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """The items of a3_lastword and a3_cloze: ``per_domain`` of each from every domain, in domain order."""
    lastword: list[dict] = []
    cloze: list[dict] = []
    for dom_index, name in enumerate(DOMAINS):
        dom = Domain(name)
        rng = random.Random(f"{seed}:{name}")
        for k, c in enumerate(_pick(dom, lastword_candidates(dom), per_domain, rng, f"{name} last-word")):
            lastword.append({"id": f"{name}-{k:03d}", "domain": name, "doc": c["doc"], "context": c["context"],
                             "target": c["target"]})
        pool = [(d, s) for d, sents in enumerate(dom.docs) for s in sents if _prose(s)]
        for k, c in enumerate(_pick(dom, cloze_candidates(dom), per_domain, rng, f"{name} cloze")):
            choices = _distractors(dom, c, pool, rng)
            label = rng.randrange(4)
            choices.insert(label, c["answer"])
            cloze.append({"id": f"{name}-{k:03d}", "domain": name, "doc": c["doc"], "context": c["context"],
                          "choices": choices, "label": label})
    return lastword, cloze


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, keys in insertion order, UTF-8, newline-terminated."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the JSONL files (default: {DEFAULT_OUT})")
    p.add_argument("--per-domain", type=int, default=DEFAULT_PER_DOMAIN, help="items per domain and task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args(argv)
    if args.per_domain < 1:
        p.error("--per-domain must be >= 1")
    lastword, cloze = build(args.per_domain, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "a3_lastword.jsonl", lastword)
    write_jsonl(args.out / "a3_cloze.jsonl", cloze)
    print(f"wrote {len(lastword)} a3_lastword and {len(cloze)} a3_cloze items to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
