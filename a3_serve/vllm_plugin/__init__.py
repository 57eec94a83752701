"""vLLM plugin: serve A3-compressed checkpoints (``architectures: ["A3LlamaForCausalLM"]``) with vLLM.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) through the
``vllm.general_plugins`` entry point declared in pyproject.toml, so ``vllm serve ./compressed`` needs no flag
and no ``--trust-remote-code``. Registration is lazy: the model module (which imports vLLM's model
executor) is only imported when vLLM actually builds an ``A3LlamaForCausalLM``.
"""

ARCHITECTURE = "A3LlamaForCausalLM"
MODEL_CLASS = "a3_serve.vllm_plugin.model:A3LlamaForCausalLM"


def register() -> None:
    """Entry point of ``vllm.general_plugins``: register the config with transformers and the model with vLLM."""
    from vllm import ModelRegistry

    import a3_serve  # noqa: F401  (registers model_type "a3_llama" with transformers' AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
