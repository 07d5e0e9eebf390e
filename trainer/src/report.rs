//! Progress reports to the operator, posted from a background thread so that
//! a slow or absent operator never slows training.
//!
//! Reports coalesce: the thread always sends the newest one and waits at
//! least [`MIN_INTERVAL`] between posts. Failures are logged, never fatal.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use crate::env;
use crate::protocol::ProgressMessage;

/// Shortest time between two posts.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Sends progress to the operator.
#[derive(Clone)]
pub struct Reporter {
    tx: SyncSender<ProgressMessage>,
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
        let (tx, rx) = mpsc::sync_channel(16);
        std::thread::Builder::new()
            .name("progress-report".into())
            .spawn(move || post_loop(&url, &token, rx))
            .expect("a thread can be spawned");
        Self { tx }
    }

    /// Queues a report; never blocks (a full queue means newer ones follow).
    pub fn send(&self, report: ProgressMessage) {
        let _ = self.tx.try_send(report);
    }
}

fn post_loop(url: &str, token: &str, rx: Receiver<ProgressMessage>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut last_post: Option<Instant> = None;
    let mut warned = false;
    while let Ok(mut report) = rx.recv() {
        if let Some(at) = last_post {
            std::thread::sleep(MIN_INTERVAL.saturating_sub(at.elapsed()));
        }
        // Only the newest report matters.
        loop {
            match rx.try_recv() {
                Ok(newer) => report = newer,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break,
            }
        }
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
                total_steps: 10,
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
        assert!(report.step >= 1 && report.total_steps == 10);
        (&stream)
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap();
    }
}
