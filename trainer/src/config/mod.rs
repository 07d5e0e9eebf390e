//! The trainer's configuration: what a `TrainingJob` hands a replica, and what
//! `trainyard-trainer train --config FILE` reads.
//!
//! See [`TrainerConfig`] for the primary entry point. This module depends on
//! serde alone (no tensors), so the operator can embed the same types.
//!
//! Loading is layered, ripgrep-style: the file is parsed to a generic value,
//! `--set key=value` overrides are applied to that value, and only then is the
//! value deserialized into the typed config (unknown keys and wrong types are
//! errors naming the dotted path) and validated semantically ([`TrainerConfig::validate`]).
//!
//! Names follow the `TrainingJob` spec's, in snake_case (`bucket_mib` is
//! `bucketMib`), so a trainer key maps onto its spec field mechanically.
//! Keys renamed to get there keep their old name as a serde alias, so
//! config files written before still load.

mod federated;
mod peft;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use federated::{
    AdaptiveClipping, AdaptiveServer, Aggregation, BiasCorrection, FederatedConfig, Partition,
    PrivacyConfig, ServerOptimizer, client_token,
};
pub use peft::PeftConfig;

/// Label value that marks a pixel to be ignored by the loss and the metrics.
pub const IGNORE_INDEX: u8 = 255;

/// Classes of the synthetic shapes dataset.
pub const SHAPES_CLASSES: usize = SHAPES_CLASS_NAMES.len();

/// The shapes dataset's class names, by label index.
pub const SHAPES_CLASS_NAMES: [&str; 4] = ["background", "circle", "rectangle", "triangle"];

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}: {source}")]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML or JSON.
    #[error("failed to parse config file {path}: {message}")]
    Parse {
        /// The file that was parsed.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A `--set` override is malformed.
    #[error("invalid override `{arg}`: {message}")]
    Override {
        /// The override as given.
        arg: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key is unknown or a value has the wrong type.
    #[error("invalid config at `{field}`: {message}")]
    Schema {
        /// Dotted path of the offending key.
        field: String,
        /// What serde said about it.
        message: String,
    },
    /// A value has the right type but is not allowed.
    #[error("invalid value for `{field}`: {message}")]
    Invalid {
        /// Dotted path of the offending key.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Everything one training run needs. Sections are named so that a
/// `TrainingJob` spec can embed them unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// The network.
    pub model: ModelConfig,
    /// Where samples come from and how they are split and augmented.
    pub data: DataConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Checkpoint cadence and retention.
    pub checkpoint: CheckpointConfig,
    /// Federated learning (aggregator and client roles); absent otherwise.
    pub federated: Option<FederatedConfig>,
    /// Fine-tune a base with a LoRA adapter; absent trains every parameter.
    pub peft: Option<PeftConfig>,
}

/// How the decoder upsamples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// Max-unpooling with the argmax indices of the mirrored encoder stage (SegNet).
    #[default]
    Unpool,
    /// Nearest-neighbour 2x upsampling (the paper's cheap baseline).
    Nearest,
}

/// How the segmentation and boundary losses are added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TaskWeighting {
    /// `segmentation + boundary_loss_weight · boundary`.
    #[default]
    Fixed,
    /// A learned log-variance per task (Kendall, Gal & Cipolla 2018), see
    /// [`crate::model::task_weights`].
    Uncertainty,
}

/// The SegNet family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Channels of each encoder stage; the decoder mirrors them.
    pub widths: Vec<usize>,
    /// 3x3 conv → BN → ReLU blocks per stage.
    pub convs_per_stage: usize,
    /// How the decoder upsamples.
    pub decoder: DecoderKind,
    /// Number of semantic classes, background included.
    pub classes: usize,
    /// Input image channels.
    pub in_channels: usize,
    /// Train an auxiliary per-pixel instance-boundary head.
    pub boundary_head: bool,
    /// Weight of the boundary loss relative to the segmentation loss, under
    /// `task_weighting: fixed`.
    pub boundary_loss_weight: f64,
    /// Whether the balance of the two losses is fixed or learned.
    pub task_weighting: TaskWeighting,
    /// A squeeze-excitation block (two linear layers) on the bottleneck.
    pub squeeze_excitation: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            widths: vec![16, 32, 64],
            convs_per_stage: 2,
            decoder: DecoderKind::Unpool,
            classes: 4,
            in_channels: 3,
            boundary_head: false,
            boundary_loss_weight: 1.0,
            task_weighting: TaskWeighting::Fixed,
            squeeze_excitation: false,
        }
    }
}

impl ModelConfig {
    /// Checks of the `model` section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.widths.is_empty() {
            return Err(ConfigError::invalid(
                "model.widths",
                "needs at least one stage, e.g. [16, 32, 64]",
            ));
        }
        if let Some(i) = self.widths.iter().position(|&w| w == 0) {
            return Err(ConfigError::invalid(
                format!("model.widths[{i}]"),
                "a stage needs at least one channel",
            ));
        }
        if self.convs_per_stage == 0 {
            return Err(ConfigError::invalid(
                "model.convs_per_stage",
                "must be at least 1",
            ));
        }
        if self.classes < 2 {
            return Err(ConfigError::invalid(
                "model.classes",
                "must be at least 2 (background and one object class)",
            ));
        }
        if self.classes > IGNORE_INDEX as usize {
            return Err(ConfigError::invalid(
                "model.classes",
                format!(
                    "at most {IGNORE_INDEX} classes fit in 8-bit masks ({IGNORE_INDEX} marks ignored pixels)"
                ),
            ));
        }
        if self.in_channels == 0 {
            return Err(ConfigError::invalid(
                "model.in_channels",
                "must be at least 1",
            ));
        }
        check_non_negative("model.boundary_loss_weight", self.boundary_loss_weight)?;
        if self.task_weighting == TaskWeighting::Uncertainty {
            if !self.boundary_head {
                return Err(ConfigError::invalid(
                    "model.task_weighting",
                    "uncertainty weighting balances the segmentation and boundary losses, and \
                     without the boundary head there is only one: turn the head on, or use fixed \
                     weighting",
                ));
            }
            if self.boundary_loss_weight != Self::default().boundary_loss_weight {
                return Err(ConfigError::invalid(
                    "model.boundary_loss_weight",
                    "is learned under uncertainty task weighting: leave it out, or use fixed \
                     weighting to set it by hand",
                ));
            }
        }

        Ok(())
    }
}

/// Sample source, split and augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Synthetic shapes (set exactly one of `shapes` and `folder`).
    pub shapes: Option<ShapesConfig>,
    /// Images and masks from a directory.
    pub folder: Option<FolderConfig>,
    /// Fraction of samples held out for validation.
    #[serde(alias = "val_fraction")]
    pub validation_fraction: f64,
    /// Seed of the train/validation split and the per-epoch shuffle.
    pub seed: u64,
    /// Gaussian input noise on training batches (training with noise).
    pub noise: Option<NoiseConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            shapes: Some(ShapesConfig::default()),
            folder: None,
            validation_fraction: 0.1,
            seed: 1,
            noise: None,
        }
    }
}

impl DataConfig {
    /// Checks of the `data` section, and what the dataset asks of the model.
    pub fn validate(&self, m: &ModelConfig) -> Result<(), ConfigError> {
        match (&self.shapes, &self.folder) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "data",
                    "set exactly one of `data.shapes` and `data.folder`, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "data",
                    "set one of `data.shapes` or `data.folder`",
                ));
            }
            (Some(s), None) => {
                if s.samples < 2 {
                    return Err(ConfigError::invalid(
                        "data.shapes.samples",
                        "needs at least 2 samples (one for training, one for validation)",
                    ));
                }
                let min = 1usize << m.widths.len();
                if s.image_size < min.max(8) || s.image_size % min != 0 {
                    return Err(ConfigError::invalid(
                        "data.shapes.image_size",
                        format!(
                            "must be a multiple of {min} (2 to the number of stages) and at least {}",
                            min.max(8)
                        ),
                    ));
                }
                check_non_negative("data.shapes.sensor_noise", s.sensor_noise)?;
                if s.max_shapes == 0 {
                    return Err(ConfigError::invalid(
                        "data.shapes.max_shapes",
                        "must be at least 1",
                    ));
                }
                if m.classes != SHAPES_CLASSES {
                    return Err(ConfigError::invalid(
                        "model.classes",
                        format!(
                            "the shapes dataset has {SHAPES_CLASSES} classes ({}); set model.classes: {SHAPES_CLASSES}",
                            SHAPES_CLASS_NAMES.join(", ")
                        ),
                    ));
                }
                if m.in_channels != 3 {
                    return Err(ConfigError::invalid(
                        "model.in_channels",
                        "the shapes dataset is RGB; set model.in_channels: 3",
                    ));
                }
            }
            (None, Some(f)) => {
                if f.path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid(
                        "data.folder.path",
                        "must name a directory holding images/ and masks/",
                    ));
                }
            }
        }
        if !(0.0..1.0).contains(&self.validation_fraction) || !self.validation_fraction.is_finite()
        {
            return Err(ConfigError::invalid(
                "data.validation_fraction",
                "must be in [0, 1), e.g. 0.1",
            ));
        }
        if let Some(n) = &self.noise {
            check_non_negative("data.noise.sigma", n.sigma)?;
            if !(0.0..=1.0).contains(&n.probability) {
                return Err(ConfigError::invalid(
                    "data.noise.probability",
                    "must be in [0, 1]",
                ));
            }
        }

        Ok(())
    }
}

/// The synthetic shapes dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapesConfig {
    /// Number of samples (train and validation together).
    pub samples: usize,
    /// Image height and width in pixels.
    pub image_size: usize,
    /// Most shapes per image (at least one is always drawn).
    pub max_shapes: usize,
    /// Generator seed: the same seed gives byte-identical samples everywhere.
    pub seed: u64,
    /// Photographic negatives (every intensity v becomes 255 − v): the same
    /// scenes in another domain, for fine-tuning a model trained on positives.
    pub invert: bool,
    /// Sensor noise: zero-mean Gaussian noise of this standard deviation
    /// (intensity units, 0-255) on every pixel of every sample, validation
    /// included, deterministic by seed; 0 is none.
    pub sensor_noise: f64,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            samples: 2048,
            image_size: 64,
            max_shapes: 4,
            seed: 7,
            invert: false,
            sensor_noise: 0.0,
        }
    }
}

/// A dataset on disk: `images/*.png|jpg` and `masks/*.png` with equal stems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    /// Directory holding `images/` and `masks/`.
    pub path: PathBuf,
}

/// Additive Gaussian input noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseConfig {
    /// Standard deviation, in units of normalised pixel intensity (0..1).
    pub sigma: f64,
    /// Probability that a training sample gets noise.
    pub probability: f64,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            sigma: 0.1,
            probability: 0.5,
        }
    }
}

/// Weight noise in training (`train.weight_noise`): every forward pass uses
/// `w · (1 + σ·ε)` with `ε ~ N(0, 1)` per element of each conv and linear
/// weight, a fresh draw per optimiser step, seeded by `train.seed` and the
/// step (so resuming draws the same noise). Gradients reach the clean
/// weights through the product; biases and normalisation stay clean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightNoiseConfig {
    /// σ of the multiplicative noise (0.1: each weight off by about 10%).
    pub sigma: f64,
}

/// The noise a model is scored under (`eval` and validation take the same
/// description): additive Gaussian noise on every input pixel, as a sensor
/// adds it, and multiplicative Gaussian noise on the conv and linear weights,
/// as low-precision or analog hardware inflicts it. A pure function of
/// `seed`: the same description gives the same number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalNoise {
    /// σ of the input noise, in normalised pixel intensity (0..1); drawn per
    /// sample from (`seed`, the sample's index), so sharding does not change it.
    pub input_sigma: f64,
    /// σ of the multiplicative weight noise; one draw per scoring (one device).
    pub weight_sigma: f64,
    /// Seed of both draws.
    pub seed: u64,
}

impl Default for EvalNoise {
    fn default() -> Self {
        Self {
            input_sigma: 0.0,
            weight_sigma: 0.0,
            seed: 0,
        }
    }
}

impl EvalNoise {
    /// Checks of a noise description at `field`.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_non_negative(&format!("{field}.input_sigma"), self.input_sigma)?;
        check_non_negative(&format!("{field}.weight_sigma"), self.weight_sigma)
    }

    /// Whether scoring under this noise is scoring clean.
    pub fn is_clean(&self) -> bool {
        self.input_sigma == 0.0 && self.weight_sigma == 0.0
    }
}

/// The optimiser and its hyper-parameters (learning rate lives in [`TrainConfig::lr`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with optional (Nesterov) momentum.
    Sgd(SgdConfig),
    /// Adam with decoupled weight decay.
    AdamW(AdamWConfig),
}

impl OptimizerConfig {
    /// Checks of `train.optimizer`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            OptimizerConfig::Sgd(s) => {
                check_non_negative("train.optimizer.momentum", s.momentum)?;
                if s.momentum >= 1.0 {
                    return Err(ConfigError::invalid(
                        "train.optimizer.momentum",
                        "must be below 1",
                    ));
                }
                if s.nesterov && s.momentum == 0.0 {
                    return Err(ConfigError::invalid(
                        "train.optimizer.nesterov",
                        "Nesterov needs momentum; set train.optimizer.momentum > 0",
                    ));
                }
                check_non_negative("train.optimizer.weight_decay", s.weight_decay)?;
            }
            OptimizerConfig::AdamW(a) => {
                for (field, beta) in [
                    ("train.optimizer.beta1", a.beta1),
                    ("train.optimizer.beta2", a.beta2),
                ] {
                    if !(0.0..1.0).contains(&beta) {
                        return Err(ConfigError::invalid(field, "must be in [0, 1)"));
                    }
                }
                check_positive("train.optimizer.eps", a.eps)?;
                check_non_negative("train.optimizer.weight_decay", a.weight_decay)?;
            }
        }
        Ok(())
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::AdamW(AdamWConfig::default())
    }
}

/// SGD hyper-parameters (PyTorch semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    /// Momentum factor; 0 disables momentum.
    pub momentum: f64,
    /// Use Nesterov momentum (needs `momentum > 0`).
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// AdamW hyper-parameters (PyTorch semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// How the learning rate decays after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DecayConfig {
    /// Keep the peak learning rate.
    Constant,
    /// Cosine from the peak down to `final_factor` × peak at the last step.
    Cosine(CosineDecay),
    /// Multiply by `gamma` every `every` steps.
    Step(StepDecay),
}

impl DecayConfig {
    /// Checks of `train.decay`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            DecayConfig::Constant => {}
            DecayConfig::Cosine(c) => {
                if !(0.0..=1.0).contains(&c.final_factor) {
                    return Err(ConfigError::invalid(
                        "train.decay.final_factor",
                        "must be in [0, 1]",
                    ));
                }
            }
            DecayConfig::Step(s) => {
                if s.every == 0 {
                    return Err(ConfigError::invalid(
                        "train.decay.every",
                        "must be at least 1",
                    ));
                }
                if !(s.gamma > 0.0 && s.gamma <= 1.0) {
                    return Err(ConfigError::invalid(
                        "train.decay.gamma",
                        "must be in (0, 1]",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Default for DecayConfig {
    fn default() -> Self {
        Self::Cosine(CosineDecay::default())
    }
}

/// Cosine decay parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineDecay {
    /// Learning rate at the last step, as a fraction of the peak.
    pub final_factor: f64,
}

impl Default for CosineDecay {
    fn default() -> Self {
        Self { final_factor: 0.01 }
    }
}

/// Step decay parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDecay {
    /// Steps between decays.
    pub every: u64,
    /// Multiplicative factor per decay.
    pub gamma: f64,
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps to run.
    pub steps: u64,
    /// Samples per micro-batch (per replica).
    pub batch_size: usize,
    /// Micro-batches whose mean gradient makes one optimiser step (gradient
    /// accumulation: one all-reduce per step in data-parallel training).
    pub accumulate_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: u64,
    /// Decay after warm-up.
    pub decay: DecayConfig,
    /// Optimiser.
    pub optimizer: OptimizerConfig,
    /// Clip gradients to this global L2 norm.
    pub grad_clip_norm: Option<f64>,
    /// Wire format of the gradient all-reduce in data-parallel training.
    pub compression: Compression,
    /// Top-k sparsification with error feedback for the gradient exchange.
    pub topk: Option<TopKConfig>,
    /// Gradients are all-reduced in flat buckets of at most this many MiB,
    /// in a fixed order (layout order), as PyTorch DDP does.
    #[serde(alias = "bucket_mb")]
    pub bucket_mib: f64,
    /// Local SGD: in data-parallel training, ranks step on their own and
    /// average parameters every `every` steps instead of gradients every step.
    pub local_sgd: Option<LocalSgdConfig>,
    /// Per-class loss weights (length = `model.classes`).
    pub class_weights: Option<Vec<f64>>,
    /// Multiplicative Gaussian noise on the conv and linear weights of every
    /// training forward pass (training for low-precision or analog hardware);
    /// the optimiser updates the clean weights.
    pub weight_noise: Option<WeightNoiseConfig>,
    /// The noise every validation is scored under (absent: clean inputs and weights).
    pub validation_noise: Option<EvalNoise>,
    /// Validate every this many steps (and at the end); 0 validates only at the end.
    #[serde(alias = "val_every")]
    pub validate_every: u64,
    /// Write a `metrics.jsonl` training row every this many steps.
    pub log_every: u64,
    /// Seed of parameter initialisation and noise.
    pub seed: u64,
    /// Compute threads; absent means one per core.
    pub threads: Option<usize>,
    /// Steps excluded from the steady-state throughput in `summary.json`.
    pub throughput_warmup_steps: u64,
    /// Where this process computes: the CPU, its GPU (`LOCAL_RANK` picks which
    /// one), or whichever this machine has.
    pub device: DeviceKind,
    /// What averages gradients across the ranks of a data-parallel group.
    pub backend: CollectiveBackend,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            accumulate_steps: 1,
            lr: 3e-3,
            warmup_steps: 50,
            decay: DecayConfig::default(),
            optimizer: OptimizerConfig::default(),
            grad_clip_norm: Some(5.0),
            compression: Compression::None,
            bucket_mib: 25.0,
            topk: None,
            local_sgd: None,
            class_weights: None,
            weight_noise: None,
            validation_noise: None,
            validate_every: 200,
            log_every: 10,
            seed: 42,
            threads: None,
            throughput_warmup_steps: 5,
            device: DeviceKind::Auto,
            backend: CollectiveBackend::Auto,
        }
    }
}

impl TrainConfig {
    /// Checks of the `train` section, with what it asks of the model and the checkpoints.
    pub fn validate(
        &self,
        m: &ModelConfig,
        checkpoint: &CheckpointConfig,
    ) -> Result<(), ConfigError> {
        if self.steps == 0 {
            return Err(ConfigError::invalid("train.steps", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::invalid(
                "train.batch_size",
                "must be at least 1",
            ));
        }
        if self.accumulate_steps == 0 {
            return Err(ConfigError::invalid(
                "train.accumulate_steps",
                "must be at least 1 (1 means no accumulation)",
            ));
        }
        check_positive("train.lr", self.lr)?;
        self.decay.validate()?;
        self.optimizer.validate()?;
        if let Some(c) = self.grad_clip_norm {
            check_positive("train.grad_clip_norm", c)?;
        }
        if let Some(w) = &self.class_weights {
            if w.len() != m.classes {
                return Err(ConfigError::invalid(
                    "train.class_weights",
                    format!(
                        "has {} entries but model.classes is {}; give one weight per class",
                        w.len(),
                        m.classes
                    ),
                ));
            }
            for (i, &x) in w.iter().enumerate() {
                check_non_negative(&format!("train.class_weights[{i}]"), x)?;
            }
            if w.iter().all(|&x| x == 0.0) {
                return Err(ConfigError::invalid(
                    "train.class_weights",
                    "at least one class weight must be positive",
                ));
            }
        }
        if let Some(n) = &self.weight_noise {
            check_non_negative("train.weight_noise.sigma", n.sigma)?;
        }
        if let Some(n) = &self.validation_noise {
            n.validate("train.validation_noise")?;
        }
        if !(self.bucket_mib.is_finite() && self.bucket_mib >= 0.001) {
            return Err(ConfigError::invalid(
                "train.bucket_mib",
                "must be at least 0.001 (MiB per all-reduce bucket; 25 is PyTorch's default)",
            ));
        }
        if self.backend == CollectiveBackend::Nccl && self.device == DeviceKind::Cpu {
            return Err(ConfigError::invalid(
                "train.backend",
                "nccl all-reduces GPU memory, but train.device is cpu; set train.device to cuda or auto, or train.backend to tcp",
            ));
        }
        if let Some(k) = &self.topk {
            if self.device == DeviceKind::Cuda || self.backend == CollectiveBackend::Nccl {
                return Err(ConfigError::invalid(
                    "train.topk",
                    "top-k sparsification runs on the CPU only; use train.compression (bf16 or fp16) on GPUs, or train.device: cpu",
                ));
            }
            if !(k.ratio > 0.0 && k.ratio <= 1.0) {
                return Err(ConfigError::invalid(
                    "train.topk.ratio",
                    "must be in (0, 1], e.g. 0.01",
                ));
            }
            if self.compression != Compression::None || self.local_sgd.is_some() {
                return Err(ConfigError::invalid(
                    "train.topk",
                    "cannot be combined with train.compression or train.local_sgd; choose one way to reduce traffic",
                ));
            }
        }
        if let Some(l) = &self.local_sgd {
            if l.every == 0 {
                return Err(ConfigError::invalid(
                    "train.local_sgd.every",
                    "must be at least 1 (1 synchronises every step)",
                ));
            }
            if let Some(o) = &l.outer {
                check_positive("train.local_sgd.outer.lr", o.lr)?;
                if !(0.0..1.0).contains(&o.momentum) {
                    return Err(ConfigError::invalid(
                        "train.local_sgd.outer.momentum",
                        "must be in [0, 1)",
                    ));
                }
            }
            if !checkpoint.every.is_multiple_of(l.every) {
                return Err(ConfigError::invalid(
                    "checkpoint.every",
                    format!(
                        "must be a multiple of train.local_sgd.every ({}): checkpoints are taken when ranks agree",
                        l.every
                    ),
                ));
            }
        }
        if self.log_every == 0 {
            return Err(ConfigError::invalid(
                "train.log_every",
                "must be at least 1",
            ));
        }
        if self.threads == Some(0) {
            return Err(ConfigError::invalid(
                "train.threads",
                "must be at least 1, or left out for one per core",
            ));
        }
        Ok(())
    }
}

/// Where a trainer process computes (`train.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when this trainer is built with it, the NVIDIA driver loads and a
    /// GPU is visible; otherwise the CPU.
    #[default]
    Auto,
    /// The CPU, with Trainyard's own kernels.
    Cpu,
    /// NVIDIA GPU number `LOCAL_RANK`; refused at start where there is none.
    Cuda,
}

/// What averages gradients across ranks (`train.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL when the process computes on a GPU, the TCP ring otherwise.
    #[default]
    Auto,
    /// NVIDIA NCCL on device memory (GPU training only).
    Nccl,
    /// Trainyard's ring all-reduce over TCP, through host memory.
    Tcp,
}

/// Gradient compression on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Full f32 gradients.
    #[default]
    None,
    /// IEEE half precision (gradients are divided by the world size first,
    /// so the sums stay in range).
    Fp16,
    /// bfloat16.
    Bf16,
}

/// Top-k gradient sparsification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopKConfig {
    /// Fraction of gradient entries each rank sends per step.
    pub ratio: f64,
}

/// Local SGD (delayed synchronisation of parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSgdConfig {
    /// Steps between parameter synchronisations (H).
    pub every: u64,
    /// Apply the averaged change through an outer optimiser (DiLoCo); absent
    /// means plain parameter averaging.
    #[serde(default)]
    pub outer: Option<OuterConfig>,
}

/// The outer optimiser of local SGD: SGD with (Nesterov) momentum on the
/// pseudo-gradient `anchor − average` (DiLoCo's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OuterConfig {
    /// Outer learning rate.
    pub lr: f64,
    /// Outer momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
            nesterov: true,
        }
    }
}

/// Checkpoint cadence and retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (and at the end); 0 only at the end.
    pub every: u64,
    /// Number of most recent checkpoints to keep.
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 200,
            keep_last: 3,
        }
    }
}

impl CheckpointConfig {
    /// Checks of the `checkpoint` section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.keep_last == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.keep_last",
                "must be at least 1 so that a run can be resumed",
            ));
        }
        Ok(())
    }
}

/// Samples of `n` held out for validation: `round(n * validation_fraction)`, at
/// least one when the fraction is positive and `n > 1`, never all of them.
/// (Shared with the operator, which turns epochs into steps.)
pub fn validation_count(n: usize, validation_fraction: f64) -> usize {
    let n_val = (n as f64 * validation_fraction).round() as usize;
    if validation_fraction > 0.0 && n > 1 {
        n_val.clamp(1, n - 1)
    } else {
        n_val.min(n)
    }
}

impl TrainerConfig {
    /// Reads `path` (YAML or JSON), applies `key=value` overrides, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses a document (YAML or JSON) that came from `origin` (a file, or a
    /// name such as the `TRAINYARD_CONFIG` variable), applies overrides, and validates.
    pub fn parse(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        // YAML is a superset of JSON, so one parser serves both.
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_owned(),
                message: e.to_string(),
            })?;
        Self::from_value(value, overrides)
    }

    /// Builds a config from an already-parsed document plus overrides, and validates it.
    pub fn from_value(
        mut value: serde_yaml::Value,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        let config: Self =
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Schema {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks that types alone cannot express, section by section
    /// (each next to its section). The first problem wins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.data.validate(&self.model)?;
        self.train.validate(&self.model, &self.checkpoint)?;
        self.checkpoint.validate()?;
        if let Some(f) = &self.federated {
            f.validate(self.model.classes)?;
        }
        if let Some(p) = &self.peft {
            p.validate()?;
            if self.federated.is_some() {
                return Err(ConfigError::invalid(
                    "peft",
                    "cannot be combined with federated (yet); fine-tune in one place",
                ));
            }
        }
        Ok(())
    }
}

fn check_positive(field: &str, x: f64) -> Result<(), ConfigError> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be a positive number, got {x}"),
        ))
    }
}

fn check_non_negative(field: &str, x: f64) -> Result<(), ConfigError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be a non-negative number, got {x}"),
        ))
    }
}

/// Applies one `a.b.c=value` override. The value is parsed as YAML, so
/// `train.steps=200`, `model.decoder=nearest` and `model.widths=[8,16]` all work.
/// Missing intermediate sections are created; whether the key exists at all is
/// decided later by the typed deserialization, which names unknown keys.
pub fn apply_override(root: &mut serde_yaml::Value, arg: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override {
        arg: arg.to_owned(),
        message: message.to_owned(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value, e.g. train.steps=200"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(err("the key must be a dotted path like train.batch_size"));
    }
    let value: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| err(&format!("the value is not valid YAML: {e}")))?;
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().ok_or_else(|| {
            err(&format!(
                "`{}` is not a section, so `{part}` cannot be set inside it",
                parts[..i].join(".")
            ))
        })?;
        let k = serde_yaml::Value::String((*part).to_owned());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    unreachable!("a non-empty key has a last part")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str, overrides: &[&str]) -> Result<TrainerConfig, ConfigError> {
        let value = serde_yaml::from_str(yaml).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainerConfig::from_value(value, &overrides)
    }

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Schema { field, .. } | ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn empty_document_gives_defaults() {
        assert_eq!(load("", &[]).unwrap(), TrainerConfig::default());
    }

    #[test]
    fn keys_renamed_to_the_specs_names_still_load_under_their_old_names() {
        let old = load(
            "data: {val_fraction: 0.2}\ntrain: {bucket_mb: 4, val_every: 7}\nfederated: {max_update_mb: 8, privacy: {adaptive: {target_quantile: 0.4, lr: 0.1}}}",
            &[],
        )
        .unwrap();
        let new = load(
            "data: {validation_fraction: 0.2}\ntrain: {bucket_mib: 4, validate_every: 7}\nfederated: {max_update_mib: 8, privacy: {adaptive_clipping: {target_quantile: 0.4, lr: 0.1}}}",
            &[],
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(new.train.bucket_mib, 4.0);
        assert_eq!(new.federated.unwrap().max_update_mib, 8.0);
    }

    #[test]
    fn uncertainty_weighting_needs_two_losses_and_owns_their_balance() {
        let e = load("model: {task_weighting: uncertainty}", &[]).unwrap_err();
        assert_eq!(field_of(e), "model.task_weighting");
        let learned = "model: {task_weighting: uncertainty, boundary_head: true}";
        let c = load(learned, &[]).unwrap();
        assert_eq!(c.model.task_weighting, TaskWeighting::Uncertainty);
        let e = load(learned, &["model.boundary_loss_weight=3"]).unwrap_err();
        assert_eq!(field_of(e), "model.boundary_loss_weight");
        let e = load("model: {task_weighting: gradnorm}", &[]).unwrap_err();
        assert!(field_of(e).starts_with("model"));
    }

    #[test]
    fn overrides_reach_nested_keys_and_parse_yaml_values() {
        let c = load(
            "train: {steps: 5}",
            &[
                "train.steps=200",
                "train.batch_size=4",
                "model.decoder=nearest",
                "model.widths=[8, 16]",
                "train.optimizer.kind=sgd",
                "train.optimizer.nesterov=true",
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 200);
        assert_eq!(c.train.batch_size, 4);
        assert_eq!(c.model.decoder, DecoderKind::Nearest);
        assert_eq!(c.model.widths, vec![8, 16]);
        assert!(matches!(
            c.train.optimizer,
            OptimizerConfig::Sgd(SgdConfig { nesterov: true, .. })
        ));
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            field_of(load("train: {stepz: 5}", &[]).unwrap_err()),
            "train.stepz"
        );
        let e = load("", &["model.widht=3"]).unwrap_err();
        assert!(e.to_string().contains("widht"), "{e}");
        let e = load("train: {optimizer: {kind: adamw, momentum: 0.9}}", &[]).unwrap_err();
        assert!(e.to_string().contains("momentum"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        assert_eq!(
            field_of(load("train: {batch_size: lots}", &[]).unwrap_err()),
            "train.batch_size"
        );
        assert_eq!(
            field_of(load("train: {lr: -1}", &[]).unwrap_err()),
            "train.lr"
        );
        assert_eq!(
            field_of(load("", &["train.batch_size=0"]).unwrap_err()),
            "train.batch_size"
        );
        assert_eq!(
            field_of(load("", &["train.steps=-3"]).unwrap_err()),
            "train.steps"
        );
    }

    #[test]
    fn semantic_errors_name_the_field() {
        for (yaml, field) in [
            ("model: {widths: []}", "model.widths"),
            ("model: {widths: [8, 0]}", "model.widths[1]"),
            ("model: {classes: 5}", "model.classes"),
            ("data: {shapes: {image_size: 60}}", "data.shapes.image_size"),
            ("data: {folder: {path: x}}", "data"),
            ("data: {shapes: null}", "data"),
            (
                "data: {validation_fraction: 1.0}",
                "data.validation_fraction",
            ),
            ("data: {noise: {probability: 2}}", "data.noise.probability"),
            ("train: {class_weights: [1, 1]}", "train.class_weights"),
            (
                "train: {weight_noise: {sigma: -0.1}}",
                "train.weight_noise.sigma",
            ),
            (
                "train: {validation_noise: {input_sigma: .nan}}",
                "train.validation_noise.input_sigma",
            ),
            (
                "train: {validation_noise: {weight_sigma: -1}}",
                "train.validation_noise.weight_sigma",
            ),
            (
                "train: {optimizer: {kind: sgd, momentum: 0, nesterov: true}}",
                "train.optimizer.nesterov",
            ),
            (
                "train: {decay: {kind: step, every: 0, gamma: 0.5}}",
                "train.decay.every",
            ),
            ("train: {threads: 0}", "train.threads"),
            ("checkpoint: {keep_last: 0}", "checkpoint.keep_last"),
            ("train: {accumulate_steps: 0}", "train.accumulate_steps"),
            ("train: {bucket_mib: 0}", "train.bucket_mib"),
            ("train: {topk: {ratio: 0}}", "train.topk.ratio"),
            (
                "train: {topk: {ratio: 0.1}, compression: bf16}",
                "train.topk",
            ),
            ("train: {device: tpu}", "train.device"),
            ("train: {device: cpu, backend: nccl}", "train.backend"),
            ("train: {device: cuda, topk: {ratio: 0.1}}", "train.topk"),
            ("train: {backend: nccl, topk: {ratio: 0.1}}", "train.topk"),
            ("train: {local_sgd: {every: 0}}", "train.local_sgd.every"),
            ("train: {local_sgd: {every: 3}}", "checkpoint.every"),
            (
                "train: {local_sgd: {every: 2, outer: {momentum: 1.0}}}",
                "train.local_sgd.outer.momentum",
            ),
        ] {
            assert_eq!(field_of(load(yaml, &[]).unwrap_err()), field, "{yaml}");
        }
    }

    #[test]
    fn malformed_overrides_are_rejected() {
        for bad in ["train.steps", "=3", "train..steps=3", "train.steps.x=3"] {
            let e = load("train: {steps: 5}", &[bad]).unwrap_err();
            assert!(matches!(e, ConfigError::Override { .. }), "{bad}: {e}");
        }
    }
}
