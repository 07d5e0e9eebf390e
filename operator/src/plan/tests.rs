//! One test per row of the transition table, and properties over random runs.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use super::*;
use crate::api::validate::parse_manifests;
use crate::api::{FailureRule, TrainingJob};

const JOB: &str = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: j, namespace: ns, generation: 1}\nspec:\n  mode: Distributed\n  image: t:1\n  distributed: {workers: 2}\n  runPolicy: {backoffLimit: 2, startupTimeoutSeconds: 100, stallTimeoutSeconds: 50, activeDeadlineSeconds: 1000}\n";

fn job() -> TrainingJob {
    parse_manifests(JOB).unwrap().remove(0)
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0() + SignedDuration::from_secs(secs)
}

fn with_status(mut j: TrainingJob, f: impl FnOnce(&mut TrainingJobStatus)) -> TrainingJob {
    let mut s = j.status.take().unwrap_or_default();
    f(&mut s);
    j.status = Some(s);
    j
}

fn replica(name: &str, attempt: u32, state: ReplicaState) -> ObservedReplica {
    ObservedReplica {
        name: name.into(),
        attempt,
        state,
    }
}

fn gang(attempt: u32, s0: ReplicaState, s1: ReplicaState) -> Observation {
    Observation {
        replicas: vec![
            replica("j-worker-0", attempt, s0),
            replica("j-worker-1", attempt, s1),
        ],
        progress: None,
        history: None,
        admission: None,
    }
}

fn running() -> ReplicaState {
    ReplicaState::Running
}

fn failed(code: i32) -> ReplicaState {
    ReplicaState::Failed {
        exit_code: Some(code),
        reason: None,
    }
}

/// What a reconcile does: the facts of the job, then its plan (or its rejection).
fn run(j: &TrainingJob, o: &Observation, now: Timestamp) -> Plan {
    let j = crate::job::with_uid(j.clone(), "u-1".into());
    match crate::job::validated(&j) {
        Ok(facts) => plan(&facts, j.status.as_ref(), o, now, &Placement::Kubernetes),
        Err(problem) => reject(&j, &problem, o, now),
    }
}

fn running_job(attempt: u32) -> TrainingJob {
    with_status(job(), |s| {
        s.phase = Phase::Running;
        s.attempt = attempt;
        s.start_time = Some(Time(t0()));
        s.attempt_start_time = Some(Time(t0()));
        s.running_since = Some(Time(t0()));
    })
}

fn condition<'a>(s: &'a TrainingJobStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

fn creates(p: &Plan) -> Vec<&str> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Create(r) => Some(r.name.as_str()),
            _ => None,
        })
        .collect()
}

fn deletes(p: &Plan) -> Vec<&str> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Delete { name } => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

// --- Pending ---

#[test]
fn pending_with_nothing_creates_the_whole_gang() {
    let p = run(&job(), &Observation::default(), t0());
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(creates(&p), ["j-worker-0", "j-worker-1"]);
    assert_eq!(p.status.start_time, Some(Time(t0())));
    assert_eq!(p.status.observed_generation, Some(1));
    assert_eq!(
        p.requeue_after,
        Some(Duration::from_secs(100)),
        "the startup timer"
    );
}

#[test]
fn pending_creates_only_missing_members() {
    let o = Observation {
        replicas: vec![replica("j-worker-0", 0, running())],
        progress: None,
        history: None,
        admission: None,
    };
    let p = run(&job(), &o, t0());
    assert_eq!(creates(&p), ["j-worker-1"]);
    assert_eq!(p.status.phase, Phase::Pending);
}

#[test]
fn pending_becomes_running_only_when_every_member_runs() {
    let pending = ReplicaState::Pending {
        reason: Some("ContainerCreating".into()),
        message: None,
    };
    let p = run(&job(), &gang(0, running(), pending), t0());
    assert_eq!(p.status.phase, Phase::Pending);
    let p = run(&job(), &gang(0, running(), running()), at(5));
    assert_eq!(p.status.phase, Phase::Running);
    assert_eq!(p.status.reason, "GangRunning");
    assert_eq!(p.status.running_since, Some(Time(at(5))));
    assert_eq!(p.status.replicas.ready, 2);
    let running = condition(&p.status, "Running").unwrap();
    assert_eq!(running.status, "True");
    assert_eq!(running.observed_generation, Some(1));
}

#[test]
fn pending_past_the_startup_timeout_restarts() {
    let j = with_status(job(), |s| s.attempt_start_time = Some(Time(t0())));
    let o = gang(
        0,
        running(),
        ReplicaState::Pending {
            reason: Some("Unschedulable".into()),
            message: None,
        },
    );
    let p = run(&j, &o, at(100));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(p.status.reason, "StartupTimeout");
    assert_eq!(p.status.restarts, 1);
    assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
}

#[test]
fn pending_with_a_bad_image_fails_naming_the_pod() {
    let o = gang(
        0,
        running(),
        ReplicaState::Pending {
            reason: Some("ImagePullBackOff".into()),
            message: Some("manifest unknown".into()),
        },
    );
    let p = run(&job(), &o, t0());
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "ImagePullFailed");
    assert!(
        p.status.message.contains("j-worker-1"),
        "{}",
        p.status.message
    );
    assert!(p.status.message.contains("manifest unknown"));
}

#[test]
fn old_attempt_replicas_are_deleted() {
    let j = with_status(job(), |s| s.attempt = 3);
    let o = Observation {
        replicas: vec![replica("j-worker-0", 2, running())],
        progress: None,
        history: None,
        admission: None,
    };
    let p = run(&j, &o, t0());
    assert_eq!(deletes(&p), ["j-worker-0"]);
    assert!(
        creates(&p).is_empty(),
        "names are taken until the old replica is gone"
    );
    let p = run(&j, &Observation::default(), t0());
    assert_eq!(creates(&p), ["j-worker-0", "j-worker-1"]);
}

// --- Running ---

#[test]
fn running_stays_running_and_arms_the_stall_timer() {
    let p = run(&running_job(0), &gang(0, running(), running()), at(10));
    assert_eq!(p.status.phase, Phase::Running);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(40)));
}

#[test]
fn retryable_failure_restarts_the_gang() {
    let p = run(&running_job(0), &gang(0, running(), failed(137)), at(10));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(p.status.reason, "ReplicaFailed");
    assert!(p.status.message.contains("j-worker-1 exited with code 137"));
    assert_eq!(p.status.restarts, 1);
    assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
    assert!(creates(&p).is_empty());
    let p = run(&running_job(0), &gang(0, failed(75), running()), at(10));
    assert_eq!(
        p.status.phase,
        Phase::Restarting,
        "75 is the trainer's retryable code"
    );
}

#[test]
fn permanent_failure_fails_at_once_even_beside_a_retryable_one() {
    let p = run(&running_job(0), &gang(0, failed(75), failed(1)), at(10));
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "ReplicaFailed");
    assert_eq!(p.status.restarts, 0);
    assert_eq!(p.status.completion_time, Some(Time(at(10))));
}

#[test]
fn failure_rules_override_the_default_classification() {
    let mut j = running_job(0);
    j.spec.run_policy.failure_rules = vec![
        FailureRule {
            exit_codes: vec![3],
            action: FailureAction::RestartGang,
        },
        FailureRule {
            exit_codes: vec![137],
            action: FailureAction::FailJob,
        },
    ];
    let p = run(&j, &gang(0, running(), failed(3)), at(1));
    assert_eq!(p.status.phase, Phase::Restarting);
    let p = run(&j, &gang(0, running(), failed(137)), at(1));
    assert_eq!(p.status.phase, Phase::Failed);
}

#[test]
fn a_vanished_member_restarts_the_gang() {
    let o = Observation {
        replicas: vec![replica("j-worker-0", 0, running())],
        progress: None,
        history: None,
        admission: None,
    };
    let p = run(&running_job(0), &o, at(1));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(p.status.reason, "ReplicaLost");
    assert!(p.status.message.contains("j-worker-1"));
}

#[test]
fn leader_success_succeeds_and_cleans_up_running_replicas() {
    let p = run(
        &running_job(0),
        &gang(0, ReplicaState::Succeeded, running()),
        at(30),
    );
    assert_eq!(p.status.phase, Phase::Succeeded);
    assert_eq!(
        deletes(&p),
        ["j-worker-1"],
        "cleanPodPolicy Running keeps finished pods"
    );
    let p = run(
        &running_job(0),
        &gang(0, running(), ReplicaState::Succeeded),
        at(30),
    );
    assert_eq!(
        p.status.phase,
        Phase::Running,
        "a follower may finish first"
    );
}

#[test]
fn no_progress_past_the_stall_timeout_restarts() {
    let p = run(&running_job(0), &gang(0, running(), running()), at(50));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(p.status.reason, "Stalled");
    assert_eq!(
        condition(&p.status, STALLED).map(|c| c.status.as_str()),
        Some("True")
    );
    // The next gang running clears it.
    let j = with_status(running_job(0), |s| {
        *s = p.status.clone();
        s.phase = Phase::Pending;
        s.attempt = 1;
        s.attempt_start_time = Some(Time(at(60)));
    });
    let next = run(&j, &gang(1, running(), running()), at(61));
    assert_eq!(next.status.phase, Phase::Running);
    assert_eq!(
        condition(&next.status, STALLED).map(|c| c.status.as_str()),
        Some("False")
    );
    // Progress moves the stall clock.
    let o = Observation {
        progress: Some(ProgressMessage {
            step: 7,
            ..Default::default()
        }),
        ..gang(0, running(), running())
    };
    let p = run(&running_job(0), &o, at(49));
    assert_eq!(
        p.status.progress.as_ref().unwrap().updated_time,
        Some(Time(at(49)))
    );
    let p = run(
        &with_status(running_job(0), |s| *s = p.status.clone()),
        &o,
        at(90),
    );
    assert_eq!(p.status.phase, Phase::Running);
}

#[test]
fn deadline_fails_from_any_active_phase() {
    for phase in [Phase::Pending, Phase::Running, Phase::Restarting] {
        let j = with_status(running_job(0), |s| s.phase = phase);
        let p = run(&j, &gang(0, running(), running()), at(1000));
        assert_eq!(p.status.phase, Phase::Failed, "from {phase}");
        assert_eq!(p.status.reason, "DeadlineExceeded");
        assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
    }
}

#[test]
fn exhausted_backoff_fails_and_keeps_the_count() {
    let j = with_status(running_job(0), |s| s.restarts = 2);
    let p = run(&j, &gang(0, running(), failed(137)), at(1));
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "BackoffLimitExceeded");
    assert_eq!(p.status.restarts, 2);
}

// --- Restarting ---

#[test]
fn restarting_waits_for_every_old_replica_to_go() {
    let j = with_status(running_job(0), |s| {
        s.phase = Phase::Restarting;
        s.restarts = 1;
        s.restart_after = Some(Time(at(1)));
    });
    let p = run(&j, &gang(0, running(), failed(137)), at(5));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
    assert!(creates(&p).is_empty());
}

#[test]
fn restarting_starts_the_next_attempt_after_the_backoff() {
    let j = with_status(running_job(0), |s| {
        s.phase = Phase::Restarting;
        s.restarts = 1;
        s.restart_after = Some(Time(at(2)));
    });
    let p = run(&j, &Observation::default(), at(1));
    assert_eq!(p.status.phase, Phase::Restarting);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(1)));
    let p = run(&j, &Observation::default(), at(2));
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(p.status.attempt, 1);
    assert_eq!(creates(&p), ["j-worker-0", "j-worker-1"]);
    assert!(p.desired.iter().all(|r| r.attempt == 1));
}

/// A status read from a cache that has not seen our last write (Restarting
/// at attempt 0) beside the gang that write started (attempt 1): the new
/// gang is kept, and the plan lands where that write had taken the job.
#[test]
fn a_stale_status_never_deletes_a_later_attempts_gang() {
    let j = with_status(running_job(0), |s| {
        s.phase = Phase::Restarting;
        s.restarts = 1;
        s.restart_after = Some(Time(at(1)));
    });
    let newer = gang(1, running(), running());
    let p = run(&j, &newer, at(5));
    assert!(deletes(&p).is_empty(), "{:?}", p.actions);
    assert!(creates(&p).is_empty(), "{:?}", p.actions);
    assert_eq!((p.status.phase, p.status.attempt), (Phase::Running, 1));
    // Old and new side by side: only the old go.
    let mut both = newer.clone();
    both.replicas.push(replica("j-worker-0", 0, failed(137)));
    let p = run(&j, &both, at(5));
    assert_eq!(deletes(&p), ["j-worker-0"]);
    assert_eq!(p.status.phase, Phase::Restarting);
    // A stale Running status (attempt 0) with a failed member beside
    // attempt 1's gang decides nothing.
    let stale = running_job(0);
    let mut o = newer;
    o.replicas.push(replica("j-worker-1", 0, failed(137)));
    let p = run(&stale, &o, at(5));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.status.restarts, 0);
}

#[test]
fn admission_refusals_are_a_condition_until_the_tries_run_out() {
    let refused = |tries| Observation {
        admission: Some(AdmissionRefusal {
            tries,
            message: "violates PodSecurity".into(),
        }),
        ..Default::default()
    };
    let p = run(&job(), &refused(1), t0());
    assert_eq!(p.status.phase, Phase::Pending);
    let c = condition(&p.status, ADMISSION_REFUSED).unwrap();
    assert_eq!(c.status, "True");
    assert!(c.message.contains("violates PodSecurity"), "{}", c.message);
    assert_eq!(creates(&p).len(), 2, "tried again");
    // Admitted at last: the condition clears.
    let j = with_status(job(), |s| *s = p.status.clone());
    let p = run(&j, &Observation::default(), t0());
    assert_eq!(
        condition(&p.status, ADMISSION_REFUSED).unwrap().status,
        "False"
    );
    let p = run(&job(), &refused(ADMISSION_TRIES), t0());
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "AdmissionRefused");
    assert!(creates(&p).is_empty());
}

// --- Suspend ---// --- Suspend ---

#[test]
fn suspend_tears_everything_down_and_resume_starts_a_new_attempt() {
    let mut j = running_job(0);
    j.spec.run_policy.suspend = true;
    let p = run(&j, &gang(0, running(), running()), at(10));
    assert_eq!(p.status.phase, Phase::Suspended);
    assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
    assert!(p.desired.is_empty());
    let mut j = with_status(j, |s| *s = p.status.clone());
    j.spec.run_policy.suspend = false;
    let p = run(&j, &Observation::default(), at(5000));
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(p.status.attempt, 1);
    assert_eq!(p.status.restarts, 0, "a resume is not a restart");
    assert_eq!(
        p.status.start_time,
        Some(Time(at(5000))),
        "the deadline restarts"
    );
    assert_eq!(creates(&p), ["j-worker-0", "j-worker-1"]);
}

// --- Federated ---

const FEDERATED: &str = "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: f, namespace: ns, generation: 1}\nspec:\n  mode: Federated\n  image: t:1\n  federated: {clients: 3, minClients: 2, rounds: 7}\n  runPolicy: {backoffLimit: 2}\n";

fn federated_running(restarts: u32) -> (TrainingJob, Vec<ObservedReplica>) {
    let j = with_status(parse_manifests(FEDERATED).unwrap().remove(0), |s| {
        s.phase = Phase::Running;
        s.restarts = restarts;
        s.start_time = Some(Time(t0()));
        s.attempt_start_time = Some(Time(t0()));
        s.running_since = Some(Time(t0()));
    });
    let replicas = ["f-aggregator-0", "f-client-0", "f-client-1", "f-client-2"]
        .iter()
        .map(|n| replica(n, 0, running()))
        .collect();
    (j, replicas)
}

#[test]
fn a_failed_federated_client_restarts_alone() {
    let (j, mut replicas) = federated_running(0);
    replicas[2].state = failed(137);
    let o = Observation {
        replicas,
        ..Default::default()
    };
    let p = run(&j, &o, at(10));
    assert_eq!(p.status.phase, Phase::Running, "{}", p.status.message);
    assert_eq!(p.status.restarts, 1);
    assert_eq!(deletes(&p), ["f-client-1"]);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Event { reason, .. } if reason == "ReplicaRestarted"))
    );
    // Once it is gone it is recreated, and the others are left alone.
    let j = with_status(j, |s| *s = p.status.clone());
    let mut o = o;
    o.replicas.remove(2);
    let p = run(&j, &o, at(11));
    assert_eq!(p.status.phase, Phase::Running);
    assert_eq!(creates(&p), ["f-client-1"]);
    assert!(deletes(&p).is_empty());
    // A recreated client that is still pending is not lost.
    o.replicas.push(replica(
        "f-client-1",
        0,
        ReplicaState::Pending {
            reason: None,
            message: None,
        },
    ));
    let p = run(&j, &o, at(12));
    assert_eq!(p.status.phase, Phase::Running);
    assert!(
        p.actions.iter().all(|a| matches!(a, Action::Event { .. })),
        "{:?}",
        p.actions
    );
}

#[test]
fn federated_restarts_are_bounded_and_permanent_failures_fail() {
    let (j, mut replicas) = federated_running(2);
    replicas[1].state = failed(137);
    let p = run(
        &j,
        &Observation {
            replicas: replicas.clone(),
            ..Default::default()
        },
        at(10),
    );
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "BackoffLimitExceeded");
    let (j, mut replicas) = federated_running(0);
    replicas[3].state = failed(1);
    let p = run(
        &j,
        &Observation {
            replicas,
            ..Default::default()
        },
        at(10),
    );
    assert_eq!(p.status.phase, Phase::Failed);
    assert!(
        p.status.message.contains("f-client-2"),
        "{}",
        p.status.message
    );
}

#[test]
fn federated_progress_counts_rounds() {
    let (j, replicas) = federated_running(0);
    let o = Observation {
        replicas,
        progress: Some(ProgressMessage {
            step: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = run(&j, &o, at(10));
    let progress = p.status.progress.unwrap();
    assert_eq!(
        (progress.round, progress.total_rounds, progress.total_steps),
        (Some(3), Some(7), 7)
    );
    assert!(
        progress.summary.contains("round 3/7"),
        "{}",
        progress.summary
    );
}

// --- Terminal ---

#[test]
fn terminal_jobs_only_clean_up_and_expire() {
    let mut j = with_status(running_job(0), |s| {
        s.phase = Phase::Failed;
        s.completion_time = Some(Time(at(100)));
    });
    j.spec.run_policy.clean_pod_policy = CleanPodPolicy::All;
    j.spec.run_policy.ttl_seconds_after_finished = Some(60);
    let o = gang(0, ReplicaState::Succeeded, failed(1));
    let p = run(&j, &o, at(120));
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(deletes(&p), ["j-worker-0", "j-worker-1"]);
    assert!(creates(&p).is_empty());
    assert_eq!(p.requeue_after, Some(Duration::from_secs(40)));
    let p = run(&j, &Observation::default(), at(160));
    assert_eq!(p.actions, [Action::DeleteJob]);
    j.spec.run_policy.clean_pod_policy = CleanPodPolicy::None;
    assert!(deletes(&run(&j, &o, at(120))).is_empty());
}

#[test]
fn an_unplannable_spec_fails_with_the_field() {
    let mut j = job();
    j.spec.data.shapes.as_mut().unwrap().image_size = 36;
    let p = run(&j, &Observation::default(), t0());
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason, "InvalidSpec");
    assert_eq!(
        p.status.message,
        "spec.data.shapes.imageSize: must be a multiple of 8 (2 to the number of stages) and at least 8"
    );
}

#[test]
fn a_store_outage_is_a_condition_that_phases_leave_alone() {
    let mut o = gang(0, running(), running());
    o.history = Some(false);
    let p = run(&running_job(0), &o, at(1));
    let c = condition(&p.status, HISTORY_DEGRADED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "StoreUnavailable")
    );
    // A phase change keeps it; the store's recovery clears it.
    let j = with_status(running_job(0), |s| *s = p.status.clone());
    let failing = Observation {
        history: Some(false),
        admission: None,
        ..gang(0, running(), failed(137))
    };
    let p = run(&j, &failing, at(2));
    assert_eq!(p.status.phase, Phase::Restarting);
    let c = condition(&p.status, HISTORY_DEGRADED).unwrap();
    assert_eq!(c.status, "True");
    let j = with_status(running_job(0), |s| *s = p.status.clone());
    let ok = Observation {
        history: Some(true),
        admission: None,
        ..Observation::default()
    };
    let p = run(&j, &ok, at(3));
    let c = condition(&p.status, HISTORY_DEGRADED).unwrap();
    assert_eq!(c.status, "False");
    // Without a store there is no such condition at all.
    let p = run(&running_job(0), &gang(0, running(), running()), at(1));
    assert!(condition(&p.status, HISTORY_DEGRADED).is_none());
}

#[test]
fn backoff_doubles_up_to_a_minute() {
    let secs: Vec<u64> = [1, 2, 3, 7, 8, 40]
        .map(|n| restart_backoff(n).as_secs())
        .to_vec();
    assert_eq!(secs, [1, 2, 4, 60, 60, 60]);
}

// --- Properties over random worlds ---

#[derive(Debug, Clone)]
enum Event {
    Tick(u16),
    Start(usize),
    Exit(usize, i32),
    Vanish(usize),
    Progress(u8),
    Suspend(bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (1u16..200).prop_map(Event::Tick),
        (0usize..3).prop_map(Event::Start),
        (
            0usize..3,
            prop_oneof![Just(0), Just(1), Just(75), Just(137), Just(143)]
        )
            .prop_map(|(i, c)| Event::Exit(i, c)),
        (0usize..3).prop_map(Event::Vanish),
        any::<u8>().prop_map(Event::Progress),
        any::<bool>().prop_map(Event::Suspend),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_in_any_world(events in prop::collection::vec(event(), 1..60)) {
        let mut j = parse_manifests(&JOB.replace("workers: 2", "workers: 3")).unwrap().remove(0);
        let mut world: Vec<ObservedReplica> = Vec::new();
        let mut now = t0();
        let mut step = 0u64;
        let mut restarts = 0;
        for e in events {
            match e {
                Event::Tick(s) => now += SignedDuration::from_secs(i64::from(s)),
                Event::Start(i) => {
                    if let Some(r) = world.get_mut(i)
                        && matches!(r.state, ReplicaState::Pending { .. })
                    {
                        r.state = ReplicaState::Running;
                    }
                }
                Event::Exit(i, code) => {
                    if let Some(r) = world.get_mut(i)
                        && r.state == ReplicaState::Running
                    {
                        r.state = if code == 0 { ReplicaState::Succeeded } else { failed(code) };
                    }
                }
                Event::Vanish(i) => {
                    if i < world.len() {
                        world.remove(i);
                    }
                }
                Event::Progress(n) => step += u64::from(n),
                Event::Suspend(s) => j.spec.run_policy.suspend = s,
            }
            let o = Observation {
                replicas: world.clone(),
                progress: Some(ProgressMessage { step, ..Default::default() }),
                history: None,
                admission: None,
            };
            let was_terminal = j.status.as_ref().is_some_and(|s| s.phase.is_terminal());
            let p = run(&j, &o, now);
            let s = &p.status;
            // Running only while every gang member runs (or has finished).
            if s.phase == Phase::Running {
                for r in &p.desired {
                    let seen = world.iter().find(|w| w.name == r.name && w.attempt == s.attempt);
                    prop_assert!(
                        matches!(seen.map(|w| &w.state), Some(ReplicaState::Running | ReplicaState::Succeeded)),
                        "Running while {} is {:?}", r.name, seen
                    );
                }
            }
            prop_assert!(s.restarts >= restarts, "restarts went down");
            prop_assert!(s.restarts <= j.spec.run_policy.backoff_limit);
            restarts = s.restarts;
            if was_terminal || s.phase.is_terminal() || s.phase == Phase::Suspended {
                prop_assert!(creates(&p).is_empty(), "{:?} schedules replicas", s.phase);
            }
            if s.phase == Phase::Suspended {
                prop_assert!(p.desired.is_empty());
            }
            if was_terminal {
                prop_assert!(s.phase.is_terminal(), "a terminal job came back");
            }
            let exactly_one_true = s
                .conditions
                .iter()
                .filter(|c| c.status == "True" && c.type_ != HISTORY_DEGRADED && c.type_ != STALLED)
                .count();
            prop_assert!(s.conditions.is_empty() || exactly_one_true == 1);
            // Carry out the plan.
            for a in &p.actions {
                match a {
                    Action::Create(r) => world.push(replica(&r.name, r.attempt, ReplicaState::Pending { reason: None, message: None })),
                    Action::Delete { name } => world.retain(|w| &w.name != name),
                    _ => {}
                }
            }
            j.status = Some(p.status);
        }
    }
}
