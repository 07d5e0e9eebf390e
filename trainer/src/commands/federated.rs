//! Federated learning: the aggregator and a client.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use trainyard_trainer::cli;
use trainyard_trainer::{env, federated};

use super::{env_var, flush_progress, init_threads, load_config, serve_metrics, stop_flag};

#[derive(clap::Args)]
pub(crate) struct AggregateArgs {
    /// Config file with a `federated` section (default: TRAINYARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: config.json, metrics.jsonl (one row per round), checkpoints/, summary.json.
    #[arg(long = cli::OUT)]
    out: PathBuf,
    /// Continue after the newest round checkpoint in --out.
    #[arg(long = cli::RESUME)]
    resume: bool,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Listen address (default 0.0.0.0:$MASTER_PORT).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Compute threads (evaluation, aggregation).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds to keep telling polling clients the job is done.
    #[arg(long, default_value_t = 10)]
    linger_seconds: u64,
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key).
    #[arg(long = cli::TLS_CERT, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long = cli::TLS_KEY, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (rounds, participants,
    /// rejected updates by reason, privacy spent).
    #[arg(long = cli::METRICS_ADDR)]
    metrics_addr: Option<SocketAddr>,
}

impl AggregateArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            out,
            resume,
            overrides,
            bind,
            threads,
            linger_seconds,
            tls_cert,
            tls_key,
            metrics_addr,
        } = self;
        let config = load_config(config, &overrides)?;
        init_threads(threads.or(config.train.threads))?;
        let bind = match bind {
            Some(b) => b,
            None => {
                let port: u16 =
                    env_var(env::MASTER_PORT, "the port to listen on (or pass --bind)")?
                        .parse()
                        .context("MASTER_PORT is not a port number")?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
        };
        let opts = federated::aggregator::AggregatorOptions {
            out_dir: out,
            resume,
            bind,
            secret: env_var(
                env::FEDERATION_SECRET,
                "the federation secret client tokens derive from",
            )?,
            report: trainyard_trainer::report::Reporter::from_env(),
            stop: Some(stop_flag()?),
            linger: std::time::Duration::from_secs(linger_seconds),
            tls: match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(federated::tls::server_config(&cert, &key)?),
                _ => None,
            },
            metrics: serve_metrics(metrics_addr)?,
        };
        let summary = federated::aggregator::run(&config, &opts);
        flush_progress(opts.report.as_ref());
        println!("{}", serde_json::to_string(&summary?)?);
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    /// Config file with a `federated` section (default: TRAINYARD_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for summary.json.
    #[arg(long = cli::OUT)]
    out: PathBuf,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// This client's index (default $RANK).
    #[arg(long)]
    index: Option<usize>,
    /// Aggregator URL (default http://$MASTER_ADDR:$MASTER_PORT).
    #[arg(long = cli::AGGREGATOR)]
    aggregator: Option<String>,
    /// Seconds the aggregator may be unreachable before the client gives up (exit 75).
    #[arg(long = cli::JOIN_TIMEOUT, default_value_t = trainyard_trainer::env::DEFAULT_JOIN_TIMEOUT_SECONDS)]
    join_timeout: u64,
    /// Reach the aggregator over HTTPS, trusting only this CA (PEM).
    #[arg(long = cli::TLS_CA)]
    tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on this address.
    #[arg(long = cli::METRICS_ADDR)]
    metrics_addr: Option<SocketAddr>,
    /// Compute threads.
    #[arg(long)]
    threads: Option<usize>,
}

impl ClientArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            out,
            overrides,
            index,
            aggregator,
            join_timeout,
            threads,
            tls_ca,
            metrics_addr,
        } = self;
        let config = load_config(config, &overrides)?;
        init_threads(threads.or(config.train.threads))?;
        let index = match index {
            Some(i) => i,
            None => env_var(env::RANK, "this client's index (or pass --index)")?
                .parse()
                .context("RANK is not a client index")?,
        };
        let aggregator = match aggregator {
            Some(a) => a,
            None => format!(
                "{}://{}:{}",
                if tls_ca.is_some() { "https" } else { "http" },
                env_var(
                    env::MASTER_ADDR,
                    "the aggregator's host (or pass --aggregator)"
                )?,
                env_var(
                    env::MASTER_PORT,
                    "the aggregator's port (or pass --aggregator)"
                )?
            ),
        };
        let opts = federated::client::ClientOptions {
            index,
            aggregator,
            token: env_var(env::CLIENT_TOKEN, "this client's token")?,
            join_timeout: std::time::Duration::from_secs(join_timeout),
            stop: Some(stop_flag()?),
            tls: tls_ca
                .as_deref()
                .map(federated::tls::client_tls)
                .transpose()?,
            metrics: serve_metrics(metrics_addr)?,
        };
        let summary = federated::client::run(&config, &opts)?;
        // A client's directory holds its summary alone: there is nothing to resume or refuse.
        trainyard_trainer::run_dir::RunDir::open(&out, true)?.write_summary(&summary)?;
        println!("{}", serde_json::to_string(&summary)?);
        Ok(())
    }
}
