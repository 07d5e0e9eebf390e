//! Durable history in PostgreSQL (sqlx; migrations from `migrations/`,
//! embedded and applied by the writer before its first write).
//!
//! Writing never blocks reconciling, and the database is never needed to
//! start: records go into a bounded queue that one writer task drains in
//! order, and that task connects and migrates in the background, retrying
//! with backoff for as long as PostgreSQL is down (meanwhile the store is
//! not [`Health::Up`] and jobs show `HistoryDegraded`). When PostgreSQL is
//! down the writer keeps the record it holds and retries it, the queue fills,
//! and records beyond its bound are counted and logged, never dropped
//! silently. A record PostgreSQL can never take (a data exception or a
//! constraint violation) is set aside, counted and logged, so it cannot hold
//! up every job's history behind it. A database migrated by a newer release
//! is never written to ([`Health::SchemaNewer`]): this release cannot know
//! what its rows mean there. Every write is idempotent (upserts and keyed
//! inserts), so replays after a restart or a retried write add nothing.

pub mod history;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{mpsc, watch};

pub use history::Record;

/// Embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL does not parse.
    #[error(
        "the database URL is not valid ({0}); expected postgres://user[:password]@host[:port]/database"
    )]
    Url(#[source] sqlx::Error),
    /// Could not connect (or migrate) in time.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    /// The database holds migrations this release does not know.
    #[error(
        "the database was migrated by a newer Trainyard (migration {0} is unknown here); upgrade the operator, or point it at another database"
    )]
    SchemaNewer(i64),
}

/// Where the writer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Connecting and migrating (PostgreSQL not reached yet).
    Connecting,
    /// The last write (or the migration) succeeded.
    Up,
    /// Writes are failing and being retried.
    Failing,
    /// The schema is newer than this release: nothing is written.
    SchemaNewer(i64),
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
    /// Records PostgreSQL refused for good (logged and skipped).
    pub set_aside: AtomicU64,
    /// Records waiting to be written.
    pub queued: AtomicU64,
}

/// A handle to the history writer.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Record>,
    health: watch::Receiver<Health>,
    stats: Arc<StoreStats>,
    pool: PgPool,
}

/// How long to wait for a connection (per attempt and per write).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two attempts while PostgreSQL is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest [`Store::connect`] waits for the first connection and the
/// migrations (a cold or busy server takes a while).
const FIRST_ATTEMPT: Duration = Duration::from_secs(60);
/// How often a newer schema is looked at again (it may be rolled back).
const SCHEMA_RECHECK: Duration = Duration::from_secs(60);

impl Store {
    /// Starts the writer with a queue of `capacity`, without waiting for
    /// PostgreSQL: it connects and migrates in the background. Fails only
    /// for a URL that can never work.
    pub fn start(url: &str, capacity: usize) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy(url)
            .map_err(StoreError::Url)?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (health_tx, health) = watch::channel(Health::Connecting);
        let stats = Arc::new(StoreStats::default());
        tokio::spawn(writer(pool.clone(), rx, health_tx, stats.clone()));
        Ok(Self {
            tx,
            health,
            stats,
            pool,
        })
    }

    /// [`Store::start`], then the outcome of its first attempt to connect
    /// and migrate: for callers that would rather fail than run without
    /// history (`trainyard local --database-url`).
    pub async fn connect(url: &str, capacity: usize) -> Result<Self, StoreError> {
        let store = Self::start(url, capacity)?;
        let mut health = store.health.clone();
        let settled =
            tokio::time::timeout(FIRST_ATTEMPT, health.wait_for(|h| *h != Health::Connecting))
                .await;
        // A closed channel (the writer gone) reads as no connection.
        match settled.map(|h| h.map(|h| *h).unwrap_or(Health::Connecting)) {
            Ok(Health::Up) => Ok(store),
            Ok(Health::SchemaNewer(v)) => Err(StoreError::SchemaNewer(v)),
            Ok(_) => Err(StoreError::Connect(format!(
                "no connection within {CONNECT_TIMEOUT:?}"
            ))),
            Err(_) => Err(StoreError::Connect(format!(
                "connecting and migrating took over {FIRST_ATTEMPT:?}"
            ))),
        }
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

    /// Whether history is being written (connected, migrated, last write ok).
    pub fn healthy(&self) -> bool {
        self.health() == Health::Up
    }

    /// Where the writer stands.
    pub fn health(&self) -> Health {
        *self.health.borrow()
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

/// Whether PostgreSQL will never take this record, however often it is
/// retried: a data exception (SQLSTATE class 22, e.g. a NUL byte in text)
/// or an integrity constraint violation (class 23, e.g. a transition whose
/// job row was lost to a full queue); and values sqlx cannot encode.
fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => true,
        _ => false,
    }
}

/// A migration the database has and this release does not know, if any.
async fn newer_migration(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(&mut *conn)
        .await?;
    Ok(applied.into_iter().find(|v| !MIGRATOR.version_exists(*v)))
}

/// Applies the migrations on a connection of its own. Refuses a newer
/// schema before taking the migration lock, and closes the connection on any
/// failure: sqlx's migrator returns early without releasing its advisory
/// lock, and a pooled session that keeps it would block every other
/// migrator of the database (a newer release's included) for ever.
async fn apply_migrations(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    let outcome = match newer_migration(&mut conn).await {
        Ok(Some(version)) => Err(sqlx::migrate::MigrateError::VersionMissing(version)),
        // `run` over a `&mut PgConnection` is not provably Send inside a
        // spawned task ("Acquire is not general enough"); sqlx offers
        // `run_direct` for exactly that (sqlx is pinned, see Cargo.toml).
        Ok(None) => MIGRATOR.run_direct(None, &mut *conn, false).await,
        Err(e) => Err(e.into()),
    };
    if outcome.is_err() {
        let _ = conn.close().await;
    }
    outcome
}

/// Connects and migrates, retrying until it succeeds; a newer schema is
/// reported and looked at again now and then, and nothing is written meanwhile.
async fn migrate(pool: &PgPool, health: &watch::Sender<Health>, stats: &StoreStats) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match apply_migrations(pool).await {
            Ok(()) => {
                health.send_replace(Health::Up);
                return;
            }
            Err(sqlx::migrate::MigrateError::VersionMissing(version)) => {
                if health.send_replace(Health::SchemaNewer(version)) != Health::SchemaNewer(version)
                {
                    tracing::error!(
                        version,
                        "{}; history is not written until then",
                        StoreError::SchemaNewer(version)
                    );
                }
                tokio::time::sleep(SCHEMA_RECHECK).await;
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if health.send_replace(Health::Failing) != Health::Failing {
                    tracing::warn!(error = %e, "cannot reach or migrate PostgreSQL; history is queued and retried");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn writer(
    pool: PgPool,
    mut rx: mpsc::Receiver<Record>,
    health: watch::Sender<Health>,
    stats: Arc<StoreStats>,
) {
    migrate(&pool, &health, &stats).await;
    while let Some(record) = rx.recv().await {
        let mut backoff = Duration::from_millis(100);
        // Hold on to the record until it is written or refused for good:
        // order matters (a transition needs its job row) and nothing may
        // vanish unlogged.
        loop {
            match history::write(&pool, &record).await {
                Ok(()) => {
                    stats.written.fetch_add(1, Ordering::Relaxed);
                    health.send_if_modified(|h| std::mem::replace(h, Health::Up) != Health::Up);
                    break;
                }
                Err(e) if is_permanent(&e) => {
                    let n = stats.set_aside.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::error!(
                        error = %e,
                        record = ?record,
                        set_aside_total = n,
                        "PostgreSQL refused a history record for good; it is set aside"
                    );
                    break;
                }
                Err(e) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    if health.send_replace(Health::Failing) != Health::Failing {
                        tracing::warn!(error = %e, "history writes failing; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        stats.queued.fetch_sub(1, Ordering::Relaxed);
    }
}
