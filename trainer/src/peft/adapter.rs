//! Adapters on disk in Hugging Face PEFT's format: `adapter_config.json`
//! (sorted keys, indent 2) and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, the
//! `modules_to_save` tensors as `base_model.model.<module path>.<param>`, and
//! `{"format": "pt"}` metadata. What PEFT's `save_pretrained` writes, ours
//! reads, and the reverse.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::tensor::Device;

use super::PeftError;
use super::config::LoraConfig;
use super::lora::{ADAPTER_TENSORS, TENSOR_NAMES, attach, layers_mut};
use crate::model::SegNet;
use crate::tensorfile::{self, NamedTensor};

/// File names of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The adapter's tensors under PEFT's keys: every LoRA factor, and every
/// tensor of the modules to save.
pub fn adapter_tensors(model: &mut SegNet, config: &LoraConfig) -> Vec<(String, NamedTensor)> {
    let mut out = Vec::new();
    for (path, layer) in layers_mut(model) {
        for name in kept(config, &path) {
            if let Some(t) = layer.tensor(name) {
                out.push((format!("{PREFIX}{path}.{name}"), t));
            }
        }
    }
    out
}

/// Which of a layer's tensors an adapter file holds.
fn kept(config: &LoraConfig, path: &str) -> &'static [&'static str] {
    if config.saves(path) {
        &TENSOR_NAMES[ADAPTER_TENSORS..]
    } else {
        &TENSOR_NAMES[..ADAPTER_TENSORS]
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`
/// (atomically); returns the bytes of the weights file.
pub fn save(dir: &Path, model: &mut SegNet, config: &LoraConfig) -> Result<u64, PeftError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| PeftError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let tensors = adapter_tensors(model, config);
    let bytes = tensorfile::to_bytes(
        &tensors,
        HashMap::from([("format".to_string(), "pt".to_string())]),
    );
    crate::run_dir::write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    // PEFT writes json.dumps(config, indent=2, sort_keys=True).
    let value = serde_json::to_value(config).expect("configs serialise");
    let sorted: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_value(value).expect("an object");
    let text = serde_json::to_string_pretty(&sorted).expect("configs serialise");
    crate::run_dir::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    Ok(bytes.len() as u64)
}

/// Reads an adapter directory (ours or PEFT's) onto `model`: attaches the
/// configured adapters and fills them, and the saved modules, from the file.
/// Every key that does not fit (missing, unexpected, wrong shape) is listed.
pub fn load(dir: &Path, model: SegNet, device: &Device) -> Result<(SegNet, LoraConfig), PeftError> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).map_err(|e| {
        PeftError::Io(format!(
            "cannot read {}: {e}",
            dir.join(CONFIG_FILE).display()
        ))
    })?;
    let config: LoraConfig = serde_json::from_str(&text)
        .map_err(|e| PeftError::Io(format!("{}: {e}", dir.join(CONFIG_FILE).display())))?;
    let file = tensorfile::read(&dir.join(WEIGHTS_FILE))?;
    let mut model = attach(model, &config, 0, device)?;
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut take = |key: String, shape: &[usize], problems: &mut Vec<String>| -> Option<Vec<f32>> {
        match file.tensors.get(&key) {
            None => {
                problems.push(format!("missing `{key}`"));
                None
            }
            Some(t) if t.shape != shape => {
                problems.push(format!(
                    "`{key}` has shape {:?}, the model needs {shape:?}",
                    t.shape
                ));
                used.insert(key);
                None
            }
            Some(t) => {
                used.insert(key);
                Some(t.values.clone())
            }
        }
    };
    for (path, layer) in layers_mut(&mut model) {
        for name in kept(&config, &path) {
            if let Some(shape) = layer.shape_of(name)
                && let Some(v) = take(format!("{PREFIX}{path}.{name}"), &shape, &mut problems)
            {
                layer.set_tensor(name, v, device);
            }
        }
    }
    let mut unexpected: Vec<&String> = file.tensors.keys().filter(|k| !used.contains(*k)).collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected `{k}`")));
    if !problems.is_empty() {
        return Err(PeftError::Mismatch(format!(
            "{} does not fit this model: {}",
            dir.join(WEIGHTS_FILE).display(),
            problems.join("; ")
        )));
    }
    Ok((model, config))
}
