//! Attaching LoRA adapters to a SegNet's convolutions, and merging them
//! back into the base weights (`W + s·ΔW`, PEFT's `merge_and_unload`).

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;

use super::PeftError;
use super::config::{InitLoraWeights, LoraConfig};
use crate::model::SegNet;
use crate::model::layers::{Conv2d, ConvWeight};

/// Every convolution of `model` with its module path (PyTorch's
/// `named_modules()` path, e.g. `encoder.0.convs.1.conv`, `head`).
pub fn convs_mut(model: &mut SegNet) -> Vec<(String, &mut Conv2d)> {
    let mut out = Vec::new();
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
    out
}

/// The module paths of every convolution (see [`convs_mut`]).
pub fn conv_paths(model: &mut SegNet) -> Vec<String> {
    convs_mut(model).into_iter().map(|(p, _)| p).collect()
}

/// Adds an adapter to every convolution `config` targets, initialised as
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
    let paths = conv_paths(&mut model);
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
    for (path, conv) in convs_mut(&mut model) {
        if !config.targets(&path) {
            continue;
        }
        if config.saves(&path) {
            return Err(PeftError::Mismatch(format!(
                "`{path}` is both a LoRA target and in modules_to_save; choose one"
            )));
        }
        let (r, scale) = config.rank_and_scale(&path);
        let [out, inp, k, _] = conv.weight.dims();
        let kaiming = |rng: &mut ChaCha8Rng, fan_in: usize, n: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        let a = match &config.init_lora_weights {
            InitLoraWeights::Named(_) => {
                // "gaussian": A ~ N(0, 1/r) (PEFT's std is 1/r).
                let normal = Normal::new(0.0f32, 1.0 / r as f32).expect("finite");
                (0..r * inp * k * k)
                    .map(|_| rand_distr::Distribution::sample(&normal, &mut rng))
                    .collect()
            }
            InitLoraWeights::Bool(_) => kaiming(&mut rng, inp * k * k, r * inp * k * k),
        };
        let b = match &config.init_lora_weights {
            // PEFT leaves both factors at PyTorch's default initialisation.
            InitLoraWeights::Bool(false) => kaiming(&mut rng, r, out * r),
            _ => vec![0.0; out * r],
        };
        conv.lora_a = Some(ConvWeight {
            weight: Param::from_data(TensorData::new(a, [r, inp, k, k]), device),
        });
        conv.lora_b = Some(ConvWeight {
            weight: Param::from_data(TensorData::new(b, [out, r, 1, 1]), device),
        });
        conv.lora_scale = scale as f32;
        conv.lora_dropout = config.lora_dropout as f32;
    }
    Ok(model)
}

/// `s·ΔW` of an adapted convolution: `ΔW[o,i,:,:] = s·Σ_r B[o,r]·A[r,i,:,:]`
/// (PEFT's `conv2d(A.transpose(0,1), B).transpose(0,1)·s`, written as a matmul).
pub fn delta_weight(conv: &Conv2d) -> Option<Tensor<4>> {
    let (a, b) = (conv.lora_a.as_ref()?, conv.lora_b.as_ref()?);
    let [r, inp, k, _] = a.weight.dims();
    let [out, _, _, _] = b.weight.dims();
    let a2: Tensor<2> = a.weight.val().reshape([r, inp * k * k]);
    let b2: Tensor<2> = b.weight.val().reshape([out, r]);
    Some(
        b2.matmul(a2)
            .reshape([out, inp, k, k])
            .mul_scalar(conv.lora_scale),
    )
}

/// Folds every adapter into its base weight and removes it: a plain model
/// that computes what the adapted one did.
pub fn merge(mut model: SegNet) -> SegNet {
    for (_, conv) in convs_mut(&mut model) {
        if let Some(delta) = delta_weight(conv) {
            let w = conv.weight.val().add(delta);
            conv.weight = Param::from_tensor(w);
            conv.lora_a = None;
            conv.lora_b = None;
            conv.lora_scale = 0.0;
            conv.lora_dropout = 0.0;
        }
    }
    model
}

/// What fine-tuning with `config` trains: the LoRA factors and every
/// parameter of the modules to save; the rest of the base is frozen.
pub fn trainable(config: &LoraConfig) -> crate::model::params::Trainable {
    let config = config.clone();
    crate::model::params::Trainable::Matching(std::sync::Arc::new(move |name: &str| {
        if name.contains(".lora_a.") || name.contains(".lora_b.") {
            return true;
        }
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        config.saves(module)
    }))
}

/// Trainable adapter parameters of `model`, and all parameters.
pub fn parameter_counts(model: &SegNet) -> (usize, usize) {
    let layout = crate::model::params::Layout::of(model);
    let all: usize = layout.trainable().map(|e| e.len).sum();
    let adapter: usize = layout
        .trainable()
        .filter(|e| e.name.contains(".lora_a.") || e.name.contains(".lora_b."))
        .map(|e| e.len)
        .sum();
    (adapter, all)
}

/// Seeded uniform values in every B, so tests can check merging with an
/// adapter that does something.
pub fn randomize_b(mut model: SegNet, seed: u64, device: &Device) -> SegNet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (_, conv) in convs_mut(&mut model) {
        if let Some(b) = conv.lora_b.as_mut() {
            let dims = b.weight.dims();
            let values: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| rng.random_range(-0.5f32..0.5))
                .collect();
            b.weight = Param::from_data(TensorData::new(values, dims), device);
        }
    }
    model
}
