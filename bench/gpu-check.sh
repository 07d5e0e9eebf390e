#!/usr/bin/env bash
# The GPU check: one script for a machine with NVIDIA GPUs, taking a prebuilt
# trainer so the machine need not compile (build one with
# `scripts/build-cuda-trainer`, which writes target/gpu/trainyard-trainer.gz).
# Prints one JSON line per check and a summary line; about 5 minutes on one GPU.
#
#   TRAINER=target/gpu/trainyard-trainer.gz bench/gpu-check.sh
#
# Checks:
#   1. probe: CUDA built in, the driver loads, GPUs visible, NCCL loads;
#   2. parity: one batch of SegNet on CUDA vs the CPU, loss and every flat
#      gradient within 1e-3 (gradient relative to its largest entry);
#   3. train: 300 steps of the shapes job on CUDA: the loss falls, validation
#      mIoU and steady-state samples/s;
#   4. nccl: the same job through `launch` with one process per GPU and
#      train.backend nccl (world 1 on one GPU: NCCL still reduces every step
#      in the loop), ranks' parameter hashes checked at every checkpoint;
#   5. torch: the same SegNet and batch in PyTorch eager on the same GPU (when
#      torch imports), our img/s / PyTorch's.
# CHECK_DEVICE=cpu runs the same plumbing on the CPU (for trying the script
# on a machine without a GPU; the figures then mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
# Every group authenticates with the job's secret (trainer/README.md); one per run.
export TRAINYARD_GROUP_SECRET="${TRAINYARD_GROUP_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"

device="${CHECK_DEVICE:-cuda}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin="${TRAINER:-target/gpu/trainyard-trainer.gz}"
if [[ "$bin" == *.gz ]]; then
  gunzip -c "$bin" >"$work/trainyard-trainer" && chmod +x "$work/trainyard-trainer" || {
    echo "{\"check\":\"setup\",\"ok\":false,\"error\":\"cannot unpack $bin\"}"; exit 1; }
  bin="$work/trainyard-trainer"
fi
export RUST_LOG="${RUST_LOG:-warn}"

# NCCL from PyPI ships libnccl.so.2 only; cudarc looks for libnccl.so.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
  nccl=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, nvidia
hits = [h for p in nvidia.__path__ for h in glob.glob(os.path.join(p, "**", "libnccl.so.2"), recursive=True)]
print(os.path.dirname(hits[0]) if hits else "")
PY
)
  if [ -n "$nccl" ]; then
    mkdir -p "$work/nccl" && ln -sf "$nccl/libnccl.so.2" "$work/nccl/libnccl.so"
    export LD_LIBRARY_PATH="$work/nccl:$nccl:${LD_LIBRARY_PATH:-}"
  fi
fi

results="$work/results.jsonl"
emit() { echo "$1" | tee -a "$results"; }
elapsed() { python3 -c "import time; print(round(time.time() - $1, 1))"; }

# 1. probe
t0=$(date +%s.%N)
probe=$("$bin" devices 2>"$work/probe.err")
gpus=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['gpus'])" "$probe" 2>/dev/null || echo 0)
ok=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('true' if d['cuda_built'] and d['driver'] and d['gpus']>0 and d['nccl'] else 'false')" "$probe" 2>/dev/null || echo false)
[ "$device" = cpu ] && ok=true && gpus=1
emit "{\"check\":\"probe\",\"ok\":$ok,\"seconds\":$(elapsed "$t0"),\"devices\":${probe:-null}}"

# 2. parity: the same network, batch and loss on the device and on the CPU.
t0=$(date +%s.%N)
parity=$("$bin" bench-parity --device "$device" 2>"$work/parity.err")
ok=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('true' if d['loss_relative_difference']<1e-3 and d['gradient_max_difference']<1e-3 else 'false')" "$parity" 2>/dev/null || echo false)
emit "{\"check\":\"parity\",\"ok\":$ok,\"seconds\":$(elapsed "$t0"),\"result\":${parity:-null},\"stderr\":$(tail -c 600 "$work/parity.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

# 3. train 300 steps on the device.
t0=$(date +%s.%N)
"$bin" train --config examples/trainer/shapes.yaml --out "$work/train" \
  --set "train.device=$device" --set train.steps=300 --set train.validate_every=300 \
  --set checkpoint.every=300 >"$work/train.json" 2>"$work/train.err"
code=$?
train=$(python3 - "$work/train" "$code" <<'PY'
import json, sys
out, code = sys.argv[1], int(sys.argv[2])
try:
    s = json.load(open(f"{out}/summary.json"))
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    ok = code == 0 and last < 0.7 * first
    print(json.dumps({"ok": ok, "exit": code, "device": s["device"], "loss_first10": first, "loss_last10": last,
                      "val_miou": s["val_miou"], "samples_per_sec": s["samples_per_sec"], "wall_seconds": s["wall_seconds"]}))
except Exception as e:  # a failed run leaves no summary
    print(json.dumps({"ok": False, "exit": code, "error": str(e)}))
PY
)
emit "{\"check\":\"train\",\"seconds\":$(elapsed "$t0"),\"result\":$train,\"stderr\":$(tail -c 600 "$work/train.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

# 4. NCCL in the training loop, one process per GPU under the supervisor.
t0=$(date +%s.%N)
backend=nccl
[ "$device" = cpu ] && backend=tcp
WORLD_SIZE=$gpus MASTER_PORT=29731 "$bin" launch --nproc-per-node "$gpus" -- \
  train --config examples/trainer/shapes.yaml --out "$work/nccl" \
  --set "train.device=$device" --set "train.backend=$backend" --set train.steps=60 \
  --set train.validate_every=60 --set checkpoint.every=20 >"$work/nccl.out" 2>"$work/nccl.err"
code=$?
nccl=$(python3 - "$work/nccl" "$code" "$gpus" <<'PY'
import json, sys
out, code, gpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    s = json.load(open(f"{out}/summary.json"))
    print(json.dumps({"ok": code == 0 and s["world_size"] == gpus, "exit": code, "world_size": s["world_size"],
                      "parameter_hash": s["parameter_hash"], "allreduce_seconds": s["allreduce_seconds"],
                      "bytes_communicated": s["bytes_communicated"], "samples_per_sec": s["samples_per_sec"]}))
except Exception as e:
    print(json.dumps({"ok": False, "exit": code, "error": str(e)}))
PY
)
emit "{\"check\":\"nccl\",\"seconds\":$(elapsed "$t0"),\"result\":$nccl,\"stderr\":$(tail -c 600 "$work/nccl.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

# 5. the same SegNet step in PyTorch eager on the same device.
t0=$(date +%s.%N)
shape=(--set train.batch_size=64 --set data.shapes.image_size=128)
ours=$("$bin" bench-step --device "$device" --steps 30 --warmup 10 "${shape[@]}" 2>"$work/step.err")
if python3 -c "import torch; assert torch.cuda.is_available() or '$device' == 'cpu'" 2>/dev/null; then
  theirs=$(python3 bench/torch_step.py --device "$device" --batch 64 --size 128 --steps 30 --warmup 10 2>"$work/torch.err")
else
  theirs=null
fi
ratio=$(python3 -c "
import json,sys
o=json.loads(sys.argv[1]); t=json.loads(sys.argv[2]) if sys.argv[2] != 'null' else None
print(round(o['images_per_sec']/t['images_per_sec'], 3) if t else 'null')" "${ours:-null}" "${theirs:-null}" 2>/dev/null || echo null)
emit "{\"check\":\"torch\",\"seconds\":$(elapsed "$t0"),\"ours\":${ours:-null},\"pytorch\":${theirs:-null},\"ours_over_pytorch\":$ratio}"

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def ok(r):
    if "ok" in r:
        return r["ok"]
    return r.get("result", {}).get("ok", r.get("ours_over_pytorch") is not None)
print(json.dumps({"summary": {r["check"]: ok(r) for r in rows}, "all_ok": all(ok(r) for r in rows)}))
PY
