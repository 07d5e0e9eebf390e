//! Trainyard's operator and CLI: the `TrainingJob` API ([`api`]), the pure
//! planner ([`plan`]), and the two sides that carry out its decisions: the
//! Kubernetes controller ([`k8s`]) with pods, and the local runner ([`local`])
//! with child processes.

pub mod api;
pub mod k8s;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod store;
