"""Dataset loaders for the local lm-eval tasks in this folder (``custom_dataset: !function a3_tasks.NAME``).

lm-eval imports this file from the YAML's folder, so the JSONL files are found next to it from any working
directory, in an installed package or a copy of this folder; nothing else of a3-serve is imported. Each loader
returns a ``datasets.DatasetDict`` with one ``test`` split. lm-eval passes the run's metadata (model arguments)
as keyword arguments; they do not change the data.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    with open(HERE / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(name: str):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(name))})


def lastword(**_metadata):
    """a3_lastword: ``context`` and its last word ``target`` (scripts/make_lm_eval_tasks.py)."""
    return _dataset("a3_lastword")


def cloze(**_metadata):
    """a3_cloze: ``context``, four ``choices`` and the true one's index ``label``."""
    return _dataset("a3_cloze")
