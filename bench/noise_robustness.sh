#!/usr/bin/env bash
# Training with noise, measured. The shapes model (examples/trainer/shapes.yaml,
# 1024 samples, a fifth held out) is trained three times with the same steps
# and seed: clean, with input noise (data.noise) and with weight noise
# (train.weight_noise). Each is then scored on the validation split under
# input noise and under weight noise at several levels (`eval --input-noise /
# --weight-noise`, SEEDS draws each), and a table of val mIoU is printed.
#
#   bench/noise_robustness.sh              # 1000 steps per model
#   STEPS=300 SEEDS=2 bench/noise_robustness.sh
#   MODELS=input TRAIN_INPUT_SIGMA=0.1 INPUT_LEVELS="0.05 0.1 0.2" bench/noise_robustness.sh
#   TRAINER=target/debug/trainyard-trainer bench/noise_robustness.sh  # no build
#
# The peer is the clean model: what training with noise buys is read against
# what the clean model keeps under the same noise. Rows go to
# bench/results/noise_robustness.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-1000}"
SEEDS="${SEEDS:-3}"
TRAIN_INPUT_SIGMA="${TRAIN_INPUT_SIGMA:-0.1}"
TRAIN_WEIGHT_SIGMA="${TRAIN_WEIGHT_SIGMA:-0.2}"
INPUT_LEVELS="${INPUT_LEVELS:-0.05 0.1 0.2 0.3}"
WEIGHT_LEVELS="${WEIGHT_LEVELS:-0.1 0.2 0.3 0.4}"
# The clean model is always trained: it is what the others are read against.
read -r -a models <<< "clean ${MODELS:-input weights}"

source bench/trainer-bin.sh
mkdir -p bench/results
out=bench/results/noise_robustness.jsonl
: > "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

common=(--config examples/trainer/shapes.yaml
  --set "train.steps=$STEPS" --set data.shapes.samples=1024
  --set data.validation_fraction=0.2 --set train.validate_every=0
  --set checkpoint.every=0 --set train.log_every=50)
declare -A noise=(
  [clean]=""
  [input]="data.noise={sigma: $TRAIN_INPUT_SIGMA, probability: 0.5}"
  [weights]="train.weight_noise={sigma: $TRAIN_WEIGHT_SIGMA}"
)
for model in "${models[@]}"; do
  args=("${common[@]}")
  if [ -n "${noise[$model]}" ]; then args+=(--set "${noise[$model]}"); fi
  start=$(date +%s%N)
  RUST_LOG=warn "$bin" train "${args[@]}" --out "$work/$model" > /dev/null
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "{\"model\": \"$model\", \"train_seconds\": $ms.0e-3}" >> "$out"
  echo "trained $model in $(( ms / 1000 )) s" >&2
done

checkpoint() { printf '%s/%s/checkpoints/step-%08d.safetensors' "$work" "$1" "$STEPS"; }
score() { # model kind sigma seed [eval flags...]
  local model=$1 kind=$2 sigma=$3 seed=$4
  shift 4
  local report
  report=$(RUST_LOG=warn "$bin" eval --checkpoint "$(checkpoint "$model")" "$@")
  echo "{\"model\": \"$model\", \"kind\": \"$kind\", \"sigma\": $sigma, \"seed\": $seed, \"report\": $report}" >> "$out"
}
for model in "${models[@]}"; do
  score "$model" none 0 0
  for seed in $(seq 1 "$SEEDS"); do
    for sigma in $INPUT_LEVELS; do
      score "$model" input "$sigma" "$seed" --input-noise "$sigma" --noise-seed "$seed"
    done
    for sigma in $WEIGHT_LEVELS; do
      score "$model" weights "$sigma" "$seed" --weight-noise "$sigma" --noise-seed "$seed"
    done
  done
done

python3 - "$out" "$TRAIN_INPUT_SIGMA" "$TRAIN_WEIGHT_SIGMA" "${models[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train_input, train_weight = sys.argv[2], sys.argv[3]
models = sys.argv[4:]
names = {"clean": "clean", "input": f"input σ={train_input}", "weights": f"weights σ={train_weight}"}
scores = {}
for r in rows:
    if "report" in r:
        scores.setdefault((r["model"], r["kind"], r["sigma"]), []).append(r["report"]["miou"])
seconds = {r["model"]: r["train_seconds"] for r in rows if "train_seconds" in r}
levels = sorted({(k, s) for (_, k, s) in scores}, key=lambda x: (x[0] != "none", x[0], x[1]))
print("val mIoU (mean ± sd over noise seeds) of models trained", ", ".join(names[m] for m in models))
print(f"{'scored under':18}" + "".join(f"{names[m]:>22}" for m in models))
for kind, sigma in levels:
    label = "no noise" if kind == "none" else f"{kind} σ={sigma}"
    cells = []
    for m in models:
        v = scores[(m, kind, sigma)]
        sd = statistics.pstdev(v) if len(v) > 1 else 0.0
        cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}" if len(v) > 1 else f"{v[0]:.3f}")
    print(f"{label:18}" + "".join(f"{c:>22}" for c in cells))
clean0 = scores[("clean", "none", 0)][0]
print()
for m, kind in (("input", "input"), ("weights", "weights")):
    if m not in models:
        continue
    cost = scores[(m, "none", 0)][0] - clean0
    print(f"{names[m]}: {cost:+.3f} mIoU without noise")
    for (k, sigma) in levels:
        if k != kind:
            continue
        lost = clean0 - statistics.mean(scores[("clean", k, sigma)])
        gained = statistics.mean(scores[(m, k, sigma)]) - statistics.mean(scores[("clean", k, sigma)])
        share = f"{gained / lost:5.0%} of it" if lost > 0.005 else "n/a"
        print(f"  {k} σ={sigma}: clean model loses {lost:.3f}, noise training wins back {gained:+.3f} ({share})")
print("training wall time: " + ", ".join(f"{names[m]} {seconds[m]:.0f} s" for m in models))
PY
