//! History in a real PostgreSQL: each test starts its own throwaway server
//! from the machine's PostgreSQL binaries (initdb/pg_ctl), so it can also
//! stop it to play an outage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use trainyard::api::validate::parse_manifests;
use trainyard::api::{Phase, TrainingJob, TrainingJobStatus};
use trainyard::store::{Health, Record, Store, history};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A private PostgreSQL cluster on 127.0.0.1.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TRAINYARD_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    candidates.sort();
    if let Some(dir) = candidates.pop() {
        return dir;
    }
    let which = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "these tests need PostgreSQL's initdb and pg_ctl (Debian: postgresql-15), or TRAINYARD_PG_BIN"
    );
    Path::new(&path).parent().unwrap().to_path_buf()
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (the
/// server refuses to run as root).
fn pg(bin: &Path, tool: &str, args: &[&str]) {
    let exe = bin.join(tool);
    let root = is_root();
    let out = if root {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&exe)
            .args(args)
            .output()
    } else {
        Command::new(&exe).args(args).output()
    }
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    fn start() -> Self {
        let bin = pg_bin();
        // Under /tmp so the postgres user can reach it when we are root.
        let dir = tempfile::Builder::new()
            .prefix("trainyard-pg")
            .tempdir_in("/tmp")
            .unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = dir.path().join("data");
        pg(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self { dir, port, bin };
        pg.up();
        pg
    }

    fn up(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    fn down(&self) {
        let data = self.dir.path().join("data");
        pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

fn job() -> TrainingJob {
    let mut j = parse_manifests(
        "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: seg, namespace: ml}\nspec:\n  mode: Distributed\n  image: t:1\n  distributed: {workers: 2}\n",
    )
    .unwrap()
    .remove(0);
    j.metadata.uid = Some("uid-1".into());
    j
}

fn status(phase: Phase, step: u64, restarts: u32) -> TrainingJobStatus {
    let mut s = TrainingJobStatus {
        phase,
        restarts,
        reason: format!("{phase}Reason"),
        ..Default::default()
    };
    s.progress = (step > 0).then(|| trainyard::api::Progress {
        step,
        total_steps: 100,
        loss: Some(1.0 / step as f64),
        last_checkpoint: Some(trainyard::api::CheckpointRef {
            step: step - step % 10,
            path: format!("/ck/step-{}", step - step % 10),
        }),
        ..Default::default()
    });
    s
}

/// A life: Pending, Running with progress, a restart, Succeeded.
fn life() -> Vec<Record> {
    let j = job();
    let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
    let states = [
        status(Phase::Pending, 0, 0),
        status(Phase::Running, 10, 0),
        status(Phase::Running, 20, 0),
        status(Phase::Restarting, 20, 1),
        status(Phase::Running, 30, 1),
        status(Phase::Succeeded, 100, 1),
    ];
    let mut out = Vec::new();
    let mut before: Option<TrainingJobStatus> = None;
    for (i, s) in states.into_iter().enumerate() {
        out.extend(history::records(&j, before.as_ref(), &s, t(i as i64)));
        before = Some(s);
    }
    out
}

async fn count(store: &Store, table: &'static str) -> i64 {
    let sql = match table {
        "jobs" => "SELECT count(*) FROM jobs",
        "transitions" => "SELECT count(*) FROM transitions",
        "progress" => "SELECT count(*) FROM progress",
        "artifacts" => "SELECT count(*) FROM artifacts",
        "rounds" => "SELECT count(*) FROM rounds",
        other => panic!("no table {other}"),
    };
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_written_once_even_when_replayed() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 1000).await.unwrap();
    for _ in 0..2 {
        for r in life() {
            store.record(r);
        }
        assert!(store.flush(Duration::from_secs(20)).await);
    }
    assert_eq!(count(&store, "jobs").await, 1);
    // Pending, Running, Restarting, Running, Succeeded.
    assert_eq!(count(&store, "transitions").await, 5);
    assert_eq!(count(&store, "progress").await, 4, "steps 10, 20, 30, 100");
    assert_eq!(count(&store, "artifacts").await, 4);
    let (phase, restarts): (String, i32) =
        sqlx::query_as("SELECT phase, restarts FROM jobs WHERE uid = 'uid-1'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!((phase.as_str(), restarts), ("Succeeded", 1));
    // Migrations are idempotent too: a second operator start is fine.
    Store::connect(&pg.url(), 10).await.unwrap();
}

/// Federated rounds: one row per round with participants, rejections, loss,
/// metric, ε and duration; a round reported again (resumed aggregator)
/// updates its row instead of adding one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_rounds_are_recorded_once_each() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 1000).await.unwrap();
    let j = job();
    let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
    let round = |r: u64, eps: f64| {
        let mut s = status(Phase::Running, r, 0);
        let p = s.progress.as_mut().unwrap();
        p.round = Some(r);
        p.total_rounds = Some(5);
        p.participants = Some(4);
        p.updates_rejected = Some(1);
        p.metric = Some(0.1 * r as f64);
        p.epsilon = Some(eps);
        p.round_seconds = Some(2.5);
        s
    };
    let states = [round(1, 0.5), round(2, 0.8), round(2, 0.9), round(3, 1.1)];
    let mut before: Option<TrainingJobStatus> = None;
    for (i, s) in states.into_iter().enumerate() {
        for r in history::records(&j, before.as_ref(), &s, t(i as i64)) {
            store.record(r);
        }
        before = Some(s);
    }
    // A replay of round 2 with a newer ε.
    let mut replay = history::records(&j, Some(&round(1, 0.5)), &round(2, 0.95), t(9));
    replay.retain(|r| r.kind() == "round");
    for r in replay {
        store.record(r);
    }
    assert!(store.flush(Duration::from_secs(20)).await);
    assert_eq!(count(&store, "rounds").await, 3);
    let (participants, rejected, epsilon, seconds): (i32, i32, f64, f64) = sqlx::query_as(
        "SELECT participants, rejected, epsilon, seconds FROM rounds WHERE job_uid = 'uid-1' AND round = 2",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((participants, rejected, seconds), (4, 1, 2.5));
    assert!(
        (epsilon - 0.95).abs() < 1e-12,
        "the replay's ε wins: {epsilon}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_delays_history_but_loses_nothing() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 1000).await.unwrap();
    let records = life();
    let (first, rest) = records.split_at(3);
    for r in first {
        store.record(r.clone());
    }
    assert!(store.flush(Duration::from_secs(20)).await);
    pg.down();
    for r in rest {
        store.record(r.clone());
    }
    // The writer notices and keeps retrying; the queue holds the records.
    let mut waited = Duration::ZERO;
    while store.healthy() {
        assert!(
            waited < Duration::from_secs(30),
            "the outage went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert!(!store.flush(Duration::from_millis(500)).await);
    let metrics = trainyard::metrics::OperatorMetrics::new();
    let scrape = metrics.render(Some(&store));
    assert!(scrape.contains("\ntrainyard_store_up 0\n"), "{scrape}");
    assert!(!scrape.contains("\ntrainyard_store_write_errors_total 0\n"));
    assert!(
        store
            .stats()
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    pg.up();
    assert!(
        store.flush(Duration::from_secs(60)).await,
        "the queue drained after the outage"
    );
    assert!(store.healthy());
    assert!(
        metrics
            .render(Some(&store))
            .contains("\ntrainyard_store_up 1\n")
    );
    assert_eq!(count(&store, "transitions").await, 5);
    assert_eq!(count(&store, "progress").await, 4);
    assert_eq!(
        store
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_counts_what_it_loses() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 2).await.unwrap();
    pg.down();
    for r in life() {
        store.record(r);
    }
    let dropped = store
        .stats()
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped >= life().len() as u64 - 3, "dropped {dropped}");
}

#[test]
fn trainyard_local_records_the_jobs_history() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("job.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: trainyard.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: hist}\nspec:\n  mode: Distributed\n  image: t:1\n  model: {widths: [8, 16]}\n  data: {shapes: {samples: 64, imageSize: 32}}\n  training: {steps: 20, batchSize: 4, logEvery: 1, validateEvery: 0, threads: 1}\n  distributed: {workers: 2}\n  checkpoints: {intervalSteps: 5}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let trainer =
        PathBuf::from(env!("CARGO_BIN_EXE_trainyard")).with_file_name("trainyard-trainer");
    let result = Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .arg("local")
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .arg("--trainer")
        .arg(&trainer)
        .arg("--no-progress")
        .arg("--database-url")
        .arg(pg.url())
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let uid = std::fs::read_to_string(out.join("uid")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::connect(&pg.url(), 10).await.unwrap();
        let (name, phase): (String, String) =
            sqlx::query_as("SELECT name, phase FROM jobs WHERE uid = $1")
                .bind(&uid)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(
            (name.as_str(), phase.as_str()),
            ("hist", "Succeeded"),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let phases: Vec<String> = sqlx::query_scalar(
            "SELECT to_phase FROM transitions WHERE job_uid = $1 ORDER BY at, to_phase",
        )
        .bind(&uid)
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert!(phases.contains(&"Succeeded".to_string()), "{phases:?}");
        let max_step: Option<i64> =
            sqlx::query_scalar("SELECT max(step) FROM progress WHERE job_uid = $1")
                .bind(&uid)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(max_step, Some(20));
        let checkpoints: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM artifacts WHERE job_uid = $1 AND kind = 'checkpoint'",
        )
        .bind(&uid)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert!(checkpoints >= 1);
    });
}

async fn wait_for(store: &Store, want: impl Fn(Health) -> bool, within: Duration) -> Health {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = store.health();
        if want(now) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator starts with PostgreSQL down: the store starts at once,
/// queues history, and connects, migrates and writes it all once the
/// database is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_starts_without_postgres_and_catches_up() {
    let pg = Postgres::start();
    pg.down();
    let started = std::time::Instant::now();
    let store = Store::start(&pg.url(), 1000).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "start never waits"
    );
    for r in life() {
        store.record(r);
    }
    let health = wait_for(&store, |h| h == Health::Failing, Duration::from_secs(20)).await;
    assert_eq!(health, Health::Failing);
    assert!(!store.healthy());
    let scrape = trainyard::metrics::OperatorMetrics::new().render(Some(&store));
    assert!(scrape.contains("\ntrainyard_store_up 0\n"), "{scrape}");
    pg.up();
    assert!(store.flush(Duration::from_secs(60)).await, "caught up");
    assert!(store.healthy());
    assert_eq!(count(&store, "transitions").await, 5);
    assert_eq!(count(&store, "progress").await, 4);
}

/// Records PostgreSQL can never take (a NUL byte in text; a transition of
/// a job whose row never arrived) are set aside, counted, and do not hold
/// up the records behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_postgres_refuses_for_good_is_set_aside() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 1000).await.unwrap();
    let t = Timestamp::from_second(1_800_000_000).unwrap();
    let mut records = life();
    records.insert(
        1,
        Record::Checkpoint {
            uid: "uid-1".into(),
            kind: "checkpoint",
            location: "/ck/a\0b".into(),
            step: 5,
            size_bytes: None,
            at: t,
        },
    );
    records.insert(
        0,
        Record::Transition {
            uid: "a-job-never-recorded".into(),
            at: t,
            from: None,
            to: Phase::Pending,
            reason: "Created".into(),
            message: String::new(),
            attempt: 0,
            restarts: 0,
        },
    );
    for r in records {
        store.record(r);
    }
    assert!(
        store.flush(Duration::from_secs(20)).await,
        "the queue moved on past the bad records"
    );
    let set_aside = store
        .stats()
        .set_aside
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(set_aside, 2);
    assert_eq!(count(&store, "transitions").await, 5);
    assert_eq!(count(&store, "artifacts").await, 4);
    assert!(store.healthy(), "a bad record is not an outage");
    let scrape = trainyard::metrics::OperatorMetrics::new().render(Some(&store));
    assert!(
        scrape.contains("\ntrainyard_store_set_aside_total 2\n"),
        "{scrape}"
    );
}

/// A database a newer release migrated: this release never writes to it,
/// says why, and keeps running (the writer waits; `connect` refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_a_newer_release_is_never_written() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 10).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00'::bytea, 1)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let newer = Store::start(&pg.url(), 10).unwrap();
    let health = wait_for(&newer, |h| h != Health::Connecting, Duration::from_secs(20)).await;
    assert_eq!(health, Health::SchemaNewer(9999));
    for r in life() {
        newer.record(r);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&store, "jobs").await, 0, "nothing written");
    let e = Store::connect(&pg.url(), 10).await.unwrap_err();
    assert!(e.to_string().contains("newer Trainyard"), "{e}");
}

/// Deleting a job closes its history: a finished job keeps the phase it
/// ended in, a running one ends as Deleted; both get a Deleted transition,
/// once however often it is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_job_is_closed_in_history() {
    let pg = Postgres::start();
    let store = Store::connect(&pg.url(), 1000).await.unwrap();
    let t = |s: i64| Timestamp::from_second(1_800_000_100 + s).unwrap();
    let mut finished = job();
    finished.status = Some(status(Phase::Succeeded, 100, 1));
    finished.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0)));
    let mut running = job();
    running.metadata.uid = Some("uid-2".into());
    running.status = Some(status(Phase::Running, 10, 0));
    running.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(1)));
    for r in life() {
        store.record(r);
    }
    store
        .record(history::records(&running, None, running.status.as_ref().unwrap(), t(0)).remove(0));
    for _ in 0..2 {
        store.record(history::deleted(&finished, t(5)));
        store.record(history::deleted(&running, t(5)));
    }
    assert!(store.flush(Duration::from_secs(20)).await);
    let rows: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT uid, phase, deleted_at IS NOT NULL FROM jobs ORDER BY uid")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("uid-1".to_string(), "Succeeded".to_string(), true),
            ("uid-2".to_string(), "Deleted".to_string(), true)
        ]
    );
    let deleted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transitions WHERE to_phase = 'Deleted'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(deleted, 2);
}
