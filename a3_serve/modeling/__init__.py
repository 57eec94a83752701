"""Transformers model + config classes for A3-compressed checkpoints (``model_type: a3_llama``).

``configuration_a3_llama.py`` and ``modeling_a3_llama.py`` import only torch and transformers: the exporter
copies them verbatim into every checkpoint (see :func:`modeling_source_files` and :data:`AUTO_MAP`) so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without a3-serve installed.
"""

from pathlib import Path

from .configuration_a3_llama import A3LlamaConfig
from .modeling_a3_llama import A3LlamaForCausalLM, A3LlamaModel, A3LlamaPreTrainedModel

#: The ``auto_map`` block of a compressed checkpoint's config.json (points at the copied files).
AUTO_MAP = {
    "AutoConfig": "configuration_a3_llama.A3LlamaConfig",
    "AutoModelForCausalLM": "modeling_a3_llama.A3LlamaForCausalLM",
}


def modeling_source_files() -> list[Path]:
    """The two source files to copy (same names) into an exported checkpoint folder."""
    here = Path(__file__).resolve().parent
    return [here / "configuration_a3_llama.py", here / "modeling_a3_llama.py"]


__all__ = [
    "AUTO_MAP",
    "A3LlamaConfig",
    "A3LlamaForCausalLM",
    "A3LlamaModel",
    "A3LlamaPreTrainedModel",
    "modeling_source_files",
]
