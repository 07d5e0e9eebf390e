#!/usr/bin/env bash
# LoRA fine-tuning against full fine-tuning of the same SegNet-mini (16-32-64,
# 64x64 shapes, batch 16, AdamW), one process each, same data and steps:
# trainable parameters, optimiser-state bytes (AdamW keeps two f32 moments
# per trained value), peak RSS, training throughput, and checkpoint vs
# adapter size. Full fine-tuning trains every tensor (its cost per step does
# not depend on the starting values, so it starts from a fresh init).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-60}"
cargo build --release --quiet -p trainyard-trainer
bin="${CARGO_TARGET_DIR:-target}/release/trainyard-trainer"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--config examples/trainer/shapes.yaml --set "train.steps=$STEPS" --set train.val_every=0
        --set train.warmup_steps=5 --set checkpoint.every=0)
"$bin" train "${common[@]}" --out "$work/base" >/dev/null 2>&1
base=$(ls "$work"/base/checkpoints/*.safetensors | tail -1)
shifted=(--set data.shapes.seed=21 --set data.shapes.max_shapes=8)
"$bin" train "${common[@]}" "${shifted[@]}" --out "$work/full" > "$work/full.json" 2>/dev/null
"$bin" train "${common[@]}" "${shifted[@]}" --out "$work/lora" \
  --set "peft={base: '$base', r: 4, lora_alpha: 8, target_modules: [conv], modules_to_save: [head]}" \
  > "$work/lora.json" 2>/dev/null
python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
full, lora = (json.load(open(os.path.join(w, f"{k}.json"))) for k in ("full", "lora"))
ck = lambda run: max(os.path.getsize(os.path.join(w, run, "checkpoints", f)) for f in os.listdir(os.path.join(w, run, "checkpoints")))
adapter = lora["adapter_bytes"]
rows = [
    ("trained values", full["parameters"], lora["parameters"]),
    ("trained fraction", 1.0, lora["parameters"] / lora["model_values"]),
    ("AdamW state bytes", 8 * full["parameters"], 8 * lora["parameters"]),
    ("peak RSS MiB", full["peak_rss_bytes"] / 2**20, lora["peak_rss_bytes"] / 2**20),
    ("samples/s", full["samples_per_sec"], lora["samples_per_sec"]),
    ("saved bytes (checkpoint | adapter)", ck("full"), adapter),
]
print(f"{'':36} {'full':>14} {'LoRA r=4':>14}")
for name, f, l in rows:
    print(f"{name:36} {f:14.4g} {l:14.4g}")
print(json.dumps({"full": full, "lora": lora}), file=open(os.path.join("bench", "results", "peft_vs_full.json") if os.path.isdir("bench/results") else os.devnull, "w"))
PY
