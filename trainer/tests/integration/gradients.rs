//! Autodiff gradients against central finite differences.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainyard_trainer::config::TrainerConfig;
use trainyard_trainer::data::shapes::Shapes;
use trainyard_trainer::data::{Batch, Dataset};
use trainyard_trainer::model::SegNet;
use trainyard_trainer::model::noise::perturb_weights;
use trainyard_trainer::model::params::{trainable_values, with_trainable_values};
use trainyard_trainer::model::pool::{max_pool2x2, max_unpool2d};
use trainyard_trainer::train::{batch_loss, loss_and_gradients};

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .unwrap()[0]
}

#[test]
fn pool_then_unpool_gradient_equals_finite_differences() {
    let shape = [1, 2, 4, 6];
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let r: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let f = |x: &[f32], device: &Device| -> Tensor<1> {
        let xt = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), device);
        let xt = if device.is_autodiff() {
            xt.require_grad()
        } else {
            xt
        };
        let (p, i) = max_pool2x2(xt);
        let u = max_unpool2d(p, i, [4, 6]);
        u.mul(Tensor::from_data(TensorData::new(r.clone(), shape), device))
            .sum()
    };

    let ad = Device::flex().autodiff();
    let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), shape), &ad).require_grad();
    let (p, i) = max_pool2x2(xt.clone());
    let loss = max_unpool2d(p, i, [4, 6])
        .mul(Tensor::from_data(TensorData::new(r.clone(), shape), &ad))
        .sum();
    let grads = loss.backward();
    let analytic: Vec<f32> = xt
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();

    let plain = Device::flex();
    let eps = 1e-3f32;
    for k in 0..n {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[k] += eps;
        down[k] -= eps;
        let fd = (scalar(f(&up, &plain)) - scalar(f(&down, &plain))) / (2.0 * eps as f64);
        assert!(
            (fd - analytic[k] as f64).abs() < 1e-3,
            "x[{k}]: finite difference {fd} vs autodiff {}",
            analytic[k]
        );
    }
    // Only the argmax positions pass gradient: exactly one per 2x2 window.
    assert_eq!(analytic.iter().filter(|g| **g != 0.0).count(), n / 4);
}

/// A tiny network (with the boundary head and class weights, so every loss
/// term takes part), a two-image batch, and the analytic gradient.
struct Probe {
    config: TrainerConfig,
    batch: Batch,
    device: Device,
    model: SegNet,
    base: Vec<f32>,
    analytic: Vec<f32>,
    /// The optimiser step whose weight noise the loss is computed under
    /// (when `config.train.weight_noise` is set).
    step: u64,
}

impl Probe {
    fn new(decoder: &str) -> Self {
        Self::with(decoder, &["model.boundary_loss_weight=0.5"])
    }

    /// The probe with further config overrides.
    fn with(decoder: &str, extra: &[&str]) -> Self {
        let mut overrides: Vec<String> = vec![
            "model.widths=[3, 4]".into(),
            "model.convs_per_stage=1".into(),
            format!("model.decoder={decoder}"),
            "model.boundary_head=true".into(),
            "data.shapes.image_size=16".into(),
            "train.class_weights=[0.5, 1, 2, 1.5]".into(),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        let config = TrainerConfig::from_value(serde_yaml::Value::Null, &overrides).unwrap();
        let shapes = Shapes::new(config.data.shapes.clone().unwrap());
        let samples: Vec<_> = (0..2).map(|i| shapes.get(i)).collect();
        let batch = Batch::collate(&samples, 3, [16, 16]);
        assert!(batch.boundaries.is_some(), "the boundary loss takes part");
        let device = Device::flex().autodiff();
        let model = SegNet::new(&config.model, 3, &device);
        let mut probe = Self {
            config,
            batch,
            device,
            model,
            base: Vec::new(),
            analytic: Vec::new(),
            step: 0,
        };
        probe.set_model(probe.model.clone());
        probe
    }

    /// Probes at `model`'s parameters instead.
    fn set_model(&mut self, model: SegNet) {
        let (_, analytic) = loss_and_gradients(&model, &self.batch, &self.config, &self.device);
        self.base = trainable_values(&model);
        assert_eq!(self.base.len(), analytic.len());
        self.analytic = analytic;
        self.model = model;
    }

    /// Where the trainable tensor `name` starts in the flat layout.
    fn offset_of(&self, name: &str) -> usize {
        let layout = trainyard_trainer::model::params::Layout::of(&self.model);
        let mut offset = 0;
        for e in layout.trainable() {
            if e.name == name {
                return offset;
            }
            offset += e.len;
        }
        panic!("no trainable tensor `{name}`")
    }

    /// The loss at `params`. Batch norm in training mode normalises with batch
    /// statistics, as in the gradient computation.
    fn loss_at(&self, params: &[f32]) -> f64 {
        let mut m = with_trainable_values(self.model.clone(), params, &self.device);
        if let Some(n) = &self.config.train.weight_noise {
            m = perturb_weights(m, n.sigma, self.config.train.seed, self.step);
        }
        scalar(batch_loss(&m, &self.batch, &self.config, &self.device))
    }

    /// Central difference along `direction`.
    fn directional(&self, direction: &[f32], eps: f32) -> f64 {
        let shifted = |sign: f32| -> Vec<f32> {
            self.base
                .iter()
                .zip(direction)
                .map(|(p, d)| p + sign * eps * d)
                .collect()
        };
        (self.loss_at(&shifted(1.0)) - self.loss_at(&shifted(-1.0))) / (2.0 * eps as f64)
    }

    fn analytic_along(&self, direction: &[f32]) -> f64 {
        self.analytic
            .iter()
            .zip(direction)
            .map(|(g, d)| (*g as f64) * (*d as f64))
            .sum()
    }

    /// Asserts that the directional derivative along a random ±1 direction
    /// (seeded by `seed`) over the tensors `select` picks equals autodiff's
    /// to 2%.
    fn assert_directional_derivative(&self, seed: u64, select: impl Fn(&str) -> bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let direction = self.direction(&mut rng, select);
        let (fd, ad) = (
            self.directional(&direction, 1e-4),
            self.analytic_along(&direction),
        );
        assert!(
            (fd - ad).abs() <= 0.02 * ad.abs(),
            "finite difference {fd} vs autodiff {ad}"
        );
    }

    /// A random ±1 direction over the tensors `select` picks.
    fn direction(&self, rng: &mut ChaCha8Rng, select: impl Fn(&str) -> bool) -> Vec<f32> {
        let layout = trainyard_trainer::model::params::Layout::of(&self.model);
        let mut direction = vec![0.0f32; self.base.len()];
        let mut offset = 0;
        for e in layout.trainable() {
            if select(&e.name) {
                for d in &mut direction[offset..offset + e.len] {
                    *d = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                }
            }
            offset += e.len;
        }
        direction
    }
}

#[test]
fn whole_network_gradient_equals_finite_differences_per_coordinate() {
    let probe = Probe::new("unpool");
    let n = probe.base.len();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut coords: Vec<usize> = (0..40).map(|_| rng.random_range(0..n)).collect();
    // Always include the first and last parameter (first conv, boundary head bias).
    coords.extend([0, n - 1]);
    // Max-unpooling makes the loss discontinuous where an argmax changes (the
    // value jumps to another pixel), so a difference quotient across such a
    // switch is meaningless. A coordinate counts only where two step sizes
    // agree, i.e. where the loss is smooth around it; encoder weights near a
    // switch are the ones left out.
    let mut checked = 0;
    for &k in &coords {
        let mut unit = vec![0.0f32; n];
        unit[k] = 1.0;
        let (fine, coarse) = (
            probe.directional(&unit, 1e-3),
            probe.directional(&unit, 2e-3),
        );
        if (fine - coarse).abs() > 2e-3 + 0.05 * fine.abs() {
            continue;
        }
        checked += 1;
        let ad = probe.analytic[k] as f64;
        // f32 forward passes leave ~1e-3 of rounding noise in a difference
        // quotient at this step size (measured), hence the absolute floor.
        assert!(
            (fine - ad).abs() <= 2e-3 + 0.05 * ad.abs(),
            "param {k}: finite difference {fine} vs autodiff {ad}"
        );
    }
    assert!(
        checked >= coords.len() / 2,
        "only {checked} of {} coordinates were smooth",
        coords.len()
    );
}

/// A directional derivative along a random ±1 direction sums hundreds of
/// coordinates, so rounding noise is small beside it and the check is tight.
/// The step is small because moving every coordinate at once crosses ReLU
/// kinks: measured here, the quotient converges from 13% off at 1e-2 to 0.1–0.4%
/// at 1e-4, below which f32 noise takes over.
/// Decoder and heads lie after every max-pool: moving them never switches an
/// argmax, so the loss is continuous along this direction.
#[test]
fn decoder_and_head_directional_derivative_is_exact_with_unpooling() {
    let probe = Probe::new("unpool");
    probe.assert_directional_derivative(12, |name| !name.starts_with("encoder."));
}

/// With nearest-neighbour upsampling the loss is continuous in every
/// parameter, so the whole network can be checked in one direction.
#[test]
fn whole_network_directional_derivative_is_exact_with_nearest_upsampling() {
    let probe = Probe::new("nearest");
    probe.assert_directional_derivative(13, |_| true);
}

/// The whole model with burn's own operations (what it runs on CUDA) against
/// our CPU kernels, on the same device, batch and weights: the loss and every
/// flat gradient agree to 1e-4 relative, at the initial weights and at the
/// weights five training steps later. (Two trajectories, one per
/// implementation, would part ways at the first near-tie of a max-pool
/// window, which says nothing about either.)
#[test]
fn the_whole_model_on_burns_ops_equals_our_kernels() {
    use trainyard_trainer::kernels::{NativeOps, with_native};
    use trainyard_trainer::model::params::{Trainable, to_host};
    use trainyard_trainer::train::learner::Learner;
    let config = TrainerConfig::from_value(
        serde_yaml::Value::Null,
        &[
            "model.widths=[8, 16]".into(),
            "model.boundary_head=true".into(),
            "model.squeeze_excitation=true".into(),
            "data.shapes.image_size=32".into(),
            "train.class_weights=[0.5, 1, 2, 1.5]".into(),
        ],
    )
    .unwrap();
    let shapes = Shapes::new(config.data.shapes.clone().unwrap());
    let batch = |from: usize| {
        let samples: Vec<_> = (from..from + 4).map(|i| shapes.get(i)).collect();
        Batch::collate(&samples, 3, [32, 32])
    };
    let device = Device::flex().autodiff();
    let model = SegNet::new(&config.model, 11, &device);
    let mut learner = Learner::new(model, Trainable::All, &config.train.optimizer, &device);
    let compare = |learner: &Learner, when: &str| {
        let probe = batch(100);
        let [(l1, g1), (l2, g2)] = [NativeOps::ALL, NativeOps::NONE].map(|ops| {
            with_native(ops, || {
                let (loss, grads) = learner.loss_and_gradient(&probe, &config);
                (loss.into_scalar::<f32>(), to_host(&grads))
            })
        });
        assert!(((l1 - l2) / l2).abs() < 1e-4, "{when}: loss {l1} vs {l2}");
        // Different kernels round differently: equal bits would mean one path ran twice.
        assert_ne!(g1, g2, "{when}: both runs used the same operations");
        // Relative to the gradient's largest entry: entries near zero carry no
        // relative precision in either implementation.
        let scale = g2.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let (i, worst) = g1
            .iter()
            .zip(&g2)
            .map(|(a, b)| (a - b).abs() / scale)
            .enumerate()
            .fold((0, 0.0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
        assert!(
            worst < 1e-4,
            "{when}, gradient {i}: {} (our kernels) vs {} (burn's ops), {worst:.2e} of the largest entry {scale}",
            g1[i],
            g2[i]
        );
        g1
    };
    let first = compare(&learner, "initial weights");
    for step in 0..5 {
        let (_, grads) = learner.mean_gradient([batch(4 * step)], &config, step as u64);
        learner.apply(grads, 0.01, Some(5.0));
    }
    let later = compare(&learner, "after five steps");
    assert_ne!(first, later, "the model trained between the checks");
}

/// The flat tensors the optimiser and the collectives use hold exactly the
/// host layout: parameters, buffers and gradients.
#[test]
fn device_flattening_equals_the_host_layout_bit_for_bit() {
    use trainyard_trainer::model::params::{self, Trainable};
    let config = TrainerConfig::from_value(
        serde_yaml::Value::Null,
        &[
            "model.widths=[4, 8]".into(),
            "data.shapes.image_size=16".into(),
        ],
    )
    .unwrap();
    let device = Device::flex().autodiff();
    let model = SegNet::new(&config.model, 3, &device);
    let shapes = Shapes::new(config.data.shapes.clone().unwrap());
    let batch = Batch::collate(&[shapes.get(0), shapes.get(1)], 3, [16, 16]);
    let loss = batch_loss(&model, &batch, &config, &device);
    let grads = loss.backward();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let all = Trainable::All;
    assert_eq!(
        bits(params::to_host(&params::flat_trainable_of(
            &model, &all, &device
        ))),
        bits(params::trainable_values(&model))
    );
    assert_eq!(
        bits(params::to_host(&params::flat_buffers(&model, &device))),
        bits(params::buffer_values(&model))
    );
    assert_eq!(
        bits(params::to_host(&params::flat_gradients_of(
            &model, &grads, &all, &device
        ))),
        bits(params::gradient_values_of(&model, &grads, &all))
    );
    // And back: a module rebuilt from a flat tensor holds its values.
    let shifted: Vec<f32> = params::trainable_values(&model)
        .iter()
        .map(|v| v + 1.0)
        .collect();
    let rebuilt = params::with_flat_trainable_of(
        model.clone(),
        &params::from_host(shifted.clone(), &Device::flex()),
        &all,
    );
    assert_eq!(bits(params::trainable_values(&rebuilt)), bits(shifted));
    assert_eq!(
        bits(params::buffer_values(&rebuilt)),
        bits(params::buffer_values(&model))
    );
}

/// Under weight noise the forward pass computes with w·(1 + σε); the gradient
/// the learner returns is that loss's gradient in the clean weights, which is
/// what finite differences of the clean weights measure (same draw: same step).
#[test]
fn weight_noise_gradient_is_the_clean_weights_gradient() {
    use trainyard_trainer::config::WeightNoiseConfig;
    use trainyard_trainer::model::params::Trainable;
    use trainyard_trainer::train::learner::Learner;
    let mut probe = Probe::new("nearest");
    probe.config.train.weight_noise = Some(WeightNoiseConfig { sigma: 0.3 });
    probe.step = 5;
    let learner = Learner::new(
        probe.model.clone(),
        Trainable::All,
        &probe.config.train.optimizer,
        &probe.device,
    );
    let (_, g) = learner.mean_gradient([probe.batch.clone()], &probe.config, probe.step);
    let noisy: Vec<f32> = g.into_data().convert::<f32>().try_into_vec().unwrap();
    assert_ne!(noisy, probe.analytic, "the noise changes the gradient");
    probe.analytic = noisy;
    probe.assert_directional_derivative(14, |_| true);
}

/// Under uncertainty weighting the objective is Σ exp(−s_i)·L_i + s_i/2, so
/// each log-variance's gradient has the closed form ½ − exp(−s_i)·L_i, with
/// L_i the task's own loss (measured here with fixed weights); and finite
/// differences of the whole objective, network and log-variances moved
/// together, match autodiff's. Away from s = 0, where exp(−s) = 1 would hide
/// a missing factor.
#[test]
fn uncertainty_weights_gradient_is_the_closed_form_and_finite_differences() {
    use trainyard_trainer::config::TaskWeighting;
    use trainyard_trainer::model::task_weights::TaskWeights;
    let mut probe = Probe::with("nearest", &["model.task_weighting=uncertainty"]);
    let s = [0.4f32, -0.7];
    let mut model = probe.model.clone();
    model.task_weights = Some(TaskWeights::from_log_vars(s, &probe.device));
    probe.set_model(model);

    let task_loss = |boundary_weight: f64| {
        let mut config = probe.config.clone();
        config.model.task_weighting = TaskWeighting::Fixed;
        config.model.boundary_loss_weight = boundary_weight;
        let mut fixed = probe.model.clone();
        fixed.task_weights = None;
        scalar(batch_loss(&fixed, &probe.batch, &config, &probe.device))
    };
    let segmentation = task_loss(0.0);
    let boundary = task_loss(1.0) - segmentation;
    let at = probe.offset_of("task_weights.log_vars");
    for (i, loss) in [segmentation, boundary].into_iter().enumerate() {
        let want = 0.5 - (-f64::from(s[i])).exp() * loss;
        let got = f64::from(probe.analytic[at + i]);
        assert!(
            (got - want).abs() <= 1e-5 + 1e-4 * want.abs(),
            "log-variance {i}: autodiff {got} vs closed form {want}"
        );
    }
    probe.assert_directional_derivative(15, |name| name.starts_with("task_weights."));
    probe.assert_directional_derivative(16, |_| true);
}
