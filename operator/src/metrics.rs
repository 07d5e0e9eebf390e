//! The operator's Prometheus metrics (every name in one place) and the
//! `/metrics`, `/healthz`, `/readyz` server.
//!
//! Lifecycle metrics are derived from the planner's status before and after
//! each reconcile, so they count what the operator decided, once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::{Mode, Phase, TrainingJob, TrainingJobStatus};
use crate::store::Store;

/// Metric names, the one source of truth (dashboards and alerts use these).
pub mod names {
    /// Jobs by phase and mode (gauge).
    pub const JOBS: &str = "trainyard_jobs";
    /// Jobs seen for the first time, by mode.
    pub const JOBS_CREATED_TOTAL: &str = "trainyard_jobs_created_total";
    /// Jobs that finished, by mode, result (Succeeded, Failed) and reason.
    pub const JOBS_FINISHED_TOTAL: &str = "trainyard_jobs_finished_total";
    /// Gang restarts, by reason.
    pub const RESTARTS_TOTAL: &str = "trainyard_job_restarts_total";
    /// Seconds from a job's creation until its whole gang first ran.
    pub const TIME_TO_RUNNING_SECONDS: &str = "trainyard_job_time_to_running_seconds";
    /// Reconcile duration, by result.
    pub const RECONCILE_SECONDS: &str = "trainyard_reconcile_duration_seconds";
    /// Failed reconciles, by category (`conflict`, `api`, `invalid_object`, `store`).
    pub const RECONCILE_ERRORS_TOTAL: &str = "trainyard_reconcile_errors_total";
    /// History records written to PostgreSQL.
    pub const STORE_WRITES_TOTAL: &str = "trainyard_store_writes_total";
    /// Failed history writes (each is retried).
    pub const STORE_WRITE_ERRORS_TOTAL: &str = "trainyard_store_write_errors_total";
    /// History records lost to a full queue.
    pub const STORE_DROPPED_TOTAL: &str = "trainyard_store_dropped_total";
    /// History records PostgreSQL refused for good (logged, then skipped).
    pub const STORE_SET_ASIDE_TOTAL: &str = "trainyard_store_set_aside_total";
    /// History records waiting to be written.
    pub const STORE_QUEUE_DEPTH: &str = "trainyard_store_queue_depth";
    /// 1 while history is written (connected, migrated, last write ok).
    pub const STORE_UP: &str = "trainyard_store_up";
    /// Progress reports received, by result (accepted, bad_token, ...).
    pub const PROGRESS_REPORTS_TOTAL: &str = "trainyard_progress_reports_total";
    /// Latest step of a running job.
    pub const JOB_STEP: &str = "trainyard_job_step";
    /// Latest loss of a running job.
    pub const JOB_LOSS: &str = "trainyard_job_loss";
    /// Latest throughput of a running job.
    pub const JOB_SAMPLES_PER_SECOND: &str = "trainyard_job_samples_per_second";
    /// Gang restarts of a job so far, while it has not finished. (Neither
    /// `trainyard_job_restarts`, which OpenMetrics would read as the family
    /// of the `_total` counter above, nor `_count`, a histogram suffix.)
    pub const JOB_GANG_RESTARTS: &str = "trainyard_job_gang_restarts";
}

/// The operator's metric handles.
pub struct OperatorMetrics {
    registry: Registry,
    /// The store's series, rendered only when a store is configured.
    store_registry: Registry,
    jobs: IntGaugeVec,
    created: IntCounterVec,
    finished: IntCounterVec,
    restarts: IntCounterVec,
    time_to_running: HistogramVec,
    /// Reconcile durations by result (`ok`, `error`).
    pub reconcile_seconds: HistogramVec,
    /// Failed reconciles by category.
    pub reconcile_errors: IntCounterVec,
    /// Progress reports by result.
    pub progress_reports: IntCounterVec,
    store_writes: IntCounter,
    store_errors: IntCounter,
    store_dropped: IntCounter,
    store_set_aside: IntCounter,
    store_queue: IntGauge,
    store_up: IntGauge,
    job_step: GaugeVec,
    job_loss: GaugeVec,
    job_sps: GaugeVec,
    job_restarts: GaugeVec,
    phases: Mutex<BTreeMap<String, (Phase, Mode)>>,
    ready: AtomicBool,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        // The store's series exist only where there is a store: a `0` for
        // "up" without a database would read as an outage.
        let store_registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let store_gauge = |name: &str, help: &str| {
            reg(
                &store_registry,
                IntGauge::new(name, help).expect("valid metric"),
            )
        };
        let store_total = |name: &str, help: &str| {
            reg(
                &store_registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let job_gauge = |name: &str, help: &str| {
            reg(
                &r,
                // Not `namespace`/`job`: Prometheus gives those to every scraped
                // target, and a clash would rename ours to `exported_*`.
                GaugeVec::new(Opts::new(name, help), &["job_namespace", "job_name"])
                    .expect("valid metric"),
            )
        };
        let metrics = Self {
            jobs: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(names::JOBS, "TrainingJobs by phase and mode."),
                    &["phase", "mode"],
                )
                .expect("valid metric"),
            ),
            created: counter(
                names::JOBS_CREATED_TOTAL,
                "TrainingJobs seen for the first time.",
                &["mode"],
            ),
            finished: counter(
                names::JOBS_FINISHED_TOTAL,
                "TrainingJobs that finished, by result and reason.",
                &["mode", "result", "reason"],
            ),
            restarts: counter(
                names::RESTARTS_TOTAL,
                "Gang restarts, by reason.",
                &["reason"],
            ),
            time_to_running: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        names::TIME_TO_RUNNING_SECONDS,
                        "Seconds from creation until the whole gang first ran.",
                    )
                    .buckets(vec![
                        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                    ]),
                    &["mode"],
                )
                .expect("valid metric"),
            ),
            reconcile_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(names::RECONCILE_SECONDS, "Reconcile duration.").buckets(
                        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            reconcile_errors: counter(
                names::RECONCILE_ERRORS_TOTAL,
                "Failed reconciles, by category.",
                &["category"],
            ),
            progress_reports: counter(
                names::PROGRESS_REPORTS_TOTAL,
                "Progress reports received, by result.",
                &["result"],
            ),
            store_writes: store_total(
                names::STORE_WRITES_TOTAL,
                "History records written to PostgreSQL.",
            ),
            store_errors: store_total(
                names::STORE_WRITE_ERRORS_TOTAL,
                "Failed history writes (retried).",
            ),
            store_dropped: store_total(
                names::STORE_DROPPED_TOTAL,
                "History records lost to a full queue.",
            ),
            store_set_aside: store_total(
                names::STORE_SET_ASIDE_TOTAL,
                "History records PostgreSQL refused for good (logged, then skipped).",
            ),
            store_queue: store_gauge(
                names::STORE_QUEUE_DEPTH,
                "History records waiting to be written.",
            ),
            store_up: store_gauge(
                names::STORE_UP,
                "1 while history is written (connected, migrated, last write ok).",
            ),
            job_step: job_gauge(names::JOB_STEP, "Latest step of a running job."),
            job_loss: job_gauge(names::JOB_LOSS, "Latest training loss of a running job."),
            job_sps: job_gauge(
                names::JOB_SAMPLES_PER_SECOND,
                "Latest throughput of a running job.",
            ),
            job_restarts: job_gauge(
                names::JOB_GANG_RESTARTS,
                "Gang restarts of a job so far, while it has not finished.",
            ),
            registry: r,
            store_registry,
            phases: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
        };
        // Every phase and mode from the start, so dashboards show zeros, not gaps.
        metrics.recount();
        for category in crate::k8s::ReconcileError::CATEGORIES {
            metrics.reconcile_errors.with_label_values(&[category]);
        }
        metrics
    }

    /// Accounts for one reconcile that took `job` from `before` to `after`.
    pub fn observe(
        &self,
        job: &TrainingJob,
        before: Option<&TrainingJobStatus>,
        after: &TrainingJobStatus,
        now: Timestamp,
    ) {
        let mode = job.spec.mode.as_str();
        let key = format!(
            "{}/{}",
            job.metadata.namespace.as_deref().unwrap_or(""),
            job.metadata.name.as_deref().unwrap_or("")
        );
        if before.is_none() {
            self.created.with_label_values(&[mode]).inc();
        }
        let was = before.map(|s| s.phase);
        if was != Some(after.phase) {
            if after.phase == Phase::Running
                && before.is_none_or(|s| s.running_since.is_none() && s.restarts == 0)
                && let Some(created) = &job.metadata.creation_timestamp
            {
                let secs = created.0.duration_until(now).as_secs_f64().max(0.0);
                self.time_to_running
                    .with_label_values(&[mode])
                    .observe(secs);
            }
            if after.phase.is_terminal() {
                self.finished
                    .with_label_values(&[mode, after.phase.as_str(), &after.reason])
                    .inc();
            }
        }
        let restarts_before = before.map_or(0, |s| s.restarts);
        if after.restarts > restarts_before {
            self.restarts
                .with_label_values(&[&after.reason])
                .inc_by(u64::from(after.restarts - restarts_before));
        }
        let labels = [
            job.metadata.namespace.as_deref().unwrap_or(""),
            job.metadata.name.as_deref().unwrap_or(""),
        ];
        match (&after.progress, after.phase) {
            (Some(p), Phase::Running) => {
                self.job_step.with_label_values(&labels).set(p.step as f64);
                if let Some(loss) = p.loss {
                    self.job_loss.with_label_values(&labels).set(loss);
                }
                if let Some(sps) = p.samples_per_second {
                    self.job_sps.with_label_values(&labels).set(sps);
                }
            }
            // Per-job series end with the run, so cardinality stays bounded.
            _ => self.forget_job_series(&labels),
        }
        if after.phase.is_terminal() {
            let _ = self.job_restarts.remove_label_values(&labels);
        } else {
            self.job_restarts
                .with_label_values(&labels)
                .set(f64::from(after.restarts));
        }
        self.set_phase(&key, after.phase, job.spec.mode);
    }

    /// The job is gone from the cluster.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.forget_job_series(&[namespace, name]);
        let _ = self.job_restarts.remove_label_values(&[namespace, name]);
        let mut phases = self.phases.lock().expect("metrics lock");
        if phases.remove(&format!("{namespace}/{name}")).is_some() {
            drop(phases);
            self.recount();
        }
    }

    fn forget_job_series(&self, labels: &[&str; 2]) {
        for g in [&self.job_step, &self.job_loss, &self.job_sps] {
            let _ = g.remove_label_values(labels);
        }
    }

    fn set_phase(&self, key: &str, phase: Phase, mode: Mode) {
        let mut phases = self.phases.lock().expect("metrics lock");
        if phases.insert(key.to_string(), (phase, mode)) != Some((phase, mode)) {
            drop(phases);
            self.recount();
        }
    }

    fn recount(&self) {
        let phases = self.phases.lock().expect("metrics lock");
        self.jobs.reset();
        for phase in Phase::ALL {
            for mode in Mode::ALL {
                let n = phases.values().filter(|&&pm| pm == (phase, mode)).count();
                self.jobs
                    .with_label_values(&[phase.as_str(), mode.as_str()])
                    .set(n as i64);
            }
        }
    }

    /// Marks the operator ready (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The text exposition, with the store's counters read now.
    pub fn render(&self, store: Option<&Store>) -> String {
        if let Some(store) = store {
            let s = store.stats();
            // The store counts in atomics; catch the counters up to them.
            let catch_up = |counter: &IntCounter, source: &std::sync::atomic::AtomicU64| {
                let now = source.load(Ordering::Relaxed);
                counter.inc_by(now.saturating_sub(counter.get()));
            };
            catch_up(&self.store_writes, &s.written);
            catch_up(&self.store_errors, &s.write_errors);
            catch_up(&self.store_dropped, &s.dropped);
            catch_up(&self.store_set_aside, &s.set_aside);
            self.store_queue
                .set(i64::try_from(s.queued.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            self.store_up.set(i64::from(store.healthy()));
        }
        let mut families = self.registry.gather();
        if store.is_some() {
            families.extend(self.store_registry.gather());
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the exposition is UTF-8")
    }
}

/// Serves [`router`] on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<OperatorMetrics>,
    store: Option<Store>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    trainyard_trainer::serve::serve(
        listener,
        router(metrics, store),
        None,
        trainyard_trainer::serve::Limits::default(),
    )
    .await;
    Ok(())
}

/// `/metrics` (the text exposition), `/healthz` (alive) and `/readyz`
/// (503 until the controller has started).
pub fn router(metrics: Arc<OperatorMetrics>, store: Option<Store>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                let store = store.clone();
                async move { m.render(store.as_ref()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = metrics.ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::parse_manifests;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job() -> TrainingJob {
        let mut j = parse_manifests("apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: a, namespace: n}\nspec:\n  mode: Distributed\n  image: t:1\n  distributed: {workers: 2}\n").unwrap().remove(0);
        j.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1000).unwrap()));
        j
    }

    fn status(phase: Phase, restarts: u32, reason: &str) -> TrainingJobStatus {
        TrainingJobStatus {
            phase,
            restarts,
            reason: reason.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_endpoints_answer_and_readiness_follows_the_controller() {
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use tower::ServiceExt;
        let m = Arc::new(OperatorMetrics::new());
        let get = |path: &str| {
            let app = router(m.clone(), None);
            let req = Request::get(path).body(Body::empty()).unwrap();
            async move { app.oneshot(req).await.unwrap() }
        };
        assert_eq!(get("/healthz").await.status(), StatusCode::OK);
        assert_eq!(
            get("/readyz").await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.set_ready(true);
        assert_eq!(get("/readyz").await.status(), StatusCode::OK);
        let response = get("/metrics").await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        for name in [names::JOBS, names::RECONCILE_ERRORS_TOTAL] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
    }

    #[test]
    fn lifecycle_is_counted_once_per_decision() {
        let m = OperatorMetrics::new();
        let j = job();
        let at = |s| Timestamp::from_second(s).unwrap();
        let pending = status(Phase::Pending, 0, "");
        let mut running = status(Phase::Running, 0, "GangRunning");
        running.progress = Some(crate::api::Progress {
            step: 7,
            loss: Some(0.5),
            ..Default::default()
        });
        let restarting = status(Phase::Restarting, 1, "ReplicaFailed");
        let done = status(Phase::Succeeded, 1, "Completed");
        m.observe(&j, None, &pending, at(1000));
        m.observe(&j, Some(&pending), &pending, at(1001));
        m.observe(&j, Some(&pending), &running, at(1012));
        let text = m.render(None);
        assert!(
            text.contains("trainyard_jobs_created_total{mode=\"Distributed\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("trainyard_store_"),
            "no store, no store series (an `up` of 0 would read as an outage)"
        );
        assert!(text.contains("trainyard_jobs{mode=\"Distributed\",phase=\"Running\"} 1"));
        assert!(text.contains("trainyard_job_step{job_name=\"a\",job_namespace=\"n\"} 7"));
        assert!(
            text.contains("trainyard_job_time_to_running_seconds_sum{mode=\"Distributed\"} 12")
        );
        assert!(text.contains("trainyard_job_gang_restarts{job_name=\"a\",job_namespace=\"n\"} 0"));
        m.observe(&j, Some(&running), &restarting, at(1020));
        assert!(
            m.render(None)
                .contains("trainyard_job_gang_restarts{job_name=\"a\",job_namespace=\"n\"} 1"),
            "restarts are counted per job while it lives"
        );
        m.observe(&j, Some(&restarting), &done, at(1100));
        let text = m.render(None);
        assert!(
            !text.contains("trainyard_job_gang_restarts{"),
            "and end with it"
        );
        assert!(text.contains("trainyard_job_restarts_total{reason=\"ReplicaFailed\"} 1"));
        assert!(text.contains(
            "trainyard_jobs_finished_total{mode=\"Distributed\",reason=\"Completed\",result=\"Succeeded\"} 1"
        ));
        assert!(text.contains("trainyard_jobs{mode=\"Distributed\",phase=\"Succeeded\"} 1"));
        assert!(
            !text.contains("trainyard_job_step{"),
            "per-job series end with the run"
        );
        m.forget("n", "a");
        assert!(
            m.render(None)
                .contains("trainyard_jobs{mode=\"Distributed\",phase=\"Succeeded\"} 0")
        );
    }
}
