//! `TrainingJob.spec`: what the user asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, PodSecurityContext, ResourceRequirements,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults as d;
use super::status::TrainingJobStatus;

/// A training run on the cluster: data-parallel training, federated learning,
/// or parameter-efficient fine-tuning of SegNet segmentation models.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "trainyard.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    plural = "trainingjobs",
    shortname = "tj",
    category = "trainyard",
    namespaced,
    status = "TrainingJobStatus",
    derive = "PartialEq",
    cel,
    doc = "A training run: data-parallel training, federated learning, or parameter-efficient fine-tuning of a SegNet segmentation model.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"}"#,
    printcolumn = r#"{"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.mode != 'Distributed' || (has(self.distributed) && !has(self.federated) && !has(self.peft))").message("mode Distributed needs the `distributed` section and no `federated` or `peft` section"),
    validation = Rule::new("self.mode != 'Federated' || (has(self.federated) && !has(self.distributed) && !has(self.peft))").message("mode Federated needs the `federated` section and no `distributed` or `peft` section"),
    validation = Rule::new("self.mode != 'Peft' || (has(self.peft) && !has(self.distributed) && !has(self.federated))").message("mode Peft needs the `peft` section and no `distributed` or `federated` section"),
    validation = Rule::new("!has(self.data) || has(self.data.shapes) != has(self.data.folder)").message("set exactly one of data.shapes and data.folder").field_path(".data"),
    validation = Rule::new("!has(self.training) || !(has(self.training.steps) && has(self.training.epochs))").message("set at most one of training.steps and training.epochs").field_path(".training"),
    validation = Rule::new("!has(self.training) || !has(self.training.optimizer) || self.training.optimizer.type == 'Sgd' || (!has(self.training.optimizer.momentum) && !has(self.training.optimizer.nesterov))").message("momentum and nesterov apply to optimizer type Sgd only").field_path(".training.optimizer"),
    validation = Rule::new("!has(self.training) || !has(self.training.optimizer) || self.training.optimizer.type == 'AdamW' || (!has(self.training.optimizer.beta1) && !has(self.training.optimizer.beta2) && !has(self.training.optimizer.eps))").message("beta1, beta2 and eps apply to optimizer type AdamW only").field_path(".training.optimizer"),
    validation = Rule::new("!has(self.training) || !has(self.training.schedule) || self.training.schedule.decay != 'Step' || (has(self.training.schedule.stepEvery) && has(self.training.schedule.gamma))").message("decay Step needs stepEvery and gamma").field_path(".training.schedule"),
    validation = Rule::new("!has(self.distributed) || self.distributed.backend != 'Nccl' || self.distributed.gpusPerWorker > 0").message("backend Nccl needs gpusPerWorker >= 1").field_path(".distributed.backend"),
    validation = Rule::new("!has(self.distributed) || !has(self.distributed.localSgd) || self.distributed.accumulateSteps == 1").message("localSgd and accumulateSteps > 1 cannot be combined").field_path(".distributed.localSgd"),
    validation = Rule::new("!has(self.distributed) || !has(self.distributed.compression) || (self.distributed.compression.type == 'TopK') == has(self.distributed.compression.ratio)").message("ratio is required with compression type TopK and allowed only there").field_path(".distributed.compression"),
    validation = Rule::new("!has(self.federated) || self.federated.minClients <= self.federated.clients").message("minClients must not exceed clients").field_path(".federated.minClients"),
    validation = Rule::new("!has(self.federated) || !has(self.federated.serverOptimizer) || self.federated.serverOptimizer.type != 'Sgd' || (!has(self.federated.serverOptimizer.beta1) && !has(self.federated.serverOptimizer.beta2) && !has(self.federated.serverOptimizer.tau) && !has(self.federated.serverOptimizer.biasCorrection))").message("beta1, beta2, tau and biasCorrection apply to serverOptimizer type Adam or Yogi only").field_path(".federated.serverOptimizer"),
    validation = Rule::new("!has(self.federated) || !has(self.federated.serverOptimizer) || self.federated.serverOptimizer.type == 'Sgd' || !has(self.federated.serverOptimizer.momentum)").message("momentum applies to serverOptimizer type Sgd only").field_path(".federated.serverOptimizer"),
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingJobSpec {
    /// What kind of training this is. Exactly the matching section
    /// (`distributed`, `federated` or `peft`) must be set.
    pub mode: Mode,
    /// Container image with the `trainyard-trainer` binary.
    #[schemars(length(min = 1))]
    pub image: String,
    /// The network to train: its family, widths, decoder, classes and optional heads.
    #[serde(default)]
    pub model: ModelSpec,
    /// Where samples come from, how they are split, and input noise.
    #[serde(default)]
    pub data: DataSpec,
    /// Length of training, batch size, optimiser, learning-rate schedule.
    #[serde(default)]
    pub training: TrainingSpec,
    /// Data-parallel training across workers (mode Distributed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedSpec>,
    /// An aggregator and clients that keep their data (mode Federated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedSpec>,
    /// Train a small adapter on a frozen base checkpoint (mode Peft).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft: Option<PeftSpec>,
    /// Checkpoint cadence, retention and location.
    #[serde(default)]
    pub checkpoints: CheckpointSpec,
    /// CPU and memory of each replica's trainer container. GPUs come from
    /// `distributed.gpusPerWorker`, not from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Additions to every replica's pod: labels, scheduling, volumes, env.
    #[serde(default)]
    pub template: PodTemplateOverrides,
    /// Restarts, deadlines, clean-up and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,
}

/// The kind of training.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Data-parallel training: every worker trains on its shard and gradients
    /// (or parameters) are averaged.
    Distributed,
    /// Federated learning: clients train on their own data, an aggregator
    /// combines their updates.
    Federated,
    /// Parameter-efficient fine-tuning (LoRA) of a base checkpoint.
    Peft,
}

impl TrainingJobSpec {
    /// Worker pods of a data-parallel job (Distributed, Peft); 1 otherwise.
    pub fn worker_pods(&self) -> u32 {
        match self.mode {
            Mode::Distributed => self.distributed.as_ref().map_or(1, |d| d.workers),
            Mode::Peft => self.peft.as_ref().map_or(1, |p| p.workers),
            Mode::Federated => 1,
        }
    }

    /// GPUs each worker pod requests (`nvidia.com/gpu`); federated replicas
    /// train on the CPU.
    pub fn gpus_per_worker(&self) -> u32 {
        match self.mode {
            Mode::Distributed => self.distributed.as_ref().map_or(0, |d| d.gpus_per_worker),
            Mode::Peft => self.peft.as_ref().map_or(0, |p| p.gpus_per_worker),
            Mode::Federated => 0,
        }
    }

    /// Data-parallel ranks that train (and share each optimiser step): one
    /// process per GPU, or one on the CPU, in every worker pod.
    pub fn world_size(&self) -> u32 {
        match self.mode {
            // Each client trains alone; the aggregator does not train.
            Mode::Federated => 1,
            Mode::Distributed | Mode::Peft => self.worker_pods() * self.gpus_per_worker().max(1),
        }
    }
}

impl Mode {
    /// Every mode.
    pub const ALL: [Self; 3] = [Self::Distributed, Self::Federated, Self::Peft];

    /// The name used in the spec, metrics and history.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Distributed => "Distributed",
            Self::Federated => "Federated",
            Self::Peft => "Peft",
        }
    }
}

/// The SegNet family of encoder-decoder segmentation networks.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ModelSpec {
    /// The network family to train; SegNet (the default and only one) is an
    /// encoder-decoder whose decoder reuses the encoder's pooling indices.
    pub architecture: Architecture,
    /// Channels of each encoder stage; the decoder mirrors them.
    #[schemars(length(min = 1, max = 8), inner(range(min = 1, max = 4096)))]
    pub widths: Vec<u32>,
    /// 3x3 conv, batch-norm, ReLU blocks per stage.
    #[schemars(range(min = 1, max = 8))]
    pub convs_per_stage: u32,
    /// How the decoder doubles the resolution at each stage: Unpool (the
    /// default) places values at the encoder's argmax positions, Nearest
    /// repeats them.
    pub decoder: Decoder,
    /// Number of semantic classes the model predicts, background included (4
    /// for the shapes dataset).
    #[schemars(range(min = 2, max = 255))]
    pub classes: u32,
    /// Channels of each input image: 3 for RGB, 1 for greyscale.
    #[schemars(range(min = 1, max = 64))]
    pub in_channels: u32,
    /// Also train a per-pixel instance-boundary head (enables panoptic quality).
    pub boundary_head: bool,
    /// Weight of the boundary loss relative to the segmentation loss, under
    /// `taskWeighting: Fixed`.
    #[schemars(range(min = 0.0))]
    pub boundary_loss_weight: f64,
    /// How the segmentation and boundary losses are balanced: Fixed (the
    /// default) by `boundaryLossWeight`, Uncertainty by a learned
    /// log-variance per task (Kendall, Gal & Cipolla 2018; needs
    /// `boundaryHead`).
    pub task_weighting: TaskWeighting,
    /// A squeeze-excitation block (two linear layers) re-weights the
    /// bottleneck's channels; PEFT can target its `fc1`/`fc2`.
    pub squeeze_excitation: bool,
}

/// The network family to train; SegNet (the default and only one) is an
/// encoder-decoder whose decoder reuses the encoder's pooling indices.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Architecture {
    /// SegNet: encoder max-pooling saves argmax indices, the decoder unpools with them.
    #[default]
    SegNet,
}

/// How the decoder doubles the resolution at each stage: Unpool (the
/// default) places values at the encoder's argmax positions, Nearest
/// repeats them.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Decoder {
    /// Max-unpooling with the encoder's argmax indices (SegNet).
    #[default]
    Unpool,
    /// Nearest-neighbour 2x upsampling.
    Nearest,
}

/// How the segmentation and boundary losses are balanced: Fixed (the
/// default) by `boundaryLossWeight`, Uncertainty by a learned log-variance
/// per task (Kendall, Gal & Cipolla 2018; needs `boundaryHead`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TaskWeighting {
    /// `segmentation + boundaryLossWeight * boundary`.
    #[default]
    Fixed,
    /// `exp(-s1)*segmentation + s1/2 + exp(-s2)*boundary + s2/2`, with the
    /// log-variances `s` learned like every other parameter.
    Uncertainty,
}

/// Where samples come from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DataSpec {
    /// Synthetic shapes generated deterministically by every replica (no
    /// download, no volume). Set exactly one of `shapes` and `folder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shapes: Option<ShapesData>,
    /// Images and masks in a directory of the container (mount it through
    /// `template.volumes` and `template.volumeMounts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folder: Option<FolderData>,
    /// Fraction of samples held out for validation.
    #[schemars(range(min = 0.0, max = 0.9))]
    pub validation_fraction: f64,
    /// Seed of the train/validation split and the per-epoch shuffle.
    pub seed: u64,
    /// Gaussian noise added to training inputs (training with noise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<NoiseSpec>,
}

/// The synthetic shapes dataset: circles, rectangles and triangles on noise.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ShapesData {
    /// Number of synthetic samples to generate, training and validation
    /// together (data.validationFraction of them are held out).
    #[schemars(range(min = 2, max = 10000000))]
    pub samples: u64,
    /// Image height and width in pixels (a multiple of 2 per encoder stage).
    #[schemars(range(min = 8, max = 4096))]
    pub image_size: u32,
    /// Largest number of shapes drawn on one image; each image gets between one
    /// and this many.
    #[schemars(range(min = 1, max = 64))]
    pub max_shapes: u32,
    /// Generator seed: the same seed gives the same samples on every replica.
    pub seed: u64,
    /// Photographic negatives of the same scenes (a domain shift for fine-tuning).
    #[serde(default)]
    pub invert: bool,
    /// Gaussian sensor noise σ (0-255 units) on every pixel of every sample,
    /// validation included: a noisier camera than the base was trained on.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 255.0))]
    pub sensor_noise: f64,
}

/// A dataset directory: `images/*.png|jpg` and `masks/*.png` with equal file stems.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FolderData {
    /// Absolute path of the dataset directory inside the container (or on this
    /// machine for `trainyard local`).
    #[schemars(length(min = 1))]
    pub path: String,
}

/// Additive Gaussian input noise.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NoiseSpec {
    /// Standard deviation in units of normalised intensity (0..1).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub sigma: f64,
    /// Probability that a training sample gets noise.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub probability: f64,
}

/// Length of training and optimisation.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TrainingSpec {
    /// Optimiser steps. Set at most one of `steps` and `epochs`; with neither,
    /// 1000 steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub steps: Option<u64>,
    /// Passes over the training split, turned into steps from the dataset
    /// size, the global batch and the accumulation (needs `data.shapes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub epochs: Option<u64>,
    /// Samples in one forward/backward pass on each training process; the
    /// global batch is this times the processes times
    /// distributed.accumulateSteps.
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// The optimiser and its hyper-parameters (AdamW unless set).
    pub optimizer: OptimizerSpec,
    /// How the learning rate warms up from 0 and then decays over the run.
    pub schedule: ScheduleSpec,
    /// Seed of the parameter initialisation (adapters included) and of the
    /// training noise: the same seed and data give the same run.
    pub seed: u64,
    /// Clip gradients to this global L2 norm; 0 disables clipping.
    #[schemars(range(min = 0.0))]
    pub grad_clip_norm: f64,
    /// Per-class loss weights, one per `model.classes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<Vec<f64>>,
    /// Validate every this many steps (and at the end); 0 only at the end.
    pub validate_every: u64,
    /// Log a training row every this many steps.
    #[schemars(range(min = 1))]
    pub log_every: u64,
    /// Compute threads per replica; absent means one per available core.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub threads: Option<u32>,
    /// Where replicas compute. Auto: on their GPUs when the job requests
    /// them (`gpusPerWorker` > 0), otherwise on the CPU; Cuda requires
    /// GPUs and fails a replica that finds none; Cpu trains on the CPU.
    pub device: ComputeDevice,
    /// Multiplicative Gaussian noise on the conv and linear weights of every
    /// training forward pass, for a model that will run on low-precision or
    /// analog hardware; left out, training uses the clean weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_noise: Option<WeightNoiseSpec>,
    /// The noise every validation is scored under (inputs and weights), to
    /// see accuracy as a noisy deployment will; left out, validation is clean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_noise: Option<EvalNoiseSpec>,
}

/// Weight noise in training: each forward pass uses w·(1 + σ·ε), ε ~ N(0, 1),
/// drawn afresh every step from training.seed and the step; the optimiser
/// updates the clean weights.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightNoiseSpec {
    /// Relative standard deviation σ of each weight's noise (0.1: weights off
    /// by about 10%); 0 trains exactly as without noise.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub sigma: f64,
}

/// Noise a model is scored under, reproducible from its seed.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EvalNoiseSpec {
    /// Standard deviation of Gaussian noise added to every input pixel, in
    /// normalised intensity (0..1) (default 0, clean inputs).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub input_sigma: f64,
    /// Relative standard deviation of multiplicative Gaussian noise on the
    /// conv and linear weights, one draw per validation (default 0, clean
    /// weights).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub weight_sigma: f64,
    /// Seed of both draws: the same seed gives the same scores (default 0).
    pub seed: u64,
}

/// Where replicas compute.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// The requested GPUs when there are any, otherwise the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// NVIDIA GPUs (one trainer process per GPU).
    Cuda,
}

/// Optimiser and its hyper-parameters (PyTorch semantics).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// The optimisation algorithm: AdamW (decoupled weight decay) or Sgd (with
    /// momentum).
    #[serde(rename = "type")]
    pub kind: OptimizerKind,
    /// Learning rate reached at the end of the warm-up, from which the schedule
    /// decays.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub lr: f64,
    /// Weight decay (decoupled for AdamW, an L2 term for Sgd). Default 1e-4
    /// for AdamW, 0 for Sgd.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: Option<f64>,
    /// Sgd momentum factor (default 0.9).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum: Option<f64>,
    /// Sgd with Nesterov momentum (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    /// AdamW first-moment decay (default 0.9).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: Option<f64>,
    /// AdamW second-moment decay (default 0.999).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: Option<f64>,
    /// AdamW denominator epsilon (default 1e-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub eps: Option<f64>,
}

/// Optimiser algorithm.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    #[default]
    AdamW,
    /// Stochastic gradient descent with optional (Nesterov) momentum.
    Sgd,
}

/// Learning-rate schedule: linear warm-up, then decay.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ScheduleSpec {
    /// Steps of linear warm-up from 0 to the peak learning rate.
    pub warmup_steps: u64,
    /// How the learning rate falls after the warm-up: Constant keeps it, Cosine
    /// anneals it to finalFactor times the peak, Step multiplies it by gamma
    /// every stepEvery steps.
    pub decay: Decay,
    /// Cosine: learning rate at the last step as a fraction of the peak.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub final_factor: f64,
    /// Step decay only: optimiser steps between two multiplications by gamma
    /// (required with decay Step).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub step_every: Option<u64>,
    /// Step decay only: factor in (0, 1] the learning rate is multiplied by
    /// every stepEvery steps (required with decay Step).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub gamma: Option<f64>,
}

/// How the learning rate falls after the warm-up: Constant keeps it, Cosine
/// anneals it to finalFactor times the peak, Step multiplies it by gamma
/// every stepEvery steps.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Decay {
    /// Cosine to `finalFactor` × peak at the last step.
    #[default]
    Cosine,
    /// Multiply by `gamma` every `stepEvery` steps.
    Step,
    /// Keep the peak.
    Constant,
}

/// Data-parallel training across workers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DistributedSpec {
    /// Worker replicas (one process each); worker 0 is rank 0.
    #[schemars(range(min = 1, max = 4096))]
    pub workers: u32,
    /// GPUs per worker pod (`nvidia.com/gpu`), 0 to 8. Each worker pod runs
    /// one trainer process per GPU, so the group has `workers × gpusPerWorker`
    /// ranks; 0 trains on the CPU with one process per pod.
    #[schemars(range(min = 0, max = 8))]
    pub gpus_per_worker: u32,
    /// All-reduce implementation: Auto picks Nccl with GPUs and Tcp without.
    pub backend: CollectiveBackend,
    /// Micro-batches per optimiser step, with one all-reduce per step
    /// (delayed synchronisation by gradient accumulation).
    #[schemars(range(min = 1, max = 4096))]
    pub accumulate_steps: u64,
    /// Local SGD: workers step on their own and synchronise parameters every
    /// `every` steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_sgd: Option<LocalSgdSpec>,
    /// How gradients are compressed before the all-reduce (none unless set):
    /// fewer bytes on the network for a small loss of precision.
    pub compression: CompressionSpec,
    /// Gradients are all-reduced in flat buckets of at most this many MiB.
    #[schemars(range(min = 0.001, max = 4096.0))]
    pub bucket_mib: f64,
    /// Port of rank 0's rendezvous store (MASTER_PORT).
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Seconds every worker waits for the whole group to join.
    #[schemars(range(min = 1, max = 86400))]
    pub join_timeout_seconds: u64,
    /// Seconds a collective may stall before a peer is declared dead and the
    /// worker exits with a retryable code.
    #[schemars(range(min = 1, max = 86400))]
    pub collective_timeout_seconds: u64,
}

/// All-reduce implementation.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CollectiveBackend {
    /// Nccl when `gpusPerWorker` > 0, otherwise Tcp.
    #[default]
    Auto,
    /// NVIDIA NCCL on GPUs.
    Nccl,
    /// Ring all-reduce over TCP on CPU.
    Tcp,
}

/// Local SGD (delayed parameter synchronisation).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalSgdSpec {
    /// Steps between parameter synchronisations (H).
    #[schemars(range(min = 1, max = 1000000))]
    pub every: u64,
    /// Apply the averaged change through an outer optimiser (DiLoCo); absent
    /// means plain parameter averaging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer: Option<OuterOptimizerSpec>,
}

/// Outer optimiser of local SGD: SGD with (Nesterov) momentum on the averaged change.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OuterOptimizerSpec {
    /// DiLoCo outer learning rate applied to the averaged parameter change
    /// every localSgd.every steps (0.7 in the DiLoCo paper).
    #[schemars(range(min = 0.0, max = 10.0))]
    pub lr: f64,
    /// DiLoCo outer momentum factor (0.9 in the DiLoCo paper).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum: f64,
    /// Whether the outer step uses Nesterov momentum (as DiLoCo does).
    pub nesterov: bool,
}

/// Gradient compression.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CompressionSpec {
    /// What goes on the wire: None (fp32), Fp16 or Bf16 (half the bytes), or
    /// TopK (only the largest entries, with error feedback; set ratio).
    #[serde(rename = "type")]
    pub kind: CompressionKind,
    /// TopK: fraction of gradient entries each worker sends per step (the
    /// rest is kept as error feedback).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: Option<f64>,
}

/// What goes on the wire: None (fp32), Fp16 or Bf16 (half the bytes), or
/// TopK (only the largest entries, with error feedback; set ratio).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressionKind {
    /// Full f32.
    #[default]
    None,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// Top-k sparsification with error feedback.
    TopK,
}

/// Federated learning: what the planner needs to lay out replicas.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FederatedSpec {
    /// Client replicas, each with its own data partition.
    #[schemars(range(min = 1, max = 10000))]
    pub clients: u32,
    /// Fewest client updates that complete a round.
    #[schemars(range(min = 1, max = 10000))]
    pub min_clients: u32,
    /// Federated rounds to run: in each, sampled clients train locally and the
    /// aggregator combines their updates into the global model.
    #[schemars(range(min = 1, max = 1000000))]
    pub rounds: u64,
    /// TCP port the aggregator serves clients on inside its pod.
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Optimiser steps each sampled client runs per round on its own data.
    #[schemars(range(min = 1))]
    pub local_steps: u64,
    /// Fraction of available clients sampled per round (Flower's `fraction_fit`).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub fraction: f64,
    /// Clients that must be polling before a round samples (default: minClients).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_available: Option<u32>,
    /// Seconds a round waits for enough available clients before it is retried.
    #[schemars(range(min = 1))]
    pub sampling_timeout_seconds: u64,
    /// Seconds sampled clients have to answer; late ones are dropped from the round.
    #[schemars(range(min = 1))]
    pub round_timeout_seconds: u64,
    /// Attempts of one round (too few clients) before the aggregator gives up.
    #[schemars(range(min = 1, max = 1000))]
    pub round_attempts: u32,
    /// How the aggregator combines the round's client updates (a weighted mean
    /// unless set; robust rules resist hostile clients).
    pub aggregation: AggregationSpec,
    /// How the combined update moves the global model.
    pub server_optimizer: ServerOptimizerSpec,
    /// FedProx proximal term μ (0 is FedAvg).
    #[schemars(range(min = 0.0))]
    pub proximal_mu: f64,
    /// Updates with a larger L2 norm are rejected as hostile.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_update_norm: Option<f64>,
    /// Largest client update body the aggregator reads, in MiB; a bigger one is
    /// refused before it is read (the model's own largest valid update bounds
    /// it further).
    #[schemars(range(min = 0.0))]
    pub max_update_mib: f64,
    /// Central differential privacy: updates are clipped and Gaussian noise is
    /// added to their mean, and the ε spent is reported (off unless set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpec>,
    /// How the built-in dataset is split across clients.
    pub partition: PartitionSpec,
    /// Evaluate the global model every this many rounds (and at the end); 0 only at the end.
    pub eval_every: u64,
    /// Serve the federation endpoint over HTTPS (on a cluster; local runs
    /// stay on loopback HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<FederatedTlsSpec>,
}

/// TLS of the federation endpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederatedTlsSpec {
    /// A Secret in the job's namespace with `tls.crt` and `tls.key` (the
    /// aggregator's certificate, valid for `<job>-aggregator-0.<job>.<namespace>.svc`)
    /// and `ca.crt` (what clients trust); cert-manager's Certificate writes this shape.
    #[schemars(length(min = 1))]
    pub secret_name: String,
}

/// Aggregation rule.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AggregationSpec {
    /// The aggregation rule: Mean (weighted by examples, FedAvg), Median,
    /// TrimmedMean, or Krum (Byzantine-robust).
    #[serde(rename = "type")]
    pub kind: AggregationKind,
    /// TrimmedMean: fraction cut from each end (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub beta: Option<f64>,
    /// Krum: Byzantine clients tolerated (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<u32>,
    /// Krum: updates kept and averaged (default 1; more is Multi-Krum).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep: Option<u32>,
}

/// Aggregation rules.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AggregationKind {
    /// Mean weighted by examples (FedAvg).
    #[default]
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Krum / Multi-Krum.
    Krum,
}

/// Server optimiser.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerOptimizerSpec {
    /// Algorithm: Sgd (FedAvg, FedAvgM with momentum), Adam (FedAdam), Yogi (FedYogi).
    #[serde(rename = "type")]
    pub kind: ServerOptimizerKind,
    /// Server learning rate (default 1 for Sgd, 0.1 for Adam and Yogi).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub lr: Option<f64>,
    /// Sgd server momentum (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum: Option<f64>,
    /// Adam/Yogi first-moment decay (default 0.9).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: Option<f64>,
    /// Adam/Yogi second-moment decay (default 0.99).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: Option<f64>,
    /// Adam/Yogi adaptivity τ (default 1e-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub tau: Option<f64>,
    /// Adam/Yogi step-size bias correction: Flower (η·√(1 − β2^(t+1))/(1 − β1^(t+1))
    /// in round t, as Flower's FedAdam) or None (Reddi et al.'s rule). Default:
    /// what Flower does for the rule (Flower for Adam, None for Yogi).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_correction: Option<BiasCorrectionSpec>,
}

/// Bias correction of an adaptive server optimiser's step size.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasCorrectionSpec {
    /// As Flower's FedAdam.
    Flower,
    /// As Reddi et al. (2020), Algorithm 2.
    None,
}

/// Server optimisers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServerOptimizerKind {
    /// FedAvg / FedAvgM.
    #[default]
    Sgd,
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
}

/// Central differential privacy: updates are clipped and Gaussian noise is
/// added to their mean, and the ε spent is reported (off unless set).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrivacySpec {
    /// Clip every update to this L2 norm (C).
    #[schemars(range(min = 0.0))]
    pub clip_norm: f64,
    /// Noise multiplier z (σ = z·C/m on the mean of m updates).
    #[schemars(range(min = 0.0))]
    pub noise_multiplier: f64,
    /// δ of the (ε, δ) reported.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub delta: f64,
    /// Adapt C towards a quantile of update norms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClippingSpec>,
}

/// Adaptive clipping.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdaptiveClippingSpec {
    /// Fraction of updates that should be left unclipped.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub target_quantile: f64,
    /// Learning rate of log C.
    #[schemars(range(min = 0.0))]
    pub lr: f64,
}

/// How data is split across clients.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PartitionSpec {
    /// Iid, Dirichlet (per-class proportions from Dirichlet(alpha)), Classes
    /// (classesPerClient classes each), or Own (each client mounts its own data).
    #[serde(rename = "type")]
    pub kind: PartitionKind,
    /// Dirichlet concentration (default 0.5; smaller is more skewed).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub alpha: Option<f64>,
    /// Classes: classes per client (default 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub classes_per_client: Option<u32>,
    /// Seed of the split of samples among clients: the same seed gives each
    /// client the same data.
    pub seed: u64,
}

/// Partitioning schemes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PartitionKind {
    /// Equal random shares.
    #[default]
    Iid,
    /// Dirichlet(α) over classes.
    Dirichlet,
    /// A few classes per client.
    Classes,
    /// Each client's own data, unsplit.
    Own,
}

/// Parameter-efficient fine-tuning: adapter basics.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeftSpec {
    /// safetensors checkpoint with the base model's weights, inside the container.
    #[schemars(length(min = 1))]
    pub base_checkpoint: String,
    /// LoRA rank r: the inner dimension of the low-rank update B·A added to
    /// each targeted weight; larger ranks train more parameters.
    #[serde(default = "d::lora_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// LoRA alpha: the update B·A is scaled by α/r (α/√r with useRslora).
    #[serde(default = "d::lora_alpha")]
    #[schemars(range(min = 0.0))]
    pub alpha: f64,
    /// Module names (exact or dotted suffix, as PEFT matches them) that get
    /// adapters; default every 3x3 convolution (`conv`).
    #[serde(default = "d::lora_targets")]
    pub target_modules: Vec<String>,
    /// Modules trained fully and saved with the adapter (e.g. `head` for new classes).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Dropout probability on the adapter's input during training (0 disables
    /// it).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub dropout: f64,
    /// Scale α/√r (rsLoRA) instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: also train a magnitude per output channel of each adapted layer.
    #[serde(default)]
    pub use_dora: bool,
    /// Worker pods that fine-tune data-parallel, each on its shard of the data.
    #[serde(default = "d::one")]
    #[schemars(range(min = 1, max = 4096))]
    pub workers: u32,
    /// GPUs per worker pod (`nvidia.com/gpu`), 0 to 8, one trainer process
    /// per GPU, as in `distributed.gpusPerWorker`.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub gpus_per_worker: u32,
}

/// Checkpoint cadence, retention and location.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Checkpoint every this many steps (and at the end); 0 only at the end.
    pub interval_steps: u64,
    /// How many of the newest checkpoints each replica keeps; older ones are
    /// deleted after a new one is written.
    #[schemars(range(min = 1, max = 1000))]
    pub keep: u32,
    /// Directory inside the container for run outputs; each replica writes
    /// below `<location>/<job>-<uid>/<replica>`, and a gang restart resumes
    /// from what worker 0 wrote there (a job deleted and recreated under the
    /// same name has a new uid, so it starts afresh). Mount a persistent volume at this path, or a
    /// restart starts over. `trainyard local` uses its `--out` directory instead.
    #[schemars(length(min = 1))]
    pub location: String,
}

/// Additions to every replica's pod.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PodTemplateOverrides {
    /// Extra pod labels (Trainyard's own labels win on conflict).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every pod of the job (e.g. for a service mesh or a
    /// log shipper).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node labels a node must carry to run the job's pods (e.g. a GPU type).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the job's pods, e.g. for the taints of GPU nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity of the job's pods, as in a Pod spec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Pod volumes (datasets, checkpoint storage).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Mounts of `volumes` into the trainer container.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Extra environment variables of the trainer container. Names Trainyard
    /// sets itself (RANK, WORLD_SIZE, MASTER_ADDR, TRAINYARD_*, ...) are refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Secrets holding registry credentials for pulling spec.image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Service account the job's pods run as (its token is not mounted unless
    /// template.automountServiceAccountToken is true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Priority class of the job's pods, which decides their scheduling order
    /// and preemption.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Scheduler of the pods (e.g. volcano); gang gating is then left to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// The pods' security context. Default: Pod Security `restricted`
    /// (non-root as 65532, the images' user; group 65532 owns mounted
    /// volumes; seccomp RuntimeDefault). Given, it replaces the default whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// The trainer container's security context. Default: no privilege
    /// escalation, every capability dropped, read-only root filesystem
    /// (the run directory, /tmp and /dev/shm are writable mounts). Given, it
    /// replaces the default whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    /// Mount the service account's API token into the pods. Default false:
    /// trainers never call the Kubernetes API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub automount_service_account_token: Option<bool>,
}

/// Restarts, deadlines, clean-up and suspension.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RunPolicy {
    /// Gang restarts allowed after retryable failures before the job fails.
    /// The count never resets (not on suspend, not when pods are deleted).
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: u32,
    /// Seconds the job may run (since it started or was last resumed) before
    /// it fails with DeadlineExceeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u64>,
    /// Seconds after the job finished before it is deleted; absent keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<u64>,
    /// Which replicas are deleted when the job finishes.
    pub clean_pod_policy: CleanPodPolicy,
    /// Stop every replica and keep the job (resume by setting false; the
    /// deadline restarts on resume).
    pub suspend: bool,
    /// Seconds a gang may take from creation until every replica runs; then
    /// it is torn down and retried (counts against backoffLimit).
    #[schemars(range(min = 1))]
    pub startup_timeout_seconds: u64,
    /// Seconds without training progress while Running before the gang is
    /// restarted (counts against backoffLimit); absent disables it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub stall_timeout_seconds: Option<u64>,
    /// How replica exit codes are classified, first match wins. Unmatched
    /// codes follow the default: 75 (the trainer's "peer failed") and 128-255
    /// (killed by a signal) are retryable, every other code fails the job.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failure_rules: Vec<FailureRule>,
}

/// Which replicas are deleted when the job finishes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CleanPodPolicy {
    /// Delete every replica.
    All,
    /// Delete replicas still running or pending; keep finished ones for their logs.
    #[default]
    Running,
    /// Delete nothing.
    None,
}

/// Classifies replica exit codes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRule {
    /// Container exit codes this rule applies to.
    #[schemars(length(min = 1), inner(range(min = 1, max = 255)))]
    pub exit_codes: Vec<i32>,
    /// What a replica failing with one of these exit codes does: FailJob fails
    /// the job at once, RestartGang restarts it (counted against backoffLimit).
    pub action: FailureAction,
}

/// What a failure does to the job.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Restart the whole gang from the last checkpoint (counts against backoffLimit).
    RestartGang,
    /// Fail the job at once.
    FailJob,
}
