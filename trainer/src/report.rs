//! Progress reports to the operator, posted from a background thread so that
//! a slow or absent operator never slows training.
//!
//! Reports coalesce in one slot: a new report replaces the one not yet
//! posted (never the other way round, so the newest always goes out), and
//! the thread waits at least [`MIN_INTERVAL`] between posts. Failures are
//! logged, never fatal. Before the process exits, [`Reporter::flush`] waits
//! for the slot to be posted (the final step, checkpoint or adapter), so the
//! last word is not lost.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::env;
use crate::protocol::ProgressMessage;

/// Shortest time between two posts.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a process waits at its end for its last report to go out.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// Sends progress to the operator.
#[derive(Clone)]
pub struct Reporter {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    changed: Condvar,
}

#[derive(Default)]
struct Slot {
    /// The newest report not yet taken for posting.
    pending: Option<ProgressMessage>,
    /// A post is under way.
    posting: bool,
}

impl Reporter {
    /// A reporter posting to `url` with `token`, or `None` when the
    /// environment names no endpoint (local runs, plain `train`).
    pub fn from_env() -> Option<Self> {
        let url = std::env::var(env::PROGRESS_URL).ok()?;
        let token = std::env::var(env::PROGRESS_TOKEN).unwrap_or_default();
        Some(Self::new(url, token))
    }

    /// A reporter posting to `url` with `token`.
    pub fn new(url: String, token: String) -> Self {
        let shared = Arc::new(Shared::default());
        let poster = shared.clone();
        std::thread::Builder::new()
            .name("progress-report".into())
            .spawn(move || post_loop(&url, &token, &poster))
            .expect("a thread can be spawned");
        Self { shared }
    }

    /// Replaces the report waiting to be posted; never blocks on the network.
    pub fn send(&self, report: ProgressMessage) {
        self.shared.slot.lock().expect("report slot").pending = Some(report);
        self.shared.changed.notify_all();
    }

    /// Waits at most `within` for the newest report to be posted; whether it
    /// was (delivered, or refused by the operator: either way not pending).
    pub fn flush(&self, within: Duration) -> bool {
        let slot = self.shared.slot.lock().expect("report slot");
        let (slot, _) = self
            .shared
            .changed
            .wait_timeout_while(slot, within, |s| s.pending.is_some() || s.posting)
            .expect("report slot");
        slot.pending.is_none() && !slot.posting
    }
}

fn post_loop(url: &str, token: &str, shared: &Shared) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut last_post: Option<Instant> = None;
    let mut warned = false;
    loop {
        {
            let slot = shared.slot.lock().expect("report slot");
            drop(
                shared
                    .changed
                    .wait_while(slot, |s| s.pending.is_none())
                    .expect("report slot"),
            );
        }
        if let Some(at) = last_post {
            std::thread::sleep(MIN_INTERVAL.saturating_sub(at.elapsed()));
        }
        // The newest report, taken after the wait: those sent meanwhile coalesce.
        let report = {
            let mut slot = shared.slot.lock().expect("report slot");
            slot.posting = true;
            slot.pending.take().expect("only this thread takes reports")
        };
        let body = serde_json::to_string(&report).expect("a report serializes");
        last_post = Some(Instant::now());
        let result = agent
            .post(url)
            .header("Authorization", &format!("Bearer {token}"))
            .content_type("application/json")
            .send(body.as_str());
        match result {
            Ok(_) => warned = false,
            Err(e) if !warned => {
                tracing::warn!(%url, error = %e, "progress report failed; training goes on");
                warned = true;
            }
            Err(e) => tracing::debug!(%url, error = %e, "progress report failed"),
        }
        shared.slot.lock().expect("report slot").posting = false;
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    #[test]
    fn posts_the_newest_report_with_the_token() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/v1/progress/ns/job",
            listener.local_addr().unwrap()
        );
        let reporter = Reporter::new(url, "s3cret".into());
        for step in 1..=3 {
            reporter.send(ProgressMessage {
                step,
                ..Default::default()
            });
        }
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            headers.push(line.trim().to_string());
        }
        assert_eq!(headers[0], "POST /v1/progress/ns/job HTTP/1.1");
        assert!(
            headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case("authorization: Bearer s3cret")),
            "{headers:?}"
        );
        let len: usize = headers
            .iter()
            .find_map(|h| {
                h.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let report: ProgressMessage = serde_json::from_slice(&body).unwrap();
        assert!((1..=3).contains(&report.step), "{report:?}");
        (&stream)
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap();
    }

    /// Answers every request on every connection with 204 and records the
    /// reported steps.
    fn recording_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<u64>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/v1/progress/ns/job",
            listener.local_addr().unwrap()
        );
        let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = steps.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut len = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length: ")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        reader.read_exact(&mut body).unwrap();
                        let report: ProgressMessage = serde_json::from_slice(&body).unwrap();
                        seen.lock().unwrap().push(report.step);
                        (&stream)
                            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                            .unwrap();
                    }
                });
            }
        });
        (url, steps)
    }

    #[test]
    fn flush_posts_the_last_report_before_it_returns() {
        let (url, steps) = recording_server();
        let reporter = Reporter::new(url, "t".into());
        let report = |step| ProgressMessage {
            step,
            ..Default::default()
        };
        reporter.send(report(1));
        std::thread::sleep(Duration::from_millis(100));
        // More reports than any queue would hold while the interval after the
        // first post runs: they coalesce, and the last is the one posted.
        for step in 2..=100 {
            reporter.send(report(step));
        }
        assert!(reporter.flush(FLUSH_DEADLINE));
        assert_eq!(*steps.lock().unwrap(), [1, 100]);
        // Nothing queued: a flush returns at once.
        let started = Instant::now();
        assert!(reporter.flush(FLUSH_DEADLINE));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
