#!/usr/bin/env bash
# Federated aggregation and round overhead, beside Flower.
#
#  1. Aggregation time per round for 10 and 100 clients x 1M and 10M float32
#     parameters: trainyard-trainer bench-aggregate vs Flower's aggregate()
#     (FedAvg) and aggregate_median() on the same shapes of random updates,
#     one after the other in this script. Prints the ratio (Flower / ours).
#  2. Round overhead (everything but local training) for 10 clients on
#     loopback and a ~1.3M-parameter SegNet: trainyard-trainer bench-round.
#
# Needs ~9 GB free memory for 100 x 10M (each side holds 4 GB of updates;
# Flower also allocates a weighted copy). ITERS (default 5) repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS="${ITERS:-5}"
source bench/trainer-bin.sh
bench/setup-venv.sh >/dev/null
if ! bench/.venv/bin/python -c 'import flwr' 2>/dev/null; then
  bench/.venv/bin/pip install --quiet "flwr==1.42.0"
fi
mkdir -p bench/results
out=bench/results/federated.jsonl
: > "$out"
for rule in mean median; do
  for clients in 10 100; do
    for params in 1000000 10000000; do
      ours=$("$bin" bench-aggregate --clients "$clients" --params "$params" --rule "$rule" --iters "$ITERS")
      flower=$(bench/.venv/bin/python bench/fl_aggregate.py "$clients" "$params" "$rule" "$ITERS")
      echo "$ours" >> "$out"; echo "$flower" >> "$out"
      python3 - "$ours" "$flower" <<'PY'
import json, sys
o, f = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{o['rule']:>6} {o['clients']:>4} clients x {o['params']:>9} params: "
      f"ours {o['median_seconds']*1e3:8.1f} ms  flower {f['median_seconds']*1e3:8.1f} ms  "
      f"ratio {f['median_seconds']/o['median_seconds']:5.1f}x")
PY
    done
  done
done
round=$("$bin" bench-round --rounds 12 --set 'model.widths=[48, 96, 192]' \
  --set data.shapes.samples=64 --set data.shapes.image_size=32 \
  --set 'federated={clients: 10, min_clients: 10, min_available: 10, local_steps: 1}' 2>/dev/null)
echo "$round" >> "$out"
echo "round overhead: $round"
