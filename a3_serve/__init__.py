"""a3-serve: compress dense Hugging Face decoders with A3 and serve them with vLLM.

Importing the package registers the ``a3_llama`` model type with the transformers Auto classes, so
``AutoModelForCausalLM.from_pretrained(compressed_dir)`` works without ``trust_remote_code``.
"""

__version__ = "0.2.0"


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3_serve.modeling import A3LlamaConfig, A3LlamaForCausalLM

    try:
        AutoConfig.register(A3LlamaConfig.model_type, A3LlamaConfig)
        AutoModelForCausalLM.register(A3LlamaConfig, A3LlamaForCausalLM)
    except ValueError:  # already registered (re-import, or a second copy of the classes)
        pass


_register_with_transformers()
