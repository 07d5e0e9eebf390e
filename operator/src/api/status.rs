//! `TrainingJob.status`: what the operator (or `trainyard local`) observed and decided.
//!
//! Written only by the planner's output, so every field means the same thing
//! on a cluster and on a laptop.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a TrainingJob.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Where the job is in its life cycle.
    #[serde(default)]
    pub phase: Phase,
    /// Machine-readable cause of the current phase (e.g. GangRunning,
    /// BackoffLimitExceeded, DeadlineExceeded, ImagePullFailed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable detail of the current phase.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Latest observations of the job's state, one per type (Created, Running,
    /// Restarting, Suspended, Succeeded, Failed, Stalled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica counts of the current attempt.
    #[serde(default)]
    pub replicas: ReplicaCounts,
    /// Gang restarts so far. Never decreases: not on suspend, not when
    /// replicas are deleted, not when the operator restarts.
    #[serde(default)]
    pub restarts: u32,
    /// Current run attempt; every gang restart or resume starts a new one, and
    /// replicas of older attempts are refused by the rendezvous.
    #[serde(default)]
    pub attempt: u32,
    /// When the job started running, or was last resumed (the deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the current attempt's replicas were first requested (the startup timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// When the whole gang was last seen running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since: Option<Time>,
    /// Earliest time the next attempt may start (restart backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_after: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Training progress reported by the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// Life-cycle phase.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    /// Accepted; the gang is being created or is not fully running yet.
    #[default]
    Pending,
    /// Every replica of the gang runs.
    Running,
    /// A retryable failure: the gang is being torn down to start again from
    /// the last checkpoint.
    Restarting,
    /// Training finished.
    Succeeded,
    /// Training failed for good; `reason` says why.
    Failed,
    /// Stopped by `runPolicy.suspend`; no replica runs.
    Suspended,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Running,
        Self::Restarting,
        Self::Succeeded,
        Self::Failed,
        Self::Suspended,
    ];

    /// Succeeded or Failed: nothing will run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    /// The name used in status, conditions and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Restarting => "Restarting",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Suspended => "Suspended",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Replica counts of the current attempt.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Replicas that exist and have not finished (pending or running).
    pub active: u32,
    /// Replicas of the current attempt that are running and ready.
    pub ready: u32,
    /// Replicas of the current attempt that exited with code 0.
    pub succeeded: u32,
    /// Replicas of the current attempt that exited with a failure.
    pub failed: u32,
}

/// Training progress.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimiser steps completed so far (federated: rounds).
    #[serde(default)]
    pub step: u64,
    /// Steps the job will run.
    #[serde(default)]
    pub total_steps: u64,
    /// Federated rounds the aggregator has completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// Federated rounds the job will run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_rounds: Option<u64>,
    /// The latest training loss the leader reported (the mean over its last batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest validation metric (mean IoU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<f64>,
    /// Training throughput of the whole job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// The newest checkpoint the leader wrote, from which a restart resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,
    /// Federated: clients whose updates made the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participants: Option<u32>,
    /// Federated: client updates rejected so far (malformed, hostile, stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_rejected: Option<u64>,
    /// Federated with differential privacy: ε spent so far (δ as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Federated: seconds the last round took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_seconds: Option<f64>,
    /// Fine-tuning: the adapter directory (Hugging Face PEFT format), once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// When progress last advanced (the stall timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_time: Option<Time>,
    /// One-line summary for `kubectl get` (e.g. "40% 400/1000").
    #[serde(default)]
    pub summary: String,
}

/// A checkpoint written by the job.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    /// The optimiser step (federated: round) the checkpoint holds.
    pub step: u64,
    /// Where it is, as the replica sees it.
    pub path: String,
}
