#!/usr/bin/env bash
# Training-step throughput of SegNet-mini (16-32-64, batch 16, 3x64x64,
# 4 classes, AdamW, 2 threads) in PyTorch CPU and in the Trainyard trainer,
# measured in the same run, for both decoder variants.
#
#   bench/segnet_cpu.sh            # 20 timed steps after 3 warm-up steps
#   STEPS=50 bench/segnet_cpu.sh
#
# Sets up bench/.venv on first use (see setup-venv.sh) and builds the trainer
# in release mode. Results are printed and saved to bench/results/segnet_cpu.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-3}"
THREADS="${THREADS:-2}"

bench/setup-venv.sh >/dev/null
source bench/trainer-bin.sh
mkdir -p bench/results
out=bench/results/segnet_cpu.jsonl
: > "$out"

for decoder in unpool nearest; do
  # Each engine runs in its own process so peak RSS is its own.
  bench/.venv/bin/python bench/torch_step.py --decoder "$decoder" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" >> "$out"
  # Our trainer with the levers switched on one after another: burn's own ops
  # with glibc's default allocator thresholds, + heap-kept memory, + our 3x3
  # convolution, + fused batch norm + ReLU, + our max-pooling and unpooling (the default).
  for levers in "--default-malloc --burn-conv --burn-bn --burn-pooling" "--burn-conv --burn-bn --burn-pooling" \
                "--burn-bn --burn-pooling" "--burn-pooling" ""; do
    # shellcheck disable=SC2086
    RUST_LOG=warn "$bin" bench-step --set "model.decoder=$decoder" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" $levers >> "$out"
  done
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'decoder':8} {'engine':40} {'img/s':>8} {'vs torch':>9} {'peak RSS':>10}")
# engine names: pytorch <version>, or trainyard (<which kernels are ours>)
for decoder in ("unpool", "nearest"):
    torch_row = next(r for r in rows if r["decoder"] == decoder and r["engine"].startswith("pytorch"))
    for r in (x for x in rows if x["decoder"] == decoder):
        ratio = r["images_per_sec"] / torch_row["images_per_sec"]
        print(f"{decoder:8} {r['engine']:40} {r['images_per_sec']:8.1f} {ratio:8.2f}x {r['peak_rss_bytes'] / 2**20:8.0f} MiB")
PY
