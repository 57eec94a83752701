"""The request mix of a benchmark: random token prompts with fixed input and output lengths.

As ``vllm bench throughput --dataset-name random``: every prompt is ``input_len`` token ids drawn uniformly
(seeded) from the tokenizer's ordinary tokens (special tokens excluded), every request generates exactly
``output_len`` tokens (EOS ignored, greedy). Dense and compressed models share one tokenizer, so both see the
same token ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from a3_serve.errors import InputError


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    max_model_len: int = 0  # 0: input_len + output_len

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.max_model_len and self.max_model_len < self.input_len + self.output_len:
            raise InputError(f"--max-model-len {self.max_model_len} is shorter than --input-len + --output-len "
                             f"({self.input_len + self.output_len}); raise it or shorten the requests")

    @property
    def model_len(self) -> int:
        """The context length engines are started with."""
        return self.max_model_len or self.input_len + self.output_len

    @property
    def sequence_len(self) -> int:
        """Tokens one request occupies in the KV cache at its end."""
        return self.input_len + self.output_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_token_ids(tokenizer, workload: Workload, vocab_size: int | None = None) -> list[list[int]]:
    """``num_prompts`` lists of ``input_len`` token ids, uniform over the non-special ids below ``vocab_size``.

    Deterministic in ``workload.seed``; ``vocab_size`` (the model's embedding rows) caps the ids when smaller
    than the tokenizer's vocabulary."""
    n_vocab = len(tokenizer)
    if vocab_size:
        n_vocab = min(n_vocab, int(vocab_size))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(n_vocab) if i not in special], dtype=torch.long)
    if allowed.numel() < 2:
        raise InputError(f"the tokenizer has no ordinary tokens to build prompts from (vocabulary {n_vocab})")
    gen = torch.Generator().manual_seed(workload.seed)
    idx = torch.randint(0, allowed.numel(), (workload.num_prompts, workload.input_len), generator=gen)
    return allowed[idx].tolist()
