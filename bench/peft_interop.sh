#!/usr/bin/env bash
# Interoperability with Hugging Face PEFT, both directions and merged
# (see peft_interop.py). Needs the bench virtualenv (PyTorch) and installs
# peft into it. Exit 0 when every difference is within 1e-4.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/trainer-bin.sh
bench/setup-venv.sh >/dev/null
if ! bench/.venv/bin/python -c 'import peft' 2>/dev/null; then
  bench/.venv/bin/pip install --quiet "peft==0.21.2"
fi
bench/.venv/bin/python bench/peft_interop.py "$bin"
