//! Single-process training: the loop, validation, checkpoints and run outputs.
//!
//! See [`train`] for the primary entry point; what it writes is a
//! [`RunDir`], and what a step tells the world goes through [`outputs`].

pub mod learner;
pub mod loss;
pub mod optim;
mod outputs;
pub mod schedule;

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
use crate::collective::{Collective, CollectiveError, DistEnv};
use crate::config::{CollectiveBackend, TrainerConfig};
use crate::data::{self, Batch, Dataset, Sampler, Split, folder::FolderError};
use crate::ddp::local_sgd::{LocalSgd, OUTER_MOMENTUM};
use crate::ddp::{self, DataParallel};
use crate::eval::{self, EvalReport};
use crate::infer::Predictor;
use crate::metrics::TrainerMetrics;
use crate::model::SegNet;
use crate::model::params::{self, Layout};
use crate::model::task_weights::TaskWeights;
use crate::run_dir::{RunDir, RunDirError};
use crate::tensorfile::{NamedTensor, TensorFileError};
use learner::Learner;
use loss::{PixelTargets, binary_cross_entropy_with_logits, cross_entropy};
use outputs::{Outputs, StepDone};

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
    /// The dataset's images do not fit the model.
    #[error(transparent)]
    Dataset(#[from] data::DatasetMismatch),
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
    /// The run directory cannot be opened or written (a fresh run where one
    /// left checkpoints, a full disk).
    #[error(transparent)]
    RunDir(#[from] RunDirError),
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
    /// `train.device` cannot be had here.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
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
    /// Where this run computed (`cpu`, `cuda:0`).
    pub device: String,
    /// FNV-1a hash of the bits of the trained parameters and buffers at the
    /// end: equal on every rank (checked), and across runs that should be
    /// bit-identical.
    pub parameter_hash: String,
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
        data::check_fits(&config.model, dataset.as_ref())?;
        let split = Split::new(
            dataset.len(),
            config.data.validation_fraction,
            config.data.seed,
        );
        if split.train.is_empty() {
            return Err(TrainError::Mismatch(
                "no training samples remain after the validation split; lower data.validation_fraction"
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

/// Forward pass and loss on one batch. Returns the loss tensor (with its graph
/// on an autodiff device).
pub fn batch_loss(
    model: &SegNet,
    batch: &Batch,
    config: &TrainerConfig,
    device: &Device,
) -> Tensor<1> {
    let [_, h, w] = batch.image_shape;
    let out = model.forward(batch.images_tensor(device));
    let targets = PixelTargets::new(
        &batch.masks,
        [batch.len, h, w],
        config.train.class_weights.as_deref(),
        device,
    );
    let segmentation = cross_entropy(out.logits, &targets);
    let boundary = match (out.boundary_logits, batch.boundaries.as_ref()) {
        (Some(logits), Some(b)) => {
            let t = Tensor::from_data(TensorData::new(b.clone(), [batch.len, 1, h, w]), device);
            Some(binary_cross_entropy_with_logits(logits, t))
        }
        _ => None,
    };
    match (&model.task_weights, boundary) {
        (Some(learned), boundary) => learned.combine(segmentation, boundary),
        (None, Some(b)) => segmentation.add(b.mul_scalar(config.model.boundary_loss_weight)),
        (None, None) => segmentation,
    }
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
        eval::scores_instances(&predictor, dataset, setup.split.val.first().copied());
    let Some(c) = group else {
        return Ok(eval::accumulate(
            &predictor,
            dataset,
            &setup.split.val,
            config.train.batch_size,
            with_instances,
            config.train.validation_noise.as_ref(),
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
    let mut counts = eval::accumulate(
        &predictor,
        dataset,
        &shard,
        config.train.batch_size,
        with_instances,
        config.train.validation_noise.as_ref(),
    );
    let mine = counts.to_words();
    for root in 0..world {
        let mut words = if root == rank {
            mine.clone()
        } else {
            vec![0; mine.len()]
        };
        ddp::sync::broadcast_from(c, &mut words, root)?;
        if root != rank {
            counts.add_words(&words);
        }
    }
    Ok(counts.report())
}

/// Puts the tensors of `checkpoint` into the learner's model and optimiser.
fn restore(learner: &mut Learner, checkpoint: &Checkpoint, path: &Path) -> Result<(), TrainError> {
    let incompatible = |message: String| TrainError::Incompatible {
        path: path.to_owned(),
        message,
    };
    let expected = Layout::of(learner.model()).entries.len();
    if checkpoint.model.len() != expected {
        return Err(incompatible(format!(
            "it has {} model tensors, the model has {expected} (was it written with another model config?)",
            checkpoint.model.len()
        )));
    }
    let device = learner.device().clone();
    let model = params::load_named(learner.model().clone(), |n| checkpoint.tensor(n), &device)
        .map_err(|e| incompatible(e.to_string()))?;
    if checkpoint.optimizer != learner.optimizer().kind() {
        return Err(incompatible(format!(
            "it was trained with optimizer `{}` but train.optimizer.kind is `{}`",
            checkpoint.optimizer,
            learner.optimizer().kind()
        )));
    }
    learner.set_model(model);
    let n = learner.len();
    learner
        .optimizer_mut()
        .load_state(
            checkpoint.optimizer_step,
            n,
            |slot| {
                checkpoint
                    .optimizer_state
                    .iter()
                    .find(|(n, _)| n == slot)
                    .map(|(_, v)| v.clone())
            },
            &device.without_autodiff(),
        )
        .map_err(|e| incompatible(e.to_string()))?;
    Ok(())
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

/// The network a run trains and the parameters it trains: a fresh SegNet,
/// or (fine-tuning) the base with LoRA adapters, everything but the adapters
/// and the modules to save frozen.
fn build_model(
    config: &TrainerConfig,
    lora: Option<&crate::peft::config::LoraConfig>,
    device: &Device,
) -> Result<(SegNet, params::Trainable), TrainError> {
    match (&config.peft, lora) {
        (Some(p), Some(lora)) => {
            let base = crate::peft::base::load_base(&p.base, config, device)?;
            let adapted = crate::peft::lora::attach(base, lora, config.train.seed, device)?;
            let selection = crate::peft::lora::trainable(lora);
            Ok((params::freeze(adapted, &selection), selection))
        }
        _ => Ok((
            SegNet::new(&config.model, config.train.seed, device),
            params::Trainable::All,
        )),
    }
}

/// Rank 0's start with `--resume`: the newest checkpoint that loads (newer
/// ones that do not are set aside and counted), or a fresh start where there
/// is none. Returns the step resumed from.
fn resume(
    checkpoints: &CheckpointDir,
    config: &TrainerConfig,
    learner: &mut Learner,
    local_sgd: Option<&mut LocalSgd>,
    metrics: Option<&TrainerMetrics>,
) -> Result<Option<u64>, TrainError> {
    let Some(found) = checkpoints.load_newest()? else {
        tracing::info!(dir = %checkpoints.dir().display(), "no checkpoint to resume from; starting fresh");
        return Ok(None);
    };
    if let Some(m) = metrics {
        m.checkpoints_skipped_total
            .inc_by(found.skipped.len() as u64);
    }
    let (path, ck) = (found.path, found.checkpoint);
    if ck.config.model != config.model || ck.config.data != config.data {
        tracing::warn!(
            checkpoint = %path.display(),
            "the model or data config differs from the one this checkpoint was trained with; \
             the continued run will not match an uninterrupted one"
        );
    }
    restore(learner, &ck, &path)?;
    if let Some(l) = local_sgd {
        l.reset(learner.params());
        if let Some(outer) = l.outer.as_mut() {
            outer.momentum = ck
                .optimizer_state
                .iter()
                .find(|(n, _)| n == OUTER_MOMENTUM)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
        }
    }
    tracing::info!(checkpoint = %path.display(), step = ck.step, "resuming");
    Ok(Some(ck.step))
}

/// The checkpoint of step `done`: the whole model, the optimiser state and
/// local SGD's outer momentum.
fn checkpoint_of(
    learner: &Learner,
    local_sgd: Option<&LocalSgd>,
    config: &TrainerConfig,
    done: u64,
    global_batch: u64,
) -> Checkpoint {
    let (optimizer_step, state) = learner.optimizer().state();
    let mut optimizer_state: Vec<(String, Vec<f32>)> =
        state.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if let Some(outer) = local_sgd.and_then(|l| l.outer.as_ref()) {
        optimizer_state.push((OUTER_MOMENTUM.to_owned(), outer.momentum.clone()));
    }
    Checkpoint {
        step: done,
        data_position: done * global_batch,
        model: model_tensors(learner.model()),
        optimizer: learner.optimizer().kind().to_owned(),
        optimizer_step,
        optimizer_state,
        config: config.clone(),
    }
}

/// What follows a completed optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Score the model on the validation split.
    pub validate: bool,
    /// Write a checkpoint.
    pub checkpoint: bool,
}

impl Due {
    /// After step `done` of `steps`: the last step validates and checkpoints,
    /// so does every `validate_every` / `checkpoint.every` (0: never), and a
    /// run asked to stop checkpoints where it is.
    pub fn after(done: u64, steps: u64, stopping: bool, config: &TrainerConfig) -> Self {
        let every = |n: u64| n > 0 && done.is_multiple_of(n);
        let last = done == steps;
        Self {
            validate: last || every(config.train.validate_every),
            checkpoint: last || stopping || every(config.checkpoint.every),
        }
    }
}

/// Trains a SegNet as `config` says, writing outputs to `opts.out_dir`.
///
/// With `opts.dist` describing more than one rank, this process joins the
/// group and trains data-parallel: rank 0's starting state (fresh or resumed)
/// is broadcast, each rank trains on its own slice of every global batch, and
/// the averaged gradient drives identical optimiser steps everywhere. Batch
/// norm normalises with each rank's own batch (as PyTorch's DDP does without
/// SyncBatchNorm); the running statistics are averaged across ranks after
/// every step, so all ranks hold the same model (checked at every
/// checkpoint). Only rank 0 writes outputs.
pub fn train(config: &TrainerConfig, opts: &RunOptions) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let dist = opts.dist.clone().unwrap_or_else(DistEnv::single);
    // First: a device that cannot be had fails before any work is done.
    let compute = crate::device::resolve(config.train.device, dist.local_rank)?;
    let device = compute.device.clone().autodiff();
    let setup = Setup::new(config)?;
    let root = dist.rank == 0;
    let run = root
        .then(|| RunDir::open(&opts.out_dir, opts.resume))
        .transpose()?;
    let lora = config
        .peft
        .as_ref()
        .map(crate::peft::config::LoraConfig::from_section);
    let (model, selection) = build_model(config, lora.as_ref(), &device)?;
    let mut replica = Replica::new(model, selection, config, &device);
    let checkpoints = CheckpointDir::new(RunDir::at(&opts.out_dir).checkpoints_dir());
    let resumed = match run {
        Some(_) if opts.resume => resume(
            &checkpoints,
            config,
            &mut replica.learner,
            replica.local_sgd.as_mut(),
            opts.metrics.as_ref(),
        )?,
        _ => None,
    };
    let start_step = replica.join(
        &dist,
        config,
        compute.compute,
        opts.timeouts,
        resumed.unwrap_or(0),
    )?;
    let resumed_from = (start_step > 0).then_some(start_step);
    let mut outputs = Outputs::open(run.as_ref(), config, opts, start_step, resumed_from)?;

    let steps = config.train.steps;
    let accumulate = config.train.accumulate_steps;
    let rank_batch = config.train.batch_size as u64 * accumulate;
    // Samples per optimiser step over the whole group.
    let global_batch = rank_batch * dist.world_size as u64;
    let prefetch = Prefetch::spawn(
        &setup,
        dist.rank,
        dist.world_size,
        start_step * accumulate..steps * accumulate,
    );
    let has_val = !setup.split.val.is_empty();
    // A resumed run that was already complete reports the logged last loss.
    let mut final_loss = outputs.logged_loss().unwrap_or(f64::NAN);
    let mut steady = (Duration::ZERO, 0u64);
    let mut last_scores = None;
    // Fine-tuning starts from the base itself (B = 0): scoring it first gives
    // the base's quality on this data, the baseline the adapter must beat.
    let mut base_val_miou = None;
    if lora.is_some() && start_step == 0 && has_val {
        let report = replica.validate(config, &setup, &device)?;
        outputs.base(&report)?;
        base_val_miou = Some(report.scores.miou);
    }
    for step in start_step..steps {
        let t0 = Instant::now();
        let lr = schedule::learning_rate(&config.train, step);
        let stop = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let stepped = replica.step(&prefetch, config, step, lr, stop)?;
        let dt = t0.elapsed();
        if step >= start_step + config.train.throughput_warmup_steps {
            steady.0 += dt;
            steady.1 += global_batch;
        }
        let done = step + 1;
        final_loss = stepped.loss as f64;
        outputs.step(&StepDone {
            done,
            loss: final_loss,
            lr,
            grad_norm: stepped.grad_norm,
            samples_per_sec: global_batch as f64 / dt.as_secs_f64(),
            samples: rank_batch,
            noisy: stepped.noisy,
            comm: replica.comm(),
        })?;

        let due = Due::after(done, steps, stepped.stopping, config);
        if due.validate && has_val {
            let report = replica.validate(config, &setup, &device)?;
            let learned = replica.learner.model().task_weights.as_ref();
            outputs.validation(done, &report, learned.map(TaskWeights::weights))?;
            last_scores = Some(report.scores);
        }
        if due.checkpoint {
            // Every rank must hold the model rank 0 is about to save.
            replica.check_in_sync()?;
            let path = checkpoints.path_for(done);
            if root {
                outputs.flush()?;
                let ck = replica.checkpoint(config, done, global_batch);
                let t = Instant::now();
                checkpoints.save(&ck, config.checkpoint.keep_last)?;
                outputs.checkpoint(done, &path, t.elapsed());
            }
            if stepped.stopping && done < steps {
                outputs.abandon();
                return Err(TrainError::Stopped {
                    step: done,
                    checkpoint: path,
                });
            }
        }
    }
    outputs.finish()?;

    // The adapter in PEFT's format; the checkpoints hold the whole model.
    let adapter = match (&run, &lora) {
        (Some(run), Some(lora)) => {
            let dir = run.adapter_dir();
            let mut model = replica.learner.model().clone();
            let bytes = crate::peft::adapter::save(&dir, &mut model, lora)?;
            outputs.adapter(&dir, bytes);
            Some((dir, bytes))
        }
        _ => None,
    };
    if root && last_scores.is_none() && has_val {
        // A resumed run that was already complete still reports its quality.
        let alone = validate_group(replica.learner.model(), config, &setup, None, &device)?;
        last_scores = Some(alone.scores);
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
        parameters: replica.learner.len(),
        resumed_from,
        world_size: dist.world_size,
        bytes_communicated: replica.comm().bytes,
        allreduce_seconds: replica.comm().time.as_secs_f64(),
        model_values: Layout::of(replica.learner.model())
            .entries
            .iter()
            .map(|e| e.len)
            .sum(),
        adapter_bytes: adapter.as_ref().map(|(_, b)| *b),
        base_val_miou,
        adapter: adapter.map(|(d, _)| d),
        device: compute.compute.to_string(),
        parameter_hash: format!("{:016x}", ddp::sync::fingerprint(&replica.learner)),
    };
    if let Some(run) = &run {
        run.write_summary(&summary)?;
    }
    Ok(summary)
}

/// This process's copy of the model, and what keeps it in step with the
/// other ranks' copies.
struct Replica {
    learner: Learner,
    /// Local SGD / DiLoCo: averaging every H steps instead of every step.
    local_sgd: Option<LocalSgd>,
    /// The data-parallel group, when there is one.
    group: Option<DataParallel>,
}

/// What one optimiser step gave.
struct Stepped {
    /// The group's mean loss.
    loss: f32,
    /// Norm of the averaged gradient before clipping.
    grad_norm: f64,
    /// Some rank was asked to stop.
    stopping: bool,
    /// This rank's samples that had input noise added.
    noisy: usize,
}

impl Replica {
    /// A replica of `model` training the parameters `selection` picks, alone
    /// until it [`join`](Self::join)s its group.
    fn new(
        model: SegNet,
        selection: params::Trainable,
        config: &TrainerConfig,
        device: &Device,
    ) -> Self {
        let learner = Learner::new(model, selection, &config.train.optimizer, device);
        let local_sgd = config
            .train
            .local_sgd
            .as_ref()
            .map(|l| LocalSgd::new(l, learner.params()));
        Self {
            learner,
            local_sgd,
            group: None,
        }
    }

    /// Joins the data-parallel group when there is one and takes rank 0's
    /// state (fresh or resumed at `start_step`). Returns the step every
    /// rank starts from.
    fn join(
        &mut self,
        dist: &DistEnv,
        config: &TrainerConfig,
        compute: crate::device::Compute,
        timeouts: RingTimeouts,
        start_step: u64,
    ) -> Result<u64, TrainError> {
        // NCCL asked for by name joins even alone (a one-GPU machine still
        // runs the device collective in the loop).
        if dist.world_size <= 1 && config.train.backend != CollectiveBackend::Nccl {
            return Ok(start_step);
        }
        let mut group =
            DataParallel::join(dist, &config.train, compute, self.learner.len(), timeouts)?;
        let start_step = ddp::sync::adopt_root_state(
            &mut group,
            start_step,
            &mut self.learner,
            self.local_sgd.as_mut(),
        )?;
        self.group = Some(group);
        Ok(start_step)
    }

    /// Optimiser step `step` at learning rate `lr`: the mean gradient of the
    /// step's micro-batches (gradient accumulation), averaged over the group
    /// with the loss, any rank's stop request (`stop` is this rank's) and
    /// the BN running statistics, applied, then local SGD's averaging when due.
    fn step(
        &mut self,
        prefetch: &Prefetch,
        config: &TrainerConfig,
        step: u64,
        lr: f64,
        stop: bool,
    ) -> Result<Stepped, TrainError> {
        let mut noisy = 0;
        let micro_batches = (0..config.train.accumulate_steps).map(|_| {
            let (batch, n) = prefetch.next();
            noisy += n;
            batch
        });
        let (mut loss, mut grads) = self.learner.mean_gradient(micro_batches, config, step);
        let mut stopping = stop;
        if let Some(g) = self.group.as_mut() {
            grads = g.average_gradients(grads)?;
            (loss, stopping) = g.agree(loss, stopping)?;
            self.learner.set_buffers(g.average(self.learner.buffers())?);
        }
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let grad_norm = self
            .learner
            .apply(grads, lr, config.train.grad_clip_norm)
            .grad_norm;
        let done = step + 1;
        if let Some(l) = self.local_sgd.as_mut()
            && l.due(done, config.train.steps, stopping)
        {
            let agreed = l.synchronise(self.learner.params().clone(), self.group.as_mut())?;
            self.learner.set_params(agreed);
        }
        Ok(Stepped {
            loss,
            grad_norm,
            stopping,
            noisy,
        })
    }

    /// The whole validation split's scores, on every rank of the group.
    fn validate(
        &mut self,
        config: &TrainerConfig,
        setup: &Setup,
        device: &Device,
    ) -> Result<EvalReport, TrainError> {
        let group = self.group.as_mut().map(|g| g.collective());
        Ok(validate_group(
            self.learner.model(),
            config,
            setup,
            group,
            device,
        )?)
    }

    /// Fails unless every rank holds the same model and buffers.
    fn check_in_sync(&mut self) -> Result<(), TrainError> {
        if let Some(g) = self.group.as_mut() {
            ddp::sync::check_in_sync(g.collective(), ddp::sync::fingerprint(&self.learner))?;
        }
        Ok(())
    }

    /// The checkpoint of step `done`.
    fn checkpoint(&self, config: &TrainerConfig, done: u64, global_batch: u64) -> Checkpoint {
        checkpoint_of(
            &self.learner,
            self.local_sgd.as_ref(),
            config,
            done,
            global_batch,
        )
    }

    /// This rank's communication so far.
    fn comm(&self) -> ddp::CommStats {
        self.group.as_ref().map(|g| g.stats()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_checkpoints_fall_on_their_cadence_the_last_step_and_a_stop() {
        let mut c = TrainerConfig::default();
        c.train.validate_every = 4;
        c.checkpoint.every = 6;
        let due = |done, stopping| Due::after(done, 10, stopping, &c);
        let at: Vec<(u64, bool, bool)> = (1..=10)
            .map(|d| (d, due(d, false).validate, due(d, false).checkpoint))
            .filter(|&(_, v, k)| v || k)
            .collect();
        assert_eq!(
            at,
            [
                (4, true, false),
                (6, false, true),
                (8, true, false),
                (10, true, true)
            ]
        );
        let stop = Due {
            validate: false,
            checkpoint: true,
        };
        assert_eq!(due(3, true), stop);
        c.train.validate_every = 0;
        c.checkpoint.every = 0;
        let nothing = Due {
            validate: false,
            checkpoint: false,
        };
        assert_eq!(Due::after(5, 10, false, &c), nothing);
        let both = Due {
            validate: true,
            checkpoint: true,
        };
        assert_eq!(Due::after(10, 10, false, &c), both);
    }
}
