//! Training-step throughput of the model alone: forward, backward and
//! optimiser step on a fixed batch, the quantity `bench/segnet_cpu.sh` and
//! `bench/gpu-check.sh` compare with PyTorch; and one batch on a device
//! against the same batch on the CPU (`bench/gpu-check.sh`).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::TrainerConfig;
use crate::data::Batch;
use crate::device::ComputeDevice;
use crate::model::SegNet;
use crate::model::params::Trainable;
use crate::train::{learner::Learner, peak_rss_bytes};

/// What one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    /// Engine label.
    pub engine: String,
    /// Decoder variant.
    pub decoder: crate::config::DecoderKind,
    /// Images per step.
    pub batch_size: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median step time.
    pub median_step_seconds: f64,
    /// Images per second at the median step time.
    pub images_per_sec: f64,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: Option<u64>,
}

/// "trainyard cuda:0 (burn ops)", naming the device and the kernels that are ours.
fn engine_label(
    compute: crate::device::Compute,
    native: crate::kernels::NativeOps,
    default_malloc: bool,
) -> String {
    let ours: Vec<&str> = [
        ("conv", native.conv),
        ("bn", native.bn_relu),
        ("pooling", native.pooling),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let ops = if ours.is_empty() {
        "burn ops".to_owned()
    } else {
        format!("native {}", ours.join("+"))
    };
    let malloc = if default_malloc {
        ", default malloc"
    } else {
        ""
    };
    match compute {
        crate::device::Compute::Cpu => format!("trainyard ({ops}{malloc})"),
        other => format!("trainyard {other} ({ops}{malloc})"),
    }
}

/// A fixed random batch of the config's shape.
fn random_batch(config: &TrainerConfig, seed: u64) -> Batch {
    let [h, w] = [config.data.shapes.as_ref().map_or(64, |s| s.image_size); 2];
    let (b, c, k) = (
        config.train.batch_size,
        config.model.in_channels,
        config.model.classes,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Batch {
        len: b,
        image_shape: [c, h, w],
        images: (0..b * c * h * w).map(|_| rng.random::<f32>()).collect(),
        masks: (0..b * h * w)
            .map(|_| rng.random_range(0..k as u8))
            .collect(),
        boundaries: None,
    }
}

/// Times `steps` training steps on `compute` after `warmup` untimed ones.
/// `default_malloc` only labels the result: the caller decides the allocator
/// tuning before any allocation (see [`crate::allocator`]).
pub fn step_throughput(
    config: &TrainerConfig,
    steps: usize,
    warmup: usize,
    default_malloc: bool,
    compute: &ComputeDevice,
) -> StepBench {
    let device = compute.device.clone().autodiff();
    let batch = random_batch(config, 0);
    let b = batch.len;
    let model = SegNet::new(&config.model, config.train.seed, &device);
    let mut learner = Learner::new(model, Trainable::All, &config.train.optimizer, &device);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let (_, grads) = learner.mean_gradient([batch.clone()], config, i as u64);
        learner.apply(grads, config.train.lr, None);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    StepBench {
        engine: engine_label(
            compute.compute,
            crate::kernels::native(&device),
            default_malloc,
        ),
        decoder: config.model.decoder,
        batch_size: b,
        steps,
        median_step_seconds: median,
        images_per_sec: b as f64 / median,
        peak_rss_bytes: peak_rss_bytes(),
    }
}

/// One batch on a device against the same batch on the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceParity {
    /// The device checked.
    pub device: String,
    /// The loss on the CPU (our kernels).
    pub cpu_loss: f32,
    /// The loss on the device.
    pub device_loss: f32,
    /// |device − cpu| / |cpu| of the loss.
    pub loss_relative_difference: f32,
    /// The largest |device − cpu| over the flat gradient, relative to the
    /// gradient's largest entry.
    pub gradient_max_difference: f32,
    /// Gradient entries compared.
    pub gradient_values: usize,
}

/// The same network (same seed), batch and loss on `compute` and on the CPU:
/// how far the device's loss and gradients are from the CPU's.
pub fn device_parity(config: &TrainerConfig, compute: &ComputeDevice) -> DeviceParity {
    let batch = random_batch(config, 1);
    let run = |device: &burn::tensor::Device| {
        let device = device.clone().autodiff();
        let model = SegNet::new(&config.model, config.train.seed, &device);
        let learner = Learner::new(model, Trainable::All, &config.train.optimizer, &device);
        let (loss, grads) = learner.loss_and_gradient(&batch, config);
        (
            loss.into_scalar::<f32>(),
            crate::model::params::to_host(&grads),
        )
    };
    let (cpu_loss, cpu) = run(&ComputeDevice::cpu().device);
    let (device_loss, on_device) = run(&compute.device);
    let scale = cpu
        .iter()
        .fold(0.0f32, |m, g| m.max(g.abs()))
        .max(f32::MIN_POSITIVE);
    let gradient_max_difference = cpu
        .iter()
        .zip(&on_device)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0f32, f32::max);
    DeviceParity {
        device: compute.compute.to_string(),
        cpu_loss,
        device_loss,
        loss_relative_difference: ((device_loss - cpu_loss) / cpu_loss).abs(),
        gradient_max_difference,
        gradient_values: cpu.len(),
    }
}
