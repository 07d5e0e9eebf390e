#!/usr/bin/env bash
# Fixed against learned task weighting, measured. The shapes model with the
# boundary head (examples/trainer/shapes.yaml, 1024 samples, a fifth held
# out) is trained on the same budget (steps, batch, seed) with the boundary
# loss weighted by hand, `model.boundary_loss_weight` in WEIGHTS, and with
# `model.task_weighting: uncertainty` (a learned log-variance per task,
# Kendall et al. 2018), for each of SEEDS training seeds. The final
# validation row of each run gives val mIoU, panoptic quality, boundary F1
# and, for the learned run, the weights it ended with.
#
#   bench/task_weighting.sh                  # 1000 steps, 2 seeds per setting
#   STEPS=500 SEEDS=1 WEIGHTS="1 3" bench/task_weighting.sh
#   TRAINER=target/debug/trainyard-trainer bench/task_weighting.sh   # no build
#
# The hand-set weights are the learned weighting's peers: what it buys is
# read against the best and worst of them. Rows go to
# bench/results/task_weighting.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-1000}"
SEEDS="${SEEDS:-2}"
read -r -a weights <<< "${WEIGHTS:-0.3 1 3}"

source bench/trainer-bin.sh
mkdir -p bench/results
out=bench/results/task_weighting.jsonl
: > "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

settings=()
for w in "${weights[@]}"; do settings+=("fixed:$w"); done
settings+=("uncertainty:")
for seed in $(seq 1 "$SEEDS"); do
  for setting in "${settings[@]}"; do
    kind="${setting%%:*}" weight="${setting#*:}"
    extra=(--set "model.task_weighting=$kind")
    [ -n "$weight" ] && extra+=(--set "model.boundary_loss_weight=$weight")
    run="$work/$kind-$weight-$seed"
    RUST_LOG=warn "$bin" train --config examples/trainer/shapes.yaml --out "$run" \
      --set model.boundary_head=true "${extra[@]}" \
      --set "train.steps=$STEPS" --set "train.seed=$((41 + seed))" \
      --set data.shapes.samples=1024 --set data.validation_fraction=0.2 \
      --set train.validate_every=0 --set checkpoint.every=0 --set train.log_every=50 > /dev/null
    python3 - "$run" "$kind" "${weight:-null}" "$seed" >> "$out" <<'PY'
import json, sys
run, kind, weight, seed = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
final = [r for r in rows if r["kind"] == "val"][-1]
summary = json.load(open(f"{run}/summary.json"))
print(json.dumps({"kind": kind, "weight": json.loads(weight), "seed": int(seed),
                  "val": final, "wall_seconds": summary["wall_seconds"]}))
PY
    echo "trained $kind ${weight:-learned} (seed $seed)" >&2
  done
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def cell(values):
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {statistics.pstdev(values):.3f}"
print(f"{'boundary weight':18} {'val mIoU':>15} {'PQ':>15} {'boundary F1':>15} {'wall s':>7}")
keys = []
for r in rows:
    k = (r["kind"], r["weight"])
    if k not in keys:
        keys.append(k)
for kind, weight in keys:
    rs = [r for r in rows if (r["kind"], r["weight"]) == (kind, weight)]
    miou = [r["val"]["miou"] for r in rs]
    pq = [r["val"]["panoptic"]["pq"] for r in rs]
    bf1 = [r["val"]["boundary_f1"] for r in rs]
    wall = statistics.mean(r["wall_seconds"] for r in rs)
    name = f"fixed {weight:g}" if kind == "fixed" else "learned"
    print(f"{name:18} {cell(miou):>15} {cell(pq):>15} {cell(bf1):>15} {wall:7.0f}")
    if kind == "uncertainty":
        for r in rs:
            w = r["val"]["task_weights"]
            print(f"  seed {r['seed']}: learned weights segmentation {w['segmentation']:.3f}, "
                  f"boundary {w['boundary']:.3f} (ratio {w['boundary'] / w['segmentation']:.2f})")
print(f"(mean ± spread over {len({r['seed'] for r in rows})} training seed(s); the final validation of each run)")
PY
