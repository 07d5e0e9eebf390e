//! Durable history in PostgreSQL (sqlx; migrations from `migrations/`,
//! embedded and applied at start).
//!
//! Writing never blocks reconciling: records go into a bounded queue that one
//! writer task drains in order. When PostgreSQL is down the writer keeps the
//! record it holds and retries with backoff, the queue fills, and records
//! beyond its bound are counted and logged, never dropped silently. Every
//! write is idempotent (upserts and keyed inserts), so replays after a
//! restart or a retried write add nothing.

pub mod history;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{mpsc, watch};

pub use history::Record;

/// Embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Could not connect.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    /// Could not migrate.
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Counters of the store, for metrics and tests.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Records written.
    pub written: AtomicU64,
    /// Failed write attempts (each retried).
    pub write_errors: AtomicU64,
    /// Records refused because the queue was full.
    pub dropped: AtomicU64,
    /// Records waiting to be written.
    pub queued: AtomicU64,
}

/// A handle to the history writer.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Record>,
    healthy: watch::Receiver<bool>,
    stats: Arc<StoreStats>,
    pool: PgPool,
}

/// How long to wait for a connection (at start and per write).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// Connects, applies migrations, and starts the writer with a queue of `capacity`.
    pub async fn connect(url: &str, capacity: usize) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect(url)
            .await
            .map_err(StoreError::Connect)?;
        MIGRATOR.run(&pool).await?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (health_tx, healthy) = watch::channel(true);
        let stats = Arc::new(StoreStats::default());
        tokio::spawn(writer(pool.clone(), rx, health_tx, stats.clone()));
        Ok(Self {
            tx,
            healthy,
            stats,
            pool,
        })
    }

    /// Queues a record; never waits. A full queue counts and logs the loss.
    pub fn record(&self, record: Record) {
        match self.tx.try_send(record) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    record = e.into_inner().kind(),
                    dropped_total = n,
                    "history queue is full (PostgreSQL unavailable for long?); a record is lost"
                );
            }
        }
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Waits until every queued record is written, or `timeout` passes;
    /// returns whether the queue drained.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.stats.queued.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The pool, for queries (tests, future read APIs).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

async fn writer(
    pool: PgPool,
    mut rx: mpsc::Receiver<Record>,
    healthy: watch::Sender<bool>,
    stats: Arc<StoreStats>,
) {
    while let Some(record) = rx.recv().await {
        let mut backoff = Duration::from_millis(100);
        // Hold on to the record until it is written: order matters (a
        // transition needs its job row) and nothing may vanish.
        loop {
            match history::write(&pool, &record).await {
                Ok(()) => {
                    stats.written.fetch_add(1, Ordering::Relaxed);
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    healthy.send_if_modified(|h| !std::mem::replace(h, true));
                    break;
                }
                Err(e) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    if healthy.send_if_modified(|h| std::mem::replace(h, false)) {
                        tracing::warn!(error = %e, at = %Timestamp::now(), "history writes failing; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
