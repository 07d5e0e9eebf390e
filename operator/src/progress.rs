//! The progress endpoint: trainers post [`ProgressMessage`]s, authenticated
//! by their job's token, and reconciles read the newest one per job.
//!
//! Every rejection is a 4xx with a reason and is counted: unknown job (404),
//! missing or wrong token (401), oversize body (413), malformed body (400),
//! too frequent (429).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use prometheus::IntCounterVec;
use trainyard_trainer::protocol::{MAX_REPORT_BYTES, PROGRESS_PATH, ProgressMessage};

/// Shortest accepted interval between two reports of one job.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// The longest path a report may name (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// A path a report names, fit for the status and for PostgreSQL (which
/// refuses a NUL byte in text for good).
fn valid_path(path: &str) -> bool {
    path.len() <= MAX_PATH_BYTES && !path.contains('\0')
}

/// Tokens of the known jobs and their newest reports.
pub struct ProgressHub {
    tokens: RwLock<HashMap<String, String>>,
    latest: Mutex<HashMap<String, (ProgressMessage, Instant)>>,
    counter: Option<IntCounterVec>,
}

fn key(namespace: &str, job: &str) -> String {
    format!("{namespace}/{job}")
}

impl ProgressHub {
    /// An empty hub; `counter` (labels: `result`) counts every report.
    pub fn new(counter: Option<IntCounterVec>) -> Self {
        Self {
            tokens: RwLock::new(HashMap::new()),
            latest: Mutex::new(HashMap::new()),
            counter,
        }
    }

    /// Accepts reports for `namespace/job` carrying `token`.
    pub fn register(&self, namespace: &str, job: &str, token: &str) {
        self.tokens
            .write()
            .expect("hub lock")
            .insert(key(namespace, job), token.to_string());
    }

    /// Forgets a job (it is gone).
    pub fn forget(&self, namespace: &str, job: &str) {
        self.tokens
            .write()
            .expect("hub lock")
            .remove(&key(namespace, job));
        self.latest
            .lock()
            .expect("hub lock")
            .remove(&key(namespace, job));
    }

    /// The newest report of a job.
    pub fn latest(&self, namespace: &str, job: &str) -> Option<ProgressMessage> {
        self.latest
            .lock()
            .expect("hub lock")
            .get(&key(namespace, job))
            .map(|(r, _)| r.clone())
    }

    fn count(&self, result: &str) {
        if let Some(c) = &self.counter {
            c.with_label_values(&[result]).inc();
        }
    }

    fn accept(
        &self,
        namespace: &str,
        job: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), (StatusCode, &'static str)> {
        let k = key(namespace, job);
        let expected = self.tokens.read().expect("hub lock").get(&k).cloned();
        let Some(expected) = expected else {
            return Err((StatusCode::NOT_FOUND, "unknown job"));
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
            return Err((StatusCode::UNAUTHORIZED, "missing or wrong token"));
        }
        let message: ProgressMessage = serde_json::from_slice(body)
            .map_err(|_| (StatusCode::BAD_REQUEST, "malformed progress report"))?;
        let paths = message
            .checkpoint
            .iter()
            .map(|c| c.path.as_str())
            .chain(message.adapter.as_deref());
        if !paths.into_iter().all(valid_path) {
            return Err((
                StatusCode::BAD_REQUEST,
                "a path in the report holds a NUL byte or is longer than 4096 bytes",
            ));
        }
        let mut latest = self.latest.lock().expect("hub lock");
        if latest
            .get(&k)
            .is_some_and(|(_, at)| at.elapsed() < MIN_INTERVAL)
        {
            return Err((StatusCode::TOO_MANY_REQUESTS, "reports too frequent"));
        }
        latest.insert(k, (message, Instant::now()));
        Ok(())
    }
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn receive(
    State(hub): State<Arc<ProgressHub>>,
    Path((namespace, job)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> (StatusCode, &'static str) {
    let bytes = match axum::body::to_bytes(body, MAX_REPORT_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            hub.count("oversize");
            return (StatusCode::PAYLOAD_TOO_LARGE, "report too large");
        }
    };
    match hub.accept(&namespace, &job, &headers, &bytes) {
        Ok(()) => {
            hub.count("accepted");
            (StatusCode::NO_CONTENT, "")
        }
        Err((code, why)) => {
            hub.count(match code {
                StatusCode::NOT_FOUND => "unknown_job",
                StatusCode::UNAUTHORIZED => "bad_token",
                StatusCode::TOO_MANY_REQUESTS => "rate_limited",
                _ => "malformed",
            });
            (code, why)
        }
    }
}

/// Where job `namespace/job` posts its reports on the endpoint at `base`.
pub fn job_url(base: &str, namespace: &str, job: &str) -> String {
    format!(
        "{}{PROGRESS_PATH}/{namespace}/{job}",
        base.trim_end_matches('/')
    )
}

/// The endpoint's routes: `POST /v1/progress/{namespace}/{job}`.
pub fn router(hub: Arc<ProgressHub>) -> axum::Router {
    axum::Router::new()
        .route(
            &format!("{PROGRESS_PATH}/{{namespace}}/{{job}}"),
            axum::routing::post(receive),
        )
        .with_state(hub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn post(
        hub: &Arc<ProgressHub>,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> StatusCode {
        let mut req = Request::post(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        router(hub.clone())
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap()
            .status()
    }

    fn report(step: u64) -> Vec<u8> {
        serde_json::to_vec(&ProgressMessage {
            step,
            loss: Some(0.5),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn only_the_jobs_token_is_accepted_and_everything_is_counted() {
        let counter = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["result"]).unwrap();
        let hub = Arc::new(ProgressHub::new(Some(counter.clone())));
        hub.register("ml", "seg", "tok");
        let url = "/v1/progress/ml/seg";
        assert_eq!(
            post(&hub, "/v1/progress/ml/other", Some("tok"), report(1)).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            post(&hub, url, None, report(1)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            post(&hub, url, Some("nope"), report(1)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            post(&hub, url, Some("tok"), b"{\"step\": \"x\"}".to_vec()).await,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            post(&hub, url, Some("tok"), vec![b' '; MAX_REPORT_BYTES + 1]).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // PostgreSQL would refuse a NUL in text for good; the status has no
        // use for a path longer than the kernel's.
        for path in [
            "/ck/a\0b".to_string(),
            format!("/{}", "x".repeat(MAX_PATH_BYTES)),
        ] {
            let bad = serde_json::to_vec(&ProgressMessage {
                step: 3,
                adapter: Some(path),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(
                post(&hub, url, Some("tok"), bad).await,
                StatusCode::BAD_REQUEST
            );
        }
        assert_eq!(
            post(&hub, url, Some("tok"), report(7)).await,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            post(&hub, url, Some("tok"), report(8)).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        let latest = hub.latest("ml", "seg").unwrap();
        assert_eq!((latest.step, latest.loss), (7, Some(0.5)));
        for (result, n) in [
            ("unknown_job", 1),
            ("bad_token", 2),
            ("malformed", 3),
            ("oversize", 1),
            ("accepted", 1),
            ("rate_limited", 1),
        ] {
            assert_eq!(counter.with_label_values(&[result]).get(), n, "{result}");
        }
        hub.forget("ml", "seg");
        assert!(hub.latest("ml", "seg").is_none());
    }

    #[tokio::test]
    async fn a_report_from_an_older_trainer_is_read_for_what_it_shares() {
        let hub = Arc::new(ProgressHub::new(None));
        hub.register("ml", "seg", "tok");
        // What trainers before this release sent: two fields more.
        let old = br#"{"step": 4, "total_steps": 12, "round": 4, "loss": 0.25}"#.to_vec();
        assert_eq!(
            post(&hub, "/v1/progress/ml/seg", Some("tok"), old).await,
            StatusCode::NO_CONTENT
        );
        let latest = hub.latest("ml", "seg").unwrap();
        assert_eq!(
            latest,
            ProgressMessage {
                step: 4,
                loss: Some(0.25),
                ..Default::default()
            }
        );
    }
}
