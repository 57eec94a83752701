"""The finished quantized folder, loaded in the SERVING environment (transformers + the compressed-tensors vLLM
uses) before it reaches ``--out``: the quantizer's compressed-tensors is newer than the one vLLM reads, so this is
where a format it cannot read would show, not at serve time."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from a3_serve.errors import A3Error

#: above this many weight bytes only the config is parsed (a full load would need the model's memory again)
FULL_LOAD_MAX_BYTES = 4 * 1024**3


class VerifyError(A3Error):
    """The quantized checkpoint does not load (or gives non-finite logits) in the serving environment."""


def verify_folder(folder: Path, weight_bytes: int) -> dict:
    """Load ``folder`` with transformers (compressed-tensors of the serving environment) and run one forward pass;
    returns what was checked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import a3_serve  # noqa: F401  (a3_llama with the Auto classes)

    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except Exception as err:
        raise VerifyError(f"the quantized config.json does not load in the serving environment ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); report this with the versions in a3_quantize.json"
                          ) from None
    if weight_bytes > FULL_LOAD_MAX_BYTES:
        return {"loaded": False, "config": True}
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # compressed-tensors' own (de)compression bars
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = torch.arange(1, 9).unsqueeze(0) % cfg.vocab_size
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as err:
        raise VerifyError(f"the quantized checkpoint does not load in the serving environment's transformers "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); nothing was written") from None
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet
    if not torch.isfinite(logits).all():
        raise VerifyError("the quantized checkpoint gives NaN/Inf logits; try more calibration text (--nsamples) or "
                          "--scheme w8a8; nothing was written")
    return {"loaded": True, "config": True, "forward": True}
