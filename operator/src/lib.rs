//! Trainyard's operator and CLI: the `TrainingJob` API ([`api`]), the pure
//! planner ([`plan`]), and the local runner ([`local`]) that carries out the
//! planner's decisions with child processes.

pub mod api;
pub mod local;
pub mod plan;
