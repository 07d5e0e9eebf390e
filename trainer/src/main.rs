//! `trainyard-trainer`: the command-line entry point.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trainyard_trainer::cli;
use trainyard_trainer::config::{ShapesConfig, TrainerConfig};
use trainyard_trainer::infer;
use trainyard_trainer::metrics::TrainerMetrics;
use trainyard_trainer::train::{self, RunOptions};

/// Trainyard's trainer: trains and applies SegNet segmentation models.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where this process sits in a data-parallel group.
#[derive(clap::Args)]
struct GroupArgs {
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Ring,
    Nccl,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    fn resolve(self) -> anyhow::Result<trainyard_trainer::device::ComputeDevice> {
        use trainyard_trainer::config::DeviceKind;
        let kind = match self {
            Self::Auto => DeviceKind::Auto,
            Self::Cpu => DeviceKind::Cpu,
            Self::Cuda => DeviceKind::Cuda,
        };
        let local_rank = trainyard_trainer::collective::DistEnv::from_env()?.local_rank;
        Ok(trainyard_trainer::device::resolve(kind, local_rank)?)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// The model a base checkpoint belongs to: `--config FILE` (a trainer
/// config) and/or `--set model.widths=[...]` overrides.
#[derive(clap::Args)]
struct ModelArgs {
    /// Trainer config whose `model` section describes the base.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set 'model.widths=[4, 8]' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<TrainerConfig> {
        config_or_defaults(self.config.as_deref(), &self.overrides)
    }
}

/// The config from `--config`, else the defaults; `--set` overrides either.
fn config_or_defaults(
    config: Option<&std::path::Path>,
    overrides: &[String],
) -> anyhow::Result<TrainerConfig> {
    Ok(match config {
        Some(path) => TrainerConfig::load(path, overrides)?,
        None => TrainerConfig::from_value(serde_yaml::Value::Null, overrides)?,
    })
}

#[derive(Subcommand)]
enum AdapterCommand {
    /// Write a new adapter for a base: B zero (the adapted model equals the
    /// base), or seeded random B with --random-b (for interoperability checks).
    Init {
        /// Base weights: our checkpoint, or safetensors with our parameter names.
        #[arg(long)]
        base: PathBuf,
        /// The adapter's adapter_config.json (PEFT's LoraConfig fields).
        #[arg(long)]
        peft_config: PathBuf,
        /// Adapter directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Fill B with seeded uniform values instead of zeros.
        #[arg(long)]
        random_b: Option<u64>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Logits of the base (with an adapter, if given) on the tensor `x` of a
    /// safetensors file, in evaluation mode, written as `logits`.
    Logits {
        /// Base weights.
        #[arg(long)]
        base: PathBuf,
        /// Adapter directory (ours or PEFT's save_pretrained output).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// safetensors file with `x` of shape [batch, channels, h, w].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Fold an adapter into its base and write a full checkpoint (usable by
    /// `eval`, `predict` and as a base).
    Merge {
        /// Base weights.
        #[arg(long)]
        base: PathBuf,
        /// Adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Checkpoint file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run one trainer process per GPU of this pod, as torchrun's
    /// --nproc-per-node does: each gets LOCAL_RANK (its GPU),
    /// RANK = GROUP_RANK·N + LOCAL_RANK and WORLD_SIZE. Signals are forwarded;
    /// when one process fails the others are stopped, and the exit code is
    /// the one that tells the operator whether a restart can help.
    #[command(name = cli::LAUNCH)]
    Launch {
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
    },
    /// Train a model.
    #[command(name = cli::TRAIN)]
    Train {
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
    },
    /// Federated aggregator: samples clients each round, aggregates their
    /// updates, evaluates and checkpoints the global model.
    #[command(name = cli::AGGREGATE)]
    Aggregate {
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
    },
    /// Federated client: trains on its own partition when sampled and sends
    /// back only the change to the global model.
    #[command(name = cli::CLIENT)]
    Client {
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
    },
    /// LoRA adapters in Hugging Face PEFT's format: create one for a base,
    /// run a base with one, or merge one into a full checkpoint.
    Adapter {
        #[command(subcommand)]
        action: AdapterCommand,
    },
    /// Write class masks and colour overlays (and instance masks, when the
    /// model has a boundary head) for every image in a directory.
    Predict {
        /// A checkpoint written by `train` (checkpoints/step-*.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Directory of images (*.png, *.jpg), or a dataset with an images/ folder.
        #[arg(long)]
        input: PathBuf,
        /// Directory for <stem>_mask.png, <stem>_overlay.png, <stem>_instances.png.
        #[arg(long)]
        out: PathBuf,
    },
    /// Report pixel accuracy and mIoU (and panoptic quality with a boundary head)
    /// as one JSON line.
    Eval {
        /// A checkpoint written by `train`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Score every sample of this image folder (images/, masks/) instead of
        /// the validation split of the dataset the checkpoint was trained on.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Measure training-step throughput (forward, backward, optimiser step) on
    /// a fixed random batch and print one JSON line (used by bench/segnet_cpu.sh).
    BenchStep {
        /// Config file; defaults give SegNet-mini, batch 16, 64x64, AdamW.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Timed steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Compute threads (default one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Run 3x3 convolutions with burn's generic kernels instead of ours.
        #[arg(long)]
        burn_conv: bool,
        /// Run batch norm + ReLU with burn's composite ops instead of our fused kernel.
        #[arg(long)]
        burn_bn: bool,
        /// Run max-pooling and unpooling with burn's ops instead of our kernels.
        #[arg(long)]
        burn_pooling: bool,
        /// Leave glibc's allocator thresholds at their defaults (see `allocator`).
        #[arg(long)]
        default_malloc: bool,
        /// Where to run the steps: cpu, cuda (GPU LOCAL_RANK) or auto.
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
    },
    /// One batch of the config's network on --device and on the CPU: the
    /// loss and the flat gradient's largest difference, as one JSON line
    /// (bench/gpu-check.sh).
    BenchParity {
        /// Config file (defaults: SegNet-mini, batch 16, 64x64).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The device to compare with the CPU.
        #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
        device: DeviceArg,
    },
    /// What this machine offers the trainer: CUDA built in, the NVIDIA driver,
    /// visible GPUs and NCCL, as one JSON line.
    Devices,
    /// Aggregation time of one federated round over random updates (one
    /// JSON line; bench/federated.sh compares it with Flower's aggregate()).
    BenchAggregate {
        /// Updates per round.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// f32 values per update.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Rule: mean, median, trimmed-mean or krum.
        #[arg(long, default_value = "mean")]
        rule: String,
        /// Timed repetitions.
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// Round overhead of federated training (everything but local training):
    /// an aggregator and clients that answer at once, on loopback.
    BenchRound {
        /// Config file with a federated section (the model sets the update size).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Rounds to run (the first and last are not timed).
        #[arg(long, default_value_t = 12)]
        rounds: u64,
    },
    /// All-reduce bandwidth of the CPU ring. Run by every rank with the
    /// torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    /// rank 0 prints one JSON line (nccl-tests' algbw and busbw).
    BenchAllreduce {
        /// Bytes per all-reduce (rounded down to whole f32 values).
        #[arg(long, default_value_t = 16 << 20)]
        bytes: usize,
        /// Timed iterations.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Wire format: f32, or a 16-bit float (compression).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Seconds to wait for all ranks to join.
        #[arg(long, default_value_t = trainyard_trainer::env::DEFAULT_JOIN_TIMEOUT_SECONDS)]
        join_timeout: u64,
        /// Seconds a transfer may stall before a peer is declared dead.
        #[arg(long, default_value_t = trainyard_trainer::env::DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)]
        collective_timeout: u64,
        /// Collective: the CPU TCP ring, or NCCL on GPU LOCAL_RANK (needs a
        /// build with `--features cuda`).
        #[arg(long, value_enum, default_value_t = Backend::Ring)]
        backend: Backend,
    },
    /// Write synthetic shapes samples as an image folder (images/, masks/).
    Shapes {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of samples.
        #[arg(long, default_value_t = 16)]
        samples: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_malloc = matches!(
        cli.command,
        Command::BenchStep {
            default_malloc: true,
            ..
        }
    );
    if !default_malloc {
        trainyard_trainer::allocator::keep_freed_memory();
    }
    init_logging(cli.log_format);
    if let Command::Launch {
        nproc_per_node,
        node_rank,
        grace_seconds,
        command,
    } = &cli.command
    {
        return match launch(*nproc_per_node, *node_rank, *grace_seconds, command) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(trainyard_trainer::exit::FAILURE)
            }
        };
    }
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(trainyard_trainer::exit::code_of(&e))
        }
    }
}

/// `launch`: supervises one child per local rank; returns its exit code.
fn launch(
    nproc: Option<usize>,
    node_rank: Option<usize>,
    grace_seconds: u64,
    command: &[std::ffi::OsString],
) -> anyhow::Result<u8> {
    use trainyard_trainer::launch::{Node, run};
    let node = Node::from_lookup(nproc, node_rank, |k| std::env::var(k).ok())?;
    let program = std::env::current_exe().context("failed to find this executable")?;
    Ok(run(
        &node,
        &program,
        command,
        std::time::Duration::from_secs(grace_seconds),
    )?)
}

/// The config from `--config`, else from TRAINYARD_CONFIG (inline JSON).
fn load_config(config: Option<PathBuf>, overrides: &[String]) -> anyhow::Result<TrainerConfig> {
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
fn flush_progress(reporter: Option<&trainyard_trainer::report::Reporter>) {
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
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
            .context("failed to install a signal handler")?;
        signal_hook::flag::register(signal, stop.clone())
            .context("failed to install a signal handler")?;
    }
    Ok(stop)
}

fn run_adapter(action: AdapterCommand) -> anyhow::Result<()> {
    use burn::tensor::{Device, Tensor, TensorData};
    use trainyard_trainer::peft::{adapter, base, config::LoraConfig, lora};
    use trainyard_trainer::tensorfile::{self, NamedTensor};
    let device = Device::flex();
    match action {
        AdapterCommand::Init {
            base: b,
            peft_config,
            out,
            random_b,
            model,
        } => {
            let config = model.load()?;
            let text = std::fs::read_to_string(&peft_config)
                .with_context(|| format!("failed to read {}", peft_config.display()))?;
            let lora_config: LoraConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a PEFT LoRA config", peft_config.display()))?;
            let net = base::load_base(&b, &config, &device)?;
            let mut net = lora::attach(net, &lora_config, config.train.seed, &device)?;
            if let Some(seed) = random_b {
                net = lora::randomize_b(net, seed, &device);
            }
            let bytes = adapter::save(&out, &mut net, &lora_config)?;
            let (trainable, all) = lora::parameter_counts(&net);
            tracing::info!(out = %out.display(), bytes, adapter_parameters = trainable, parameters = all, "adapter written");
            Ok(())
        }
        AdapterCommand::Logits {
            base: b,
            adapter: a,
            input,
            out,
            model,
        } => {
            let config = model.load()?;
            let mut net = base::load_base(&b, &config, &device)?;
            if let Some(dir) = a {
                net = adapter::load(&dir, net, &device)?.0;
            }
            let file = tensorfile::read(&input)?;
            let x = file
                .tensors
                .get("x")
                .with_context(|| format!("{} has no tensor `x`", input.display()))?;
            let dims: [usize; 4] = x
                .shape
                .clone()
                .try_into()
                .map_err(|_| anyhow::anyhow!("`x` must be [batch, channels, h, w]"))?;
            let xt = Tensor::<4>::from_data(TensorData::new(x.values.clone(), dims), &device);
            let logits = net.forward(xt).logits;
            let shape = logits.dims().to_vec();
            let values = logits
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32");
            tensorfile::write_atomic(
                &out,
                &[("logits".into(), NamedTensor { shape, values })],
                Default::default(),
            )?;
            Ok(())
        }
        AdapterCommand::Merge {
            base: b,
            adapter: a,
            out,
            model,
        } => {
            let config = model.load()?;
            let net = base::load_base(&b, &config, &device)?;
            let (net, _) = adapter::load(&a, net, &device)?;
            let merged = lora::merge(net);
            let ck = trainyard_trainer::checkpoint::Checkpoint {
                step: 0,
                data_position: 0,
                model: train::model_tensors(&merged),
                optimizer: "none".into(),
                optimizer_step: 0,
                optimizer_state: Vec::new(),
                config,
            };
            ck.save(&out)?;
            tracing::info!(out = %out.display(), "merged checkpoint written");
            Ok(())
        }
    }
}

/// Metrics served on `addr`, if given.
fn serve_metrics(addr: Option<SocketAddr>) -> anyhow::Result<Option<TrainerMetrics>> {
    let Some(addr) = addr else { return Ok(None) };
    let m = TrainerMetrics::new();
    let bound = m
        .serve(addr)
        .with_context(|| format!("failed to serve metrics on {addr}"))?;
    tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    Ok(Some(m))
}

fn env_var(name: &str, what: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set: it must hold {what}"))
}

fn run(command: Command) -> anyhow::Result<()> {
    use trainyard_trainer::{env, federated};
    match command {
        Command::Aggregate {
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
        } => {
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
        Command::Client {
            config,
            out,
            overrides,
            index,
            aggregator,
            join_timeout,
            threads,
            tls_ca,
            metrics_addr,
        } => {
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
            std::fs::create_dir_all(&out)
                .with_context(|| format!("failed to create {}", out.display()))?;
            trainyard_trainer::tensorfile::write_bytes_atomic(
                &out.join("summary.json"),
                &serde_json::to_vec_pretty(&summary)?,
            )?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Train {
            config,
            out,
            resume,
            overrides,
            metrics_addr,
            threads,
            group,
        } => {
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
        Command::Predict {
            checkpoint,
            input,
            out,
        } => {
            let predictor = infer::Predictor::load(&checkpoint)?;
            let written = infer::predict_dir(&predictor, &input, &out)?;
            tracing::info!(files = written.len(), out = %out.display(), "predictions written");
            Ok(())
        }
        Command::Eval { checkpoint, data } => {
            let report = infer::eval_checkpoint(&checkpoint, data.as_deref())?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::BenchStep {
            config,
            overrides,
            steps,
            warmup,
            threads,
            burn_conv,
            burn_bn,
            burn_pooling,
            default_malloc,
            device,
        } => {
            let native = trainyard_trainer::kernels::NativeOps {
                conv: !burn_conv,
                bn_relu: !burn_bn,
                pooling: !burn_pooling,
            };
            let config = config_or_defaults(config.as_deref(), &overrides)?;
            if steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            init_threads(threads)?;
            let compute = device.resolve()?;
            let result = trainyard_trainer::kernels::with_native(native, || {
                trainyard_trainer::bench::step_throughput(
                    &config,
                    steps,
                    warmup,
                    default_malloc,
                    &compute,
                )
            });
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::BenchParity {
            config,
            overrides,
            device,
        } => {
            let config = config_or_defaults(config.as_deref(), &overrides)?;
            let compute = device.resolve()?;
            let result = trainyard_trainer::bench::device_parity(&config, &compute);
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::Devices => {
            println!(
                "{}",
                serde_json::to_string(&trainyard_trainer::device::report())?
            );
            Ok(())
        }
        Command::Adapter { action } => run_adapter(action),
        Command::Launch { .. } => unreachable!("handled in main"),
        Command::BenchAggregate {
            clients,
            params,
            rule,
            iters,
        } => {
            use trainyard_trainer::config::Aggregation;
            let rule = match rule.as_str() {
                "mean" => Aggregation::Mean,
                "median" => Aggregation::Median,
                "trimmed-mean" => Aggregation::TrimmedMean { beta: 0.2 },
                "krum" => Aggregation::Krum {
                    byzantine: clients.saturating_sub(3).min(clients / 4),
                    keep: 1,
                },
                other => anyhow::bail!("--rule {other}: use mean, median, trimmed-mean or krum"),
            };
            if clients == 0 || params == 0 {
                anyhow::bail!("--clients and --params must be at least 1");
            }
            let result = federated::bench::aggregate_time(&rule, clients, params, iters);
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::BenchRound {
            config,
            overrides,
            rounds,
        } => {
            let config = config_or_defaults(config.as_deref(), &overrides)?;
            if rounds < 3 {
                anyhow::bail!("--rounds must be at least 3 (the first and last are not timed)");
            }
            let result = federated::bench::round_overhead(&config, rounds)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Command::BenchAllreduce {
            bytes,
            iters,
            warmup,
            dtype,
            join_timeout,
            collective_timeout,
            backend,
        } => {
            use trainyard_trainer::collective::{self, DistEnv, ring::RingTimeouts};
            if iters == 0 {
                anyhow::bail!("--iters must be at least 1");
            }
            let env = DistEnv::from_env()?;
            let timeouts = RingTimeouts {
                join: std::time::Duration::from_secs(join_timeout),
                collective: std::time::Duration::from_secs(collective_timeout),
            };
            if backend == Backend::Nccl && !cfg!(feature = "cuda") {
                anyhow::bail!("--backend nccl needs a trainer built with `--features cuda`");
            }
            let mut group = collective::join_group(&env, timeouts)?;
            let payload = match dtype {
                Dtype::F32 => collective::Payload::F32,
                Dtype::F16 => collective::Payload::F16,
                Dtype::Bf16 => collective::Payload::Bf16,
            };
            #[cfg(feature = "cuda")]
            let mut nccl = match backend {
                Backend::Nccl => Some(collective::nccl::NcclCollective::connect(
                    &mut group.store,
                    env.rank,
                    env.world_size,
                    env.local_rank,
                    timeouts,
                )?),
                Backend::Ring => None,
            };
            #[cfg(feature = "cuda")]
            let c: &mut dyn collective::Collective = match nccl.as_mut() {
                Some(n) => n,
                None => &mut group.ring,
            };
            #[cfg(not(feature = "cuda"))]
            let c: &mut dyn collective::Collective = &mut group.ring;
            let result = collective::bench_all_reduce(c, bytes, iters, warmup, payload)?;
            if env.rank == 0 {
                println!("{}", serde_json::to_string(&result)?);
            }
            Ok(())
        }
        Command::Shapes {
            out,
            samples,
            size,
            seed,
        } => {
            let config = ShapesConfig {
                samples,
                image_size: size,
                seed,
                ..ShapesConfig::default()
            };
            if samples == 0 || size < 8 {
                anyhow::bail!("--samples must be at least 1 and --size at least 8");
            }
            infer::write_shapes(&config, &out)?;
            tracing::info!(samples, out = %out.display(), "shapes dataset written");
            Ok(())
        }
    }
}
