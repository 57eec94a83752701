"""Safetensors files laid out in advance and filled tensor by tensor (the streamed export's writer).

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
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
                    raise ValueError(f"tensor {name}: {tuple(t.shape)} {t.dtype} written, {spec.shape} {spec.dtype} planned")
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
    from accelerate import init_empty_weights

    from a3_serve.modeling import A3LlamaConfig, A3LlamaForCausalLM

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
