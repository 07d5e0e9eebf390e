//! `trainyard local`: one manifest, run on this machine.
//!
//! The same planner as on a cluster; replicas become child processes of
//! `trainyard-trainer` on 127.0.0.1 with the env a pod would get. The loop is
//! observe → [`plan`] → act, every `poll` interval:
//! - observe: which children exited and how, and the leader's progress, which
//!   it posts to a progress endpoint on 127.0.0.1 with the job's token, as a
//!   pod posts to the operator's;
//! - act: spawn, stop (SIGTERM, then SIGKILL after a grace period), report.
//!
//! Outputs under `--out`: `status.json` (what `.status` would hold on a
//! cluster), `replicas.json` (pid and state of every child), `logs/<replica>.log`,
//! and each replica's run directory. A rerun with the same `--out` continues
//! the job (its attempt and restart count included) instead of starting over.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{Phase, TrainingJob, TrainingJobStatus};
use crate::job::ValidatedJob;
use crate::metrics::OperatorMetrics;
use crate::plan::{self, Action, EventType, Observation, ObservedReplica, Placement, ReplicaState};
use crate::progress::ProgressHub;
use crate::store::{Store, history};

/// The trainer's binary name.
pub const TRAINER_BIN: &str = "trainyard-trainer";

/// How to run.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Output directory.
    pub out: PathBuf,
    /// The `trainyard-trainer` binary.
    pub trainer: PathBuf,
    /// Draw a progress bar (on a terminal) instead of log lines.
    pub progress_bar: bool,
    /// Time between SIGTERM and SIGKILL when stopping a replica.
    pub grace: Duration,
    /// Time between planning rounds.
    pub poll: Duration,
    /// Where to record the job's history, if anywhere.
    pub store: Option<Store>,
    /// Where to serve the job's metrics (the operator's names), if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where rank 0's trainer serves its metrics, if anywhere.
    pub trainer_metrics_addr: Option<std::net::SocketAddr>,
}

/// How a local run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Final status.
    pub status: TrainingJobStatus,
    /// Stopped by SIGINT/SIGTERM before the job finished.
    pub interrupted: bool,
}

/// Finds `trainyard-trainer`: the given path, else next to this executable,
/// else on PATH.
pub fn find_trainer(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path);
        }
        bail!("--trainer {}: no such file", path.display());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(TRAINER_BIN)));
    if let Some(path) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(TRAINER_BIN))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    bail!(
        "could not find {TRAINER_BIN} next to this program or on PATH; build it with \
         `cargo build --release -p trainyard-trainer` or pass --trainer PATH"
    )
}

/// What can run locally beyond what `trainyard validate` checks.
pub fn check_local(job: &TrainingJob) -> anyhow::Result<Vec<String>> {
    let t = &job.spec.template;
    if let Some(i) = t.env.iter().position(|e| e.value_from.is_some()) {
        bail!(
            "spec.template.env[{i}].valueFrom: references Kubernetes objects, which `trainyard local` cannot resolve; use a literal value"
        );
    }
    let mut notes = Vec::new();
    if !t.volumes.is_empty() || !t.volume_mounts.is_empty() {
        notes.push(
            "spec.template.volumes/volumeMounts do not apply locally: paths in the spec are read on this machine".to_string(),
        );
    }
    notes.push(format!(
        "spec.checkpoints.location ({}) does not apply locally: run directories go under --out",
        job.spec.checkpoints.location
    ));
    if job.spec.federated.as_ref().is_some_and(|f| f.tls.is_some()) {
        notes.push("spec.federated.tls does not apply locally: the federation endpoint stays on loopback HTTP".into());
    }
    if job.spec.run_policy.ttl_seconds_after_finished.is_some() {
        notes.push("spec.runPolicy.ttlSecondsAfterFinished does not apply locally: the run ends when the job does".into());
    }
    Ok(notes)
}

struct Child {
    attempt: u32,
    process: tokio::process::Child,
    pid: u32,
    exited: Option<ReplicaState>,
    stopping: Option<Instant>,
}

#[derive(Serialize)]
struct ReplicaRecord<'a> {
    name: &'a str,
    attempt: u32,
    pid: u32,
    state: String,
}

/// Runs `job` to a terminal phase (or until interrupted).
pub async fn run(mut job: TrainingJob, opts: &LocalOptions) -> anyhow::Result<Outcome> {
    let out = absolute(&opts.out)?;
    std::fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("failed to create {}", out.display()))?;
    // Held until this run ends: two runners on one directory would start
    // two gangs over the same checkpoints.
    let _lock = lock_out(&out)?;
    // A local job's identity (its history key) lives with its outputs, so a
    // rerun that resumes it is the same job.
    job = crate::job::with_uid(job, local_uid(&out)?);
    let facts = crate::job::validated(&job).map_err(|p| anyhow::anyhow!("{p}"))?;
    let name = facts.id.name.clone();
    let status_path = out.join("status.json");
    if let Some(previous) = load_status(&status_path, &name)? {
        if previous.phase.is_terminal() {
            bail!(
                "{} says job {name} already {}: {}; choose another --out to run it again",
                status_path.display(),
                previous.phase,
                previous.message
            );
        }
        job.status = Some(previous);
    }
    let threads = thread_hint(&facts);
    let master_port = free_port()?;
    let placement = Placement::Local {
        master_port,
        out_root: out.join("replicas").display().to_string(),
        leader_metrics: opts.trainer_metrics_addr,
        secret: local_secret(&out)?,
    };
    // The same job metrics the operator exports, for a local Prometheus.
    let metrics = match opts.metrics_addr {
        Some(addr) => {
            let metrics = Arc::new(OperatorMetrics::new());
            metrics.set_ready(true);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
            let app = crate::metrics::router(metrics.clone(), opts.store.clone());
            tokio::spawn(trainyard_trainer::serve::serve(
                listener,
                app,
                None,
                trainyard_trainer::serve::Limits::default(),
            ));
            Some(metrics)
        }
        None => None,
    };
    let (hub, progress_env) = progress_endpoint(&facts).await?;
    let mut children: BTreeMap<String, Child> = BTreeMap::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to watch SIGTERM")?;
    let ui = Ui::new(
        opts.progress_bar,
        facts.total_steps(),
        if facts.federated() { "rounds" } else { "steps" },
    );
    let mut last_written = None;
    let mut last_records = String::new();
    loop {
        observe(&mut children);
        let observation = Observation {
            replicas: children
                .iter()
                .map(|(name, c)| ObservedReplica {
                    name: name.clone(),
                    attempt: c.attempt,
                    state: c.exited.clone().unwrap_or(ReplicaState::Running),
                })
                .collect(),
            progress: hub.latest(&facts.id.namespace, &facts.id.name),
            history: opts.store.as_ref().map(Store::healthy),
            admission: None,
        };
        let now = Timestamp::now();
        let decision = plan::plan(&facts, job.status.as_ref(), &observation, now, &placement);
        if let Some(metrics) = &metrics {
            metrics.observe(&job, job.status.as_ref(), &decision.status, now);
        }
        if let Some(store) = &opts.store {
            for record in history::records(&job, job.status.as_ref(), &decision.status, now) {
                store.record(record);
            }
        }
        for action in decision.actions {
            match action {
                Action::Create(replica) => {
                    let child = spawn(&opts.trainer, &replica, &progress_env, &out, threads)?;
                    children.insert(replica.name.clone(), child);
                }
                Action::Delete { name } => stop(&mut children, &name),
                Action::Event {
                    kind,
                    reason,
                    message,
                } => ui.event(kind, &reason, &message),
                // Nothing outlives a local run, so there is nothing to delete.
                Action::DeleteJob => {}
            }
        }
        escalate(&mut children, opts.grace);
        let status = decision.status;
        ui.progress(&status);
        if last_written.as_ref() != Some(&status) {
            write_json(&status_path, &status)?;
            last_written = Some(status.clone());
        }
        let records = serde_json::to_string_pretty(&records(&children))?;
        if records != last_records {
            write_atomic(&out.join("replicas.json"), records.as_bytes())?;
            last_records = records;
        }
        let finished = status.phase.is_terminal();
        job.status = Some(status);
        if finished
            && children
                .values()
                .all(|c| c.exited.is_some() || c.stopping.is_some())
        {
            shutdown(&mut children, opts.grace).await;
            flush(opts.store.as_ref()).await;
            ui.finish();
            let status = job.status.take().unwrap_or_default();
            return Ok(Outcome {
                status,
                interrupted: false,
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.poll) => {}
            _ = interrupt.recv() => return interrupted(job, &mut children, opts, &status_path, &ui).await,
            _ = terminate.recv() => return interrupted(job, &mut children, opts, &status_path, &ui).await,
        }
    }
}

/// Ctrl-C or SIGTERM: stop every replica gracefully (the trainer checkpoints
/// on SIGTERM) and leave the job suspended, so a rerun resumes it without
/// spending a restart.
async fn interrupted(
    mut job: TrainingJob,
    children: &mut BTreeMap<String, Child>,
    opts: &LocalOptions,
    status_path: &Path,
    ui: &Ui,
) -> anyhow::Result<Outcome> {
    ui.event(
        EventType::Warning,
        "Interrupted",
        "stopping every replica (they checkpoint first)",
    );
    let names: Vec<String> = children.keys().cloned().collect();
    for name in names {
        stop(children, &name);
    }
    shutdown(children, opts.grace).await;
    let before = job.status.take();
    let mut status = before.clone().unwrap_or_default();
    if !status.phase.is_terminal() {
        status.phase = Phase::Suspended;
        status.reason = "Interrupted".into();
        status.message =
            "interrupted on this machine; run `trainyard local` again with the same --out to resume"
                .into();
    }
    if let Some(store) = &opts.store {
        for record in history::records(&job, before.as_ref(), &status, Timestamp::now()) {
            store.record(record);
        }
    }
    flush(opts.store.as_ref()).await;
    write_json(status_path, &status)?;
    ui.finish();
    Ok(Outcome {
        status,
        interrupted: true,
    })
}

/// Waits for the history to reach PostgreSQL before the command exits.
async fn flush(store: Option<&Store>) {
    if let Some(store) = store
        && !store.flush(Duration::from_secs(30)).await
    {
        tracing::error!(
            "PostgreSQL did not take the job's last history records within 30 s; they are lost"
        );
    }
}

/// Takes `<out>/.lock` for this process (an advisory lock the kernel drops
/// with the process, however it dies), writing our pid into it; refused,
/// naming the holder's pid, while another `trainyard local` holds it.
fn lock_out(out: &Path) -> anyhow::Result<std::fs::File> {
    let path = out.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{} is in use by another `trainyard local` (pid {}); wait for it to finish or stop it, or choose another --out",
                out.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("failed to lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(file)
}

/// The run's secret, kept beside its outputs (owner-only) so a resumed run
/// hands out the same group secret and client tokens.
fn local_secret(out: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = out.join("run.secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.len() == 64 => Ok(secret),
        Ok(_) => bail!(
            "{} is damaged; delete it (the run's clients get new tokens)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = crate::random_hex(32)
                .map_err(|e| anyhow::anyhow!("no randomness for the run's secret: {e}"))?;
            // Owner-only from the first byte.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(secret.as_bytes()).and_then(|_| f.sync_all()))
                .with_context(|| format!("failed to write {}", path.display()))?;
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn local_uid(out: &Path) -> anyhow::Result<String> {
    let path = out.join("uid");
    match std::fs::read_to_string(&path) {
        Ok(uid) => Ok(uid.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hex = crate::random_hex(8)
                .map_err(|e| anyhow::anyhow!("no randomness for a job id: {e}"))?;
            let uid = format!("local-{hex}");
            write_atomic(&path, uid.as_bytes())?;
            Ok(uid)
        }
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn observe(children: &mut BTreeMap<String, Child>) {
    for c in children.values_mut() {
        if c.exited.is_none()
            && let Ok(Some(status)) = c.process.try_wait()
        {
            c.exited = Some(if status.success() {
                ReplicaState::Succeeded
            } else {
                match (status.code(), status.signal()) {
                    (Some(code), _) => ReplicaState::Failed {
                        exit_code: Some(code),
                        reason: Some("Error".into()),
                    },
                    // As the kubelet reports it: 128 + signal.
                    (None, Some(sig)) => ReplicaState::Failed {
                        exit_code: Some(128 + sig),
                        reason: Some(signal_name(sig)),
                    },
                    (None, None) => ReplicaState::Failed {
                        exit_code: None,
                        reason: None,
                    },
                }
            });
        }
    }
    // A replica we asked to stop is gone once it exits, as a deleted pod is.
    children.retain(|_, c| !(c.stopping.is_some() && c.exited.is_some()));
}

/// The job's progress endpoint: the operator's, on 127.0.0.1, taking the
/// job's reports with a fresh token; and the env that points a replica at it.
async fn progress_endpoint(
    job: &ValidatedJob,
) -> anyhow::Result<(Arc<ProgressHub>, Vec<(&'static str, String)>)> {
    use trainyard_trainer::env;
    let hub = Arc::new(ProgressHub::new(None));
    let token = crate::random_hex(32)
        .map_err(|e| anyhow::anyhow!("no randomness for the progress token: {e}"))?;
    let (namespace, name) = (&job.id.namespace, &job.id.name);
    hub.register(namespace, name, &token);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen for progress reports on 127.0.0.1")?;
    let addr = listener.local_addr()?;
    tokio::spawn(trainyard_trainer::serve::serve(
        listener,
        crate::progress::router(hub.clone()),
        None,
        trainyard_trainer::serve::Limits::default(),
    ));
    let url = crate::progress::job_url(&format!("http://{addr}"), namespace, name);
    Ok((
        hub,
        vec![(env::PROGRESS_URL, url), (env::PROGRESS_TOKEN, token)],
    ))
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

fn spawn(
    trainer: &Path,
    replica: &plan::Replica,
    progress_env: &[(&str, String)],
    out: &Path,
    threads: Option<usize>,
) -> anyhow::Result<Child> {
    let log_path = out.join("logs").join(format!("{}.log", replica.name));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    writeln!(
        log,
        "==> attempt {}: {} {}",
        replica.attempt,
        trainer.display(),
        replica.args.join(" ")
    )?;
    let mut cmd = tokio::process::Command::new(trainer);
    cmd.args(&replica.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C reaches only us, and we stop the
        // replicas in order (graceful first).
        .process_group(0)
        .kill_on_drop(true);
    let runner = Pid::this();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // Replicas die with the runner, however it dies (SIGKILL included):
            // kill_on_drop covers only an orderly exit. The signal follows the
            // forking thread; local mode's runtime is single-threaded, so that
            // is the runner's main thread.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The runner may have died before the line above took effect.
            if nix::unistd::getppid() != runner {
                return Err(std::io::Error::other("the runner exited during the start"));
            }
            Ok(())
        });
    }
    for var in &replica.env {
        cmd.env(&var.name, var.value.as_deref().unwrap_or(""));
    }
    cmd.envs(progress_env.iter().map(|(k, v)| (k, v)));
    if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let process = cmd
        .spawn()
        .with_context(|| format!("failed to start {} for {}", trainer.display(), replica.name))?;
    let pid = process.id().unwrap_or(0);
    Ok(Child {
        attempt: replica.attempt,
        process,
        pid,
        exited: None,
        stopping: None,
    })
}

fn stop(children: &mut BTreeMap<String, Child>, name: &str) {
    let Some(c) = children.get_mut(name) else {
        return;
    };
    if c.exited.is_some() {
        children.remove(name);
        return;
    }
    if c.stopping.is_none() {
        c.stopping = Some(Instant::now());
        if let Ok(pid) = i32::try_from(c.pid) {
            // Already gone is fine: the next observation sees the exit.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

fn escalate(children: &mut BTreeMap<String, Child>, grace: Duration) {
    for c in children.values_mut() {
        if c.exited.is_none() && c.stopping.is_some_and(|t| t.elapsed() >= grace) {
            let _ = c.process.start_kill();
        }
    }
}

/// Waits for stopping replicas (killing them after `grace`) and kills any
/// that still run: nothing outlives `trainyard local`.
async fn shutdown(children: &mut BTreeMap<String, Child>, grace: Duration) {
    let names: Vec<String> = children
        .iter()
        .filter(|(_, c)| c.exited.is_none() && c.stopping.is_none())
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        stop(children, &name);
    }
    let deadline = Instant::now() + grace;
    for c in children.values_mut() {
        if c.exited.is_some() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.process.wait()).await.is_err() {
            let _ = c.process.start_kill();
            let _ = c.process.wait().await;
        }
    }
    children.clear();
}

fn records(children: &BTreeMap<String, Child>) -> Vec<ReplicaRecord<'_>> {
    children
        .iter()
        .map(|(name, c)| ReplicaRecord {
            name,
            attempt: c.attempt,
            pid: c.pid,
            state: match (&c.exited, c.stopping) {
                (Some(ReplicaState::Succeeded), _) => "Succeeded".into(),
                (Some(ReplicaState::Failed { exit_code, .. }), _) => {
                    format!(
                        "Failed({})",
                        exit_code.map_or("?".into(), |c| c.to_string())
                    )
                }
                (_, Some(_)) => "Stopping".into(),
                _ => "Running".into(),
            },
        })
        .collect()
}

/// Threads per replica when the spec leaves it open: the cores shared by the
/// replicas, so two workers on two cores do not fight over them.
fn thread_hint(job: &ValidatedJob) -> Option<usize> {
    if job.spec.training.threads.is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let replicas = job.world_size() as usize;
    Some((cores / replicas.max(1)).max(1))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("failed to find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

fn load_status(path: &Path, name: &str) -> anyhow::Result<Option<TrainingJobStatus>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    };
    let status: TrainingJobStatus = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a status this version wrote; move it away to start job {name} over",
            path.display()
        )
    })?;
    Ok(Some(status))
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Write-then-rename, so a crash never leaves a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))
}

/// Progress bar on a terminal, log lines elsewhere.
struct Ui {
    bar: Option<ProgressBar>,
    unit: &'static str,
    last_line: std::cell::Cell<Option<(Instant, u64)>>,
}

impl Ui {
    /// `unit`: what the job counts (steps, or a federated job's rounds).
    fn new(progress_bar: bool, total: u64, unit: &'static str) -> Self {
        let bar = (progress_bar && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} {{msg}}"
                ))
                .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            unit,
            last_line: std::cell::Cell::new(None),
        }
    }

    fn event(&self, kind: EventType, reason: &str, message: &str) {
        let level = match kind {
            EventType::Normal => "info",
            EventType::Warning => "warn",
        };
        let line = format!("{level} {reason}: {message}");
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn progress(&self, status: &TrainingJobStatus) {
        let Some(p) = &status.progress else {
            if let Some(bar) = &self.bar {
                bar.set_message(status.phase.to_string());
            }
            return;
        };
        let mut detail = format!("{} ", status.phase);
        if let Some(loss) = p.loss {
            detail.push_str(&format!("loss {loss:.4} "));
        }
        if let Some(sps) = p.samples_per_second {
            detail.push_str(&format!("{sps:.1} samples/s "));
        }
        if let Some(m) = p.metric {
            detail.push_str(&format!("val mIoU {m:.3} "));
        }
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.total_steps);
                bar.set_position(p.step);
                bar.set_message(detail);
            }
            None => {
                let due = self.last_line.get().is_none_or(|(at, step)| {
                    step != p.step && at.elapsed() >= Duration::from_secs(5)
                });
                if due {
                    eprintln!(
                        "progress {}/{} {} {detail}",
                        p.step, p.total_steps, self.unit
                    );
                    self.last_line.set(Some((Instant::now(), p.step)));
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
