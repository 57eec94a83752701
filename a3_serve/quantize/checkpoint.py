"""The quantized checkpoint folder: what is kept from the source, what the quantizer's output adds, and the record.

After llm-compressor's ``save_pretrained(save_compressed=True)`` (weights in compressed-tensors format, a
``config.json`` with ``quantization_config``, ``recipe.yaml``), :func:`finish_folder` makes it the source's folder
again with quantized weights:

- ``config.json`` is the SOURCE's config (A3 sizes, ``auto_map``, the ``a3`` provenance block, every other field
  byte for byte as JSON) plus the quantizer's ``quantization_config``; an A3 checkpoint's ``a3`` block gains a
  ``quantization`` entry;
- every other file of the source that is not a weight file is copied (tokenizer, chat template, modeling code,
  generation config, ``a3_report.json``), replacing the quantizer's copies; the quantizer's weights and its
  ``recipe.yaml`` stay;
- the model card (``README.md``) gains a "Quantization" section (a new card for a source without one);
- ``a3_quantize.json`` records the run (scheme, calibration, versions, sizes, times). Its presence marks the folder
  as written by a3-quantize (``--overwrite`` may replace it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from a3_serve.folders import fmt_bytes, is_a3_output

REPORT_NAME = "a3_quantize.json"
#: files of the source never copied over the quantized folder (weights and their indexes, the config)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", REPORT_NAME}
#: files that make a folder loadable as a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tiktoken.model")


def is_quantized(config: dict[str, Any]) -> bool:
    q = config.get("quantization_config")
    a3 = config.get("a3")
    return bool(q) or (isinstance(a3, dict) and bool(a3.get("quantization")))


def is_quantize_output(folder: Path) -> bool:
    """A folder written by a3-quantize (its ``a3_quantize.json``), or by a3-export."""
    return (Path(folder) / REPORT_NAME).is_file() or is_a3_output(Path(folder))


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in TOKENIZER_FILES)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def copy_source_files(source: Path, dest: Path) -> list[str]:
    """Copy every non-weight file of ``source`` into ``dest`` (top level and sub-folders); the names copied."""
    copied = []
    for path in sorted(Path(source).rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0].startswith(".") or "__pycache__" in rel.parts:
            continue
        if str(rel) in SKIP_NAMES or path.suffix in WEIGHT_SUFFIXES:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(rel))
    return copied


def merged_config(source_cfg: dict[str, Any], quantized_cfg: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The source's config with the quantizer's ``quantization_config``; an A3 config's ``a3`` block gets
    ``quantization`` (a dense config gets no ``a3`` block: it is no A3 export)."""
    cfg = json.loads(json.dumps(source_cfg))
    cfg["quantization_config"] = quantized_cfg["quantization_config"]
    if isinstance(cfg.get("a3"), dict):
        cfg["a3"]["quantization"] = record
    return cfg


def card_section(record: dict[str, Any], report: dict[str, Any]) -> str:
    cal = record["calibration"]
    sizes = report["sizes"]
    lines = [
        "",
        "## Quantization (a3-quantize)",
        "",
        f"- Scheme: `{record['scheme']}`: {record['description']}.",
        f"- Format: {record['format']}, written by llm-compressor "
        f"{record['versions'].get('llmcompressor')} "
        f"(compressed-tensors {record['versions'].get('compressed-tensors')}); "
        "`lm_head` and the embeddings are not quantized.",
        f"- Calibration: {cal['nsamples']} x {cal['seqlen']} tokens of {cal['description']} (seed {cal['seed']}).",
        f"- Weight files: {fmt_bytes(sizes['weight_bytes_before'])} -> {fmt_bytes(sizes['weight_bytes_after'])}.",
        f"- Sizes checked for: vLLM 0.32 on {record['backend']} (docs/QUANTIZATION.md of a3-serve).",
        "",
        f"Serve it as it is: `{report['serve'].replace(report['output'], './this-folder')}` (a3-serve's vLLM plugin "
        "reads A3 checkpoints; vLLM reads the `quantization_config`). Loading it with transformers needs the "
        "`compressed-tensors` package.",
    ]
    return "\n".join(lines) + "\n"


def write_card(source: Path, dest: Path, record: dict[str, Any], report: dict[str, Any], title: str) -> None:
    src_card = Path(source) / "README.md"
    text = src_card.read_text(errors="replace") if src_card.is_file() else f"# {title}\n"
    if not text.endswith("\n"):
        text += "\n"
    (Path(dest) / "README.md").write_text(text + card_section(record, report))


def finish_folder(source: Path, folder: Path, source_cfg: dict[str, Any], record: dict[str, Any],
                  report: dict[str, Any], title: str) -> None:
    """Turn the quantizer's output ``folder`` into the final checkpoint (module docstring)."""
    folder = Path(folder)
    qcfg = json.loads((folder / "config.json").read_text())
    if not qcfg.get("quantization_config"):
        raise RuntimeError("the quantizer wrote no quantization_config")  # a bug or an llm-compressor change
    fmt = qcfg["quantization_config"].get("format")
    record["format"] = f"compressed-tensors ({fmt})" if fmt else "compressed-tensors"
    copy_source_files(source, folder)
    cfg = merged_config(source_cfg, qcfg, record)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_card(source, folder, record, report, title)
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
