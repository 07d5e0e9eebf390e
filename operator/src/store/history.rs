//! What is recorded, derived purely from a job's status before and after a
//! plan, and how each record is written (idempotently).

use k8s_openapi::jiff::Timestamp;
use sqlx::PgPool;

use crate::api::{Phase, TrainingJob, TrainingJobStatus};

/// One history record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The job's latest state (upsert).
    Job {
        /// Job uid.
        uid: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Mode.
        mode: String,
        /// The spec as JSON.
        spec: String,
        /// Status after the plan.
        status: Box<TrainingJobStatus>,
        /// Creation time.
        created_at: Timestamp,
        /// When this was observed.
        at: Timestamp,
    },
    /// A phase change.
    Transition {
        /// Job uid.
        uid: String,
        /// When it happened.
        at: Timestamp,
        /// Phase before (none for the first).
        from: Option<Phase>,
        /// Phase after.
        to: Phase,
        /// Reason.
        reason: String,
        /// Message.
        message: String,
        /// Attempt after.
        attempt: u32,
        /// Restarts after.
        restarts: u32,
    },
    /// A progress sample.
    Progress {
        /// Job uid.
        uid: String,
        /// Attempt that made it.
        attempt: u32,
        /// Step.
        step: u64,
        /// Total steps.
        total_steps: u64,
        /// Loss.
        loss: Option<f64>,
        /// Validation metric.
        metric: Option<f64>,
        /// Throughput.
        samples_per_second: Option<f64>,
        /// When.
        at: Timestamp,
    },
    /// A federated round.
    Round {
        /// Job uid.
        uid: String,
        /// Round number.
        round: u64,
        /// Updates aggregated.
        participants: Option<u32>,
        /// Updates rejected so far.
        rejected: Option<u64>,
        /// Mean client loss.
        loss: Option<f64>,
        /// Validation metric of the global model.
        metric: Option<f64>,
        /// ε spent after the round.
        epsilon: Option<f64>,
        /// Seconds the round took.
        seconds: Option<f64>,
        /// When.
        at: Timestamp,
    },
    /// The job's object left the cluster (its finalizer ran).
    Deleted {
        /// Job uid.
        uid: String,
        /// The object's deletion timestamp (stable across retries).
        at: Timestamp,
        /// Phase when it was deleted.
        from: Option<Phase>,
        /// Attempt when it was deleted.
        attempt: u32,
        /// Restarts when it was deleted.
        restarts: u32,
    },
    /// A checkpoint (or adapter) written by the job.
    Checkpoint {
        /// Job uid.
        uid: String,
        /// `checkpoint` or `adapter` (the artifacts table's kinds).
        kind: &'static str,
        /// Where.
        location: String,
        /// Step it holds.
        step: u64,
        /// Size, when known.
        size_bytes: Option<u64>,
        /// When it was seen.
        at: Timestamp,
    },
}

impl Record {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Job { .. } => "job",
            Self::Transition { .. } => "transition",
            Self::Progress { .. } => "progress",
            Self::Round { .. } => "round",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Deleted { .. } => "deleted",
        }
    }
}

/// The records that a plan taking `job` from `before` to `after` produces:
/// the job row whenever the status changed, a transition per phase change, a
/// progress sample per new step, a checkpoint per new checkpoint.
pub fn records(
    job: &TrainingJob,
    before: Option<&TrainingJobStatus>,
    after: &TrainingJobStatus,
    now: Timestamp,
) -> Vec<Record> {
    if before == Some(after) {
        return Vec::new();
    }
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let mut out = vec![Record::Job {
        uid: uid.clone(),
        namespace: job.metadata.namespace.clone().unwrap_or_default(),
        name: job.metadata.name.clone().unwrap_or_default(),
        mode: job.spec.mode.as_str().into(),
        spec: serde_json::to_string(&job.spec).expect("a spec serializes"),
        status: Box::new(after.clone()),
        created_at: job
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(now, |t| t.0),
        at: now,
    }];
    let phase_before = before.map(|s| s.phase);
    let first = before.is_none_or(|s| s.conditions.is_empty());
    if phase_before != Some(after.phase) || (first && !after.conditions.is_empty()) {
        let at = after
            .conditions
            .iter()
            .find(|c| c.type_ == after.phase.as_str())
            .map_or(now, |c| c.last_transition_time.0);
        out.push(Record::Transition {
            uid: uid.clone(),
            at,
            from: phase_before,
            to: after.phase,
            reason: after.reason.clone(),
            message: after.message.clone(),
            attempt: after.attempt,
            restarts: after.restarts,
        });
    }
    let progress_before = before.and_then(|s| s.progress.as_ref());
    if let Some(p) = &after.progress {
        if progress_before.is_none_or(|b| b.step != p.step) {
            out.push(Record::Progress {
                uid: uid.clone(),
                attempt: after.attempt,
                step: p.step,
                total_steps: p.total_steps,
                loss: p.loss,
                metric: p.metric,
                samples_per_second: p.samples_per_second,
                at: p.updated_time.as_ref().map_or(now, |t| t.0),
            });
        }
        if let Some(round) = p.round
            && progress_before.and_then(|b| b.round) != Some(round)
            && round > 0
        {
            out.push(Record::Round {
                uid: uid.clone(),
                round,
                participants: p.participants,
                rejected: p.updates_rejected,
                loss: p.loss,
                metric: p.metric,
                epsilon: p.epsilon,
                seconds: p.round_seconds,
                at: p.updated_time.as_ref().map_or(now, |t| t.0),
            });
        }
        if let Some(ck) = &p.last_checkpoint
            && progress_before.and_then(|b| b.last_checkpoint.as_ref()) != Some(ck)
        {
            out.push(Record::Checkpoint {
                uid: uid.clone(),
                kind: "checkpoint",
                location: ck.path.clone(),
                step: ck.step,
                size_bytes: None,
                at: now,
            });
        }
        if let Some(dir) = &p.adapter
            && progress_before.and_then(|b| b.adapter.as_ref()) != Some(dir)
        {
            out.push(Record::Checkpoint {
                uid,
                kind: "adapter",
                location: dir.clone(),
                step: p.step,
                size_bytes: None,
                at: now,
            });
        }
    }
    out
}

/// The record of `job` leaving the cluster, at its deletion timestamp.
pub fn deleted(job: &TrainingJob, now: Timestamp) -> Record {
    let status = job.status.as_ref();
    Record::Deleted {
        uid: job.metadata.uid.clone().unwrap_or_default(),
        at: job
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(now, |t| t.0),
        from: status.map(|s| s.phase),
        attempt: status.map_or(0, |s| s.attempt),
        restarts: status.map_or(0, |s| s.restarts),
    }
}

fn ts(t: &Timestamp) -> String {
    t.to_string()
}

fn opt_i64(x: Option<u64>) -> Option<i64> {
    x.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn i64_of(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// Writes one record; idempotent.
pub async fn write(pool: &PgPool, record: &Record) -> Result<(), sqlx::Error> {
    match record {
        Record::Job {
            uid,
            namespace,
            name,
            mode,
            spec,
            status,
            created_at,
            at,
        } => {
            sqlx::query(
                "INSERT INTO jobs (uid, namespace, name, mode, spec, phase, reason, message, restarts, attempt,
                                   created_at, started_at, finished_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10,
                         $11::timestamptz, $12::timestamptz, $13::timestamptz, $14::timestamptz)
                 ON CONFLICT (uid) DO UPDATE SET
                     spec = EXCLUDED.spec, phase = EXCLUDED.phase, reason = EXCLUDED.reason,
                     message = EXCLUDED.message,
                     restarts = GREATEST(jobs.restarts, EXCLUDED.restarts),
                     attempt = GREATEST(jobs.attempt, EXCLUDED.attempt),
                     started_at = COALESCE(jobs.started_at, EXCLUDED.started_at),
                     finished_at = EXCLUDED.finished_at,
                     updated_at = GREATEST(jobs.updated_at, EXCLUDED.updated_at)",
            )
            .bind(uid)
            .bind(namespace)
            .bind(name)
            .bind(mode)
            .bind(spec)
            .bind(status.phase.as_str())
            .bind(&status.reason)
            .bind(&status.message)
            .bind(i32::try_from(status.restarts).unwrap_or(i32::MAX))
            .bind(i32::try_from(status.attempt).unwrap_or(i32::MAX))
            .bind(ts(created_at))
            .bind(status.start_time.as_ref().map(|t| ts(&t.0)))
            .bind(status.completion_time.as_ref().map(|t| ts(&t.0)))
            .bind(ts(at))
            .execute(pool)
            .await?;
        }
        Record::Transition {
            uid,
            at,
            from,
            to,
            reason,
            message,
            attempt,
            restarts,
        } => {
            sqlx::query(
                "INSERT INTO transitions (job_uid, at, from_phase, to_phase, reason, message, attempt, restarts)
                 VALUES ($1, $2::timestamptz, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT DO NOTHING",
            )
            .bind(uid)
            .bind(ts(at))
            .bind(from.map(Phase::as_str))
            .bind(to.as_str())
            .bind(reason)
            .bind(message)
            .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
            .bind(i32::try_from(*restarts).unwrap_or(i32::MAX))
            .execute(pool)
            .await?;
        }
        Record::Progress {
            uid,
            attempt,
            step,
            total_steps,
            loss,
            metric,
            samples_per_second,
            at,
        } => {
            sqlx::query(
                "INSERT INTO progress (job_uid, attempt, step, total_steps, loss, metric, samples_per_second, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::timestamptz)
                 ON CONFLICT DO NOTHING",
            )
            .bind(uid)
            .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
            .bind(i64_of(*step))
            .bind(i64_of(*total_steps))
            .bind(loss)
            .bind(metric)
            .bind(samples_per_second)
            .bind(ts(at))
            .execute(pool)
            .await?;
        }
        Record::Round {
            uid,
            round,
            participants,
            rejected,
            loss,
            metric,
            epsilon,
            seconds,
            at,
        } => {
            // A resumed aggregator may report a round again: last word wins.
            sqlx::query(
                "INSERT INTO rounds (job_uid, round, participants, rejected, loss, metric, epsilon, seconds, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::timestamptz)
                 ON CONFLICT (job_uid, round) DO UPDATE SET
                   participants = EXCLUDED.participants, rejected = EXCLUDED.rejected,
                   loss = EXCLUDED.loss, metric = EXCLUDED.metric, epsilon = EXCLUDED.epsilon,
                   seconds = EXCLUDED.seconds, at = EXCLUDED.at",
            )
            .bind(uid)
            .bind(i64_of(*round))
            .bind(participants.map_or(0, |p| i32::try_from(p).unwrap_or(i32::MAX)))
            .bind(rejected.map_or(0, |r| i32::try_from(r).unwrap_or(i32::MAX)))
            .bind(loss)
            .bind(metric)
            .bind(epsilon)
            .bind(seconds)
            .bind(ts(at))
            .execute(pool)
            .await?;
        }
        Record::Deleted {
            uid,
            at,
            from,
            attempt,
            restarts,
        } => {
            // One statement: the transition is written only for a job row
            // that exists (one never recorded has nothing to close).
            sqlx::query(
                "WITH closed AS (
                     UPDATE jobs SET
                         deleted_at = COALESCE(deleted_at, $2::timestamptz),
                         phase = CASE WHEN phase IN ('Succeeded', 'Failed') THEN phase ELSE 'Deleted' END,
                         finished_at = COALESCE(finished_at, $2::timestamptz),
                         updated_at = GREATEST(updated_at, $2::timestamptz)
                     WHERE uid = $1
                     RETURNING uid)
                 INSERT INTO transitions (job_uid, at, from_phase, to_phase, reason, message, attempt, restarts)
                 SELECT uid, $2::timestamptz, $3, 'Deleted', 'Deleted', 'the TrainingJob was deleted', $4, $5
                 FROM closed
                 ON CONFLICT DO NOTHING",
            )
            .bind(uid)
            .bind(ts(at))
            .bind(from.map(Phase::as_str))
            .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
            .bind(i32::try_from(*restarts).unwrap_or(i32::MAX))
            .execute(pool)
            .await?;
        }
        Record::Checkpoint {
            uid,
            kind,
            location,
            step,
            size_bytes,
            at,
        } => {
            sqlx::query(
                "INSERT INTO artifacts (job_uid, kind, location, step, size_bytes, at)
                 VALUES ($1, $2, $3, $4, $5, $6::timestamptz)
                 ON CONFLICT DO NOTHING",
            )
            .bind(uid)
            .bind(kind)
            .bind(location)
            .bind(i64_of(*step))
            .bind(opt_i64(*size_bytes))
            .bind(ts(at))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_adapter_is_recorded_once_as_an_adapter_artifact() {
        let job = crate::api::validate::parse_manifests(
            "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: ft, namespace: ml, uid: u1}\nspec:\n  mode: Peft\n  image: t:1\n  peft: {baseCheckpoint: /b.safetensors}\n",
        )
        .unwrap()
        .remove(0);
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let before = TrainingJobStatus {
            progress: Some(crate::api::Progress {
                step: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut after = before.clone();
        after.progress.as_mut().unwrap().adapter = Some("/out/adapter".into());
        let adapters = |records: Vec<Record>| {
            records
                .into_iter()
                .filter(|r| {
                    matches!(
                        r,
                        Record::Checkpoint {
                            kind: "adapter",
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(adapters(records(&job, Some(&before), &after, now)), 1);
        assert_eq!(
            adapters(records(&job, Some(&after), &after, now)),
            0,
            "not again"
        );
    }
}
