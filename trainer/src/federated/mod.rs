//! Federated learning: an aggregator and clients that keep their data.
//!
//! # Protocol
//! HTTP/1.1, pull-based, so clients need no inbound port and may sit behind
//! NAT. Every request carries `Authorization: Bearer <token>`, the client's
//! own token ([`crate::config::client_token`]).
//!
//! - `GET /v1/federated/task?client=i` long-polls (up to [`LONG_POLL`]): `200`
//!   with the global model (safetensors; metadata `round`, `local_steps`,
//!   `step_offset`, `proximal_mu`) when client i is sampled in the current
//!   round and has not answered; `204` when there is nothing for it yet;
//!   `410` when the job is done. Polling is what makes a client *available*.
//! - `POST /v1/federated/update?client=i&round=r` with the change
//!   `local − global` (safetensors; metadata `round`, `examples`, `loss`).
//!   `200` accepted; `401` bad token, `404` unknown client, `409` stale round
//!   or no open task, `413` larger than a valid update of this model
//!   ([`update::Schema::max_update_bytes`]: refused from `Content-Length`
//!   unread, or as soon as an undeclared body passes it), `429` another update
//!   of this client still in flight, `408` a body slower than its deadline
//!   (30 s plus 1 s per MiB of a valid update), `422` wrong names, shapes,
//!   dtypes, NaN/Inf, an excessive norm, or more `examples` than the client's
//!   partition holds (the aggregator computes the split the clients do; with
//!   `partition: own`, the whole training split). Rejections are counted by
//!   reason and never aggregated. Token and round are checked before a byte
//!   of the body is read, and at most two bodies are decoded at once, so the
//!   aggregator holds at most one body per sampled client, two decoded
//!   updates and the accepted deltas: about 2 × clients × update size plus a
//!   constant.
//!
//! A round: wait (at most `sampling_timeout_seconds`) until `min_available`
//! clients are polling; sample `max(⌈fraction·available⌉, min_clients)` of
//! them with a seeded RNG; wait until all answer or `round_timeout_seconds`
//! pass; with at least `min_clients` updates, aggregate ([`aggregate`], with
//! [`privacy`] if configured), apply the [`server_opt`], evaluate, checkpoint
//! and report; otherwise retry the round (at most `round_attempts` times).
//! A restarted aggregator resumes after its last checkpointed round; a
//! restarted client simply polls again.

pub mod aggregate;
pub mod aggregator;
pub mod bench;
pub mod client;
mod global;
pub mod partition;
pub mod privacy;
pub mod server_opt;
pub mod tls;
pub mod update;

use std::time::Duration;

/// Path of the task long-poll.
pub const TASK_PATH: &str = "/v1/federated/task";
/// Path updates are posted to.
pub const UPDATE_PATH: &str = "/v1/federated/update";
/// Longest a task request is held open.
pub const LONG_POLL: Duration = Duration::from_secs(20);
/// A client counts as available while it polled within this window.
pub const AVAILABLE_WINDOW: Duration = Duration::from_secs(45);

/// Why a federated role stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederatedError {
    /// Setting up: config, dataset, model, partition.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Partitioning failed.
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    /// A round could not gather enough clients (retryable: a restart may find them).
    #[error("{0}")]
    Quorum(String),
    /// The aggregator cannot be reached (retryable).
    #[error("{0}")]
    Unreachable(String),
    /// The aggregator refused this client (permanent: a wrong token or index).
    #[error("{0}")]
    Refused(String),
    /// SIGTERM: the aggregator checkpointed its last round first.
    #[error("{0}")]
    Stopped(String),
    /// Anything else that stops the role (permanent).
    #[error("{0}")]
    Other(String),
    /// Checkpoints.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Writing outputs.
    #[error(transparent)]
    Output(#[from] crate::tensorfile::TensorFileError),
    /// The run directory: a fresh run where one left checkpoints, a full disk.
    #[error(transparent)]
    RunDir(#[from] crate::run_dir::RunDirError),
}

impl FederatedError {
    /// Whether a restart of this replica can help (exit 75 rather than 1).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Quorum(_) | Self::Unreachable(_))
    }
}
