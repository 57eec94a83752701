"""The checkpoint's safetensors files: written whole (:func:`save_weights`, the in-memory export) or laid out in
advance and filled tensor by tensor (:class:`PreallocatedShards`, the streamed export).

Once the per-layer dims are known, every tensor of the compressed checkpoint is known by name, shape and dtype
(from the A3 model class built on ``meta``). So the files can be laid out before any layer is solved: the
tensors go, in order, into shards of at most ``max_shard_bytes`` (one file ``model.safetensors`` when everything
fits, else ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``: the layout
``save_pretrained`` produces), each file gets its final header and size at once, and each solved tensor's bytes
are written at their offset. Memory: one tensor at a time; disk: the checkpoint once; a resumed export
rewrites only the layers it redoes.

Safetensors format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the
end of the header, padded with spaces to a multiple of 8), then the tensors' bytes, contiguous and in order.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from a3_serve.errors import InputError
from a3_serve.modeling import A3LlamaConfig, A3LlamaForCausalLM

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000`` (decimal units as in ``save_pretrained``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise InputError(f"--max-shard-size {text!r} must be positive; e.g. 5GB")
    return n


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = MAX_SHARD_SIZE) -> list[str]:
    """Save tensors as safetensors, sharded above ``max_shard_size`` with the standard index file."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=parse_size(max_shard_size))
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class PreallocatedShards:
    """The files of a checkpoint whose tensors are all known in advance (module docstring)."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        n = len(groups)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.where: dict[str, tuple[str, int, TensorSpec]] = {}  # name -> (file, absolute offset, spec)
        self.headers: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        for fname, group in zip(self.files, groups):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for spec in group:
                header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self.headers[fname] = struct.pack("<Q", len(raw)) + raw
            base = len(self.headers[fname])
            self.sizes[fname] = base + offset
            for spec in group:
                self.where[spec.name] = (fname, base + header[spec.name]["data_offsets"][0], spec)
        self.total_bytes = sum(s.nbytes for s in specs)

    def create(self) -> None:
        """Write every file's header and give it its final size (the data region is zeros until written). Files
        that already have exactly this header and size (a resumed export) are kept as they are."""
        for fname in self.files:
            path = self.folder / fname
            head = self.headers[fname]
            if path.is_file() and path.stat().st_size == self.sizes[fname]:
                with open(path, "rb") as f:
                    if f.read(len(head)) == head:
                        continue
            with open(path, "wb") as f:
                f.write(head)
                f.truncate(self.sizes[fname])

    def write(self, tensors: dict[str, torch.Tensor], sync: bool = True) -> None:
        """Write tensors at their offsets (names, shapes and dtypes must be the planned ones), then fsync the files
        they went to (``sync=False``: leave that to one :meth:`sync` after a batch of writes)."""
        touched: dict[str, int] = {}
        try:
            for name, t in tensors.items():
                if name not in self.where:
                    raise KeyError(f"tensor {name} is not part of the planned checkpoint")
                fname, offset, spec = self.where[name]
                if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise ValueError(f"tensor {name}: {tuple(t.shape)} {t.dtype} written, {spec.shape} {spec.dtype} "
                                     "planned")
                if fname not in touched:
                    touched[fname] = os.open(self.folder / fname, os.O_WRONLY)
                data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                os.pwrite(touched[fname], data, offset)
        finally:
            for fd in touched.values():
                if sync:
                    os.fsync(fd)
                os.close(fd)

    def sync(self) -> None:
        """fsync every file of the checkpoint: what was written before is on disk (one call per finished layer)."""
        for fname in self.sizes:
            fd = os.open(self.folder / fname, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, name: str) -> torch.Tensor:
        """A tensor as written (to check or digest what is on disk)."""
        fname, offset, spec = self.where[name]
        fd = os.open(self.folder / fname, os.O_RDONLY)
        try:
            data = os.pread(fd, spec.nbytes, offset)
        finally:
            os.close(fd)
        return torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.shape)

    def write_index(self) -> None:
        """``model.safetensors.index.json`` (only when there is more than one file)."""
        if len(self.files) == 1:
            return
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: fname for name, (fname, _, _) in sorted(self.where.items())}}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def checkpoint_specs(config: dict, save_dtype: torch.dtype, layer_order: int) -> list[TensorSpec]:
    """Every tensor of a compressed checkpoint with ``config`` (an a3_llama config dict), in writing order:
    decoder layer 0's tensors, layer 1's, ..., then the rest (embeddings, final norm, untied LM head).
    Floating-point tensors in ``save_dtype``; buffers (RoPE index) in their own dtype."""
    cfg = A3LlamaConfig.from_dict(config)
    with init_empty_weights(include_buffers=False):
        model = A3LlamaForCausalLM(cfg)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    def order(name: str) -> tuple[int, str]:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]), name
        return layer_order, name

    return [TensorSpec(n, tuple(t.shape), save_dtype if t.is_floating_point() else t.dtype)
            for n, t in sorted(state.items(), key=lambda kv: order(kv[0]))]
