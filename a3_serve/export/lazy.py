"""Lazy access to a safetensors checkpoint: a model skeleton with no weights, filled one decoder layer at a time.

The streamed export (:mod:`a3_serve.export.streamed`) never loads the whole source model. It builds the
transformers model on the ``meta`` device (accelerate's ``init_empty_weights``: parameters have shapes but no
storage, buffers such as RoPE ``inv_freq`` are real), loads the embeddings and the final norm, and then, for one
decoder layer at a time, reads that layer's tensors from the shards (:class:`SafetensorsSource`), casts them to
the compute dtype, runs and solves the layer, and sends its parameters back to ``meta``. Resident memory is
about one layer in the compute dtype plus the embeddings, whatever the number of layers.

Each read opens the shard, copies the tensor out of the memory map and closes the file again, so pages of the
source checkpoint do not stay mapped into the process (they would count toward its resident set).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import a3_serve  # noqa: F401 - registers a3_llama with the Auto classes (check_checkpoint_structure)
from a3_serve.errors import InputError, NumericalError
from a3_serve.solvers.linalg import all_finite

SAFETENSORS_INDEX = "model.safetensors.index.json"


class SafetensorsSource:
    """Tensor names, shapes and dtypes of a checkpoint folder's safetensors files, and reads of single tensors.

    Takes ``model.safetensors.index.json`` when present, otherwise every ``*.safetensors`` file in the folder.
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as err:
                raise InputError(f"cannot read {index} ({err}); re-download the model's index file") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{str(folder)!r} has no *.safetensors weights; convert the checkpoint with "
                             "save_pretrained(safe_serialization=True)")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise InputError(f"{path} is listed in the index but missing; re-download the model")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.file_of[key] = path
                        self.shape[key] = tuple(sl.get_shape())
                        self.dtype[key] = sl.get_dtype()
            except Exception as err:  # noqa: BLE001 - a corrupt shard is the user's to fix
                raise InputError(f"cannot read the safetensors file {path} ({type(err).__name__}: {err}); re-download "
                                 "it") from None

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape[name]:
            n *= s
        return n

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors (copied out of the files, cast to ``dtype``, moved to ``device``), grouped by shard."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise InputError(f"the checkpoint in {str(self.folder)!r} lacks tensor {missing[0]!r}; the weights do not "
                             "match config.json")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    # a cast makes a new tensor; otherwise copy, so nothing keeps the file's pages
                    t = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t.clone()
                    out[n] = t.to(device)
        return out


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise NumericalError(f"source weight {name} contains NaN or Inf; the checkpoint is corrupt: re-download or "
                             "re-convert it")


def empty_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The source model's transformers class with every parameter on ``meta`` (buffers real, on CPU)."""
    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def fill_module(model: nn.Module, prefix: str, source: SafetensorsSource, dtype: torch.dtype,
                device: torch.device) -> None:
    """Load every parameter of the submodule at ``prefix`` (e.g. ``model.layers.3``) from the checkpoint, one
    tensor at a time (only one source tensor is ever held in both dtypes)."""
    module = model.get_submodule(prefix)
    for local, param in list(module.named_parameters()):
        name = f"{prefix}.{local}"
        t = source.read([name], dtype=dtype)[name]
        if tuple(t.shape) != tuple(param.shape):
            raise InputError(f"tensor {name} has shape {tuple(t.shape)} in the checkpoint but {tuple(param.shape)} "
                             "by config.json; the weights do not match the config")
        _check_finite(name, t)
        set_module_tensor_to_device(model, name, device, value=t)
        del t


def release_module(model: nn.Module, prefix: str) -> None:
    """Drop the parameters of the submodule at ``prefix`` back to ``meta`` and return the freed memory to the OS."""
    model.get_submodule(prefix).to("meta")
    return_free_memory()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap_small(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more from their own memory maps (glibc ``mallopt``), so a freed
    layer goes straight back to the OS. glibc otherwise raises this threshold after the first large free, and the
    next layers' tensors then fragment the heap: measured on a Llama-2-7B shape, resident memory grew by about
    70 MB per layer. No effect outside glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


def return_free_memory() -> None:
    """``malloc_trim(0)``: give free heap pages back to the OS (glibc only)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def skeleton_with_embeddings(model_dir: Path, source: SafetensorsSource, dtype: torch.dtype,
                             device: torch.device) -> nn.Module:
    """:func:`empty_model` with the input embeddings and the final norm loaded (what layer 0's inputs need) and
    the buffers (RoPE tables) on ``device``."""
    model = empty_model(model_dir, dtype)
    fill_module(model, "model.embed_tokens", source, dtype, device)
    fill_module(model, "model.norm", source, dtype, device)
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            mod._buffers[leaf] = buf.to(device)
    return model


def check_checkpoint_structure(folder: Path) -> None:
    """Check a written checkpoint without loading its weights: the model class built from its config.json (on
    ``meta``) must have exactly the tensors of its safetensors files, with the same shapes.

    Raises RuntimeError naming the first mismatch.
    """
    model = empty_model(Path(folder), torch.float32)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    got = SafetensorsSource(Path(folder)).shape
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise RuntimeError(f"the written checkpoint does not match its config: missing {missing[:3]}, unexpected "
                           f"{extra[:3]}")
    for name, shape in expected.items():
        if got[name] != shape:
            raise RuntimeError(f"the written tensor {name} has shape {got[name]} but the config implies {shape}")
