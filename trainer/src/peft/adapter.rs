//! Adapters on disk in Hugging Face PEFT's format: `adapter_config.json`
//! (sorted keys, indent 2) and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, the
//! `modules_to_save` tensors as `base_model.model.<module path>.<param>`, and
//! `{"format": "pt"}` metadata. What PEFT's `save_pretrained` writes, ours
//! reads, and the reverse.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use super::PeftError;
use super::config::LoraConfig;
use super::lora::{attach, convs_mut};
use crate::model::SegNet;
use crate::tensorfile::{self, NamedTensor};

/// File names of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert")
}

/// The adapter's tensors under PEFT's keys.
pub fn adapter_tensors(model: &mut SegNet, config: &LoraConfig) -> Vec<(String, NamedTensor)> {
    let mut out = Vec::new();
    for (path, conv) in convs_mut(model) {
        for (name, w) in [("lora_A", &conv.lora_a), ("lora_B", &conv.lora_b)] {
            if let Some(w) = w {
                out.push((
                    format!("{PREFIX}{path}.{name}.weight"),
                    NamedTensor {
                        shape: w.weight.dims().to_vec(),
                        values: values(&w.weight.val()),
                    },
                ));
            }
        }
        if config.saves(&path) {
            out.push((
                format!("{PREFIX}{path}.weight"),
                NamedTensor {
                    shape: conv.weight.dims().to_vec(),
                    values: values(&conv.weight.val()),
                },
            ));
            if let Some(b) = &conv.bias {
                out.push((
                    format!("{PREFIX}{path}.bias"),
                    NamedTensor {
                        shape: b.dims().to_vec(),
                        values: values(&b.val()),
                    },
                ));
            }
        }
    }
    out
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
    tensorfile::write_bytes_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    // PEFT writes json.dumps(config, indent=2, sort_keys=True).
    let value = serde_json::to_value(config).expect("configs serialise");
    let sorted: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_value(value).expect("an object");
    let text = serde_json::to_string_pretty(&sorted).expect("configs serialise");
    tensorfile::write_bytes_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
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
    for (path, conv) in convs_mut(&mut model) {
        for (name, slot) in [("lora_A", &mut conv.lora_a), ("lora_B", &mut conv.lora_b)] {
            if let Some(w) = slot {
                let dims = w.weight.dims();
                if let Some(v) = take(
                    format!("{PREFIX}{path}.{name}.weight"),
                    &dims,
                    &mut problems,
                ) {
                    w.weight = Param::from_data(TensorData::new(v, dims), device);
                }
            }
        }
        if config.saves(&path) {
            let dims = conv.weight.dims();
            if let Some(v) = take(format!("{PREFIX}{path}.weight"), &dims, &mut problems) {
                conv.weight = Param::from_data(TensorData::new(v, dims), device);
            }
            if let Some(b) = conv.bias.as_mut() {
                let dims = b.dims();
                if let Some(v) = take(format!("{PREFIX}{path}.bias"), &dims, &mut problems) {
                    *b = Param::from_data(TensorData::new(v, dims), device);
                }
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
