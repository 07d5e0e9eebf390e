//! The planner: `(job, observed replicas, now) → (desired replicas, status, actions)`.
//!
//! Pure and deterministic: no clock, no I/O. The Kubernetes controller and
//! `trainyard local` both observe, call [`plan`], and carry out the actions,
//! so a job behaves the same on a cluster and on a laptop.
//!
//! # Transition table
//!
//! Checked top to bottom each time; the first row that applies wins. "Gang"
//! is every replica of the current attempt; "fail", "restart" and "succeed"
//! are the single functions every path goes through.
//!
//! | from | event | to | actions |
//! |---|---|---|---|
//! | Succeeded, Failed | any | (same) | delete replicas per `cleanPodPolicy`; after `ttlSecondsAfterFinished`, delete the job |
//! | any other | spec cannot become a trainer config | Failed (InvalidSpec) | cleanup |
//! | any other | `suspend: true` | Suspended | delete every replica |
//! | Suspended | `suspend: false` | Pending, attempt + 1, deadline reset | create the gang |
//! | Pending, Running, Restarting | `activeDeadlineSeconds` passed | Failed (DeadlineExceeded) | cleanup |
//! | Pending, Running | leader replica succeeded | Succeeded | cleanup |
//! | Pending, Running | a replica failed with a permanent exit code | Failed (ReplicaFailed) | cleanup |
//! | Pending | a replica cannot pull its image or build its container | Failed (ImagePullFailed / CreateContainerConfigError) | cleanup |
//! | Pending, Running (Federated) | replicas failed with a retryable exit code | (same), restarts + 1 each | delete those replicas alone (ReplicaRestarted); they are recreated |
//! | Pending, Running | a replica failed with a retryable exit code | restart (ReplicaFailed) | |
//! | Running (not Federated) | a gang member vanished or is no longer running | restart (ReplicaLost) | |
//! | Running | no progress for `stallTimeoutSeconds` | restart (Stalled) | |
//! | Pending | gang not running `startupTimeoutSeconds` after creation | restart (StartupTimeout) | |
//! | Pending | every gang member running | Running (GangRunning) | |
//! | Pending, Running | otherwise | (same) | create missing gang members, delete replicas of older attempts |
//! | Restarting | replicas of this attempt or older remain | Restarting | delete them (never a later attempt's) |
//! | Restarting | none remain, backoff over | Pending, attempt + 1 | create the gang |
//!
//! restart = `restarts < backoffLimit` ? Restarting (restarts + 1, backoff
//! 1 s · 2^(restarts−1), at most 60 s; delete every replica) : Failed (BackoffLimitExceeded).
//! Exit codes: `runPolicy.failureRules` first; otherwise 75 (the trainer's
//! "a peer failed") and 128–255 (killed by a signal) are retryable, the rest permanent.

pub mod replicas;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use trainyard_trainer::exit;
use trainyard_trainer::protocol::ProgressMessage;

use crate::api::validate::Problem;
use crate::api::{
    CheckpointRef, CleanPodPolicy, FailureAction, Phase, Progress, ReplicaCounts, RunPolicy,
    TrainingJob, TrainingJobStatus,
};
use crate::job::ValidatedJob;
pub use replicas::{Placement, Replica, Role};

/// What a replica is doing, as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaState {
    /// Created, not running yet. `reason` is the container's waiting reason
    /// (`ErrImagePull`, `ContainerCreating`, ...), when there is one.
    Pending {
        /// Waiting reason.
        reason: Option<String>,
        /// Waiting message.
        message: Option<String>,
    },
    /// Running (and ready, when it has a readiness signal).
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, or was killed (`exit_code` 128 + signal), or vanished
    /// from its node (`exit_code` None).
    Failed {
        /// Exit code, if one is known.
        exit_code: Option<i32>,
        /// Short cause (`Error`, `OOMKilled`, `Evicted`, ...).
        reason: Option<String>,
    },
}

/// One replica that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedReplica {
    /// Its name.
    pub name: String,
    /// The attempt it was created for.
    pub attempt: u32,
    /// What it is doing.
    pub state: ReplicaState,
}

/// Everything the planner is told about the world.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Every replica of the job that exists, of any attempt.
    pub replicas: Vec<ObservedReplica>,
    /// The leader's latest progress report, as the trainer sent it.
    pub progress: Option<ProgressMessage>,
    /// Whether the history store took its last write (None: no store).
    pub history: Option<bool>,
    /// The API server's admission refused the job's pods (None: it did not,
    /// or the last pod written was admitted).
    pub admission: Option<AdmissionRefusal>,
}

/// Pods of the job refused by admission (Pod Security, a webhook, a quota).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionRefusal {
    /// Refusals in a row.
    pub tries: u32,
    /// The API server's message of the last one.
    pub message: String,
}

/// A job whose pods admission refuses this many times in a row fails.
pub const ADMISSION_TRIES: u32 = 5;

/// The condition of a job whose pods admission refuses.
pub const ADMISSION_REFUSED: &str = "AdmissionRefused";

/// Normal or warning, as Kubernetes Events have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A expected transition.
    Normal,
    /// A failure or a restart.
    Warning,
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start this replica.
    Create(Replica),
    /// Stop and remove a replica (graceful: SIGTERM, then a kill).
    Delete {
        /// Replica name.
        name: String,
    },
    /// Record an event for people (Kubernetes Event, local log line).
    Event {
        /// Normal or warning.
        kind: EventType,
        /// CamelCase reason.
        reason: String,
        /// Human-readable message.
        message: String,
    },
    /// The job's TTL after finishing has passed: delete the job itself.
    DeleteJob,
}

/// The planner's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The status to write.
    pub status: TrainingJobStatus,
    /// The replicas that should exist now (the current attempt's gang, or
    /// none when the job is suspended, restarting or finished).
    pub desired: Vec<Replica>,
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// Plan again after this long at the latest (a timer is due), even if
    /// nothing changes.
    pub requeue_after: Option<Duration>,
}

/// Decides what should happen next to `job`, whose last written status is
/// `status`. Total: every input yields a plan.
pub fn plan(
    job: &ValidatedJob,
    status: Option<&TrainingJobStatus>,
    observed: &Observation,
    now: Timestamp,
    placement: &Placement,
) -> Plan {
    let mut p = Planner::new(
        &job.spec.run_policy,
        job.id.generation,
        status,
        observed,
        now,
    );
    p.merge_progress(job);
    p.step(Ok(job), placement);
    p.finish()
}

/// The plan of a stored job whose spec the trainer cannot run: it fails
/// naming the field (InvalidSpec), or, finished already, only cleans up.
pub fn reject(
    job: &TrainingJob,
    problem: &Problem,
    observed: &Observation,
    now: Timestamp,
) -> Plan {
    let status = job.status.as_ref();
    let mut p = Planner::new(
        &job.spec.run_policy,
        job.metadata.generation,
        status,
        observed,
        now,
    );
    p.step(Err(problem), &Placement::Kubernetes);
    p.finish()
}

struct Planner<'a> {
    policy: &'a RunPolicy,
    generation: Option<i64>,
    observed: &'a Observation,
    now: Timestamp,
    status: TrainingJobStatus,
    actions: Vec<Action>,
    desired: Vec<Replica>,
    timers: Vec<Duration>,
}

impl<'a> Planner<'a> {
    fn new(
        policy: &'a RunPolicy,
        generation: Option<i64>,
        status: Option<&TrainingJobStatus>,
        observed: &'a Observation,
        now: Timestamp,
    ) -> Self {
        let mut status = status.cloned().unwrap_or_default();
        status.observed_generation = generation;
        Self {
            policy,
            generation,
            observed,
            now,
            status,
            actions: Vec::new(),
            desired: Vec::new(),
            timers: Vec::new(),
        }
    }

    fn finish(mut self) -> Plan {
        let p = &mut self;
        p.status.replicas = p.counts();
        history_condition(&mut p.status, p.observed.history, p.generation, p.now);
        if let Some(progress) = &mut p.status.progress {
            progress.summary = summary(progress);
        }
        Plan {
            requeue_after: self.timers.iter().min().copied(),
            status: self.status,
            desired: self.desired,
            actions: self.actions,
        }
    }
}

/// Longest wait between gang restarts.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);

/// Waiting reasons that never resolve on their own.
const STUCK_REASONS: &[(&str, &str)] = &[
    ("ErrImagePull", "ImagePullFailed"),
    ("ImagePullBackOff", "ImagePullFailed"),
    ("InvalidImageName", "ImagePullFailed"),
    ("CreateContainerConfigError", "CreateContainerConfigError"),
];

impl Planner<'_> {
    fn step(&mut self, job: Result<&ValidatedJob, &Problem>, placement: &Placement) {
        let phase = self.status.phase;
        if phase.is_terminal() {
            self.finished();
            return;
        }
        let job = match job {
            Ok(job) => job,
            Err(problem) => {
                self.fail("InvalidSpec", &problem.to_string());
                return;
            }
        };
        let gang = replicas::desired(job, self.status.attempt, placement);
        if self.policy.suspend {
            self.suspend();
            return;
        }
        if phase == Phase::Suspended {
            self.status.attempt += 1;
            self.status.start_time = None;
            self.status.attempt_start_time = None;
            self.status.running_since = None;
            self.transition(
                Phase::Pending,
                "Resumed",
                "resumed; the deadline starts again",
            );
            // The resumed gang is the next attempt's; plan it afresh.
            self.step(Ok(job), placement);
            return;
        }
        if self.deadline_passed() || self.refused() {
            return;
        }
        match phase {
            Phase::Restarting => self.restarting(job, placement),
            Phase::Pending | Phase::Running => self.active(job, gang),
            Phase::Suspended | Phase::Succeeded | Phase::Failed => unreachable!("handled above"),
        }
    }

    /// Admission refusals: a condition and an Event with the API server's
    /// message while tries remain, then the job fails; whether it ended it.
    fn refused(&mut self) -> bool {
        let generation = self.generation;
        let Some(refusal) = &self.observed.admission else {
            if self
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == ADMISSION_REFUSED)
            {
                side_condition(
                    &mut self.status.conditions,
                    ADMISSION_REFUSED,
                    false,
                    "Admitted",
                    "the job's pods are admitted",
                    generation,
                    self.now,
                );
            }
            return false;
        };
        let message = format!(
            "the API server refused the job's pods ({} of {ADMISSION_TRIES} tries): {}",
            refusal.tries, refusal.message
        );
        if refusal.tries >= ADMISSION_TRIES {
            self.fail("AdmissionRefused", &message);
            return true;
        }
        side_condition(
            &mut self.status.conditions,
            ADMISSION_REFUSED,
            true,
            "AdmissionRefused",
            &message,
            generation,
            self.now,
        );
        self.event(EventType::Warning, "AdmissionRefused", message);
        false
    }

    fn active(&mut self, job: &ValidatedJob, gang: Vec<Replica>) {
        let attempt = self.status.attempt;
        // Replicas of a later attempt mean this status is older than the
        // write that created them (a cache behind our own write): acting on
        // it could only undo that write. A fresh read comes within moments.
        if self.observed.replicas.iter().any(|r| r.attempt > attempt) {
            self.timers.push(Duration::from_secs(1));
            self.desired = gang;
            return;
        }
        if self.status.start_time.is_none() {
            self.status.start_time = Some(Time(self.now));
        }
        if self.status.attempt_start_time.is_none() {
            self.status.attempt_start_time = Some(Time(self.now));
        }
        let current: BTreeMap<&str, &ReplicaState> = self
            .observed
            .replicas
            .iter()
            .filter(|r| r.attempt == attempt)
            .map(|r| (r.name.as_str(), &r.state))
            .collect();
        let leader = &gang[0].name;
        if matches!(current.get(leader.as_str()), Some(ReplicaState::Succeeded)) {
            self.succeed(&format!("{leader} finished"));
            return;
        }
        // Permanent failures win over retryable ones: restarting cannot help.
        let mut retryable = Vec::new();
        for r in &gang {
            if let Some(ReplicaState::Failed { exit_code, reason }) = current.get(r.name.as_str()) {
                let what = describe_exit(&r.name, *exit_code, reason.as_deref());
                match self.classify(*exit_code) {
                    FailureAction::FailJob => {
                        self.fail("ReplicaFailed", &format!("{what}, which is not retryable"));
                        return;
                    }
                    // "A peer failed" is the echo of another replica's
                    // failure: name the cause first.
                    FailureAction::RestartGang => {
                        let echo = *exit_code == Some(i32::from(exit::RETRYABLE));
                        retryable.push((echo, what));
                    }
                }
            }
            if let Some(ReplicaState::Pending {
                reason: Some(reason),
                message,
            }) = current.get(r.name.as_str())
                && let Some((_, job_reason)) = STUCK_REASONS.iter().find(|(w, _)| w == reason)
            {
                let detail = message.as_deref().unwrap_or("");
                self.fail(
                    job_reason,
                    &format!("{} is stuck in {reason}: {detail}", r.name),
                );
                return;
            }
        }
        // Federated replicas fail alone: the aggregator resumes from its
        // last round and clients rejoin, so the others keep their work.
        let federated = job.federated();
        if federated && !retryable.is_empty() {
            let failed: Vec<String> = gang
                .iter()
                .filter(|r| {
                    matches!(
                        current.get(r.name.as_str()),
                        Some(ReplicaState::Failed { .. })
                    )
                })
                .map(|r| r.name.clone())
                .collect();
            let what: Vec<String> = retryable.into_iter().map(|(_, w)| w).collect();
            self.restart_replicas(&failed, &what.join(", "));
            self.desired = gang;
            return;
        }
        if !retryable.is_empty() {
            retryable.sort_by_key(|(echo, _)| *echo);
            let what: Vec<String> = retryable.into_iter().map(|(_, w)| w).collect();
            self.restart("ReplicaFailed", &what.join(", "));
            return;
        }
        // A follower may finish a moment before the leader does.
        let up = |r: &Replica| {
            matches!(
                current.get(r.name.as_str()),
                Some(ReplicaState::Running | ReplicaState::Succeeded)
            )
        };
        let all_running = gang.iter().all(up);
        // A federated replica that is being recreated is not lost.
        if self.status.phase == Phase::Running && !all_running && !federated {
            let lost: Vec<&str> = gang
                .iter()
                .filter(|r| !up(r))
                .map(|r| r.name.as_str())
                .collect();
            self.restart(
                "ReplicaLost",
                &format!("{} stopped running without an exit code", lost.join(", ")),
            );
            return;
        }
        if self.status.phase == Phase::Running && self.stalled() {
            return;
        }
        if self.status.phase == Phase::Pending {
            let timeout = Duration::from_secs(self.policy.startup_timeout_seconds);
            let since = self
                .status
                .attempt_start_time
                .as_ref()
                .map_or(self.now, |t| t.0);
            let left = remaining(since, timeout, self.now);
            if !all_running && left.is_zero() {
                self.restart(
                    "StartupTimeout",
                    &format!(
                        "the gang was not running {}s after it was created",
                        timeout.as_secs()
                    ),
                );
                return;
            }
            if !all_running {
                self.timers.push(left);
            }
        }
        // Stale replicas of older attempts must go before they confuse the
        // gang, and before new ones take their names.
        let mut stale = false;
        for r in &self.observed.replicas {
            if r.attempt < attempt {
                stale = true;
                self.actions.push(Action::Delete {
                    name: r.name.clone(),
                });
            }
        }
        if stale {
            self.timers.push(Duration::from_secs(1));
            self.desired = gang;
            return;
        }
        let missing: Vec<Replica> = gang
            .iter()
            .filter(|r| !current.contains_key(r.name.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.event(
                EventType::Normal,
                "Creating",
                format!(
                    "creating {} of {} replicas of attempt {attempt}",
                    missing.len(),
                    gang.len()
                ),
            );
            self.actions.extend(missing.into_iter().map(Action::Create));
        }
        if all_running && self.status.phase == Phase::Pending {
            self.status.running_since = Some(Time(self.now));
            side_condition(
                &mut self.status.conditions,
                STALLED,
                false,
                "GangRunning",
                "a new gang is running",
                self.generation,
                self.now,
            );
            self.transition(
                Phase::Running,
                "GangRunning",
                &format!(
                    "all {} replicas of attempt {attempt} are running",
                    gang.len()
                ),
            );
            self.stalled();
        }
        self.desired = gang;
    }

    fn restarting(&mut self, job: &ValidatedJob, placement: &Placement) {
        // Only the attempt being restarted (and older ones) go: replicas of
        // the next attempt exist when the status that started it has not
        // reached us yet, and they are the gang this plan would create.
        let old: Vec<&ObservedReplica> = self
            .observed
            .replicas
            .iter()
            .filter(|r| r.attempt <= self.status.attempt)
            .collect();
        if !old.is_empty() {
            for r in old {
                self.actions.push(Action::Delete {
                    name: r.name.clone(),
                });
            }
            self.timers.push(Duration::from_secs(1));
            return;
        }
        if let Some(after) = &self.status.restart_after {
            let left = remaining(after.0, Duration::ZERO, self.now);
            if !left.is_zero() {
                self.timers.push(left);
                return;
            }
        }
        self.status.attempt += 1;
        self.status.attempt_start_time = Some(Time(self.now));
        self.status.running_since = None;
        self.status.restart_after = None;
        let attempt = self.status.attempt;
        self.transition(
            Phase::Pending,
            "Restarted",
            &format!("starting attempt {attempt} from the last checkpoint"),
        );
        self.active(job, replicas::desired(job, attempt, placement));
    }

    fn classify(&self, exit_code: Option<i32>) -> FailureAction {
        let Some(code) = exit_code else {
            // Vanished with its node or evicted: the process did nothing wrong.
            return FailureAction::RestartGang;
        };
        if let Some(rule) = self
            .policy
            .failure_rules
            .iter()
            .find(|r| r.exit_codes.contains(&code))
        {
            return rule.action;
        }
        if code == i32::from(exit::RETRYABLE) || (128..=255).contains(&code) {
            FailureAction::RestartGang
        } else {
            FailureAction::FailJob
        }
    }

    fn deadline_passed(&mut self) -> bool {
        let (Some(limit), Some(start)) = (
            self.policy.active_deadline_seconds,
            self.status.start_time.as_ref(),
        ) else {
            return false;
        };
        let left = remaining(start.0, Duration::from_secs(limit), self.now);
        if left.is_zero() {
            self.fail(
                "DeadlineExceeded",
                &format!("the job ran longer than activeDeadlineSeconds ({limit}s)"),
            );
            return true;
        }
        self.timers.push(left);
        false
    }

    fn stalled(&mut self) -> bool {
        let Some(limit) = self.policy.stall_timeout_seconds else {
            return false;
        };
        let running = self.status.running_since.as_ref().map(|t| t.0);
        let progressed = self
            .status
            .progress
            .as_ref()
            .and_then(|p| p.updated_time.as_ref())
            .map(|t| t.0);
        let Some(since) = running.into_iter().chain(progressed).max() else {
            return false;
        };
        let left = remaining(since, Duration::from_secs(limit), self.now);
        if left.is_zero() {
            let message = format!("no training progress for {limit}s (stallTimeoutSeconds)");
            side_condition(
                &mut self.status.conditions,
                STALLED,
                true,
                "NoProgress",
                &message,
                self.generation,
                self.now,
            );
            self.restart("Stalled", &message);
            return true;
        }
        self.timers.push(left);
        false
    }

    fn restart(&mut self, reason: &str, message: &str) {
        let limit = self.policy.backoff_limit;
        if self.status.restarts >= limit {
            self.fail(
                "BackoffLimitExceeded",
                &format!("{message}; no restarts left (backoffLimit {limit} reached)"),
            );
            return;
        }
        self.status.restarts += 1;
        let backoff = restart_backoff(self.status.restarts);
        self.status.restart_after = Some(Time(add(self.now, backoff)));
        self.transition(
            Phase::Restarting,
            reason,
            &format!(
                "{message}; restarting the gang (restart {} of at most {limit})",
                self.status.restarts
            ),
        );
        for r in &self.observed.replicas {
            self.actions.push(Action::Delete {
                name: r.name.clone(),
            });
        }
        self.timers.push(backoff);
    }

    /// Federated mode: restart only `names` (each restart counts against
    /// `backoffLimit`); the job stays in its phase.
    fn restart_replicas(&mut self, names: &[String], message: &str) {
        let limit = self.policy.backoff_limit;
        let needed = u32::try_from(names.len()).unwrap_or(u32::MAX);
        if self.status.restarts.saturating_add(needed) > limit {
            self.fail(
                "BackoffLimitExceeded",
                &format!("{message}; no restarts left (backoffLimit {limit} reached)"),
            );
            return;
        }
        self.status.restarts += needed;
        self.event(
            EventType::Warning,
            "ReplicaRestarted",
            format!(
                "{message}; restarting {} alone (restarts {} of at most {limit})",
                names.join(", "),
                self.status.restarts
            ),
        );
        for name in names {
            self.actions.push(Action::Delete { name: name.clone() });
        }
    }

    fn suspend(&mut self) {
        if self.status.phase != Phase::Suspended {
            self.transition(Phase::Suspended, "Suspended", "runPolicy.suspend is true");
        }
        for r in &self.observed.replicas {
            self.actions.push(Action::Delete {
                name: r.name.clone(),
            });
        }
    }

    fn succeed(&mut self, message: &str) {
        self.status.completion_time = Some(Time(self.now));
        self.transition(Phase::Succeeded, "Completed", message);
        self.finished();
    }

    fn fail(&mut self, reason: &str, message: &str) {
        self.status.completion_time = Some(Time(self.now));
        self.transition(Phase::Failed, reason, message);
        self.finished();
    }

    /// The one clean-up path of every terminal state.
    fn finished(&mut self) {
        let policy = self.policy.clean_pod_policy;
        for r in &self.observed.replicas {
            let delete = match policy {
                CleanPodPolicy::All => true,
                CleanPodPolicy::Running => {
                    matches!(
                        r.state,
                        ReplicaState::Pending { .. } | ReplicaState::Running
                    )
                }
                CleanPodPolicy::None => false,
            };
            if delete {
                self.actions.push(Action::Delete {
                    name: r.name.clone(),
                });
            }
        }
        if let (Some(ttl), Some(done)) = (
            self.policy.ttl_seconds_after_finished,
            self.status.completion_time.as_ref(),
        ) {
            let left = remaining(done.0, Duration::from_secs(ttl), self.now);
            if left.is_zero() {
                self.actions.push(Action::DeleteJob);
            } else {
                self.timers.push(left);
            }
        }
    }

    fn transition(&mut self, phase: Phase, reason: &str, message: &str) {
        let kind = match phase {
            Phase::Failed | Phase::Restarting => EventType::Warning,
            _ => EventType::Normal,
        };
        self.status.phase = phase;
        self.status.reason = reason.into();
        self.status.message = message.into();
        set_condition(
            &mut self.status.conditions,
            phase,
            reason,
            message,
            self.generation,
            self.now,
        );
        self.event(kind, reason, message.into());
    }

    fn event(&mut self, kind: EventType, reason: &str, message: String) {
        self.actions.push(Action::Event {
            kind,
            reason: reason.into(),
            message,
        });
    }

    fn merge_progress(&mut self, job: &ValidatedJob) {
        let Some(report) = &self.observed.progress else {
            return;
        };
        let total = job.total_steps();
        let progress = self.status.progress.get_or_insert_with(Progress::default);
        if report.step > progress.step || progress.updated_time.is_none() {
            progress.updated_time = Some(Time(self.now));
        }
        progress.step = report.step;
        progress.total_steps = total;
        if job.federated() {
            progress.round = Some(report.step);
            progress.total_rounds = Some(total);
            progress.participants = report.participants.or(progress.participants);
            progress.updates_rejected = report.rejected.or(progress.updates_rejected);
            progress.epsilon = report.epsilon.or(progress.epsilon);
            progress.round_seconds = report.round_seconds.or(progress.round_seconds);
        }
        progress.loss = report.loss.or(progress.loss);
        progress.metric = report.metric.or(progress.metric);
        progress.samples_per_second = report.samples_per_second.or(progress.samples_per_second);
        if let Some(c) = &report.checkpoint {
            progress.last_checkpoint = Some(CheckpointRef {
                step: c.step,
                path: c.path.clone(),
            });
        }
        if report.adapter.is_some() {
            progress.adapter = report.adapter.clone();
        }
    }

    fn counts(&self) -> ReplicaCounts {
        let mut c = ReplicaCounts::default();
        for r in self
            .observed
            .replicas
            .iter()
            .filter(|r| r.attempt == self.status.attempt)
        {
            match r.state {
                ReplicaState::Pending { .. } => c.active += 1,
                ReplicaState::Running => {
                    c.active += 1;
                    c.ready += 1;
                }
                ReplicaState::Succeeded => c.succeeded += 1,
                ReplicaState::Failed { .. } => c.failed += 1,
            }
        }
        c
    }
}

/// Condition type that says the history store is not taking writes.
pub const HISTORY_DEGRADED: &str = "HistoryDegraded";

/// Reports a PostgreSQL outage on the job (history is queued meanwhile),
/// and its end.
fn history_condition(
    status: &mut TrainingJobStatus,
    healthy: Option<bool>,
    generation: Option<i64>,
    now: Timestamp,
) {
    match healthy {
        None => {}
        Some(true) => side_condition(
            &mut status.conditions,
            HISTORY_DEGRADED,
            false,
            "StoreAvailable",
            "history is being recorded",
            generation,
            now,
        ),
        Some(false) => side_condition(
            &mut status.conditions,
            HISTORY_DEGRADED,
            true,
            "StoreUnavailable",
            "PostgreSQL is not taking writes; history is queued and retried",
            generation,
            now,
        ),
    }
}

/// Condition type of a Running job that made no progress for `stallTimeoutSeconds`.
pub const STALLED: &str = "Stalled";

/// Sets a condition that is not a phase. It appears only once it is first
/// True (absence means all is well); later it flips between True and False.
fn side_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let state = if on { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == state => {}
        Some(c) => {
            c.status = state.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
            c.last_transition_time = Time(now);
        }
        None if !on => {}
        None => conditions.push(Condition {
            type_: type_.into(),
            status: state.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Condition types mirror phases; exactly the current phase's is True.
fn set_condition(
    conditions: &mut Vec<Condition>,
    phase: Phase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    for c in conditions.iter_mut() {
        if c.type_ != phase.as_str()
            && c.status == "True"
            && Phase::ALL.iter().any(|p| p.as_str() == c.type_)
        {
            c.status = "False".into();
            c.last_transition_time = Time(now);
            c.observed_generation = generation;
        }
    }
    let condition = Condition {
        type_: phase.as_str().into(),
        status: "True".into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    match conditions.iter_mut().find(|c| c.type_ == phase.as_str()) {
        Some(c) if c.status == "True" => {
            c.reason = condition.reason;
            c.message = condition.message;
            c.observed_generation = generation;
        }
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

fn describe_exit(name: &str, exit_code: Option<i32>, reason: Option<&str>) -> String {
    let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    match exit_code {
        Some(code) => format!("{name} exited with code {code}{reason}"),
        None => format!("{name} disappeared{reason}"),
    }
}

/// Wait before restart number `n` (1-based): 1 s, 2 s, 4 s, ... up to a minute.
pub fn restart_backoff(n: u32) -> Duration {
    let secs = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_RESTART_BACKOFF)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Time left until `since + limit`, zero when it has passed.
fn remaining(since: Timestamp, limit: Duration, now: Timestamp) -> Duration {
    let due = add(since, limit);
    let left = now.duration_until(due);
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

fn summary(p: &Progress) -> String {
    if p.total_steps == 0 {
        return format!("step {}", p.step);
    }
    let pct = (p.step.min(p.total_steps) * 100) / p.total_steps;
    match p.total_rounds {
        Some(_) => format!("{pct}% round {}/{}", p.step, p.total_steps),
        None => format!("{pct}% {}/{}", p.step, p.total_steps),
    }
}
