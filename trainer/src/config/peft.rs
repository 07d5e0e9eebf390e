//! The `peft` section: fine-tune a base checkpoint by training a LoRA
//! adapter (and any modules to save) while the rest stays frozen.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// LoRA fine-tuning, in PEFT's terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftConfig {
    /// Base weights: a checkpoint of ours, or safetensors with our parameter names.
    pub base: PathBuf,
    /// Rank r.
    pub r: usize,
    /// α (scale α/r, or α/√r with `use_rslora`).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    pub lora_dropout: f64,
    /// Modules that get adapters, by exact name or dotted suffix (e.g. `conv`).
    pub target_modules: Vec<String>,
    /// Or a regular expression over whole module paths (instead of the list).
    pub target_regex: Option<String>,
    /// Modules trained fully and saved with the adapter (e.g. `head`).
    pub modules_to_save: Vec<String>,
    /// Scale by α/√r.
    pub use_rslora: bool,
    /// DoRA: also train a magnitude per output channel of each adapted
    /// layer (weight-decomposed LoRA, Liu et al. 2024).
    pub use_dora: bool,
    /// `kaiming` (A Kaiming-uniform, B zero: PEFT's default) or `gaussian`.
    pub init: String,
}

impl Default for PeftConfig {
    fn default() -> Self {
        Self {
            base: PathBuf::new(),
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: vec!["conv".into()],
            target_regex: None,
            modules_to_save: Vec::new(),
            use_rslora: false,
            use_dora: false,
            init: "kaiming".into(),
        }
    }
}

impl PeftConfig {
    /// Semantic checks, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, message: &str| {
            Err(ConfigError::invalid(format!("peft.{field}"), message))
        };
        if self.base.as_os_str().is_empty() {
            return bad(
                "base",
                "must name the base checkpoint (safetensors) to fine-tune",
            );
        }
        if self.r == 0 {
            return bad("r", "must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad("lora_alpha", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", "must be in [0, 1)");
        }
        if self.target_modules.is_empty() && self.target_regex.is_none() {
            return bad(
                "target_modules",
                "name at least one module (e.g. conv), or set target_regex",
            );
        }
        if !matches!(self.init.as_str(), "kaiming" | "gaussian") {
            return bad("init", "must be kaiming or gaussian");
        }
        Ok(())
    }
}
