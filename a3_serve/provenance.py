"""Identity of a model folder: what the export records about its source, and what comparisons check.

Two uses, one definition:

* ``a3-export`` records :func:`source_fingerprint` of the dense model in the compressed config's ``a3`` block
  (``a3.source_fingerprint``) and, with :func:`weights_stamp`, makes the resume key change whenever the
  source's weight files change (a re-download at the same path must never be "resumed" into a mix of two
  models);
* the benchmark and the service call :func:`comparability_problems` before they measure a dense model
  against a "compressed" one, so a pair that is not (an export of) the same model with the same tokenizer is
  refused instead of being reported as a ratio.

The fingerprint is content-based and cheap at any size (constant I/O per weight file): the SHA-256 of the
canonical ``config.json`` (volatile keys dropped), of the tokenizer files' bytes, and of every weight file's
name, size, safetensors header and its first and last :data:`SAMPLE_BYTES` bytes. A fine-tuned or
re-converted model differs in those bytes; a copy of the same files does not. The resume stamp adds each
file's modification time and inode, which change on a re-download even when the sampled bytes would not.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterable

#: config keys that tools rewrite without changing the model
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
#: the files whose bytes define the tokenizer (generation_config.json is not one of them)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
#: bytes hashed at each end of a weight file's data
SAMPLE_BYTES = 1 << 20


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def config_digest(cfg: dict[str, Any]) -> str:
    """SHA-256 of a config dict as canonical JSON, without :data:`VOLATILE_CONFIG_KEYS`."""
    clean = {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS}
    return _sha([json.dumps(clean, sort_keys=True, default=str).encode()])


def tokenizer_digest(model_dir: str | Path) -> str | None:
    """SHA-256 over the tokenizer files present in ``model_dir`` (names and bytes); None if there are none."""
    folder = Path(model_dir)
    parts: list[bytes] = []
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            parts += [name.encode(), _canonical_tokenizer_bytes(f)]
    return _sha(parts) if parts else None


def _canonical_tokenizer_bytes(f: Path) -> bytes:
    """A JSON tokenizer file as canonical JSON (a re-save that only reorders keys is the same tokenizer)."""
    data = f.read_bytes()
    if f.suffix == ".json":
        try:
            return json.dumps(json.loads(data), sort_keys=True).encode()
        except ValueError:
            pass
    return data


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model folder (safetensors, else PyTorch pickles), sorted by name."""
    folder = Path(model_dir)
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    return sorted(p for pat in WEIGHT_PATTERNS[1:] for p in folder.glob(pat))


def _file_sample(path: Path) -> list[bytes]:
    """Name, size, the safetensors header (if any) and the first and last SAMPLE_BYTES bytes of a weight file."""
    size = path.stat().st_size
    parts = [path.name.encode(), str(size).encode()]
    with open(path, "rb") as f:
        head = f.read(8)
        start = 0
        if path.suffix == ".safetensors" and len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 0 < n <= size - 8:
                parts.append(f.read(n))
                start = 8 + n
        f.seek(start)
        parts.append(f.read(SAMPLE_BYTES))
        if size - start > SAMPLE_BYTES:
            f.seek(max(start + SAMPLE_BYTES, size - SAMPLE_BYTES))
            parts.append(f.read(SAMPLE_BYTES))
    return parts


def source_fingerprint(model_dir: str | Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"config": sha, "tokenizer": sha | None, "weights": sha}`` of a dense model folder (module docstring).

    ``cfg``: the already-parsed config.json (read from the folder when None).
    """
    folder = Path(model_dir)
    if cfg is None:
        cfg = json.loads((folder / "config.json").read_text())
    parts: list[bytes] = []
    for p in weight_files(folder):
        parts += _file_sample(p)
    return {"config": config_digest(cfg), "tokenizer": tokenizer_digest(folder), "weights": _sha(parts)}


def weights_stamp(model_dir: str | Path) -> list[list[Any]]:
    """Per weight file ``[name, size, mtime_ns, inode]``: changes whenever a file is rewritten (resume keys)."""
    out = []
    for p in weight_files(model_dir):
        s = p.stat()
        out.append([p.name, s.st_size, s.st_mtime_ns, s.st_ino])
    return out


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _read_cfg(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


#: source config fields a compressed config keeps unchanged; a mismatch means another base model
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def comparability_problems(dense_dir: str | Path, compressed_dir: str | Path) -> list[str]:
    """Why ``compressed_dir`` cannot be measured against ``dense_dir`` (empty list: comparable).

    Checks, in order: the tokenizers' bytes (both folders' tokenizer files), the vocabulary size, and for an
    a3-serve export its recorded source: ``a3.source_fingerprint`` against the dense folder's fingerprint when
    the export recorded one, else the source shape fields (older exports). A dense-vs-dense comparison checks
    the tokenizer and vocabulary only.
    """
    dense_dir, compressed_dir = Path(dense_dir), Path(compressed_dir)
    dcfg, ccfg = _read_cfg(dense_dir), _read_cfg(compressed_dir)
    problems = []
    td, tc = tokenizer_digest(dense_dir), tokenizer_digest(compressed_dir)
    if td is not None and tc is not None and td != tc:
        problems.append("the two folders have different tokenizers")
    if dcfg.get("vocab_size") != ccfg.get("vocab_size"):
        problems.append(f"vocabulary sizes differ ({dcfg.get('vocab_size')} vs {ccfg.get('vocab_size')})")
    a3 = ccfg.get("a3") if isinstance(ccfg.get("a3"), dict) else None
    if a3 is not None:
        recorded = a3.get("source_fingerprint")
        if isinstance(recorded, dict) and recorded.get("weights"):
            actual = source_fingerprint(dense_dir, dcfg)
            if recorded.get("weights") != actual["weights"] or recorded.get("config") != actual["config"]:
                problems.append(f"the compressed model is an export of {a3.get('source_model')!r}, not of this dense "
                                "model (its recorded source fingerprint differs)")
        else:
            diffs = [k for k in SHAPE_FIELDS if dcfg.get(k) != ccfg.get(k)]
            if a3.get("source_head_dim") not in (None, dcfg.get("head_dim") or _head_dim(dcfg)):
                diffs.append("head_dim")
            if a3.get("source_intermediate_size") not in (None, dcfg.get("intermediate_size")):
                diffs.append("intermediate_size")
            if diffs:
                problems.append(f"the compressed model's source had another shape ({', '.join(diffs)} differ)")
    return problems


def _head_dim(cfg: dict[str, Any]) -> int | None:
    try:
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def quantization_info(folder: str | Path) -> dict[str, Any] | None:
    """The weight quantization of a model folder, from its ``config.json``'s ``quantization_config`` (None when it
    has none): ``method`` and ``format`` as written (compressed-tensors for llm-compressor and a3-quantize),
    ``weight_bits``, ``activation_bits`` (None: weight-only), ``group_size`` (None: per channel) of the first
    quantization group, ``scheme`` named from the bits (``w8a8``, ``w4a16``; the method's name when the bits are not
    recorded), and ``tool`` ``a3-quantize`` when its report (``a3_quantize.json``) is in the folder."""
    folder = Path(folder)
    qc = _read_cfg(folder).get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    first = next(iter(groups.values()), {}) if groups else {}
    weights = first.get("weights") if isinstance(first.get("weights"), dict) else {}
    acts = first.get("input_activations") if isinstance(first.get("input_activations"), dict) else None
    wbits = weights.get("num_bits") or qc.get("bits")
    abits = acts.get("num_bits") if acts else None
    method = str(qc.get("quant_method") or "unknown")
    return {"method": method, "format": qc.get("format"), "weight_bits": wbits, "activation_bits": abits,
            "group_size": weights.get("group_size") or qc.get("group_size"),
            "scheme": f"w{wbits}a{abits or 16}" if wbits else method,
            "tool": "a3-quantize" if (folder / "a3_quantize.json").is_file() else None}


def describe_quantization(info: dict[str, Any] | None) -> str:
    """``w4a16 (group 32, compressed-tensors)``; ``unquantized`` for None."""
    if not info:
        return "unquantized"
    extra = [f"group {info['group_size']}"] if info.get("group_size") else []
    extra += [str(info.get("format") or info.get("method"))]
    return f"{info['scheme']} ({', '.join(extra)})"
