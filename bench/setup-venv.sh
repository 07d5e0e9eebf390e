#!/usr/bin/env bash
# Creates bench/.venv with the peers the benchmarks compare against.
# PyTorch from PyPI is the CUDA build (~3 GB); it runs on CPU as well.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, safetensors, numpy' 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet torch numpy safetensors
fi
.venv/bin/python -c 'import torch; print("torch", torch.__version__)'
