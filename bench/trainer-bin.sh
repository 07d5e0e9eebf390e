# Sourced by the benchmarks from the repository root: sets `bin` to the
# release trainer, built first, or to $TRAINER when that names a prebuilt
# binary (then nothing is built).
if [ -z "${TRAINER:-}" ]; then
  cargo build --release --quiet -p trainyard-trainer
fi
bin="${TRAINER:-${CARGO_TARGET_DIR:-target}/release/trainyard-trainer}"
