//! The trainer's command line as the operator writes it: the subcommands and
//! flags a replica is started with, named once for the trainer's parser
//! (`main.rs`) and for the planner that writes them into pods
//! (`operator/src/plan/replicas.rs`).

/// Train a model (a worker replica).
pub const TRAIN: &str = "train";
/// The federated aggregator.
pub const AGGREGATE: &str = "aggregate";
/// A federated client.
pub const CLIENT: &str = "client";
/// The in-pod supervisor, one process per GPU.
pub const LAUNCH: &str = "launch";

/// The run directory.
pub const OUT: &str = "out";
/// Continue from what the run directory holds.
pub const RESUME: &str = "resume";
/// Seconds to wait for the whole group (or the aggregator).
pub const JOIN_TIMEOUT: &str = "join-timeout";
/// Seconds a collective may stall.
pub const COLLECTIVE_TIMEOUT: &str = "collective-timeout";
/// Where the trainer serves Prometheus metrics.
pub const METRICS_ADDR: &str = "metrics-addr";
/// The aggregator's certificate chain.
pub const TLS_CERT: &str = "tls-cert";
/// The aggregator's private key.
pub const TLS_KEY: &str = "tls-key";
/// The CA a client trusts for the aggregator.
pub const TLS_CA: &str = "tls-ca";
/// The aggregator's URL, for a client.
pub const AGGREGATOR: &str = "aggregator";

/// `name` as it is written on a command line.
pub fn flag(name: &str) -> String {
    format!("--{name}")
}
