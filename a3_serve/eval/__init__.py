"""Evaluation: perplexity on held-out text (:mod:`a3_serve.eval.ppl`) and the ``a3-eval`` command.

``evaluate_ppl(model, windows, batch_size)`` and ``load_model(dir, device, dtype)`` are the reusable
pieces; the exporter and the benchmarks call them so every number follows one protocol.
"""

from a3_serve.eval.ppl import evaluate_folder, evaluate_ppl, generate_text, load_model, load_tokenizer

__all__ = ["evaluate_folder", "evaluate_ppl", "generate_text", "load_model", "load_tokenizer"]
