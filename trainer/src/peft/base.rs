//! Base checkpoints for fine-tuning: our own run checkpoints, or any
//! safetensors file whose tensor names are our parameter names (a PyTorch
//! state dict of `bench/torch_segnet.py`, say). Every tensor that does not
//! fit is listed, not just the first.

use std::path::Path;

use burn::tensor::Device;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use super::PeftError;
use super::lora::is_loss_parameter;
use crate::config::TrainerConfig;
use crate::model::SegNet;
use crate::model::params::{self, Layout};
use crate::tensorfile::NamedTensor;

/// Loads the base weights in `path` into a SegNet built from `config.model`.
pub fn load_base(
    path: &Path,
    config: &TrainerConfig,
    device: &Device,
) -> Result<SegNet, PeftError> {
    let bytes = std::fs::read(path)
        .map_err(|e| PeftError::Io(format!("cannot read {}: {e}", path.display())))?;
    let bad = |e: safetensors::SafeTensorError| {
        PeftError::Io(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let ours = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format"))
        .is_some_and(|f| f == crate::checkpoint::FORMAT);
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut problems = Vec::new();
    let mut tensors = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        // PyTorch's BatchNorm counter: an int64 we do not use.
        if name.ends_with("num_batches_tracked") || (ours && name.starts_with("optim.")) {
            continue;
        }
        let key = if ours {
            name.strip_prefix("model.").unwrap_or(&name).to_string()
        } else {
            name.clone()
        };
        if view.dtype() != Dtype::F32 {
            problems.push(format!("`{name}` is {:?}, expected F32", view.dtype()));
            continue;
        }
        let values = crate::tensorfile::le_f32(view.data());
        tensors.insert(
            key,
            NamedTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    let model = SegNet::new(&config.model, config.train.seed, device);
    let layout = Layout::of(&model);
    take_loss_parameters(&mut tensors, &model, path);
    for e in &layout.entries {
        match tensors.get(&e.name) {
            None => problems.push(format!("missing `{}`", e.name)),
            Some(t) if t.shape != e.shape => problems.push(format!(
                "`{}` has shape {:?}, the model needs {:?}",
                e.name, t.shape, e.shape
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !layout.entries.iter().any(|e| &e.name == *k))
        .collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected `{k}`")));
    if !problems.is_empty() {
        return Err(PeftError::Mismatch(format!(
            "{} does not fit model {:?}: {}",
            path.display(),
            config.model.widths,
            problems.join("; ")
        )));
    }
    params::load_named(model, |n| tensors.get(n), device)
        .map_err(|e| PeftError::Mismatch(e.to_string()))
}

/// The task log-variances belong to the objective, not to the network: a
/// base trained without them gives this run its starting values (0: both
/// tasks weighted 1), and a base's own are dropped when this run does not
/// learn them. A base that has them and a run that learns them continue
/// from the base's balance.
fn take_loss_parameters(
    tensors: &mut std::collections::HashMap<String, NamedTensor>,
    model: &SegNet,
    path: &Path,
) {
    let own = params::named_values(model);
    tensors.retain(|name, _| {
        let keep = !is_loss_parameter(name) || own.iter().any(|(e, _)| &e.name == name);
        if !keep {
            tracing::info!(base = %path.display(), tensor = %name, "this run does not learn task weights; the base's are not used");
        }
        keep
    });
    for (e, values) in own.into_iter().filter(|(e, _)| is_loss_parameter(&e.name)) {
        tensors.entry(e.name.clone()).or_insert_with(|| {
            tracing::info!(base = %path.display(), tensor = %e.name, "the base has no task weights; they start at 0");
            NamedTensor {
                shape: e.shape,
                values,
            }
        });
    }
}
