//! Training: `train`, and `launch`, the in-pod supervisor of one process per GPU.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use trainyard_trainer::cli;
use trainyard_trainer::train::{self, RunOptions};

use super::{flush_progress, init_threads, load_config, serve_metrics, stop_flag};

/// Where this process sits in a data-parallel group.
#[derive(clap::Args)]
pub(crate) struct GroupArgs {
    /// This process's rank (RANK).
    #[arg(long)]
    rank: Option<usize>,
    /// Number of processes (WORLD_SIZE).
    #[arg(long)]
    world_size: Option<usize>,
    /// Host of rank 0's rendezvous store (MASTER_ADDR).
    #[arg(long)]
    master_addr: Option<String>,
    /// Port of rank 0's rendezvous store (MASTER_PORT).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds to wait for every rank to join.
    #[arg(long = cli::JOIN_TIMEOUT, default_value_t = trainyard_trainer::env::DEFAULT_JOIN_TIMEOUT_SECONDS)]
    join_timeout: u64,
    /// Seconds a collective may stall before a peer is declared dead.
    #[arg(long = cli::COLLECTIVE_TIMEOUT, default_value_t = trainyard_trainer::env::DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)]
    collective_timeout: u64,
    /// Form a group without TRAINYARD_GROUP_SECRET: connections still run the
    /// handshake, with a publicly known key, so anyone who can reach the
    /// ports can join. For experiments on a trusted network only.
    #[arg(long)]
    insecure_group: bool,
}

impl GroupArgs {
    fn resolve(
        &self,
    ) -> anyhow::Result<(
        trainyard_trainer::collective::DistEnv,
        trainyard_trainer::collective::ring::RingTimeouts,
    )> {
        use trainyard_trainer::collective::{DistEnv, env, ring::RingTimeouts};
        let flag = |name: &str| -> Option<String> {
            match name {
                env::RANK => self.rank.map(|v| v.to_string()),
                env::WORLD_SIZE => self.world_size.map(|v| v.to_string()),
                env::MASTER_ADDR => self.master_addr.clone(),
                env::MASTER_PORT => self.master_port.map(|v| v.to_string()),
                _ => None,
            }
        };
        let mut dist =
            DistEnv::from_lookup(|name| flag(name).or_else(|| std::env::var(name).ok()))?;
        if self.insecure_group && dist.key.is_none() && dist.world_size > 1 {
            tracing::warn!(
                "--insecure-group: anyone who reaches MASTER_PORT can join this group or disrupt it"
            );
            dist.key = Some(trainyard_trainer::collective::auth::GroupKey::insecure());
        }
        if self.join_timeout == 0 || self.collective_timeout == 0 {
            anyhow::bail!("--join-timeout and --collective-timeout must be at least 1 second");
        }
        let timeouts = RingTimeouts {
            join: std::time::Duration::from_secs(self.join_timeout),
            collective: std::time::Duration::from_secs(self.collective_timeout),
        };
        Ok((dist, timeouts))
    }
}

#[derive(clap::Args)]
pub(crate) struct LaunchArgs {
    /// Processes to start, one per GPU (overrides LOCAL_WORLD_SIZE; default 1).
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// This pod's index among the worker pods (overrides GROUP_RANK; default 0).
    #[arg(long)]
    node_rank: Option<usize>,
    /// Seconds the other processes get to exit after one failed, before SIGKILL.
    #[arg(long, default_value_t = 30)]
    grace_seconds: u64,
    /// What each process runs, after `--`: e.g. `-- train --out run --resume`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

impl LaunchArgs {
    /// Supervises one child per local rank; returns the exit code to end with.
    pub(crate) fn run(&self) -> anyhow::Result<u8> {
        use trainyard_trainer::launch::{Node, run};
        let node = Node::from_lookup(self.nproc_per_node, self.node_rank, |k| {
            std::env::var(k).ok()
        })?;
        let program = std::env::current_exe().context("failed to find this executable")?;
        Ok(run(
            &node,
            &program,
            &self.command,
            std::time::Duration::from_secs(self.grace_seconds),
        )?)
    }
}

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Config file (YAML or JSON) with sections model, data, train,
    /// checkpoint. Without it, the config is read inline from the
    /// TRAINYARD_CONFIG variable (how the operator starts replicas).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: config.json, metrics.jsonl, checkpoints/, summary.json.
    #[arg(long = cli::OUT)]
    out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long = cli::RESUME)]
    resume: bool,
    /// Override a config key, e.g. --set train.steps=200 (repeatable; values are YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Serve Prometheus metrics on this address while training (e.g. 0.0.0.0:9400).
    #[arg(long = cli::METRICS_ADDR)]
    metrics_addr: Option<SocketAddr>,
    /// Compute threads (overrides train.threads; default one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Data-parallel group membership; each overrides its environment
    /// variable (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    /// TRAINYARD_RUN_ATTEMPT). Without any, the process trains alone.
    #[command(flatten)]
    group: GroupArgs,
}

impl TrainArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            out,
            resume,
            overrides,
            metrics_addr,
            threads,
            group,
        } = self;
        let (dist, timeouts) = group.resolve()?;
        let config = load_config(config, &overrides)?;
        init_threads(threads.or(config.train.threads))?;
        // Under the in-pod supervisor every process is handed the pod's
        // metrics port; it belongs to local rank 0.
        if metrics_addr.is_some() && dist.local_rank > 0 {
            tracing::info!(
                local_rank = dist.local_rank,
                "metrics are served by local rank 0 of this pod"
            );
        }
        let metrics = serve_metrics(metrics_addr.filter(|_| dist.local_rank == 0))?;
        // SIGTERM (pod eviction, `kill`) and SIGINT (Ctrl-C) finish the
        // current step, checkpoint it and exit; a second signal kills at once.
        let stop = stop_flag()?;
        let opts = RunOptions {
            out_dir: out,
            resume,
            metrics,
            progress_bar: std::io::stderr().is_terminal(),
            stop: Some(stop),
            dist: Some(dist),
            timeouts,
            report: trainyard_trainer::report::Reporter::from_env(),
        };
        let summary = train::train(&config, &opts);
        flush_progress(opts.report.as_ref());
        println!("{}", serde_json::to_string(&summary?)?);
        Ok(())
    }
}
