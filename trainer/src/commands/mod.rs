//! One module per family of subcommands; each subcommand is an `Args`
//! struct whose `run` is the command, as ripgrep's flags and commands are.
//! What several share (config loading, threads, signals, metrics) is here.

pub mod bench;
pub mod federated;
pub mod model;
pub mod train;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use trainyard_trainer::config::TrainerConfig;
use trainyard_trainer::metrics::TrainerMetrics;

/// The config from `--config`, else the defaults; `--set` overrides either.
pub(crate) fn config_or_defaults(
    config: Option<&std::path::Path>,
    overrides: &[String],
) -> anyhow::Result<TrainerConfig> {
    Ok(match config {
        Some(path) => TrainerConfig::load(path, overrides)?,
        None => TrainerConfig::from_value(serde_yaml::Value::Null, overrides)?,
    })
}

pub(crate) fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    // train.threads is validated with the config; only the flag can be 0 here.
    if threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("failed to configure the compute thread pool")?;
    }
    Ok(())
}

/// The config from `--config`, else from TRAINYARD_CONFIG (inline JSON).
pub(crate) fn load_config(
    config: Option<PathBuf>,
    overrides: &[String],
) -> anyhow::Result<TrainerConfig> {
    Ok(match config {
        Some(path) => TrainerConfig::load(&path, overrides)?,
        None => {
            let var = trainyard_trainer::env::CONFIG;
            let text = std::env::var(var).map_err(|_| {
                anyhow::anyhow!("no config: pass --config FILE or set {var} to the config as JSON")
            })?;
            TrainerConfig::parse(&text, var.as_ref(), overrides)?
        }
    })
}

/// The run's last progress report (its final step, checkpoint or adapter)
/// goes out before the process does, or is given up after a deadline.
pub(crate) fn flush_progress(reporter: Option<&trainyard_trainer::report::Reporter>) {
    use trainyard_trainer::report::FLUSH_DEADLINE;
    if let Some(r) = reporter
        && !r.flush(FLUSH_DEADLINE)
    {
        tracing::warn!(
            "the last progress report did not go out within {FLUSH_DEADLINE:?}; the job's status may lag"
        );
    }
}

/// A flag raised by the first SIGTERM/SIGINT; a second one kills at once.
pub(crate) fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
            .context("failed to install a signal handler")?;
        signal_hook::flag::register(signal, stop.clone())
            .context("failed to install a signal handler")?;
    }
    Ok(stop)
}

/// Metrics served on `addr`, if given.
pub(crate) fn serve_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Option<TrainerMetrics>> {
    let Some(addr) = addr else { return Ok(None) };
    let m = TrainerMetrics::new();
    let bound = m
        .serve(addr)
        .with_context(|| format!("failed to serve metrics on {addr}"))?;
    tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    Ok(Some(m))
}

pub(crate) fn env_var(name: &str, what: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set: it must hold {what}"))
}
