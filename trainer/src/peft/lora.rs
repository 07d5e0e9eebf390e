//! Attaching LoRA adapters to a SegNet's convolutions and linear layers,
//! and merging them back into the base weights (`W + s·ΔW`, PEFT's
//! `merge_and_unload`).

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;

use super::PeftError;
use super::config::{InitLoraWeights, LoraConfig};
use crate::model::SegNet;
use crate::model::layers::{Conv2d, ConvWeight, Linear, LinearWeight, dora_norm};
use crate::tensorfile::NamedTensor;

/// A layer that can carry a LoRA adapter: [`Conv2d`] and [`Linear`]. The
/// tensor names are PEFT's (`weight`, `bias`, `lora_A.weight`, `lora_B.weight`).
pub trait LoraLayer {
    /// Inputs per output (`in·k·k` for a conv, `in` for a linear layer):
    /// Kaiming-uniform's fan-in for A.
    fn fan_in(&self) -> usize;
    /// Shapes of A and B for rank `r`.
    fn lora_shapes(&self, r: usize) -> (Vec<usize>, Vec<usize>);
    /// Installs A and B (flat values in the shapes of [`Self::lora_shapes`]).
    fn set_lora(&mut self, a: TensorData, b: TensorData, scale: f32, dropout: f32, device: &Device);
    /// DoRA: starts the magnitude at `‖W + s·BA‖` per output channel (so
    /// the adapted layer computes what the LoRA one does).
    fn init_magnitude(&mut self, device: &Device);
    /// Folds the adapter into the base weight (`W + s·BA`, with DoRA
    /// `m·(W + s·BA)/‖W + s·BA‖`) and removes it.
    fn merge(&mut self);
    /// The shape of a named tensor, when the layer has it.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
    /// A named tensor's values, when the layer has it.
    fn tensor(&self, name: &str) -> Option<NamedTensor>;
    /// Replaces a named tensor (values in the shape of [`Self::shape_of`]).
    fn set_tensor(&mut self, name: &str, values: Vec<f32>, device: &Device);
}

/// Names of a LoRA layer's tensors, in file order: the adapter's (the
/// magnitude only with DoRA), then the layer's own.
pub const TENSOR_NAMES: [&str; 5] = [
    "lora_A.weight",
    "lora_B.weight",
    "lora_magnitude_vector",
    "weight",
    "bias",
];

/// How many of [`TENSOR_NAMES`] belong to the adapter.
pub const ADAPTER_TENSORS: usize = 3;

fn named<const D: usize>(p: &Param<Tensor<D>>) -> NamedTensor {
    NamedTensor {
        shape: p.dims().to_vec(),
        values: p
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 after convert"),
    }
}

fn refill<const D: usize>(p: &mut Param<Tensor<D>>, values: Vec<f32>, device: &Device) {
    *p = Param::from_data(TensorData::new(values, p.dims()), device);
}

// The two impls differ only in tensor rank; burn's Param<Tensor<D>> has no
// rank-erased handle, so each spells out its four tensors.
macro_rules! lora_layer {
    ($layer:ty, $factor:ident, $rank:literal, $fan_in:expr, $shapes:expr, $magnitude_shape:expr) => {
        impl LoraLayer for $layer {
            fn fan_in(&self) -> usize {
                ($fan_in)(self.weight.dims())
            }
            fn lora_shapes(&self, r: usize) -> (Vec<usize>, Vec<usize>) {
                ($shapes)(self.weight.dims(), r)
            }
            fn set_lora(
                &mut self,
                a: TensorData,
                b: TensorData,
                scale: f32,
                dropout: f32,
                device: &Device,
            ) {
                self.lora_a = Some($factor {
                    weight: Param::from_data(a, device),
                });
                self.lora_b = Some($factor {
                    weight: Param::from_data(b, device),
                });
                self.lora_scale = scale;
                self.lora_dropout = dropout;
            }
            fn init_magnitude(&mut self, device: &Device) {
                if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
                    let norm = dora_norm(self.weight.val(), self.delta_weight(a, b));
                    self.lora_magnitude = Some(Param::from_data(norm.into_data(), device));
                }
            }
            fn merge(&mut self) {
                let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) else {
                    return;
                };
                let delta = self.delta_weight(a, b);
                let mut w = self.weight.val().add(delta.clone());
                if let Some(m) = &self.lora_magnitude {
                    let out = self.weight.dims()[0];
                    let mut shape = [1; $rank];
                    shape[0] = out;
                    let g = m.val().div(dora_norm(self.weight.val(), delta));
                    w = w.mul(g.reshape(shape));
                }
                self.weight = Param::from_tensor(w);
                self.lora_a = None;
                self.lora_b = None;
                self.lora_magnitude = None;
                self.lora_scale = 0.0;
                self.lora_dropout = 0.0;
            }
            fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
                match name {
                    "lora_A.weight" => self.lora_a.as_ref().map(|w| w.weight.dims().to_vec()),
                    "lora_B.weight" => self.lora_b.as_ref().map(|w| w.weight.dims().to_vec()),
                    "lora_magnitude_vector" => self
                        .lora_magnitude
                        .as_ref()
                        .map(|m| ($magnitude_shape)(m.dims()[0])),
                    "weight" => Some(self.weight.dims().to_vec()),
                    "bias" => self.bias.as_ref().map(|b| b.dims().to_vec()),
                    _ => None,
                }
            }
            fn tensor(&self, name: &str) -> Option<NamedTensor> {
                match name {
                    "lora_A.weight" => self.lora_a.as_ref().map(|w| named(&w.weight)),
                    "lora_B.weight" => self.lora_b.as_ref().map(|w| named(&w.weight)),
                    "lora_magnitude_vector" => self.lora_magnitude.as_ref().map(|m| NamedTensor {
                        shape: ($magnitude_shape)(m.dims()[0]),
                        ..named(m)
                    }),
                    "weight" => Some(named(&self.weight)),
                    "bias" => self.bias.as_ref().map(named),
                    _ => None,
                }
            }
            fn set_tensor(&mut self, name: &str, values: Vec<f32>, device: &Device) {
                match name {
                    "lora_A.weight" => self
                        .lora_a
                        .as_mut()
                        .map(|w| refill(&mut w.weight, values, device)),
                    "lora_B.weight" => self
                        .lora_b
                        .as_mut()
                        .map(|w| refill(&mut w.weight, values, device)),
                    "lora_magnitude_vector" => self
                        .lora_magnitude
                        .as_mut()
                        .map(|m| refill(m, values, device)),
                    "weight" => Some(refill(&mut self.weight, values, device)),
                    "bias" => self.bias.as_mut().map(|b| refill(b, values, device)),
                    _ => None,
                };
            }
        }
    };
}

lora_layer!(
    Conv2d,
    ConvWeight,
    4,
    |[_, i, k, _]: [usize; 4]| i * k * k,
    // A is a conv like the base one, B a 1x1 conv.
    |[o, i, k, _]: [usize; 4], r| (vec![r, i, k, k], vec![o, r, 1, 1]),
    // PEFT keeps a conv's magnitude broadcastable against its output.
    |out| vec![1, out, 1, 1]
);
lora_layer!(
    Linear,
    LinearWeight,
    2,
    |[_, i]: [usize; 2]| i,
    |[o, i]: [usize; 2], r| (vec![r, i], vec![o, r]),
    |out| vec![out]
);

/// Every layer of `model` that can carry an adapter, with its module path
/// (PyTorch's `named_modules()` path, e.g. `encoder.0.convs.1.conv`, `head`,
/// `se.fc1`).
pub fn layers_mut(model: &mut SegNet) -> Vec<(String, &mut dyn LoraLayer)> {
    let mut out: Vec<(String, &mut dyn LoraLayer)> = Vec::new();
    for (side, stages) in [
        ("encoder", &mut model.encoder),
        ("decoder", &mut model.decoder),
    ] {
        for (i, stage) in stages.iter_mut().enumerate() {
            for (j, block) in stage.convs.iter_mut().enumerate() {
                out.push((format!("{side}.{i}.convs.{j}.conv"), &mut block.conv));
            }
        }
    }
    out.push(("head".into(), &mut model.head));
    if let Some(b) = model.boundary_head.as_mut() {
        out.push(("boundary_head".into(), b));
    }
    if let Some(se) = model.se.as_mut() {
        out.push(("se.fc1".into(), &mut se.fc1));
        out.push(("se.fc2".into(), &mut se.fc2));
    }
    out
}

/// The module paths of every adaptable layer (see [`layers_mut`]).
pub fn layer_paths(model: &mut SegNet) -> Vec<String> {
    layers_mut(model).into_iter().map(|(p, _)| p).collect()
}

/// Adds an adapter to every layer `config` targets, initialised as
/// `init_lora_weights` says (by default A Kaiming-uniform and B zero, so the
/// adapted network computes exactly what the base does). A target that
/// matches no module, and a module to save that does not exist, are errors
/// listing the modules there are.
pub fn attach(
    mut model: SegNet,
    config: &LoraConfig,
    seed: u64,
    device: &Device,
) -> Result<SegNet, PeftError> {
    config.check()?;
    let paths = layer_paths(&mut model);
    let targeted: Vec<&String> = paths.iter().filter(|p| config.targets(p)).collect();
    if targeted.is_empty() {
        return Err(PeftError::Mismatch(format!(
            "target_modules {:?} matches no module; the model has {}",
            config.target_modules,
            paths.join(", ")
        )));
    }
    if let super::config::TargetModules::Names(names) = &config.target_modules
        && let Some(t) = names.iter().find(|t| {
            !paths
                .iter()
                .any(|p| p == *t || p.ends_with(&format!(".{t}")))
        })
    {
        return Err(PeftError::Mismatch(format!(
            "target_modules entry `{t}` matches no module; the model has {}",
            paths.join(", ")
        )));
    }
    for m in config.modules_to_save.iter().flatten() {
        if !paths
            .iter()
            .any(|p| p == m || p.ends_with(&format!(".{m}")))
        {
            return Err(PeftError::Mismatch(format!(
                "modules_to_save entry `{m}` matches no module; the model has {}",
                paths.join(", ")
            )));
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (path, layer) in layers_mut(&mut model) {
        if !config.targets(&path) {
            continue;
        }
        if config.saves(&path) {
            return Err(PeftError::Mismatch(format!(
                "`{path}` is both a LoRA target and in modules_to_save; choose one"
            )));
        }
        let (r, scale) = config.rank_and_scale(&path);
        let (a_shape, b_shape) = layer.lora_shapes(r);
        let (a_len, b_len) = (a_shape.iter().product(), b_shape.iter().product());
        let kaiming = |rng: &mut ChaCha8Rng, fan_in: usize, n: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        let a = match &config.init_lora_weights {
            InitLoraWeights::Named(_) => {
                // "gaussian": A ~ N(0, 1/r) (PEFT's std is 1/r).
                let normal = Normal::new(0.0f32, 1.0 / r as f32).expect("finite");
                (0..a_len)
                    .map(|_| rand_distr::Distribution::sample(&normal, &mut rng))
                    .collect()
            }
            InitLoraWeights::Bool(_) => kaiming(&mut rng, layer.fan_in(), a_len),
        };
        let b = match &config.init_lora_weights {
            // PEFT leaves both factors at PyTorch's default initialisation.
            InitLoraWeights::Bool(false) => kaiming(&mut rng, r, b_len),
            _ => vec![0.0; b_len],
        };
        layer.set_lora(
            TensorData::new(a, a_shape),
            TensorData::new(b, b_shape),
            scale as f32,
            config.lora_dropout as f32,
            device,
        );
        if config.use_dora {
            layer.init_magnitude(device);
        }
    }
    Ok(model)
}

/// Folds every adapter into its base weight and removes it (PEFT's
/// `merge_and_unload`): a plain model that computes what the adapted one
/// did. `ΔW = s·B@A` with A flattened to `[r, in·k·k]`, which for a conv is
/// PEFT's `conv2d(A.transpose(0,1), B).transpose(0,1)·s`; DoRA rescales each
/// output channel of `W + ΔW` to its magnitude.
pub fn merge(mut model: SegNet) -> SegNet {
    for (_, layer) in layers_mut(&mut model) {
        layer.merge();
    }
    model
}

/// What fine-tuning with `config` trains: the LoRA factors, every
/// parameter of the modules to save, and the learned task weights (they are
/// part of the fine-tuning objective, not of the network the adapter
/// changes); the rest of the base is frozen.
pub fn trainable(config: &LoraConfig) -> crate::model::params::Trainable {
    let config = config.clone();
    crate::model::params::Trainable::Matching(std::sync::Arc::new(move |name: &str| {
        if is_adapter_parameter(name) || is_loss_parameter(name) {
            return true;
        }
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        config.saves(module)
    }))
}

/// Whether a parameter belongs to the loss rather than to the network: the
/// task log-variances. A base need not have them, and an adapter never
/// carries them (the adapted network computes the same without).
pub fn is_loss_parameter(name: &str) -> bool {
    name.starts_with("task_weights.")
}

/// Whether a parameter (by its in-memory path) belongs to an adapter.
fn is_adapter_parameter(name: &str) -> bool {
    name.contains(".lora_a.") || name.contains(".lora_b.") || name.ends_with(".lora_magnitude")
}

/// Trainable adapter parameters of `model`, and all parameters.
pub fn parameter_counts(model: &SegNet) -> (usize, usize) {
    let layout = crate::model::params::Layout::of(model);
    let all: usize = layout.trainable().map(|e| e.len).sum();
    let adapter: usize = layout
        .trainable()
        .filter(|e| is_adapter_parameter(&e.name))
        .map(|e| e.len)
        .sum();
    (adapter, all)
}

/// Seeded uniform values in every B, so tests can check merging with an
/// adapter that does something.
pub fn randomize_b(mut model: SegNet, seed: u64, device: &Device) -> SegNet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (_, layer) in layers_mut(&mut model) {
        if let Some(shape) = layer.shape_of("lora_B.weight") {
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.random_range(-0.5f32..0.5))
                .collect();
            layer.set_tensor("lora_B.weight", values, device);
        }
    }
    model
}
