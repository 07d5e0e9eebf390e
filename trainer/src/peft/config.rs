//! `adapter_config.json`: Hugging Face PEFT's LoRA configuration, field for
//! field, so adapters move between PEFT and Trainyard in both directions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The PEFT version we write (the format of 0.13+; readers accept others).
pub const PEFT_VERSION: &str = "0.17.0";

/// Which modules get adapters: a regular expression that must match the whole
/// module path, or a list of names matched exactly or as a dotted suffix
/// (PEFT's `target_modules` semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `re.fullmatch(pattern, path)`.
    Regex(String),
    /// `path == t or path.endswith("." + t)` for some `t`.
    Names(Vec<String>),
}

/// `init_lora_weights`: `true` (A Kaiming-uniform, B zero), `false`, or a
/// named scheme (only `"gaussian"` is supported besides the booleans).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named scheme.
    Named(String),
}

/// A LoRA adapter's configuration as PEFT writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// Rank r.
    #[serde(default = "default_r")]
    pub r: usize,
    /// α (scale α/r, or α/√r with rsLoRA).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules that get adapters.
    pub target_modules: TargetModules,
    /// Modules trained fully and saved with the adapter (e.g. the head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Scale α/√r instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not supported yet: refused on load).
    #[serde(default)]
    pub use_dora: bool,
    /// Which biases are trained: `"none"` (supported), `"all"`, `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Conv1D-style weights (refused: none in our models).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Initialisation.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Per-module rank overrides (PEFT's pattern keys).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module α overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Where the base model came from.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT task type (none for custom models).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Written adapters are for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Writer's PEFT version.
    #[serde(default)]
    pub peft_version: Option<String>,
    /// Keys PEFT wrote that we do not use, kept so a round trip loses nothing.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("adapter_config.json: `{field}`: {message}")]
pub struct ConfigProblem {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl LoraConfig {
    /// A LoRA config with PEFT's defaults for everything but the targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            modules_to_save: None,
            use_rslora: false,
            use_dora: false,
            bias: default_bias(),
            fan_in_fan_out: false,
            init_lora_weights: default_init(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
            task_type: None,
            inference_mode: false,
            peft_version: Some(PEFT_VERSION.into()),
            other: BTreeMap::new(),
        }
    }

    /// The adapter a trainer config's `peft` section describes.
    pub fn from_section(p: &crate::config::PeftConfig) -> Self {
        let targets = match &p.target_regex {
            Some(r) => TargetModules::Regex(r.clone()),
            None => TargetModules::Names(p.target_modules.clone()),
        };
        let mut c = Self::new(p.r, p.lora_alpha, targets);
        c.lora_dropout = p.lora_dropout;
        c.use_rslora = p.use_rslora;
        c.use_dora = p.use_dora;
        c.modules_to_save = (!p.modules_to_save.is_empty()).then(|| p.modules_to_save.clone());
        if p.init == "gaussian" {
            c.init_lora_weights = InitLoraWeights::Named("gaussian".into());
        }
        c.base_model_name_or_path = Some(p.base.display().to_string());
        c
    }

    /// Refuses what we do not implement, naming the field.
    pub fn check(&self) -> Result<(), ConfigProblem> {
        let bad = |field: &str, message: &str| {
            Err(ConfigProblem {
                field: field.into(),
                message: message.into(),
            })
        };
        if self.peft_type != "LORA" {
            return bad("peft_type", "only LORA adapters are supported");
        }
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            return bad("r", "ranks must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", "must be in [0, 1)");
        }
        if self.bias != "none" {
            return bad("bias", "only \"none\" is supported (biases stay frozen)");
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out", "our models have no Conv1D-style weights");
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Named(s) if s == "gaussian" => {}
            InitLoraWeights::Named(s) => {
                return Err(ConfigProblem {
                    field: "init_lora_weights".into(),
                    message: format!("`{s}` is not supported; use true, false or \"gaussian\""),
                });
            }
        }
        if let TargetModules::Regex(r) = &self.target_modules
            && regex::Regex::new(r).is_err()
        {
            return bad("target_modules", "is not a valid regular expression");
        }
        Ok(())
    }

    /// PEFT's `get_pattern_key`: the first pattern key equal to `path` or
    /// matching its end after a dot (`(.*\.)?key$`).
    fn pattern<'a, T>(patterns: &'a BTreeMap<String, T>, path: &str) -> Option<&'a T> {
        patterns
            .iter()
            .find(|(k, _)| {
                k.as_str() == path
                    || regex::Regex::new(&format!(r"^(.*\.)?(?:{k})$"))
                        .is_ok_and(|re| re.is_match(path))
            })
            .map(|(_, v)| v)
    }

    /// Rank and scale of the adapter on `path`.
    pub fn rank_and_scale(&self, path: &str) -> (usize, f64) {
        let r = *Self::pattern(&self.rank_pattern, path).unwrap_or(&self.r);
        let alpha = *Self::pattern(&self.alpha_pattern, path).unwrap_or(&self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }

    /// Whether `path` gets an adapter.
    pub fn targets(&self, path: &str) -> bool {
        match &self.target_modules {
            TargetModules::Regex(r) => {
                regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path))
            }
            TargetModules::Names(names) => names
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }

    /// Whether `path` (a module) is trained fully and saved with the adapter.
    pub fn saves(&self, path: &str) -> bool {
        self.modules_to_save
            .iter()
            .flatten()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_as_peft_matches() {
        let names = LoraConfig::new(
            8,
            16.0,
            TargetModules::Names(vec!["conv".into(), "head".into()]),
        );
        assert!(names.targets("encoder.0.convs.1.conv"));
        assert!(names.targets("head"));
        assert!(
            !names.targets("encoder.0.convs.1.conv2"),
            "a suffix must follow a dot"
        );
        assert!(!names.targets("boundary_head"));
        let regex = LoraConfig::new(
            8,
            16.0,
            TargetModules::Regex(r"encoder\.\d+\.convs\.0\.conv".into()),
        );
        assert!(regex.targets("encoder.1.convs.0.conv"));
        assert!(
            !regex.targets("x.encoder.1.convs.0.conv"),
            "the regex must match the whole path"
        );
    }

    #[test]
    fn patterns_override_rank_and_alpha_and_rslora_scales_by_root() {
        let mut c = LoraConfig::new(8, 16.0, TargetModules::Names(vec!["conv".into()]));
        c.rank_pattern
            .insert(r"decoder\.\d+\.convs\.0\.conv".into(), 4);
        c.alpha_pattern.insert("head".into(), 2.0);
        assert_eq!(c.rank_and_scale("encoder.0.convs.0.conv"), (8, 2.0));
        assert_eq!(c.rank_and_scale("decoder.1.convs.0.conv"), (4, 4.0));
        assert_eq!(c.rank_and_scale("head"), (8, 0.25));
        c.use_rslora = true;
        assert_eq!(
            c.rank_and_scale("encoder.0.convs.0.conv"),
            (8, 16.0 / 8f64.sqrt())
        );
    }

    #[test]
    fn unsupported_settings_name_their_field_and_unknown_keys_survive() {
        let json = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["conv"],
                       "bias":"all","layers_pattern":null,"megatron_core":"megatron.core"}"#;
        let c: LoraConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.check().unwrap_err().field, "bias");
        assert!(c.other.contains_key("megatron_core"));
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["megatron_core"], "megatron.core");
        let c: LoraConfig =
            serde_json::from_str(r#"{"peft_type":"IA3","target_modules":"x"}"#).unwrap();
        assert_eq!(c.check().unwrap_err().field, "peft_type");
    }
}
