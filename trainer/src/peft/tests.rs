//! LoRA numerics: a zero B is the base model, merged equals unmerged,
//! gradients equal finite differences, adapters survive the file round trip,
//! and mismatches are errors that list what does not fit.

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use super::adapter::{self, CONFIG_FILE, WEIGHTS_FILE};
use super::config::{InitLoraWeights, LoraConfig, TargetModules};
use super::lora::{self, layers_mut};
use crate::config::ModelConfig;
use crate::model::SegNet;
use crate::model::layers::{Conv2d, Linear};

fn model_config() -> ModelConfig {
    ModelConfig {
        widths: vec![4, 8],
        squeeze_excitation: true,
        ..ModelConfig::default()
    }
}

fn input(device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..2 * 3 * 8 * 8)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, [2, 3, 8, 8]), device)
}

fn logits(model: &SegNet, device: &Device) -> Vec<f32> {
    logits_at(model, input(device))
}

fn logits_at(model: &SegNet, x: Tensor<4>) -> Vec<f32> {
    model
        .forward(x)
        .logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Each value within `rel` of the wanted one (absolutely, below 1).
fn assert_close(got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= rel * w.abs().max(1.0), "{g} vs {w}");
    }
}

/// LoRA on every conv block and on both linear layers, the head saved.
fn all_layers() -> LoraConfig {
    let mut c = LoraConfig::new(
        2,
        4.0,
        TargetModules::Names(vec!["conv".into(), "fc1".into(), "fc2".into()]),
    );
    c.modules_to_save = Some(vec!["head".into()]);
    c
}

#[test]
fn with_b_zero_the_adapted_model_is_the_base() {
    let device = Device::flex();
    let base = SegNet::new(&model_config(), 1, &device);
    let want = logits(&base, &device);
    let adapted = lora::attach(base, &all_layers(), 7, &device).unwrap();
    assert_eq!(logits(&adapted, &device), want);
}

#[test]
fn merged_equals_unmerged() {
    let device = Device::flex();
    let base = SegNet::new(&model_config(), 1, &device);
    // At initialisation, with identity batch-norm statistics, the signal
    // shrinks layer by layer until the head's bias dominates the logits; a
    // larger input keeps the adapters' effect well above f32 rounding.
    let x = || input(&device).mul_scalar(20.0);
    let base_logits = logits_at(&base, x());
    let adapted = lora::randomize_b(
        lora::attach(base, &all_layers(), 7, &device).unwrap(),
        3,
        &device,
    );
    let unmerged = logits_at(&adapted, x());
    assert!(
        unmerged
            .iter()
            .zip(&base_logits)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the adapter does something"
    );
    let merged = lora::merge(adapted);
    assert!(
        layers_mut(&mut merged.clone())
            .iter()
            .all(|(_, l)| l.shape_of("lora_A.weight").is_none())
    );
    assert_close(&logits_at(&merged, x()), &unmerged, 1e-4);
}

/// d(sum of logits)/d(lora_A) and d/d(lora_B) from autodiff against central
/// finite differences, on a few entries of the last decoder convolution
/// (after every unpooling, so a small step moves no argmax and the loss is
/// smooth there; see `tests/integration/gradients.rs`).
#[test]
fn adapter_gradients_equal_finite_differences() {
    let device = Device::flex().autodiff();
    let base = SegNet::new(&model_config(), 1, &device);
    let model = lora::randomize_b(
        lora::attach(base, &all_layers(), 7, &device).unwrap(),
        3,
        &device,
    );
    fn conv(m: &mut SegNet) -> &mut Conv2d {
        &mut m.decoder[1].convs[1].conv
    }
    fn fc1(m: &mut SegNet) -> &mut Linear {
        &mut m.se.as_mut().unwrap().fc1
    }
    check_gradient(&model, "conv lora_A", &device, |m| {
        &mut conv(m).lora_a.as_mut().unwrap().weight
    });
    check_gradient(&model, "conv lora_B", &device, |m| {
        &mut conv(m).lora_b.as_mut().unwrap().weight
    });
    check_gradient(&model, "linear lora_A", &device, |m| {
        &mut fc1(m).lora_a.as_mut().unwrap().weight
    });
    check_gradient(&model, "linear lora_B", &device, |m| {
        &mut fc1(m).lora_b.as_mut().unwrap().weight
    });
}

/// Autodiff's gradient of `sum(logits)` with respect to the tensor `param`
/// picks out, against central differences at three entries.
fn check_gradient<const D: usize>(
    model: &SegNet,
    what: &str,
    device: &Device,
    param: impl Fn(&mut SegNet) -> &mut Param<Tensor<D>>,
) {
    // The same (training-mode) forward as the one differentiated: batch
    // norm uses batch statistics in both.
    let loss =
        |m: &SegNet| -> f64 { m.forward(input(device)).logits.sum().into_scalar::<f32>() as f64 };
    let grads = model.forward(input(device)).logits.sum().backward();
    let mut probe_model = model.clone();
    let w = param(&mut probe_model);
    let g: Vec<f32> = w
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let values: Vec<f32> = w.val().into_data().convert::<f32>().try_into_vec().unwrap();
    let dims = w.dims();
    for idx in [0, values.len() / 2, values.len() - 1] {
        let eps = 1e-3f32;
        let probe = |delta: f32| {
            let mut m = model.clone();
            let mut v = values.clone();
            v[idx] += delta;
            *param(&mut m) = Param::from_data(TensorData::new(v, dims), device);
            loss(&m)
        };
        let fd = (probe(eps) - probe(-eps)) / (2.0 * eps as f64);
        let ad = g[idx] as f64;
        // f32 forwards leave ~1e-3 of rounding noise in the quotient.
        assert!(
            (fd - ad).abs() <= 5e-3 + 0.02 * ad.abs(),
            "{what}[{idx}]: autodiff {ad} vs finite difference {fd}"
        );
    }
}

#[test]
fn adapters_round_trip_in_peft_format() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let base = SegNet::new(&model_config(), 1, &device);
    let config = all_layers();
    let mut adapted =
        lora::randomize_b(lora::attach(base, &config, 7, &device).unwrap(), 3, &device);
    let size = adapter::save(dir.path(), &mut adapted, &config).unwrap();
    assert!(size > 0);
    // The files are what PEFT writes.
    let file = crate::tensorfile::read(&dir.path().join(WEIGHTS_FILE)).unwrap();
    assert_eq!(file.metadata["format"], "pt");
    assert_eq!(
        file.tensors["base_model.model.encoder.0.convs.0.conv.lora_A.weight"].shape,
        vec![2, 3, 3, 3]
    );
    assert_eq!(
        file.tensors["base_model.model.encoder.0.convs.0.conv.lora_B.weight"].shape,
        vec![4, 2, 1, 1]
    );
    assert_eq!(
        file.tensors["base_model.model.se.fc1.lora_A.weight"].shape,
        vec![2, 8]
    );
    assert_eq!(
        file.tensors["base_model.model.se.fc2.lora_B.weight"].shape,
        vec![8, 2]
    );
    assert!(file.tensors.contains_key("base_model.model.head.weight"));
    assert!(file.tensors.contains_key("base_model.model.head.bias"));
    assert!(
        !file
            .tensors
            .keys()
            .any(|k| k.ends_with("conv.weight") && !k.contains("lora")),
        "the base is not saved"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "modules_to_save",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
        "init_lora_weights",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
        "task_type",
        "inference_mode",
        "peft_version",
    ] {
        assert!(json.get(key).is_some(), "adapter_config.json lacks {key}");
    }
    // A fresh base with the adapter loaded computes what the adapted one did.
    let (loaded, back) = adapter::load(
        dir.path(),
        SegNet::new(&model_config(), 1, &device),
        &device,
    )
    .unwrap();
    assert_eq!(back.r, 2);
    assert_eq!(logits(&loaded, &device), logits(&adapted, &device));
}

#[test]
fn mismatches_are_listed() {
    let device = Device::flex();
    let base = || SegNet::new(&model_config(), 1, &device);
    let none = LoraConfig::new(2, 4.0, TargetModules::Names(vec!["attention".into()]));
    let e = lora::attach(base(), &none, 0, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attention") && e.contains("encoder.0.convs.0.conv"),
        "{e}"
    );
    let mut missing_save = all_layers();
    missing_save.modules_to_save = Some(vec!["classifier".into()]);
    let e = lora::attach(base(), &missing_save, 0, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("classifier"), "{e}");

    // An adapter written for a wider model: every tensor of the wrong shape is named.
    let dir = tempfile::tempdir().unwrap();
    let wide = ModelConfig {
        widths: vec![4, 16],
        ..model_config()
    };
    let mut other =
        lora::attach(SegNet::new(&wide, 1, &device), &all_layers(), 0, &device).unwrap();
    adapter::save(dir.path(), &mut other, &all_layers()).unwrap();
    let e = adapter::load(dir.path(), base(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("encoder.1.convs.0.conv.lora_B.weight") && e.contains("shape"),
        "{e}"
    );

    // Gaussian init is accepted; unsupported settings are refused naming the field.
    let mut g = all_layers();
    g.init_lora_weights = InitLoraWeights::Named("gaussian".into());
    assert!(lora::attach(base(), &g, 0, &device).is_ok());
    g.bias = "lora_only".into();
    assert!(
        lora::attach(base(), &g, 0, &device)
            .unwrap_err()
            .to_string()
            .contains("bias")
    );
}

fn dora() -> LoraConfig {
    LoraConfig {
        use_dora: true,
        ..all_layers()
    }
}

/// A DoRA model with non-zero B's and magnitudes moved off their initial
/// norms, so every part of the decomposition matters.
fn trained_dora(device: &Device) -> SegNet {
    let base = SegNet::new(&model_config(), 1, device);
    let mut model = lora::randomize_b(lora::attach(base, &dora(), 7, device).unwrap(), 3, device);
    for (i, (_, layer)) in layers_mut(&mut model).into_iter().enumerate() {
        if let Some(m) = layer.tensor("lora_magnitude_vector") {
            let moved = m
                .values
                .iter()
                .enumerate()
                .map(|(j, v)| v * (1.0 + 0.1 * ((i + j) % 5) as f32 - 0.2))
                .collect();
            layer.set_tensor("lora_magnitude_vector", moved, device);
        }
    }
    model
}

#[test]
fn dora_starts_as_the_base_and_merges_exactly() {
    let device = Device::flex();
    let base = SegNet::new(&model_config(), 1, &device);
    let x = || input(&device).mul_scalar(20.0);
    let want = logits_at(&base, x());
    let adapted = lora::attach(base, &dora(), 7, &device).unwrap();
    // m = ‖W‖ makes the scale exactly 1 only up to rounding.
    assert_close(&logits_at(&adapted, x()), &want, 1e-5);

    let model = trained_dora(&device);
    let unmerged = logits_at(&model, x());
    let plain_lora = {
        let mut m = model.clone();
        for block in m.encoder.iter_mut().chain(m.decoder.iter_mut()) {
            for c in &mut block.convs {
                c.conv.lora_magnitude = None;
            }
        }
        logits_at(&m, x())
    };
    assert!(
        unmerged
            .iter()
            .zip(&plain_lora)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the magnitude does something"
    );
    let merged = lora::merge(model);
    assert!(merged.decoder[1].convs[1].conv.lora_magnitude.is_none());
    assert_close(&logits_at(&merged, x()), &unmerged, 1e-4);
}

/// The magnitude's gradient against finite differences (A's and B's are
/// not comparable: DoRA holds the norm constant in the backward pass, as
/// the paper and PEFT do, while a finite difference moves it).
#[test]
fn dora_magnitude_gradients_equal_finite_differences() {
    let device = Device::flex().autodiff();
    let model = trained_dora(&device);
    fn conv(m: &mut SegNet) -> &mut Conv2d {
        &mut m.decoder[1].convs[1].conv
    }
    fn fc2(m: &mut SegNet) -> &mut Linear {
        &mut m.se.as_mut().unwrap().fc2
    }
    check_gradient(&model, "conv magnitude", &device, |m| {
        conv(m).lora_magnitude.as_mut().unwrap()
    });
    check_gradient(&model, "linear magnitude", &device, |m| {
        fc2(m).lora_magnitude.as_mut().unwrap()
    });
}

#[test]
fn dora_adapters_round_trip_with_peft_magnitude_keys() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let config = dora();
    let mut model = trained_dora(&device);
    adapter::save(dir.path(), &mut model, &config).unwrap();
    let file = crate::tensorfile::read(&dir.path().join(WEIGHTS_FILE)).unwrap();
    // PEFT's shapes: a conv's magnitude broadcasts against its output.
    assert_eq!(
        file.tensors["base_model.model.encoder.0.convs.0.conv.lora_magnitude_vector"].shape,
        vec![1, 4, 1, 1]
    );
    assert_eq!(
        file.tensors["base_model.model.se.fc1.lora_magnitude_vector"].shape,
        vec![2]
    );
    let (loaded, back) = adapter::load(
        dir.path(),
        SegNet::new(&model_config(), 1, &device),
        &device,
    )
    .unwrap();
    assert!(back.use_dora);
    assert_eq!(logits(&loaded, &device), logits(&model, &device));
}

#[test]
fn the_adapter_is_a_small_fraction_of_the_model() {
    let device = Device::flex();
    let config = ModelConfig {
        widths: vec![16, 32, 64],
        ..ModelConfig::default()
    };
    let adapted = lora::attach(
        SegNet::new(&config, 1, &device),
        &LoraConfig::new(4, 8.0, TargetModules::Names(vec!["conv".into()])),
        0,
        &device,
    )
    .unwrap();
    let (adapter, all) = lora::parameter_counts(&adapted);
    let fraction = adapter as f64 / all as f64;
    assert!(fraction > 0.05 && fraction < 0.25, "{adapter} of {all}");
}

/// Fine-tuning trains only the adapters and the saved head: the frozen base
/// gets no gradients and no optimiser state, and is bit-identical after
/// optimiser steps, while the adapters move and the loss goes down.
#[test]
fn fine_tuning_moves_only_the_adapter_and_the_saved_modules() {
    use crate::config::{ShapesConfig, TrainerConfig};
    use crate::data::shapes::Shapes;
    use crate::data::{Batch, Dataset};
    use crate::model::params::{self, Layout};
    use crate::train::optim::Optimizer;

    let device = Device::flex().autodiff();
    let config = TrainerConfig {
        model: model_config(),
        ..TrainerConfig::default()
    };
    let shapes = Shapes::new(ShapesConfig {
        samples: 8,
        image_size: 16,
        ..ShapesConfig::default()
    });
    let samples: Vec<_> = (0..8).map(|i| shapes.get(i)).collect();
    let batch = Batch::collate(&samples, 3, [16, 16]);

    let lora_config = all_layers();
    let selection = lora::trainable(&lora_config);
    let base = SegNet::new(&model_config(), 1, &device);
    let frozen_before = params::named_values(&base);
    let model = lora::attach(base, &lora_config, 7, &device).unwrap();
    let mut model = params::freeze(model, &selection);
    let layout = Layout::of(&model);
    let mut values = params::trainable_values_of(&model, &selection);
    let expected: usize = layout
        .entries
        .iter()
        .filter(|e| e.name.contains(".lora_") || e.name.starts_with("head."))
        .map(|e| e.len)
        .sum();
    assert_eq!(
        values.len(),
        expected,
        "only adapters and the head are trainable"
    );
    let mut optimizer = Optimizer::new(&config.train.optimizer, values.len(), &Device::flex());
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = crate::train::batch_loss(&model, &batch, &config, &device);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = loss.backward();
        assert!(
            model.encoder[0].convs[0].conv.weight.grad(&grads).is_none(),
            "a frozen weight has no gradient"
        );
        let g = params::gradient_values_of(&model, &grads, &selection);
        let stepped = optimizer.step(
            params::from_host(values, &Device::flex()),
            params::from_host(g, &Device::flex()),
            0.01,
        );
        values = params::to_host(&stepped);
        model = params::with_trainable_values_of(model, &values, &selection, &device);
    }
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    let after = params::named_values(&model);
    for (e, v) in &frozen_before {
        let now = &after.iter().find(|(a, _)| a.name == e.name).unwrap().1;
        let is_buffer = e.name.contains("running_");
        if e.name.starts_with("head.") {
            assert_ne!(now, v, "{} is saved and trained", e.name);
        } else if !is_buffer {
            assert_eq!(now, v, "{} is frozen", e.name);
        }
    }
    let b = &model.encoder[0].convs[0]
        .conv
        .lora_b
        .as_ref()
        .unwrap()
        .weight;
    assert!(
        b.val().abs().sum().into_scalar::<f32>() > 0.0,
        "B left zero"
    );
}
