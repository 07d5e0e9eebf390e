#!/usr/bin/env bash
# Argmax unpooling against nearest-neighbour upsampling, measured. The shapes
# model with the boundary head (examples/trainer/shapes.yaml, 1024 samples, a
# fifth held out) is trained with `model.decoder: unpool` and `nearest` on the
# same budget (steps, batch, seed), for each of SEEDS training seeds, and each
# final checkpoint is scored on the validation split (`eval`): val mIoU,
# boundary F1 within 1 pixel (eval/boundary.rs), panoptic quality from the
# boundary head, parameters and steady-state training images/s.
#
#   bench/upsampling.sh                 # 1000 steps, 2 seeds per decoder
#   STEPS=500 SEEDS=1 bench/upsampling.sh
#   TRAINER=target/debug/trainyard-trainer bench/upsampling.sh   # no build
#
# The two decoders are each other's peer: nearest-neighbour upsampling is
# what SegNet's saved indices replace. Rows go to bench/results/upsampling.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-1000}"
SEEDS="${SEEDS:-2}"

source bench/trainer-bin.sh
mkdir -p bench/results
out=bench/results/upsampling.jsonl
: > "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for seed in $(seq 1 "$SEEDS"); do
  for decoder in unpool nearest; do
    run="$work/$decoder-$seed"
    RUST_LOG=warn "$bin" train --config examples/trainer/shapes.yaml --out "$run" \
      --set "model.decoder=$decoder" --set model.boundary_head=true \
      --set "train.steps=$STEPS" --set "train.seed=$((41 + seed))" \
      --set data.shapes.samples=1024 --set data.validation_fraction=0.2 \
      --set train.validate_every=0 --set checkpoint.every=0 --set train.log_every=50 > /dev/null
    ck=$(printf '%s/checkpoints/step-%08d.safetensors' "$run" "$STEPS")
    report=$(RUST_LOG=warn "$bin" eval --checkpoint "$ck")
    summary=$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$run/summary.json")
    echo "{\"decoder\": \"$decoder\", \"seed\": $seed, \"summary\": $summary, \"report\": $report}" >> "$out"
    echo "trained and scored $decoder (seed $seed)" >&2
  done
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def cell(values, digits=3):
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"
print(f"{'decoder':8} {'val mIoU':>16} {'boundary F1':>16} {'PQ':>16} {'params':>8} {'train img/s':>14} {'wall s':>7}")
for decoder in ("unpool", "nearest"):
    rs = [r for r in rows if r["decoder"] == decoder]
    miou = [r["report"]["miou"] for r in rs]
    bf1 = [r["report"]["boundary_f1"] for r in rs]
    pq = [r["report"]["panoptic"]["pq"] for r in rs]
    ips = [r["summary"]["samples_per_sec"] for r in rs]
    wall = [r["summary"]["wall_seconds"] for r in rs]
    params = rs[0]["summary"]["parameters"]
    print(f"{decoder:8} {cell(miou):>16} {cell(bf1):>16} {cell(pq):>16} {params:>8} {cell(ips, 0):>14} {statistics.mean(wall):7.0f}")
print(f"(mean ± spread over {len(rows) // 2} training seed(s); scored on the same validation split)")
PY
