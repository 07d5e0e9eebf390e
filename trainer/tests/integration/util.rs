use std::path::{Path, PathBuf};

use trainyard_trainer::config::TrainerConfig;

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

/// The `kind: train` rows of a run's metrics.jsonl, without timing fields.
pub fn train_rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|mut v| {
            v.as_object_mut().unwrap().remove("samples_per_sec");
            v
        })
        .collect()
}
