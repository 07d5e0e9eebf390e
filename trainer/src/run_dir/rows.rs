//! The rows of `metrics.jsonl`, typed on both sides: the trainer and the
//! aggregator write them, and anything that reads a run (the operator's
//! `trainyard local` tests, benchmarks) parses the same types instead of
//! looking up JSON keys.

use serde::{Deserialize, Serialize};

use crate::config::EvalNoise;

/// One line of `metrics.jsonl`, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Row {
    /// A logged optimiser step.
    Train(TrainRow),
    /// A validation pass.
    Val(ValRow),
    /// A federated round.
    Round(RoundRow),
}

impl Row {
    /// The step or round the row belongs to: what resuming truncates by.
    pub fn position(&self) -> u64 {
        match self {
            Self::Train(r) => r.step,
            Self::Val(r) => r.step,
            Self::Round(r) => r.round,
        }
    }

    /// The training row, if this is one.
    pub fn train(self) -> Option<TrainRow> {
        match self {
            Self::Train(r) => Some(r),
            _ => None,
        }
    }

    /// The validation row, if this is one.
    pub fn val(self) -> Option<ValRow> {
        match self {
            Self::Val(r) => Some(r),
            _ => None,
        }
    }

    /// The round row, if this is one.
    pub fn round(self) -> Option<RoundRow> {
        match self {
            Self::Round(r) => Some(r),
            _ => None,
        }
    }
}

/// An optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRow {
    /// Steps completed.
    pub step: u64,
    /// Loss of the step (the mean over the group).
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Norm of the averaged gradient before clipping.
    pub grad_norm: f64,
    /// Samples per second over the group, this step.
    pub samples_per_sec: f64,
    /// Samples of this rank's step that had input noise added.
    pub noisy_samples: usize,
}

/// A validation pass after `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValRow {
    /// Steps completed (0: the base of a fine-tuning run, before training).
    pub step: u64,
    /// The scores.
    #[serde(flatten)]
    pub report: EvalReport,
    /// The loss weights learned so far, under `model.task_weighting: uncertainty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_weights: Option<LearnedWeights>,
}

/// What each loss is multiplied by, `exp(−s)` of its learned log-variance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LearnedWeights {
    /// The segmentation cross-entropy's weight.
    pub segmentation: f64,
    /// The boundary loss's weight.
    pub boundary: f64,
}

/// A federated round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// The round (from 1).
    pub round: u64,
    /// Clients sampled.
    pub sampled: usize,
    /// Updates aggregated.
    pub participants: usize,
    /// Sampled clients that did not answer in time.
    pub dropped: usize,
    /// Updates refused over the run so far.
    pub rejected: u64,
    /// Weighted mean client loss.
    pub loss: Option<f64>,
    /// Validation mIoU of the new global model, when evaluated.
    pub val_miou: Option<f64>,
    /// Wall time of the round.
    pub seconds: f64,
    /// Time spent aggregating (decode excluded).
    pub aggregate_seconds: f64,
    /// Time spent writing the round's checkpoint.
    pub checkpoint_seconds: f64,
    /// ε spent so far, with privacy on.
    pub epsilon: Option<f64>,
    /// The clipping norm of the round, with privacy on.
    pub clip_norm: Option<f64>,
}

/// What scoring a model on some samples reports (`eval`, validation rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Samples scored.
    pub samples: usize,
    /// Semantic scores.
    #[serde(flatten)]
    pub scores: SegmentationScores,
    /// Boundary F1 within 1 pixel (`eval::boundary`); absent in rows written
    /// before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boundary_f1: Option<f64>,
    /// Instance scores, when the model has a boundary head and the data has instances.
    pub panoptic: Option<PanopticScores>,
    /// The noise the model was scored under; absent: clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<EvalNoise>,
}

/// Semantic segmentation quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentationScores {
    /// Correct pixels over counted pixels.
    pub pixel_accuracy: f64,
    /// Mean IoU over the classes present in truth or prediction.
    pub miou: f64,
    /// IoU per class; `None` for a class absent from both truth and prediction.
    pub iou: Vec<Option<f64>>,
}

/// Panoptic quality and its factors, averaged over object classes that occur.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PanopticScores {
    /// PQ = SQ · RQ.
    pub pq: f64,
    /// Segmentation quality: mean IoU of matched segments.
    pub sq: f64,
    /// Recognition quality: F1 of segment matching.
    pub rq: f64,
}
