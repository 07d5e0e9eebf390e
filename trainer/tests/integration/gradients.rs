//! Autodiff gradients against central finite differences.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainyard_trainer::config::TrainerConfig;
use trainyard_trainer::data::shapes::Shapes;
use trainyard_trainer::data::{Batch, Dataset};
use trainyard_trainer::model::SegNet;
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
}

impl Probe {
    fn new(decoder: &str) -> Self {
        let config = TrainerConfig::from_value(
            serde_yaml::Value::Null,
            &[
                "model.widths=[3, 4]".into(),
                "model.convs_per_stage=1".into(),
                format!("model.decoder={decoder}"),
                "model.boundary_head=true".into(),
                "model.boundary_loss_weight=0.5".into(),
                "data.shapes.image_size=16".into(),
                "train.class_weights=[0.5, 1, 2, 1.5]".into(),
            ],
        )
        .unwrap();
        let shapes = Shapes::new(config.data.shapes.clone().unwrap());
        let samples: Vec<_> = (0..2).map(|i| shapes.get(i)).collect();
        let batch = Batch::collate(&samples, 3, [16, 16]);
        assert!(batch.boundaries.is_some(), "the boundary loss takes part");
        let device = Device::flex().autodiff();
        let model = SegNet::new(&config.model, 3, &device);
        let (_, analytic) = loss_and_gradients(&model, &batch, &config, &device);
        let base = trainable_values(&model);
        assert_eq!(base.len(), analytic.len());
        Self {
            config,
            batch,
            device,
            model,
            base,
            analytic,
        }
    }

    /// The loss at `params`. Batch norm in training mode normalises with batch
    /// statistics, as in the gradient computation.
    fn loss_at(&self, params: &[f32]) -> f64 {
        let m = with_trainable_values(self.model.clone(), params, &self.device);
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
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let direction = probe.direction(&mut rng, |name| !name.starts_with("encoder."));
    let (fd, ad) = (
        probe.directional(&direction, 1e-4),
        probe.analytic_along(&direction),
    );
    assert!(
        (fd - ad).abs() <= 0.02 * ad.abs(),
        "finite difference {fd} vs autodiff {ad}"
    );
}

/// With nearest-neighbour upsampling the loss is continuous in every
/// parameter, so the whole network can be checked in one direction.
#[test]
fn whole_network_directional_derivative_is_exact_with_nearest_upsampling() {
    let probe = Probe::new("nearest");
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let direction = probe.direction(&mut rng, |_| true);
    let (fd, ad) = (
        probe.directional(&direction, 1e-4),
        probe.analytic_along(&direction),
    );
    assert!(
        (fd - ad).abs() <= 0.02 * ad.abs(),
        "finite difference {fd} vs autodiff {ad}"
    );
}
