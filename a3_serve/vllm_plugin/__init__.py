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
    int8_fp32_on_amx_workaround()


def int8_fp32_on_amx_workaround() -> bool:
    """vLLM 0.32 CPU, INT8 W8A8 (a3-quantize's ``w8a8``): ``CPUInt8ScaledMMLinearKernel`` chooses the AMX kernel
    (``int8_scaled_mm_with_quant``) from the weight's shape alone (``check_cpu_sgl_kernel``), but that kernel takes
    only bf16/fp16 activations, so on an AMX CPU every W8A8 checkpoint served with ``--dtype float32`` (our CPU
    default) fails at its first forward ("expect A to be bfloat16 or half"). While the model dtype (torch's default
    dtype during vLLM's weight processing) is float32, the check answers False for int8 weights and the kernel takes
    its oneDNN path, as on CPUs without AMX. bf16/fp16 models keep the AMX kernel. Returns whether it applied."""
    try:
        import torch
        from vllm.model_executor.kernels.linear.scaled_mm import cpu as cpu_mm
    except Exception:  # another vLLM layout (GPU build, newer release): nothing to fix here
        return False
    original = getattr(cpu_mm, "check_cpu_sgl_kernel", None)
    if original is None or getattr(original, "a3_serve_wrapped", False):
        return False

    def check_cpu_sgl_kernel(n, k, dtype):
        if dtype == torch.int8 and torch.get_default_dtype() not in (torch.bfloat16, torch.float16):
            return False
        return original(n, k, dtype)

    check_cpu_sgl_kernel.a3_serve_wrapped = True
    cpu_mm.check_cpu_sgl_kernel = check_cpu_sgl_kernel
    return True
