//! Training-step throughput of the model alone: forward, backward and
//! optimiser step on a fixed batch, the quantity `bench/segnet_cpu.sh`
//! compares with PyTorch.

use std::time::Instant;

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::TrainerConfig;
use crate::data::Batch;
use crate::model::SegNet;
use crate::model::params;
use crate::train::{loss_and_gradients, optim::Optimizer, peak_rss_bytes};

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

/// "trainyard (native conv+bn+pooling)", naming the kernels that are ours.
fn engine_label(native: crate::kernels::NativeOps, default_malloc: bool) -> String {
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
    format!("trainyard ({ops}{malloc})")
}

/// Times `steps` training steps after `warmup` untimed ones.
/// `default_malloc` only labels the result: the caller decides the allocator
/// tuning before any allocation (see [`crate::allocator`]).
pub fn step_throughput(
    config: &TrainerConfig,
    steps: usize,
    warmup: usize,
    default_malloc: bool,
) -> StepBench {
    let device = Device::flex().autodiff();
    let [h, w] = [config.data.shapes.as_ref().map_or(64, |s| s.image_size); 2];
    let (b, c, k) = (
        config.train.batch_size,
        config.model.in_channels,
        config.model.classes,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let batch = Batch {
        len: b,
        image_shape: [c, h, w],
        images: (0..b * c * h * w).map(|_| rng.random::<f32>()).collect(),
        masks: (0..b * h * w)
            .map(|_| rng.random_range(0..k as u8))
            .collect(),
        boundaries: None,
    };
    let mut model = SegNet::new(&config.model, config.train.seed, &device);
    let mut values = params::trainable_values(&model);
    let mut optimizer = Optimizer::new(&config.train.optimizer, values.len());
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let (_, grads) = loss_and_gradients(&model, &batch, config, &device);
        optimizer.step(&mut values, &grads, config.train.lr);
        model = params::with_trainable_values(model, &values, &device);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    StepBench {
        engine: engine_label(crate::kernels::native(), default_malloc),
        decoder: config.model.decoder,
        batch_size: b,
        steps,
        median_step_seconds: median,
        images_per_sec: b as f64 / median,
        peak_rss_bytes: peak_rss_bytes(),
    }
}
