"""The quantization schemes of ``a3-quantize``: what each writes (compressed-tensors arguments, as JSON for the worker)
and which vLLM kernels serve it (docs/QUANTIZATION.md).

A scheme is plain data: the worker (``worker.py``, in the quantizer environment) turns ``weights`` /
``input_activations`` into compressed-tensors ``QuantizationArgs`` and builds the llm-compressor recipe from
``smoothquant`` and GPTQ. Size rules live in :mod:`a3_serve.quantize.rules`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any, Optional

from a3_serve.errors import InputError

#: serving backends whose rules a3-quantize knows: vLLM 0.32's CPU backend and its CUDA backend
BACKENDS = ("cpu", "gpu")


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    weight_bits: int
    act_bits: int  # 16: weights only
    #: default group size along the input (None: one scale per output channel)
    default_group: Optional[int]
    #: SmoothQuant strength before GPTQ (None: no SmoothQuant)
    smoothquant: Optional[float]
    #: backend -> None (vLLM serves it there) or why vLLM 0.32 cannot (one clause, used in the refusal)
    unsupported: dict[str, str] = field(default_factory=dict)
    #: the --dtype vLLM 0.32's CPU kernels need (None: any; W4A16's CPU kernel has no float32 path)
    cpu_dtype: Optional[str] = None

    @property
    def grouped(self) -> bool:
        return self.default_group is not None

    def weight_args(self, group_size: Optional[int]) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` of the weights (symmetric INT; GPTQ fills them)."""
        args: dict[str, Any] = {"num_bits": self.weight_bits, "type": "int", "symmetric": True, "dynamic": False}
        if group_size:
            args.update(strategy="group", group_size=int(group_size))
        else:
            args.update(strategy="channel")
        return args

    def activation_args(self) -> Optional[dict[str, Any]]:
        """``QuantizationArgs`` of the inputs: dynamic per-token INT8 for W8A8, None for weight-only schemes."""
        if self.act_bits >= 16:
            return None
        return {"num_bits": self.act_bits, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}

    def describe(self, group_size: Optional[int]) -> str:
        w = f"INT{self.weight_bits} weights ({'group ' + str(group_size) if group_size else 'per output channel'}"
        w += ", symmetric, GPTQ)"
        a = ("INT8 activations (dynamic, per token)" if self.act_bits < 16 else "16/32-bit activations")
        sq = f"; SmoothQuant {self.smoothquant}" if self.smoothquant else ""
        return f"{w}, {a}{sq}"


SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme("w8a8", "INT8 weights and activations: SmoothQuant + GPTQ (per-channel weights, dynamic per-token "
                           "activations); served by vLLM's INT8 scaled-mm kernels (CPU: oneDNN/AMX, GPU: CUTLASS)",
                   8, 8, None, 0.8),
    "w4a16": Scheme("w4a16", "INT4 weights, group 128 by default (--group-size), 16/32-bit activations: GPTQ; "
                             "served by vLLM's WNA16 kernels (CPU: CPUWNA16, GPU: Marlin)",
                    4, 16, 128, None, cpu_dtype="bfloat16"),
    "w8a16": Scheme("w8a16", "INT8 weights per output channel (--group-size for groups), 16/32-bit activations: GPTQ; "
                             "served by vLLM's WNA16 kernels on GPU (Marlin)",
                    8, 16, None, None,
                    unsupported={"cpu": "vLLM 0.32's CPU backend has no kernel for 8-bit weight-only layers (its "
                                        "CPUWNA16 kernel takes 4-bit weights only)"}),
}


def serve_command(folder: str, scheme: Scheme, backend: str) -> str:
    """How to serve the result: ``vllm serve DIR`` plus the dtype the CPU kernels need (float32 where they take it:
    vLLM would otherwise downcast an fp32 checkpoint to bf16, which CPUs without AVX-512 BF16 run slowly)."""
    if backend != "cpu":
        return f"vllm serve {folder}"
    return f"vllm serve {folder} --dtype {scheme.cpu_dtype or 'float32'}"


def get_scheme(name: str) -> Scheme:
    key = (name or "").strip().lower()
    if key not in SCHEMES:
        raise InputError(f"--scheme {name!r} is not a scheme a3-quantize knows; use one of {', '.join(SCHEMES)}")
    return SCHEMES[key]


def parse_group_size(scheme: Scheme, value: Optional[str]) -> Optional[int]:
    """``--group-size``: a positive even integer, or ``channel`` (one scale per output channel); None: the scheme's
    default. W8A8 quantizes weights per channel and takes no group size."""
    if value is None:
        return scheme.default_group
    text = str(value).strip().lower()
    if not scheme.grouped and scheme.act_bits < 16:
        raise InputError(f"--group-size does not apply to --scheme {scheme.name} (per-channel INT8 weights); "
                         "leave it out")
    if text in ("channel", "none", "-1", "0"):
        return None
    try:
        g = int(text)
    except ValueError:
        raise InputError(f"--group-size {value!r} is not a number; use e.g. 128, 64, 32 or 'channel'") from None
    if g < 2 or g % 2:
        raise InputError(f"--group-size {g}: use a positive even size such as 128, 64 or 32, or 'channel'")
    return g


def default_backend() -> str:
    """``gpu`` where ``nvidia-smi -L`` lists a GPU (vLLM's CUDA wheel serves there), else ``cpu``."""
    try:
        ok = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return "gpu" if ok else "cpu"
