use std::path::{Path, PathBuf};

use trainyard_trainer::config::TrainerConfig;
use trainyard_trainer::run_dir::{RoundRow, Row, RunDir, TrainRow, ValRow};

/// The group secret the tests' multi-rank runs share.
pub const SECRET: &str = "integration-test group secret";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A small, fast config: 32x32 shapes, SegNet 8-16, batch 4.
pub fn tiny_config(extra: &[&str]) -> TrainerConfig {
    let mut overrides: Vec<String> = [
        "model.widths=[8, 16]",
        "data.shapes.samples=48",
        "data.shapes.image_size=32",
        "data.validation_fraction=0.25",
        "train.batch_size=4",
        "train.steps=6",
        "train.warmup_steps=2",
        "train.validate_every=3",
        "checkpoint.every=3",
        "checkpoint.keep_last=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainerConfig::from_value(serde_yaml::Value::Null, &overrides).expect("valid test config")
}

/// The training rows of a run's metrics.jsonl, with their timing zeroed
/// (the one field that differs between runs that should be identical).
pub fn train_rows(dir: &Path) -> Vec<TrainRow> {
    RunDir::at(dir)
        .rows()
        .unwrap()
        .into_iter()
        .filter_map(Row::train)
        .map(|r| TrainRow {
            samples_per_sec: 0.0,
            ..r
        })
        .collect()
}

/// The validation rows of a run's metrics.jsonl.
pub fn val_rows(dir: &Path) -> Vec<ValRow> {
    RunDir::at(dir)
        .rows()
        .unwrap()
        .into_iter()
        .filter_map(Row::val)
        .collect()
}

/// The rounds of an aggregator's metrics.jsonl.
pub fn round_rows(dir: &Path) -> Vec<RoundRow> {
    RunDir::at(dir)
        .rows()
        .unwrap()
        .into_iter()
        .filter_map(Row::round)
        .collect()
}
