//! Trainyard's operator and CLI: the `TrainingJob` API ([`api`]), the facts
//! a valid job stands for ([`job`]), the pure planner ([`plan`]), and the two sides that carry out its decisions: the
//! Kubernetes controller ([`k8s`]) with pods, and the local runner ([`local`])
//! with child processes.

pub mod api;
pub mod job;
pub mod k8s;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod store;

/// `bytes` random bytes from the operating system, as lowercase hex: the
/// one source of the operator's secrets, tokens and ids.
pub fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
