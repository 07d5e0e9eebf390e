#!/usr/bin/env bash
# GPU smoke test, for a machine with an NVIDIA GPU (never needed by CI):
# builds the trainer with NCCL (`--features cuda`) and runs NCCL all-reduces
# through `trainyard-trainer bench-allreduce --backend nccl`, one rank per GPU,
# printing nccl-tests' algbw/busbw beside the CPU ring's on the same machine.
# Every run first checks a sum all-reduce and a broadcast against the answer
# computed on the CPU (`collective::verify`), so a wrong NCCL fails loudly.
#
# This script covers the collective alone; bench/gpu-check.sh covers GPU
# training.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every group authenticates with the job's secret (trainer/README.md); one per run.
export TRAINYARD_GROUP_SECRET="${TRAINYARD_GROUP_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"

# NCCL from PyPI ships libnccl.so.2 only; cudarc looks for libnccl.so.
if ! ldconfig -p | grep -q 'libnccl.so '; then
  nccl=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, nvidia
hits = [h for p in nvidia.__path__ for h in glob.glob(os.path.join(p, "**", "libnccl.so.2"), recursive=True)]
print(os.path.dirname(hits[0]) if hits else "")
PY
)
  if [ -n "$nccl" ]; then
    mkdir -p /tmp/trainyard-nccl && ln -sf "$nccl/libnccl.so.2" /tmp/trainyard-nccl/libnccl.so
    export LD_LIBRARY_PATH="/tmp/trainyard-nccl:$nccl:${LD_LIBRARY_PATH:-}"
    echo "NCCL from $nccl"
  fi
fi

# TRAINER names a prebuilt `--features cuda` binary, for machines without a
# Rust toolchain or the crates (build it elsewhere, copy it over).
if [ -z "${TRAINER:-}" ]; then
  XDG_DATA_HOME=$(scripts/cuda-llvm) cargo build --release --quiet -p trainyard-trainer --features cuda
fi
bin="${TRAINER:-${CARGO_TARGET_DIR:-target}/release/trainyard-trainer}"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
gpus=$(( gpus > 0 ? gpus : 1 ))
port=29800
for size in $((1 << 20)) $((64 << 20)) $((256 << 20)); do
  for backend in nccl ring; do
    port=$((port + 1))
    pids=()
    for rank in $(seq 1 $((gpus - 1))); do
      WORLD_SIZE=$gpus RANK=$rank LOCAL_RANK=$rank MASTER_PORT=$port \
        "$bin" bench-allreduce --backend "$backend" --bytes "$size" >/dev/null &
      pids+=($!)
    done
    echo -n "$backend: "
    WORLD_SIZE=$gpus RANK=0 LOCAL_RANK=0 MASTER_PORT=$port \
      "$bin" bench-allreduce --backend "$backend" --bytes "$size"
    for pid in "${pids[@]}"; do wait "$pid"; done
  done
done
