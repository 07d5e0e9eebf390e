//! Evaluation: how good a model's predictions are. Semantic scores
//! ([`metrics`]: confusion, mIoU), boundary F1 ([`boundary`]), instances from semantics and boundaries
//! and panoptic quality ([`instances`]), and scoring a model on a dataset
//! (validation during training, federated evaluation, `eval`).

pub mod boundary;
pub mod instances;
pub mod metrics;

use std::path::Path;

use crate::config::EvalNoise;
use crate::data::{self, Batch, Dataset, Split};
use crate::infer::{InferError, Predictor};
use boundary::BoundaryCounts;
use instances::PanopticQuality;
use metrics::Confusion;

/// What `eval` reports (one home with the validation rows it is written in).
pub use crate::run_dir::EvalReport;

/// Raw validation statistics of some samples, mergeable across ranks.
#[derive(Debug, Clone)]
pub struct EvalCounts {
    /// Samples scored.
    pub samples: usize,
    /// Semantic confusion matrix.
    pub confusion: Confusion,
    /// Class-boundary pixels found and missed.
    pub boundary: BoundaryCounts,
    /// Instance statistics, when scored.
    pub panoptic: Option<PanopticQuality>,
    /// The noise the samples were scored under (the same on every rank).
    pub noise: Option<EvalNoise>,
}

impl EvalCounts {
    /// The scores these statistics give.
    pub fn report(&self) -> EvalReport {
        EvalReport {
            samples: self.samples,
            scores: self.confusion.scores(),
            boundary_f1: Some(self.boundary.f1()),
            panoptic: self.panoptic.as_ref().map(|p| p.scores()),
            noise: self.noise,
        }
    }

    /// Everything as integers, for exchange between ranks (same length on
    /// every rank of a run).
    pub fn to_words(&self) -> Vec<u64> {
        let mut words = vec![self.samples as u64];
        words.extend_from_slice(self.confusion.counts());
        words.extend(self.boundary.to_words());
        if let Some(p) = &self.panoptic {
            words.extend(p.to_words());
        }
        words
    }

    /// Adds statistics produced by [`EvalCounts::to_words`].
    pub fn add_words(&mut self, words: &[u64]) {
        let k = self.confusion.counts().len();
        self.samples += words[0] as usize;
        self.confusion.add_counts(&words[1..1 + k]);
        let b = 1 + k + BoundaryCounts::WORDS;
        self.boundary.add_words(&words[1 + k..b]);
        if let Some(p) = self.panoptic.as_mut() {
            p.add_words(&words[b..]);
        }
    }
}

/// Whether instance quality can be scored: the model predicts boundaries and
/// the dataset has instance masks (decided from one sample, identically on
/// every rank).
pub fn scores_instances(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    any_index: Option<usize>,
) -> bool {
    predictor.config.model.boundary_head
        && any_index.is_some_and(|i| dataset.get(i).instances.is_some())
}

/// Accumulates the statistics of `predictor` on `indices` of `dataset`,
/// under `noise` when given. Noise of σ = 0 on both sides is scoring clean,
/// and is reported as no noise.
pub fn accumulate(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    indices: &[usize],
    batch_size: usize,
    with_instances: bool,
    noise: Option<&EvalNoise>,
) -> EvalCounts {
    let noise = noise.filter(|n| !n.is_clean());
    let classes = predictor.config.model.classes;
    let mut counts = EvalCounts {
        samples: indices.len(),
        confusion: Confusion::new(classes),
        boundary: BoundaryCounts::default(),
        panoptic: with_instances.then(|| PanopticQuality::new(classes)),
        noise: noise.copied(),
    };
    let noisy = noise
        .filter(|n| n.weight_sigma > 0.0)
        .map(|n| predictor.with_weight_noise(n.weight_sigma, n.seed));
    let predictor = noisy.as_ref().unwrap_or(predictor);
    let [h, w] = dataset.size();
    for chunk in indices.chunks(batch_size.max(1)) {
        let samples: Vec<_> = chunk.iter().map(|&i| dataset.get(i)).collect();
        let mut batch = Batch::collate(&samples, dataset.channels(), [h, w]);
        if let Some(n) = noise {
            batch.add_sensor_noise(n.input_sigma, n.seed, chunk);
        }
        for (pred, sample) in predictor.predict(&batch).into_iter().zip(&samples) {
            counts.confusion.add(&sample.mask, &pred.classes);
            counts.boundary.add(&sample.mask, &pred.classes, w, h);
            if let (Some(pq), Some(pi), Some(ti)) = (
                counts.panoptic.as_mut(),
                pred.instances.as_ref(),
                sample.instances.as_ref(),
            ) {
                pq.add(&pred.classes, pi, &sample.mask, ti);
            }
        }
    }
    counts
}

/// Scores `predictor` on `indices` of `dataset`, under `noise` when given.
pub fn evaluate(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    indices: &[usize],
    batch_size: usize,
    noise: Option<&EvalNoise>,
) -> EvalReport {
    let with_instances = scores_instances(predictor, dataset, indices.first().copied());
    accumulate(
        predictor,
        dataset,
        indices,
        batch_size,
        with_instances,
        noise,
    )
    .report()
}

/// `eval`: scores a checkpoint on an image folder (every sample), or on the
/// validation split of the dataset it was trained on, under `noise` when given.
pub fn eval_checkpoint(
    checkpoint: &Path,
    folder: Option<&Path>,
    noise: Option<&EvalNoise>,
) -> Result<EvalReport, InferError> {
    let predictor = Predictor::load(checkpoint)?;
    let mut config = predictor.config.clone();
    let batch_size = config.train.batch_size;
    if let Some(dir) = folder {
        config.data.shapes = None;
        config.data.folder = Some(crate::config::FolderConfig {
            path: dir.to_owned(),
        });
        let dataset = data::open(&config.data, config.model.in_channels, config.model.classes)?;
        data::check_fits(&config.model, dataset.as_ref())?;
        let all: Vec<usize> = (0..dataset.len()).collect();
        return Ok(evaluate(
            &predictor,
            dataset.as_ref(),
            &all,
            batch_size,
            noise,
        ));
    }
    let dataset = data::open(&config.data, config.model.in_channels, config.model.classes)?;
    data::check_fits(&config.model, dataset.as_ref())?;
    let split = Split::new(
        dataset.len(),
        config.data.validation_fraction,
        config.data.seed,
    );
    let indices = if split.val.is_empty() {
        split.train
    } else {
        split.val
    };
    Ok(evaluate(
        &predictor,
        dataset.as_ref(),
        &indices,
        batch_size,
        noise,
    ))
}
