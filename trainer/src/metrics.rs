//! The trainer's Prometheus metrics: every name in one place, and the
//! `/metrics` endpoint served with `--metrics-addr`.

use std::net::SocketAddr;

use prometheus::{Encoder, Gauge, IntCounter, IntGauge, Registry, TextEncoder};

/// Metric names, the one source of truth (dashboards and alerts use these).
pub mod names {
    /// Optimiser steps completed (gauge: resets to the checkpoint on resume).
    pub const STEP: &str = "trainyard_trainer_step";
    /// Steps run by this process (counter).
    pub const STEPS_TOTAL: &str = "trainyard_trainer_steps_total";
    /// Training loss of the last step.
    pub const LOSS: &str = "trainyard_trainer_loss";
    /// Learning rate of the last step.
    pub const LEARNING_RATE: &str = "trainyard_trainer_learning_rate";
    /// Training throughput of the last step.
    pub const SAMPLES_PER_SECOND: &str = "trainyard_trainer_samples_per_second";
    /// Training samples consumed by this process (counter).
    pub const SAMPLES_TOTAL: &str = "trainyard_trainer_samples_total";
    /// Validation mean IoU of the last validation.
    pub const VAL_MIOU: &str = "trainyard_trainer_val_miou";
    /// Validation pixel accuracy of the last validation.
    pub const VAL_PIXEL_ACCURACY: &str = "trainyard_trainer_val_pixel_accuracy";
    /// Checkpoints written (counter).
    pub const CHECKPOINTS_TOTAL: &str = "trainyard_trainer_checkpoints_total";
    /// Seconds to write a checkpoint (histogram).
    pub const CHECKPOINT_SECONDS: &str = "trainyard_trainer_checkpoint_seconds";
    /// Checkpoints that failed to load on resume and were set aside (counter).
    pub const CHECKPOINTS_SKIPPED_TOTAL: &str = "trainyard_trainer_checkpoints_skipped_total";
    /// Seconds spent in all-reduce (data-parallel synchronisation; counter).
    pub const ALLREDUCE_SECONDS_TOTAL: &str = "trainyard_trainer_allreduce_seconds_total";
    /// Bytes this rank put into all-reduce (after compression; counter).
    pub const ALLREDUCE_BYTES_TOTAL: &str = "trainyard_trainer_allreduce_bytes_total";
    /// Federated rounds completed (aggregator).
    pub const FEDERATED_ROUND: &str = "trainyard_federated_round";
    /// Updates aggregated in the last round (aggregator).
    pub const FEDERATED_PARTICIPANTS: &str = "trainyard_federated_participants";
    /// Client updates accepted (aggregator, counter).
    pub const FEDERATED_UPDATES_ACCEPTED_TOTAL: &str = "trainyard_federated_updates_accepted_total";
    /// Client updates rejected, by reason (aggregator, counter).
    pub const FEDERATED_UPDATES_REJECTED_TOTAL: &str = "trainyard_federated_updates_rejected_total";
    /// Privacy spent so far, ε for the configured δ (aggregator).
    pub const FEDERATED_EPSILON: &str = "trainyard_federated_epsilon";
    /// Seconds the last round took (aggregator).
    pub const FEDERATED_ROUND_SECONDS: &str = "trainyard_federated_round_seconds";
}

/// The trainer's metric handles.
#[derive(Clone)]
pub struct TrainerMetrics {
    registry: Registry,
    /// See [`names::STEP`].
    pub step: IntGauge,
    /// See [`names::STEPS_TOTAL`].
    pub steps_total: IntCounter,
    /// See [`names::LOSS`].
    pub loss: Gauge,
    /// See [`names::LEARNING_RATE`].
    pub learning_rate: Gauge,
    /// See [`names::SAMPLES_PER_SECOND`].
    pub samples_per_second: Gauge,
    /// See [`names::SAMPLES_TOTAL`].
    pub samples_total: IntCounter,
    /// See [`names::VAL_MIOU`].
    pub val_miou: Gauge,
    /// See [`names::VAL_PIXEL_ACCURACY`].
    pub val_pixel_accuracy: Gauge,
    /// See [`names::CHECKPOINTS_TOTAL`].
    pub checkpoints_total: IntCounter,
    /// See [`names::CHECKPOINT_SECONDS`].
    pub checkpoint_seconds: prometheus::Histogram,
    /// See [`names::CHECKPOINTS_SKIPPED_TOTAL`].
    pub checkpoints_skipped_total: IntCounter,
    /// See [`names::ALLREDUCE_SECONDS_TOTAL`].
    pub allreduce_seconds_total: prometheus::Counter,
    /// See [`names::ALLREDUCE_BYTES_TOTAL`].
    pub allreduce_bytes_total: IntCounter,
    /// See [`names::FEDERATED_ROUND`].
    pub federated_round: IntGauge,
    /// See [`names::FEDERATED_PARTICIPANTS`].
    pub federated_participants: IntGauge,
    /// See [`names::FEDERATED_UPDATES_ACCEPTED_TOTAL`].
    pub federated_accepted: IntCounter,
    /// See [`names::FEDERATED_UPDATES_REJECTED_TOTAL`] (label `reason`).
    pub federated_rejected: prometheus::IntCounterVec,
    /// See [`names::FEDERATED_EPSILON`].
    pub federated_epsilon: Gauge,
    /// See [`names::FEDERATED_ROUND_SECONDS`].
    pub federated_round_seconds: Gauge,
}

impl TrainerMetrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let int_gauge = |n, h| reg(&registry, IntGauge::new(n, h).expect("valid metric"));
        let gauge = |n, h| reg(&registry, Gauge::new(n, h).expect("valid metric"));
        let counter = |n, h| reg(&registry, IntCounter::new(n, h).expect("valid metric"));
        Self {
            step: int_gauge(names::STEP, "Optimiser steps completed in this run."),
            steps_total: counter(names::STEPS_TOTAL, "Optimiser steps run by this process."),
            loss: gauge(names::LOSS, "Training loss of the last step."),
            learning_rate: gauge(names::LEARNING_RATE, "Learning rate of the last step."),
            samples_per_second: gauge(
                names::SAMPLES_PER_SECOND,
                "Training samples per second over the last step.",
            ),
            samples_total: counter(
                names::SAMPLES_TOTAL,
                "Training samples consumed by this process.",
            ),
            val_miou: gauge(names::VAL_MIOU, "Mean IoU of the last validation."),
            val_pixel_accuracy: gauge(
                names::VAL_PIXEL_ACCURACY,
                "Pixel accuracy of the last validation.",
            ),
            checkpoints_total: counter(
                names::CHECKPOINTS_TOTAL,
                "Checkpoints written by this process.",
            ),
            checkpoints_skipped_total: counter(
                names::CHECKPOINTS_SKIPPED_TOTAL,
                "Checkpoints that failed to load on resume and were set aside.",
            ),
            checkpoint_seconds: reg(
                &registry,
                prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        names::CHECKPOINT_SECONDS,
                        "Seconds to write a checkpoint.",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            allreduce_seconds_total: reg(
                &registry,
                prometheus::Counter::new(
                    names::ALLREDUCE_SECONDS_TOTAL,
                    "Seconds spent in all-reduce.",
                )
                .expect("valid metric"),
            ),
            allreduce_bytes_total: counter(
                names::ALLREDUCE_BYTES_TOTAL,
                "Bytes this rank put into all-reduce (after compression).",
            ),
            federated_round: int_gauge(names::FEDERATED_ROUND, "Federated rounds completed."),
            federated_participants: int_gauge(
                names::FEDERATED_PARTICIPANTS,
                "Client updates aggregated in the last federated round.",
            ),
            federated_accepted: counter(
                names::FEDERATED_UPDATES_ACCEPTED_TOTAL,
                "Client updates the aggregator accepted.",
            ),
            federated_rejected: reg(
                &registry,
                prometheus::IntCounterVec::new(
                    prometheus::Opts::new(
                        names::FEDERATED_UPDATES_REJECTED_TOTAL,
                        "Client updates the aggregator rejected, by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            federated_epsilon: gauge(
                names::FEDERATED_EPSILON,
                "Differential privacy spent so far (epsilon for the configured delta).",
            ),
            federated_round_seconds: gauge(
                names::FEDERATED_ROUND_SECONDS,
                "Seconds the last federated round took.",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Serves `/metrics` on `addr` from a background thread. Binding happens
    /// before this returns, so a taken port is reported to the caller.
    pub fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let metrics = self.clone();
        std::thread::Builder::new()
            .name("metrics-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "metrics server failed to start");
                            return;
                        }
                    };
                    let app = axum::Router::new()
                        .route(
                            "/metrics",
                            axum::routing::get(move || {
                                let body = metrics.render();
                                async move {
                                    (
                                        [(
                                            axum::http::header::CONTENT_TYPE,
                                            "text/plain; version=0.0.4",
                                        )],
                                        body,
                                    )
                                }
                            }),
                        )
                        .route("/healthz", axum::routing::get(|| async { "ok" }));
                    crate::serve::serve(listener, app, None, crate::serve::Limits::default()).await;
                });
            })?;
        Ok(local)
    }
}

impl Default for TrainerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn serves_every_metric_over_http() {
        let m = TrainerMetrics::new();
        m.step.set(12);
        m.loss.set(0.5);
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("trainyard_trainer_step 12"), "{body}");
        assert!(body.contains("trainyard_trainer_loss 0.5"), "{body}");
        for name in [
            names::STEPS_TOTAL,
            names::VAL_MIOU,
            names::SAMPLES_PER_SECOND,
            names::CHECKPOINTS_TOTAL,
        ] {
            assert!(body.contains(name), "{name} missing");
        }
    }
}
