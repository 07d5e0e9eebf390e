#!/usr/bin/env bash
# End-to-end data-parallel training throughput on this host: the shapes
# example for STEPS steps as 1 process with all cores, then as 2 ranks with
# one thread each (global batch twice as large), in one run. Prints images/s
# of each (steady state, global) and the all-reduce time of the 2-rank run.
#
#   bench/ddp_cpu.sh
#   STEPS=300 bench/ddp_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Every group authenticates with the job's secret (trainer/README.md); one per run.
export TRAINYARD_GROUP_SECRET="${TRAINYARD_GROUP_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
STEPS="${STEPS:-100}"
source bench/trainer-bin.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--config examples/trainer/shapes.yaml --set "train.steps=$STEPS" --set train.validate_every=0 --set checkpoint.every=0)

RUST_LOG=warn "$bin" train "${common[@]}" --out "$work/one" > "$work/one.json"
port=29900
RUST_LOG=warn WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  "$bin" train "${common[@]}" --threads 1 --out "$work/r1" > /dev/null &
rank1=$!
RUST_LOG=warn WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  "$bin" train "${common[@]}" --threads 1 --out "$work/r0" > "$work/two.json"
wait $rank1

python3 - "$work/one.json" "$work/two.json" <<'PY'
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:])
print(f"1 rank  (all cores):      {one['samples_per_sec']:7.1f} img/s")
print(f"2 ranks (1 thread each):  {two['samples_per_sec']:7.1f} img/s global, "
      f"{two['samples_per_sec'] / one['samples_per_sec']:.2f}x; "
      f"all-reduce {two['allreduce_seconds']:.2f} s for {two['bytes_communicated'] / 2**20:.1f} MiB")
PY
