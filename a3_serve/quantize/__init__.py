"""`a3-quantize`: A3 checkpoints (and the dense models they come from) quantized with llm-compressor into
compressed-tensors checkpoints that vLLM serves (docs/QUANTIZATION.md).

Modules, in the order a run uses them:

- ``cli.py``        the command line;
- ``pipeline.py``   the job (:func:`run_quantize`): checks, calibration tokens, quantizer, folder, verify, rename;
- ``schemes.py``    the schemes (w8a8, w4a16, w8a16) as compressed-tensors arguments;
- ``rules.py``      the size rules per scheme and backend (pure functions of config.json; also for a3-export);
- ``driver.py``     runs ``worker.py`` with the quantizer environment's Python (JSON request, JSON-lines events);
- ``worker.py``     llm-compressor's ``oneshot`` inside that environment (never imports a3_serve);
- ``checkpoint.py`` the finished folder: the source's config and files, the quantization record, the model card;
- ``verify.py``     the folder loaded back with the serving environment's transformers before it is moved to --out.
"""
