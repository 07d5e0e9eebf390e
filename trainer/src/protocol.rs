//! What a trainer tells the operator: the progress report's wire format,
//! shared by the trainer (which posts it) and the operator (which checks it).

use serde::{Deserialize, Serialize};

/// Path of the operator's progress endpoint: `{PROGRESS_PATH}/{namespace}/{job}`.
pub const PROGRESS_PATH: &str = "/v1/progress";

/// Largest report body the operator accepts, in bytes.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;

/// One progress report (JSON), authenticated with the job's token as
/// `Authorization: Bearer <token>`.
///
/// Fields the operator does not know are ignored rather than refused: the
/// trainer image is the user's, so a job may run a trainer older or newer
/// than the operator (`total_steps` and `round`, which older trainers send,
/// are among them). The body's size is bounded by [`MAX_REPORT_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProgressMessage {
    /// Completed optimiser steps (federated: completed rounds).
    pub step: u64,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest validation mIoU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<f64>,
    /// Training throughput of the whole group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Newest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointMessage>,
    /// Federated: clients whose updates made the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participants: Option<u32>,
    /// Federated: updates rejected so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<u64>,
    /// Federated with privacy: ε spent so far (for the configured δ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Federated: seconds the last round took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_seconds: Option<f64>,
    /// Fine-tuning: where the adapter (PEFT format) was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// A checkpoint in a progress report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMessage {
    /// Step it holds.
    pub step: u64,
    /// Path as the trainer sees it.
    pub path: String,
}
