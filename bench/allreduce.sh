#!/usr/bin/env bash
# All-reduce bandwidth on this host: our TCP ring (trainyard-trainer
# bench-allreduce) beside torch.distributed gloo, for 2 and 4 processes at
# 1, 16 and 64 MiB, and single-stream loopback TCP as the physical reference,
# all measured in one run. Prints a table; rows go to bench/results/allreduce.jsonl.
#
#   bench/allreduce.sh
#   ITERS=50 WORLDS="2 4" bench/allreduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Every group authenticates with the job's secret (trainer/README.md); one per run.
export TRAINYARD_GROUP_SECRET="${TRAINYARD_GROUP_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
ITERS="${ITERS:-20}"
WORLDS="${WORLDS:-2 4}"
SIZES="$((1 << 20)) $((16 << 20)) $((64 << 20))"

bench/setup-venv.sh >/dev/null
source bench/trainer-bin.sh
mkdir -p bench/results
out=bench/results/allreduce.jsonl
: > "$out"

bench/.venv/bin/python bench/loopback_tcp.py $((64 << 20)) >> "$out"
port=29700
for world in $WORLDS; do
  bench/.venv/bin/python bench/gloo_allreduce.py --world "$world" --iters "$ITERS" \
    --sizes "$(echo $SIZES | tr ' ' ',')" --port $((port++)) >> "$out"
  for size in $SIZES; do
    port=$((port + 1))
    pids=()
    for rank in $(seq 1 $((world - 1))); do
      RUST_LOG=warn WORLD_SIZE=$world RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$bin" bench-allreduce --bytes "$size" --iters "$ITERS" >/dev/null &
      pids+=($!)
    done
    RUST_LOG=warn WORLD_SIZE=$world RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$bin" bench-allreduce --bytes "$size" --iters "$ITERS" \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); r["engine"]="trainyard tcp ring"; print(json.dumps(r))' >> "$out"
    for pid in "${pids[@]}"; do wait "$pid"; done
  done
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tcp = next(r for r in rows if r["engine"].startswith("loopback"))["gbps"]
print(f"loopback TCP (one stream, 64 MiB): {tcp:.2f} GB/s")
print(f"{'ranks':>5} {'MiB':>4} {'gloo busbw':>11} {'ring busbw':>11} {'ring/gloo':>10} {'ring/TCP':>9}")
for world in sorted({r["world_size"] for r in rows if "world_size" in r}):
    for size in sorted({r["bytes"] for r in rows if r.get("world_size") == world}):
        g = next(r for r in rows if r.get("world_size") == world and r["bytes"] == size and r["engine"].startswith("gloo"))
        t = next(r for r in rows if r.get("world_size") == world and r["bytes"] == size and r["engine"] == "trainyard tcp ring")
        print(f"{world:>5} {size >> 20:>4} {g['busbw_gbps']:>11.2f} {t['busbw_gbps']:>11.2f} {t['busbw_gbps'] / g['busbw_gbps']:>9.2f}x {t['busbw_gbps'] / tcp:>8.0%}")
PY
