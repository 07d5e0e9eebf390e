#!/usr/bin/env bash
# LoRA and DoRA fine-tuning against full fine-tuning of the same SegNet-mini (16-32-64,
# 64x64 shapes, batch 16, AdamW), one process each, same data and steps:
# trainable parameters, optimiser-state bytes (AdamW keeps two f32 moments
# per trained value), peak RSS, training throughput, and checkpoint vs
# adapter size. Full fine-tuning trains every tensor (its cost per step does
# not depend on the starting values, so it starts from a fresh init).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-60}"
source bench/trainer-bin.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--config examples/trainer/shapes.yaml --set "train.steps=$STEPS" --set train.validate_every=0
        --set train.warmup_steps=5 --set checkpoint.every=0)
"$bin" train "${common[@]}" --out "$work/base" >/dev/null 2>&1
base=$(ls "$work"/base/checkpoints/*.safetensors | tail -1)
shifted=(--set data.shapes.seed=21 --set data.shapes.max_shapes=8)
"$bin" train "${common[@]}" "${shifted[@]}" --out "$work/full" > "$work/full.json" 2>/dev/null
"$bin" train "${common[@]}" "${shifted[@]}" --out "$work/lora" \
  --set "peft={base: '$base', r: 4, lora_alpha: 8, target_modules: [conv], modules_to_save: [head]}" \
  > "$work/lora.json" 2>/dev/null
"$bin" train "${common[@]}" "${shifted[@]}" --out "$work/dora" \
  --set "peft={base: '$base', r: 4, lora_alpha: 8, target_modules: [conv], modules_to_save: [head], use_dora: true}" \
  > "$work/dora.json" 2>/dev/null
python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
runs = {k: json.load(open(os.path.join(w, f"{k}.json"))) for k in ("full", "lora", "dora")}
full = runs["full"]
ck = lambda run: max(os.path.getsize(os.path.join(w, run, "checkpoints", f)) for f in os.listdir(os.path.join(w, run, "checkpoints")))
rows = [
    ("trained values", *(r["parameters"] for r in runs.values())),
    ("trained fraction", 1.0, *(runs[k]["parameters"] / runs[k]["model_values"] for k in ("lora", "dora"))),
    ("AdamW state bytes", *(8 * r["parameters"] for r in runs.values())),
    ("peak RSS MiB", *(r["peak_rss_bytes"] / 2**20 for r in runs.values())),
    ("samples/s", *(r["samples_per_sec"] for r in runs.values())),
    ("saved bytes (checkpoint | adapter)", ck("full"), runs["lora"]["adapter_bytes"], runs["dora"]["adapter_bytes"]),
]
print(f"{'':36} {'full':>14} {'LoRA r=4':>14} {'DoRA r=4':>14}")
for name, *vals in rows:
    print(f"{name:36}" + "".join(f" {v:14.4g}" for v in vals))
print(json.dumps(runs), file=open(os.path.join("bench", "results", "peft_vs_full.json") if os.path.isdir("bench/results") else os.devnull, "w"))
PY
