//! Single-process training: the loop, validation, checkpoints and run outputs.
//!
//! See [`train`] for the primary entry point. A run directory holds
//! `config.json` (the effective config), `metrics.jsonl` (one row per step and
//! one per validation), `checkpoints/` and, at the end, `summary.json`.

pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
mod sync;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointDir, CheckpointError};
use crate::collective::ring::RingTimeouts;
use crate::collective::{self, Collective, CollectiveError, DistEnv, Payload, ReduceOp};
use crate::config::{Compression, TrainerConfig};
use crate::data::{self, Batch, Dataset, Sampler, Split, folder::FolderError};
use crate::ddp::topk::TopK;
use crate::infer::{self, EvalReport, Predictor};
use crate::metrics::TrainerMetrics;
use crate::model::SegNet;
use crate::model::params::{self, Layout};
use crate::tensorfile::{self, NamedTensor, TensorFileError};
use loss::{PixelTargets, binary_cross_entropy_with_logits, cross_entropy};
use optim::{Optimizer, OuterOptimizer};

/// Checkpoint slot of the outer optimiser's momentum (local SGD).
const OUTER_MOMENTUM: &str = "outer.momentum_buffer";

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The dataset could not be opened.
    #[error(transparent)]
    Data(#[from] FolderError),
    /// The dataset does not fit the model config.
    #[error("dataset does not fit the model: {0}")]
    Mismatch(String),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A checkpoint does not fit the model.
    #[error("checkpoint {path} does not fit this model: {message}")]
    Incompatible {
        /// The checkpoint.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// The output directory already holds a run.
    #[error(
        "{path} already holds checkpoints of a run; pass --resume to continue it, or choose another --out"
    )]
    Exists {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// Writing an output file failed.
    #[error("failed to write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing an output file atomically failed.
    #[error(transparent)]
    File(#[from] TensorFileError),
    /// The stop flag was raised (SIGTERM, SIGINT); the run saved a checkpoint
    /// of the last completed step first.
    #[error(
        "stopped at step {step} on request; checkpoint {checkpoint} written, continue with --resume"
    )]
    Stopped {
        /// The last completed step.
        step: u64,
        /// The checkpoint holding it.
        checkpoint: PathBuf,
    },
    /// The base or the adapter of a fine-tuning run does not fit.
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
    /// Talking to the other ranks failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The loss stopped being a number.
    #[error("loss is {loss} at step {step}; lower train.lr or set train.grad_clip_norm")]
    Diverged {
        /// The step.
        step: u64,
        /// The loss value.
        loss: f32,
    },
}

/// How to run, beyond the config.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Run directory.
    pub out_dir: PathBuf,
    /// Continue from the newest checkpoint in `out_dir`.
    pub resume: bool,
    /// Metrics to update while training.
    pub metrics: Option<TrainerMetrics>,
    /// Show a progress bar instead of periodic log lines.
    pub progress_bar: bool,
    /// Raised from outside (a signal handler) to stop after the current step
    /// with a checkpoint, so that an evicted pod loses no work.
    pub stop: Option<Arc<AtomicBool>>,
    /// This process's place in a data-parallel group; absent means alone.
    pub dist: Option<DistEnv>,
    /// Join and collective timeouts of the group.
    pub timeouts: RingTimeouts,
    /// Where rank 0 reports progress (the operator), if anywhere.
    pub report: Option<crate::report::Reporter>,
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Optimiser steps completed.
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Validation mean IoU at the end (absent without a validation split).
    pub val_miou: Option<f64>,
    /// Validation pixel accuracy at the end.
    pub val_pixel_accuracy: Option<f64>,
    /// Validation IoU per class at the end.
    pub val_iou: Vec<Option<f64>>,
    /// Steady-state training throughput: excludes the first
    /// `train.throughput_warmup_steps` steps, validation and checkpointing.
    pub samples_per_sec: f64,
    /// Wall time of this process's run.
    pub wall_seconds: f64,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: Option<u64>,
    /// Trainable parameters.
    pub parameters: usize,
    /// The step this process resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Ranks that trained together.
    pub world_size: usize,
    /// Bytes this rank all-reduced (gradients, control values, BN statistics).
    pub bytes_communicated: u64,
    /// Seconds this rank spent in all-reduce.
    pub allreduce_seconds: f64,
    /// Fine-tuning: validation mIoU of the base before training (absent on resume).
    pub base_val_miou: Option<f64>,
    /// Fine-tuning: the adapter directory written (PEFT format).
    pub adapter: Option<PathBuf>,
    /// Fine-tuning: bytes of `adapter_model.safetensors`.
    pub adapter_bytes: Option<u64>,
    /// Every tensor value of the model (trained, frozen and buffers).
    pub model_values: usize,
}

/// One `metrics.jsonl` row.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Row<'a> {
    Train {
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        samples_per_sec: f64,
        noisy_samples: usize,
    },
    Val {
        step: u64,
        #[serde(flatten)]
        report: &'a EvalReport,
    },
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A model and the dataset it trains on, checked against each other.
pub struct Setup {
    /// The config.
    pub config: TrainerConfig,
    /// The samples.
    pub dataset: Arc<dyn Dataset>,
    /// Train/validation split.
    pub split: Split,
}

impl Setup {
    /// Opens the dataset and checks it against the model config.
    pub fn new(config: &TrainerConfig) -> Result<Self, TrainError> {
        let dataset: Arc<dyn Dataset> =
            data::open(&config.data, config.model.in_channels, config.model.classes)?.into();
        check_dataset(config, dataset.as_ref())?;
        let split = Split::new(dataset.len(), config.data.val_fraction, config.data.seed);
        if split.train.is_empty() {
            return Err(TrainError::Mismatch(
                "no training samples remain after the validation split; lower data.val_fraction"
                    .into(),
            ));
        }
        Ok(Self {
            config: config.clone(),
            dataset,
            split,
        })
    }
}

/// Checks that a dataset's images fit the model: channels and a size divisible
/// by 2^stages.
pub fn check_dataset(config: &TrainerConfig, dataset: &dyn Dataset) -> Result<(), TrainError> {
    if dataset.channels() != config.model.in_channels {
        return Err(TrainError::Mismatch(format!(
            "images have {} channels but model.in_channels is {}",
            dataset.channels(),
            config.model.in_channels
        )));
    }
    let factor = 1usize << config.model.widths.len();
    let [h, w] = dataset.size();
    if h % factor != 0 || w % factor != 0 {
        return Err(TrainError::Mismatch(format!(
            "images are {w}x{h}, but {} encoder stages need both sides divisible by {factor}; resize the images or change model.widths",
            config.model.widths.len()
        )));
    }
    Ok(())
}

/// Training batches produced ahead of time on their own thread, so sample
/// generation and decoding overlap with compute. Each batch is a pure function
/// of its step, so the order of production does not affect results.
pub(crate) struct Prefetch {
    rx: Receiver<(Batch, usize)>,
}

impl Prefetch {
    /// Produces the micro-batches `steps` (optimiser step × accumulation +
    /// micro-batch) of `rank` in a group of `world`.
    fn spawn(setup: &Setup, rank: usize, world: usize, steps: std::ops::Range<u64>) -> Self {
        Self::spawn_seeded(setup, setup.config.data.seed, rank, world, steps)
    }

    /// A single process's micro-batches `steps`, in the sample order of `seed`
    /// (a federated client's own order over its own partition).
    pub(crate) fn spawn_for(setup: &Setup, seed: u64, steps: std::ops::Range<u64>) -> Self {
        Self::spawn_seeded(setup, seed, 0, 1, steps)
    }

    fn spawn_seeded(
        setup: &Setup,
        sampler_seed: u64,
        rank: usize,
        world: usize,
        steps: std::ops::Range<u64>,
    ) -> Self {
        let (tx, rx) = sync_channel(2);
        let dataset = setup.dataset.clone();
        let mut sampler = Sampler::new(setup.split.train.clone(), sampler_seed);
        let batch_size = setup.config.train.batch_size;
        let noise = setup.config.data.noise.clone();
        let seed = setup.config.train.seed;
        let [h, w] = dataset.size();
        let channels = dataset.channels();
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                for step in steps {
                    let samples: Vec<_> = sampler
                        .batch_indices(step, batch_size, rank, world)
                        .into_iter()
                        .map(|i| dataset.get(i))
                        .collect();
                    let mut batch = Batch::collate(&samples, channels, [h, w]);
                    let noisy = match &noise {
                        Some(n) => {
                            // One stream per global micro-batch, so a sample's
                            // noise does not depend on how the group is split.
                            let mut rng = ChaCha8Rng::seed_from_u64(seed);
                            rng.set_stream(step * world as u64 + rank as u64);
                            batch.add_noise(n, &mut rng)
                        }
                        None => 0,
                    };
                    if tx.send((batch, noisy)).is_err() {
                        break; // the trainer stopped
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Self { rx }
    }

    pub(crate) fn next(&self) -> (Batch, usize) {
        self.rx
            .recv()
            .expect("the prefetch thread produces every step it was asked for")
    }
}

/// The image tensor of a batch.
pub fn batch_images(batch: &Batch, device: &Device) -> Tensor<4> {
    let [c, h, w] = batch.image_shape;
    Tensor::from_data(
        TensorData::new(batch.images.clone(), [batch.len, c, h, w]),
        device,
    )
}

/// Forward pass and loss on one batch. Returns the loss tensor (with its graph
/// on an autodiff device).
pub fn batch_loss(
    model: &SegNet,
    batch: &Batch,
    config: &TrainerConfig,
    device: &Device,
) -> Tensor<1> {
    let [_, h, w] = batch.image_shape;
    let out = model.forward(batch_images(batch, device));
    let targets = PixelTargets::new(
        &batch.masks,
        [batch.len, h, w],
        config.train.class_weights.as_deref(),
        device,
    );
    let mut loss = cross_entropy(out.logits, &targets);
    if let (Some(logits), Some(b)) = (out.boundary_logits, batch.boundaries.as_ref()) {
        let t = Tensor::from_data(TensorData::new(b.clone(), [batch.len, 1, h, w]), device);
        let bl = binary_cross_entropy_with_logits(logits, t);
        loss = loss.add(bl.mul_scalar(config.model.boundary_loss_weight));
    }
    loss
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert")[0]
}

/// Loss and flat gradients of the trainable parameters on one batch.
pub fn loss_and_gradients(
    model: &SegNet,
    batch: &Batch,
    config: &TrainerConfig,
    device: &Device,
) -> (f32, Vec<f32>) {
    loss_and_gradients_of(model, batch, config, device, &params::Trainable::All)
}

/// [`loss_and_gradients`] for the parameters `selection` trains.
pub fn loss_and_gradients_of(
    model: &SegNet,
    batch: &Batch,
    config: &TrainerConfig,
    device: &Device,
    selection: &params::Trainable,
) -> (f32, Vec<f32>) {
    let loss = batch_loss(model, batch, config, device);
    let value = scalar(loss.clone());
    let grads = loss.backward();
    (value, params::gradient_values_of(model, &grads, selection))
}

/// Validation across the group: each rank scores every `world`-th validation
/// sample from its rank on, and the counts are summed exactly (as integers)
/// so rank 0 reports the whole split. Every rank takes part, so no rank waits
/// on a peer that is busy validating alone.
fn validate_group(
    model: &SegNet,
    config: &TrainerConfig,
    setup: &Setup,
    group: Option<&mut dyn Collective>,
    device: &Device,
) -> Result<EvalReport, CollectiveError> {
    let predictor = Predictor::from_model(config.clone(), model.valid(), device.clone().inner());
    let dataset = setup.dataset.as_ref();
    let with_instances =
        infer::scores_instances(&predictor, dataset, setup.split.val.first().copied());
    let Some(c) = group else {
        return Ok(infer::accumulate(
            &predictor,
            dataset,
            &setup.split.val,
            config.train.batch_size,
            with_instances,
        )
        .report());
    };
    let (rank, world) = (c.rank(), c.world_size());
    let shard: Vec<usize> = setup
        .split
        .val
        .iter()
        .skip(rank)
        .step_by(world)
        .copied()
        .collect();
    let mut counts = infer::accumulate(
        &predictor,
        dataset,
        &shard,
        config.train.batch_size,
        with_instances,
    );
    let mine = counts.to_words();
    for root in 0..world {
        let mut words = if root == rank {
            mine.clone()
        } else {
            vec![0; mine.len()]
        };
        sync::broadcast_from(c, &mut words, root)?;
        if root != rank {
            counts.add_words(&words);
        }
    }
    Ok(counts.report())
}

/// Appends rows to `metrics.jsonl`.
struct MetricsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// Loss of the last training row kept from an earlier run, if any.
    last_loss: Option<f64>,
}

impl MetricsLog {
    /// Opens the log, first dropping rows past `keep_through_step` (written
    /// after the checkpoint a resumed run restarts from).
    fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self, TrainError> {
        let werr = |source| TrainError::Write {
            path: path.to_owned(),
            source,
        };
        let mut last_loss = None;
        match keep_through_step {
            Some(step) if path.exists() => {
                let f = std::fs::File::open(path).map_err(werr)?;
                let mut kept = String::new();
                for line in std::io::BufReader::new(f).lines() {
                    let line = line.map_err(werr)?;
                    let row = serde_json::from_str::<serde_json::Value>(&line).ok();
                    let row_step = row.as_ref().and_then(|v| v.get("step")?.as_u64());
                    if row_step.is_some_and(|s| s <= step) {
                        if let Some(loss) = row.as_ref().and_then(|v| v.get("loss")?.as_f64()) {
                            last_loss = Some(loss);
                        }
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                }
                tensorfile::write_bytes_atomic(path, kept.as_bytes())?;
            }
            Some(_) => {}
            None => {
                std::fs::File::create(path).map_err(werr)?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(werr)?;
        Ok(Self {
            path: path.to_owned(),
            file: std::io::BufWriter::new(file),
            last_loss,
        })
    }

    fn write(&mut self, row: &Row) -> Result<(), TrainError> {
        let line = serde_json::to_string(row).expect("rows serialise");
        writeln!(self.file, "{line}").map_err(|source| TrainError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn flush(&mut self) -> Result<(), TrainError> {
        self.file.flush().map_err(|source| TrainError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Puts the tensors of `checkpoint` into `model` and `optimizer`.
fn restore(
    model: SegNet,
    optimizer: &mut Optimizer,
    checkpoint: &Checkpoint,
    path: &Path,
    selection: &params::Trainable,
    device: &Device,
) -> Result<(SegNet, Vec<f32>), TrainError> {
    let incompatible = |message: String| TrainError::Incompatible {
        path: path.to_owned(),
        message,
    };
    let expected = Layout::of(&model).entries.len();
    if checkpoint.model.len() != expected {
        return Err(incompatible(format!(
            "it has {} model tensors, the model has {expected} (was it written with another model config?)",
            checkpoint.model.len()
        )));
    }
    let model = params::load_named(model, |n| checkpoint.tensor(n), device)
        .map_err(|e| incompatible(e.to_string()))?;
    if checkpoint.optimizer != optimizer.kind() {
        return Err(incompatible(format!(
            "it was trained with optimizer `{}` but train.optimizer.kind is `{}`",
            checkpoint.optimizer,
            optimizer.kind()
        )));
    }
    let trainable = params::trainable_values_of(&model, selection);
    optimizer
        .load_state(checkpoint.optimizer_step, trainable.len(), |slot| {
            checkpoint
                .optimizer_state
                .iter()
                .find(|(n, _)| n == slot)
                .map(|(_, v)| v.clone())
        })
        .map_err(|e| incompatible(e.to_string()))?;
    Ok((model, trainable))
}

/// The model tensors of `model` by name, for checkpoints.
pub fn model_tensors(model: &SegNet) -> Vec<(String, NamedTensor)> {
    params::named_values(model)
        .into_iter()
        .map(|(e, values)| {
            (
                e.name,
                NamedTensor {
                    shape: e.shape,
                    values,
                },
            )
        })
        .collect()
}

/// Trains a SegNet as `config` says, writing outputs to `opts.out_dir`.
///
/// With `opts.dist` describing more than one rank, this process joins the
/// group and trains data-parallel: rank 0's starting state (fresh or resumed)
/// is broadcast, each rank trains on its own slice of every global batch, and
/// the averaged gradient drives identical optimiser steps everywhere. Batch
/// norm normalises with each rank's own batch (as PyTorch's DDP does without
/// SyncBatchNorm); the running statistics are averaged across ranks after
/// every step, so all ranks hold the same model. Only rank 0 writes outputs.
pub fn train(config: &TrainerConfig, opts: &RunOptions) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let setup = Setup::new(config)?;
    let dist = opts.dist.clone().unwrap_or_else(DistEnv::single);
    let (rank, world) = (dist.rank, dist.world_size);
    let root = rank == 0;
    let out = &opts.out_dir;
    if root {
        std::fs::create_dir_all(out).map_err(|source| TrainError::Write {
            path: out.clone(),
            source,
        })?;
    }
    let device = Device::flex().autodiff();
    // Fine-tuning: the base with LoRA adapters, everything but the adapters
    // (and the modules to save) frozen.
    let lora = config
        .peft
        .as_ref()
        .map(crate::peft::config::LoraConfig::from_section);
    let (mut model, selection) = match (&config.peft, &lora) {
        (Some(p), Some(lora)) => {
            let base = crate::peft::base::load_base(&p.base, config, &device)?;
            let adapted = crate::peft::lora::attach(base, lora, config.train.seed, &device)?;
            let selection = crate::peft::lora::trainable(lora);
            (params::freeze(adapted, &selection), selection)
        }
        _ => (
            SegNet::new(&config.model, config.train.seed, &device),
            params::Trainable::All,
        ),
    };
    let mut params = params::trainable_values_of(&model, &selection);
    let mut optimizer = Optimizer::new(&config.train.optimizer, params.len());
    let checkpoints = CheckpointDir::new(out.join(crate::run_dir::CHECKPOINTS_DIR));
    let local_sgd = config.train.local_sgd.as_ref();
    let bucket_len = ((config.train.bucket_mb * (1 << 20) as f64) as usize / 4).max(1);
    // Top-k's residual is per rank and not checkpointed: a resumed run starts
    // with nothing owed.
    let mut topk = config
        .train
        .topk
        .as_ref()
        .map(|t| TopK::new(t.ratio, params.len()));
    let payload = match config.train.compression {
        Compression::None => Payload::F32,
        Compression::Fp16 => Payload::F16,
        Compression::Bf16 => Payload::Bf16,
    };
    let mut outer = local_sgd
        .and_then(|l| l.outer.as_ref())
        .map(OuterOptimizer::new);

    let mut start_step = 0;
    let mut resumed_from = None;
    if root {
        match (opts.resume, checkpoints.latest()?) {
            (true, Some(path)) => {
                let ck = Checkpoint::load(&path)?;
                if ck.config.model != config.model || ck.config.data != config.data {
                    tracing::warn!(
                        checkpoint = %path.display(),
                        "the model or data config differs from the one this checkpoint was trained with; \
                         the continued run will not match an uninterrupted one"
                    );
                }
                let (m, p) = restore(model, &mut optimizer, &ck, &path, &selection, &device)?;
                (model, params) = (m, p);
                if let Some(outer) = outer.as_mut() {
                    outer.momentum = ck
                        .optimizer_state
                        .iter()
                        .find(|(n, _)| n == OUTER_MOMENTUM)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                }
                start_step = ck.step;
                resumed_from = Some(ck.step);
                tracing::info!(checkpoint = %path.display(), step = ck.step, "resuming");
            }
            (true, None) => {
                tracing::info!(dir = %out.display(), "no checkpoint to resume from; starting fresh")
            }
            (false, Some(_)) => {
                return Err(TrainError::Exists {
                    path: checkpoints.dir().to_owned(),
                });
            }
            (false, None) => {}
        }
    }
    let mut group = if world > 1 {
        tracing::info!(rank, world, store = %dist.store_addr(), "joining the data-parallel group");
        Some(collective::join_group(&dist, opts.timeouts)?)
    } else {
        None
    };
    if let Some(g) = group.as_mut() {
        let (step, m) = sync::adopt_root_state(
            &mut g.ring,
            start_step,
            model,
            &mut params,
            &mut optimizer,
            &selection,
            &device,
        )?;
        (start_step, model) = (step, m);
        resumed_from = (start_step > 0).then_some(start_step);
        if let Some(outer) = outer.as_mut() {
            let mut len = [outer.momentum.len() as u64];
            sync::broadcast_u64s(&mut g.ring, &mut len)?;
            outer.momentum.resize(len[0] as usize, 0.0);
            g.ring.broadcast(&mut outer.momentum, 0)?;
        }
    }
    // Local SGD's last agreed parameters.
    let mut anchor = params.clone();
    let mut log = if root {
        let config_json = serde_json::to_vec_pretty(config).expect("configs serialise");
        tensorfile::write_bytes_atomic(&out.join("config.json"), &config_json)?;
        Some(MetricsLog::open(
            &out.join(crate::run_dir::METRICS_FILE),
            resumed_from,
        )?)
    } else {
        None
    };

    let steps = config.train.steps;
    // What rank 0 last told the operator; each report carries all of it.
    let mut progress = crate::protocol::ProgressMessage {
        total_steps: steps,
        ..Default::default()
    };
    let reporter = opts.report.as_ref().filter(|_| root);
    let batch_size = config.train.batch_size;
    let accumulate = config.train.accumulate_steps;
    // Samples per optimiser step over the whole group.
    let global_batch = (batch_size as u64) * accumulate * world as u64;
    let prefetch = Prefetch::spawn(
        &setup,
        rank,
        world,
        start_step * accumulate..steps * accumulate,
    );
    let bar = (root && opts.progress_bar && start_step < steps).then(|| {
        let bar = indicatif::ProgressBar::new(steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        bar.set_position(start_step);
        bar
    });

    // A resumed run that was already complete reports the logged last loss.
    let mut final_loss = log.as_ref().and_then(|l| l.last_loss).unwrap_or(f64::NAN);
    let mut steady = (Duration::ZERO, 0u64);
    let mut comm = (Duration::ZERO, 0u64);
    // What the metrics have been told of `comm` so far.
    let mut comm_reported = comm;
    let mut last_scores: Option<metrics::SegmentationScores> = None;
    // Fine-tuning starts from the base itself (B = 0): scoring it first gives
    // the base's quality on this data, the baseline the adapter must beat.
    let mut base_val_miou = None;
    if lora.is_some() && start_step == 0 && !setup.split.val.is_empty() {
        let report = validate_group(
            &model,
            config,
            &setup,
            group.as_mut().map(|g| &mut g.ring as &mut dyn Collective),
            &device,
        )?;
        if let Some(log) = log.as_mut() {
            log.write(&Row::Val {
                step: 0,
                report: &report,
            })?;
        }
        tracing::info!(
            miou = report.scores.miou,
            "the base on this data, before fine-tuning"
        );
        base_val_miou = Some(report.scores.miou);
    }
    for step in start_step..steps {
        let t0 = Instant::now();
        let lr = schedule::learning_rate(&config.train, step);
        // Gradient accumulation: the mean gradient of `accumulate` micro-batches.
        let (mut loss, mut grads, mut noisy) = (0.0f32, vec![0.0f32; params.len()], 0);
        for _ in 0..accumulate {
            let (batch, n) = prefetch.next();
            let (l, g) = loss_and_gradients_of(&model, &batch, config, &device, &selection);
            for (a, b) in grads.iter_mut().zip(&g) {
                *a += b;
            }
            loss += l;
            noisy += n;
        }
        if accumulate > 1 {
            let inv = 1.0 / accumulate as f32;
            grads.iter_mut().for_each(|g| *g *= inv);
            loss *= inv;
        }
        let mut stopping = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        if let Some(g) = group.as_mut() {
            let t = Instant::now();
            let mut gradient_bytes = 0;
            if let Some(topk) = topk.as_mut() {
                gradient_bytes = topk.all_reduce_mean(&mut g.ring, &mut grads)? as usize;
            } else if local_sgd.is_none() {
                for bucket in grads.chunks_mut(bucket_len) {
                    g.ring.all_reduce_with(bucket, ReduceOp::Average, payload)?;
                }
                gradient_bytes = grads.len() * payload.bytes();
            }
            // Loss, a stop request from any rank, and the BN running statistics.
            let mut control = [loss, f32::from(u8::from(stopping))];
            g.ring.all_reduce(&mut control, ReduceOp::Sum)?;
            (loss, stopping) = (control[0] / world as f32, control[1] > 0.0);
            let mut buffers = params::buffer_values(&model);
            g.ring.all_reduce(&mut buffers, ReduceOp::Average)?;
            model = params::with_buffer_values(model, &buffers, &device);
            comm.0 += t.elapsed();
            comm.1 += (gradient_bytes + (control.len() + buffers.len()) * 4) as u64;
        }
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let grad_norm = match config.train.grad_clip_norm {
            Some(max) => optim::clip_grad_norm(&mut grads, max),
            None => optim::grad_norm(&grads),
        };
        optimizer.step(&mut params, &grads, lr);
        let done = step + 1;
        if let Some(l) = local_sgd
            && (done % l.every == 0 || done == steps || stopping)
        {
            // Average what the ranks made of the anchor, then move the anchor
            // (through the outer optimiser, if any) and restart from it.
            let t = Instant::now();
            if let Some(g) = group.as_mut() {
                g.ring.all_reduce(&mut params, ReduceOp::Average)?;
                comm.1 += (params.len() * 4) as u64;
            }
            match outer.as_mut() {
                Some(outer) => {
                    outer.step(&mut anchor, &params);
                    params.copy_from_slice(&anchor);
                }
                None => anchor.copy_from_slice(&params),
            }
            comm.0 += t.elapsed();
        }
        model = params::with_trainable_values_of(model, &params, &selection, &device);
        let dt = t0.elapsed();
        if step >= start_step + config.train.throughput_warmup_steps {
            steady.0 += dt;
            steady.1 += global_batch;
        }
        let sps = global_batch as f64 / dt.as_secs_f64();
        final_loss = loss as f64;
        if let Some(log) = log.as_mut() {
            log.write(&Row::Train {
                step: done,
                loss: final_loss,
                lr,
                grad_norm,
                samples_per_sec: sps,
                noisy_samples: noisy,
            })?;
        }
        if let Some(r) = reporter {
            progress.step = done;
            progress.loss = Some(final_loss);
            progress.samples_per_second = Some(sps);
            r.send(progress.clone());
        }
        if let Some(m) = &opts.metrics {
            m.step.set(done as i64);
            m.steps_total.inc();
            m.loss.set(final_loss);
            m.learning_rate.set(lr);
            m.samples_per_second.set(sps);
            m.samples_total.inc_by(batch_size as u64 * accumulate);
            m.allreduce_seconds_total
                .inc_by((comm.0 - comm_reported.0).as_secs_f64());
            m.allreduce_bytes_total.inc_by(comm.1 - comm_reported.1);
            comm_reported = comm;
        }
        match &bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(format!("loss {final_loss:.4}  {sps:.1} img/s"));
            }
            None if root && (done % config.train.log_every == 0 || done == steps) => {
                tracing::info!(
                    step = done,
                    loss = final_loss,
                    lr,
                    samples_per_sec = sps,
                    "train"
                );
            }
            None => {}
        }

        let last = done == steps;
        let validate = last || (config.train.val_every > 0 && done % config.train.val_every == 0);
        let report = (validate && !setup.split.val.is_empty())
            .then(|| {
                validate_group(
                    &model,
                    config,
                    &setup,
                    group.as_mut().map(|g| &mut g.ring as &mut dyn Collective),
                    &device,
                )
            })
            .transpose()?;
        if let (Some(log), Some(report)) = (log.as_mut(), report) {
            log.write(&Row::Val {
                step: done,
                report: &report,
            })?;
            let scores = report.scores;
            if let Some(r) = reporter {
                progress.metric = Some(scores.miou);
                r.send(progress.clone());
            }
            if let Some(m) = &opts.metrics {
                m.val_miou.set(scores.miou);
                m.val_pixel_accuracy.set(scores.pixel_accuracy);
            }
            let message = format!(
                "val miou {:.3} pixel accuracy {:.3}",
                scores.miou, scores.pixel_accuracy
            );
            match &bar {
                Some(bar) => bar.println(format!("step {done}: {message}")),
                None => tracing::info!(
                    step = done,
                    miou = scores.miou,
                    pixel_accuracy = scores.pixel_accuracy,
                    "validation"
                ),
            }
            last_scores = Some(scores);
        }
        if last || stopping || (config.checkpoint.every > 0 && done % config.checkpoint.every == 0)
        {
            let path = checkpoints.path_for(done);
            if let Some(log) = log.as_mut() {
                // Rows up to this step become durable with the checkpoint that covers them.
                log.flush()?;
                let (optimizer_step, state) = optimizer.state();
                let mut optimizer_state: Vec<(String, Vec<f32>)> = state
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_vec()))
                    .collect();
                if let Some(outer) = &outer {
                    optimizer_state.push((OUTER_MOMENTUM.to_owned(), outer.momentum.clone()));
                }
                let ck = Checkpoint {
                    step: done,
                    data_position: done * global_batch,
                    model: model_tensors(&model),
                    optimizer: optimizer.kind().to_owned(),
                    optimizer_step,
                    optimizer_state,
                    config: config.clone(),
                };
                let started = Instant::now();
                checkpoints.save(&ck, config.checkpoint.keep_last)?;
                if let Some(r) = reporter {
                    progress.checkpoint = Some(crate::protocol::CheckpointMessage {
                        step: done,
                        path: path.display().to_string(),
                    });
                    r.send(progress.clone());
                }
                if let Some(m) = &opts.metrics {
                    m.checkpoints_total.inc();
                    m.checkpoint_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                tracing::debug!(path = %path.display(), "checkpoint written");
            }
            if stopping && !last {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                return Err(TrainError::Stopped {
                    step: done,
                    checkpoint: path,
                });
            }
        }
    }
    if let Some(log) = log.as_mut() {
        log.flush()?;
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    // The adapter in PEFT's format; the checkpoints hold the whole model.
    let mut adapter = None;
    if let (true, Some(lora)) = (root, &lora) {
        let dir = out.join(crate::run_dir::ADAPTER_DIR);
        let bytes = crate::peft::adapter::save(&dir, &mut model, lora)?;
        tracing::info!(dir = %dir.display(), bytes, "adapter written");
        if let Some(r) = reporter {
            progress.adapter = Some(dir.display().to_string());
            r.send(progress.clone());
        }
        adapter = Some((dir, bytes));
    }
    if root && last_scores.is_none() && !setup.split.val.is_empty() {
        // A resumed run that was already complete still reports its quality.
        last_scores = Some(validate_group(&model, config, &setup, None, &device)?.scores);
    }
    let summary = Summary {
        steps,
        final_loss,
        val_miou: last_scores.as_ref().map(|s| s.miou),
        val_pixel_accuracy: last_scores.as_ref().map(|s| s.pixel_accuracy),
        val_iou: last_scores.map(|s| s.iou).unwrap_or_default(),
        samples_per_sec: if steady.0.is_zero() {
            0.0
        } else {
            steady.1 as f64 / steady.0.as_secs_f64()
        },
        wall_seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        parameters: params.len(),
        resumed_from,
        world_size: world,
        bytes_communicated: comm.1,
        allreduce_seconds: comm.0.as_secs_f64(),
        model_values: Layout::of(&model).entries.iter().map(|e| e.len).sum(),
        adapter_bytes: adapter.as_ref().map(|(_, b)| *b),
        base_val_miou,
        adapter: adapter.map(|(d, _)| d),
    };
    if root {
        let json = serde_json::to_vec_pretty(&summary).expect("summaries serialise");
        tensorfile::write_bytes_atomic(&out.join("summary.json"), &json)?;
    }
    Ok(summary)
}
