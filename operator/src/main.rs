//! `trainyard`: the Trainyard command-line interface.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trainyard::api::validate::Problem;
use trainyard::api::{Phase, TrainingJob, crd};
use trainyard::local::{self, LocalOptions};
use trainyard::store::Store;
use trainyard_trainer::serve::{Limits, serve};

/// Trainyard: Kubernetes-native training orchestration.
///
/// Write a TrainingJob manifest, check it with `trainyard validate`, run it on
/// this machine with `trainyard local`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a TrainingJob manifest on this machine: every replica becomes a
    /// `trainyard-trainer` process on 127.0.0.1, planned exactly as the
    /// operator plans pods. Exits 0 only when the job succeeded.
    Local(LocalArgs),
    /// Check manifests against the TrainingJob schema, its CEL rules and the
    /// semantic rules; prints every problem with its field path.
    Validate(ValidateArgs),
    /// Print the TrainingJob CustomResourceDefinition (YAML), generated from the code.
    Crd,
    /// Reconcile TrainingJobs in the cluster of the current kubeconfig (or
    /// the in-cluster service account) until SIGTERM/Ctrl-C.
    Operator(OperatorArgs),
}

#[derive(clap::Args)]
struct LocalArgs {
    /// The manifest (one TrainingJob).
    file: PathBuf,
    /// Output directory: status.json, replicas.json, logs/, replicas/<name>/.
    /// Rerunning with the same directory resumes the job.
    #[arg(long, default_value = "runs/local")]
    out: PathBuf,
    /// The trainer binary (default: next to this program, then PATH).
    #[arg(long)]
    trainer: Option<PathBuf>,
    /// Seconds a replica gets to checkpoint and exit after SIGTERM before it is killed.
    #[arg(long, default_value_t = 30)]
    grace_seconds: u64,
    /// Log lines instead of a progress bar, even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Record the job's history (phases, progress, checkpoints) in this
    /// PostgreSQL database, as the operator does.
    #[arg(long, env = "TRAINYARD_DATABASE_URL")]
    database_url: Option<String>,
    /// Serve the job's metrics (/metrics, the operator's names) here, for
    /// a local Prometheus or Grafana.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Let rank 0's trainer serve its own /metrics here.
    #[arg(long)]
    trainer_metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// Manifest files (YAML; several documents per file are fine).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Name reported on Kubernetes Events (default: $POD_NAME).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// PostgreSQL for the jobs' history (migrations are applied at start).
    #[arg(long, env = "TRAINYARD_DATABASE_URL")]
    database_url: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Address of the progress endpoint trainers report to.
    #[arg(long, default_value = "0.0.0.0:8081")]
    progress_addr: std::net::SocketAddr,
    /// URL pods reach the progress endpoint at (e.g.
    /// http://trainyard-operator.trainyard.svc:8081); without it trainers
    /// do not report and stall detection has no progress to watch.
    #[arg(long, env = "TRAINYARD_PROGRESS_BASE_URL")]
    progress_base_url: Option<String>,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Reconcile without electing a leader (only safe with one replica).
    #[arg(long)]
    no_leader_election: bool,
}

/// How long an exiting operator waits for queued history to be written.
const HISTORY_FLUSH: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Local(args) => args.run(),
        Command::Validate(args) => args.run(),
        Command::Crd => {
            print!("{}", crd::yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator(args) => args.run(),
    }
}

impl ValidateArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        let mut bad = 0;
        for file in &self.files {
            match read_manifests(file)? {
                Ok(jobs) => println!("{}: ok ({} TrainingJob)", file.display(), jobs.len()),
                Err(problems) => {
                    bad += 1;
                    for p in problems {
                        println!("{}: {p}", file.display());
                    }
                }
            }
        }
        Ok(if bad == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// The TrainingJobs of a manifest file, or every problem they have; an
/// error when the file cannot be read.
fn read_manifests(file: &Path) -> anyhow::Result<Result<Vec<TrainingJob>, Vec<Problem>>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read {}", file.display()))?;
    Ok(trainyard::job::parse_manifests(&text))
}

impl LocalArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        let file = &self.file;
        let mut jobs = match read_manifests(file)? {
            Ok(jobs) => jobs,
            Err(problems) => {
                for p in &problems {
                    eprintln!("{}: {p}", file.display());
                }
                anyhow::bail!("{} is not a valid TrainingJob", file.display());
            }
        };
        if jobs.len() != 1 {
            anyhow::bail!(
                "{} holds {} TrainingJobs; `trainyard local` runs one",
                file.display(),
                jobs.len()
            );
        }
        let job = jobs.remove(0);
        for note in local::check_local(&job)? {
            eprintln!("note: {note}");
        }
        let trainer = local::find_trainer(self.trainer)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        let out = self.out;
        let outcome = runtime.block_on(async {
            let store = match self.database_url {
                Some(url) => Some(Store::connect(&url, 10_000).await?),
                None => None,
            };
            let opts = LocalOptions {
                out: out.clone(),
                trainer,
                progress_bar: !self.no_progress,
                grace: Duration::from_secs(self.grace_seconds),
                poll: Duration::from_millis(200),
                store,
                metrics_addr: self.metrics_addr,
                trainer_metrics_addr: self.trainer_metrics_addr,
            };
            local::run(job, &opts).await
        })?;
        let status = &outcome.status;
        eprintln!(
            "{}: {} ({}) {}; restarts {}; status in {}",
            file.display(),
            status.phase,
            status.reason,
            status.message,
            status.restarts,
            out.join("status.json").display()
        );
        Ok(match (outcome.interrupted, status.phase) {
            (true, _) => ExitCode::from(130),
            (false, Phase::Succeeded) => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        })
    }
}

impl OperatorArgs {
    fn run(self) -> anyhow::Result<ExitCode> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")?;
        runtime.block_on(self.reconcile())?;
        Ok(ExitCode::SUCCESS)
    }

    /// Serves metrics and progress, waits to lead, and reconciles until
    /// stopped or no longer leading; then writes the queued history.
    async fn reconcile(self) -> anyhow::Result<()> {
        let client = kube_client().await?;
        // The database is not needed to start: history is queued and
        // written once PostgreSQL is reachable (HistoryDegraded meanwhile).
        let store = match &self.database_url {
            Some(url) => Some(Store::start(url, 100_000)?),
            None => {
                tracing::warn!("no --database-url: job history is not recorded");
                None
            }
        };
        let metrics = Arc::new(trainyard::metrics::OperatorMetrics::new());
        let metrics_addr = self.metrics_addr;
        let server = tokio::spawn(trainyard::metrics::serve(
            metrics_addr,
            metrics.clone(),
            store.clone(),
        ));
        let progress = self.progress_endpoint(&metrics).await?;
        let elector = self.elector(&client);
        if let Some(e) = &elector {
            e.wait_for_leadership().await;
        }
        let lost = async {
            match &elector {
                Some(e) => e.keep_leading().await,
                None => std::future::pending().await,
            }
        };
        tracing::info!("reconciling TrainingJobs");
        let controller =
            trainyard::k8s::run(client, self.instance, store.clone(), metrics, progress);
        let outcome = tokio::select! {
            // Another replica may lead now: stop at once and let the pod
            // restart as a candidate.
            () = lost => Err(anyhow::anyhow!("lost leadership; exiting so another replica can lead")),
            done = controller => done,
            served = server => Err(match served {
                Ok(Err(e)) => e.context(format!("the metrics server on {metrics_addr} stopped")),
                Ok(Ok(())) => anyhow::anyhow!("the metrics server on {metrics_addr} stopped"),
                Err(e) => anyhow::anyhow!("the metrics server panicked: {e}"),
            }),
        };
        // Stopped (SIGTERM) or stepped down: what is queued for history is
        // written first, within a bound that leaves the pod's grace period room.
        if let Some(store) = &store
            && !store.flush(HISTORY_FLUSH).await
        {
            tracing::error!(
                queued = store
                    .stats()
                    .queued
                    .load(std::sync::atomic::Ordering::Relaxed),
                "history records still queued at exit are lost"
            );
        }
        outcome
    }

    /// The progress endpoint trainers report to, served on
    /// `--progress-addr`, when pods can reach it (`--progress-base-url`).
    async fn progress_endpoint(
        &self,
        metrics: &trainyard::metrics::OperatorMetrics,
    ) -> anyhow::Result<Option<trainyard::k8s::ProgressEndpoint>> {
        let Some(url) = self.progress_base_url.clone() else {
            return Ok(None);
        };
        let hub = Arc::new(trainyard::progress::ProgressHub::new(Some(
            metrics.progress_reports.clone(),
        )));
        let listener = tokio::net::TcpListener::bind(self.progress_addr)
            .await
            .with_context(|| format!("cannot listen on {}", self.progress_addr))?;
        let app = trainyard::progress::router(hub.clone());
        tokio::spawn(serve(listener, app, None, Limits::default()));
        Ok(Some(trainyard::k8s::ProgressEndpoint { url, hub }))
    }

    /// The Lease-based elector, unless `--no-leader-election`.
    fn elector(&self, client: &kube::Client) -> Option<trainyard::k8s::leader::Elector> {
        if self.no_leader_election {
            return None;
        }
        let identity = self.instance.clone().unwrap_or_else(|| {
            // Without randomness the name still works; two such replicas
            // would merely share it.
            let suffix = trainyard::random_hex(4).unwrap_or_else(|_| "00000000".into());
            format!("trainyard-operator-{suffix}")
        });
        Some(trainyard::k8s::leader::Elector::new(
            kube::Api::namespaced(client.clone(), &self.lease_namespace),
            "trainyard-operator",
            identity,
        ))
    }
}

/// A client for the cluster of the kubeconfig or the service account.
async fn kube_client() -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes config: set KUBECONFIG or run in a cluster")?;
    // A connection that stays silent past the watches' own server-side
    // timeout (290 s) is dead; reconcile calls have their own deadlines
    // (k8s::API_TIMEOUT).
    config.read_timeout = Some(Duration::from_secs(330));
    kube::Client::try_from(config).context("cannot build a Kubernetes client from the config")
}
