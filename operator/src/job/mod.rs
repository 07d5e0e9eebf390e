//! Where a spec becomes facts.
//!
//! [`ValidatedJob`] is built once from a `TrainingJob` (per reconcile on a
//! cluster, once for `trainyard local`): its names, uid, the trainer config
//! every replica receives, the world size and the steps it runs. The planner
//! and both runtimes take it, so none of them meets a spec the trainer
//! cannot run, and none falls back to a made-up name.

pub mod config;

use trainyard_trainer::config::TrainerConfig;

use crate::api::validate::{self, Problem};
use crate::api::{Mode, TrainingJob, TrainingJobSpec};
use crate::plan::Role;

/// Who a job is: what its replicas, Secrets, metrics and history are keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// Name (a DNS label, see [`validate::MAX_NAME_LEN`]).
    pub name: String,
    /// The API server's uid of this incarnation of the name.
    pub uid: String,
    /// `metadata.generation`, which conditions record.
    pub generation: Option<i64>,
}

/// A metadata field a stored job must have and this one lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the TrainingJob has no metadata.{0}")]
pub struct MissingMetadata(pub &'static str);

impl Identity {
    /// The identity of a job as the API server (or `trainyard local`) stores it.
    pub fn of(job: &TrainingJob) -> Result<Self, MissingMetadata> {
        let field = |v: &Option<String>, name| v.clone().ok_or(MissingMetadata(name));
        Ok(Self {
            namespace: field(&job.metadata.namespace, "namespace")?,
            name: field(&job.metadata.name, "name")?,
            uid: field(&job.metadata.uid, "uid")?,
            generation: job.metadata.generation,
        })
    }
}

/// The replicas of a job by role: one leader and its followers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The replica whose success is the job's (rank 0, or the aggregator).
    pub leader: Role,
    /// The role of the others (workers are their own followers).
    pub follower: Role,
    /// Replicas of the follower role (for workers, the leader is one of them).
    pub followers: u32,
    /// The port the leader listens on in its pod (rendezvous or federation).
    pub leader_port: u16,
}

/// A job the trainer can run, as facts.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJob {
    /// Names and uid.
    pub id: Identity,
    /// The spec these facts come from.
    pub spec: TrainingJobSpec,
    /// What every training replica receives as `TRAINYARD_CONFIG`.
    pub trainer: TrainerConfig,
    /// Who leads and who follows.
    pub roles: Roles,
}

impl ValidatedJob {
    /// The facts of `spec` for the job `id`, or the first spec field the
    /// trainer cannot run, named by its spec path.
    pub fn new(id: Identity, spec: &TrainingJobSpec) -> Result<Self, Problem> {
        let trainer = config::trainer_config(spec)?;
        let roles = match spec.mode {
            Mode::Distributed | Mode::Peft => Roles {
                leader: Role::Worker,
                follower: Role::Worker,
                followers: spec.worker_pods(),
                leader_port: spec
                    .distributed
                    .as_ref()
                    .map_or(trainyard_trainer::env::DEFAULT_MASTER_PORT, |d| d.port),
            },
            Mode::Federated => {
                let f = spec.federated.clone().unwrap_or_default();
                Roles {
                    leader: Role::Aggregator,
                    follower: Role::Client,
                    followers: f.clients,
                    leader_port: f.port,
                }
            }
        };
        Ok(Self {
            id,
            spec: spec.clone(),
            trainer,
            roles,
        })
    }

    /// Trainer processes that share each optimiser step.
    pub fn world_size(&self) -> u32 {
        self.spec.world_size()
    }

    /// GPUs each worker pod requests.
    pub fn gpus_per_worker(&self) -> u32 {
        self.spec.gpus_per_worker()
    }

    /// Optimiser steps (federated: rounds) the job runs.
    pub fn total_steps(&self) -> u64 {
        self.trainer.train.steps
    }

    /// Whether clients train alone and fail alone (Federated mode).
    pub fn federated(&self) -> bool {
        self.spec.mode == Mode::Federated
    }
}

/// Every layer of validation on every document of `text`: the manifest
/// checks of [`validate::parse_manifest`], then what the trainer can run.
/// A job without a namespace is in `default`, as `kubectl apply` would put
/// it; the uid is left to the caller that gives it one (see [`with_uid`]).
pub fn parse_manifests(text: &str) -> Result<Vec<TrainingJob>, Vec<Problem>> {
    validate::parse_each(text, |doc| {
        let job = validate::parse_manifest(doc)?;
        config::trainer_config(&job.spec).map_err(|p| vec![p])?;
        Ok(job)
    })
}

/// `job` as it is once stored: in its namespace (`default` if none), with
/// `uid` and a generation.
pub fn with_uid(mut job: TrainingJob, uid: String) -> TrainingJob {
    job.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    job.metadata.generation.get_or_insert(1);
    job.metadata.uid = Some(uid);
    job
}

/// The facts of a stored job: its identity, then its spec.
pub fn validated(job: &TrainingJob) -> Result<ValidatedJob, Problem> {
    let id = Identity::of(job).map_err(|e| Problem::new("metadata", e.to_string()))?;
    ValidatedJob::new(id, &job.spec)
}

/// A test job's facts, stored under a uid unless it has one.
#[cfg(test)]
pub(crate) fn facts(job: &TrainingJob) -> ValidatedJob {
    let uid = job.metadata.uid.clone().unwrap_or_else(|| "u-1".into());
    validated(&with_uid(job.clone(), uid)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: seg}\nspec:\n  mode: Distributed\n  image: t:1\n  distributed: {workers: 2}\n";

    #[test]
    fn trainer_limits_surface_as_spec_paths() {
        let bad = JOB.replace(
            "  distributed:",
            "  data: {shapes: {imageSize: 36}}\n  distributed:",
        );
        let problems = parse_manifests(&bad).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].to_string(),
            "spec.data.shapes.imageSize: must be a multiple of 8 (2 to the number of stages) and at least 8"
        );
        // Every document is checked, the trainer layer included.
        let two = format!("{JOB}---\n{bad}");
        let problems = parse_manifests(&two).unwrap_err();
        assert_eq!(
            problems.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
            ["[document 2] spec.data.shapes.imageSize"]
        );
    }

    #[test]
    fn facts_name_the_job_and_count_its_ranks() {
        let job = parse_manifests(&JOB.replace(
            "{workers: 2}",
            "{workers: 2, gpusPerWorker: 4}\n  training: {steps: 40}",
        ))
        .unwrap()
        .remove(0);
        assert_eq!(validated(&job).unwrap_err().path, "metadata");
        let facts = validated(&with_uid(job, "u-9".into())).unwrap();
        assert_eq!(
            facts.id,
            Identity {
                namespace: "default".into(),
                name: "seg".into(),
                uid: "u-9".into(),
                generation: Some(1),
            }
        );
        assert_eq!((facts.world_size(), facts.gpus_per_worker()), (8, 4));
        assert_eq!(facts.total_steps(), 40);
        assert_eq!(
            facts.roles,
            Roles {
                leader: Role::Worker,
                follower: Role::Worker,
                followers: 2,
                leader_port: trainyard_trainer::env::DEFAULT_MASTER_PORT,
            }
        );
    }
}
