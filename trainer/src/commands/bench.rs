//! Benchmarks: each prints one JSON line for the scripts in `bench/`.

use std::path::PathBuf;

use trainyard_trainer::federated;

use super::{config_or_defaults, init_threads};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Backend {
    Ring,
    Nccl,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum DeviceArg {
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
pub(crate) enum Dtype {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args)]
pub(crate) struct BenchStepArgs {
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
    pub(crate) default_malloc: bool,
    /// Where to run the steps: cpu, cuda (GPU LOCAL_RANK) or auto.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

impl BenchStepArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
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
        } = self;
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
}

#[derive(clap::Args)]
pub(crate) struct BenchParityArgs {
    /// Config file (defaults: SegNet-mini, batch 16, 64x64).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The device to compare with the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    device: DeviceArg,
}

impl BenchParityArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            overrides,
            device,
        } = self;
        let config = config_or_defaults(config.as_deref(), &overrides)?;
        let compute = device.resolve()?;
        let result = trainyard_trainer::bench::device_parity(&config, &compute);
        println!("{}", serde_json::to_string(&result)?);
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct BenchAggregateArgs {
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
}

impl BenchAggregateArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            clients,
            params,
            rule,
            iters,
        } = self;
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
}

#[derive(clap::Args)]
pub(crate) struct BenchRoundArgs {
    /// Config file with a federated section (the model sets the update size).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Rounds to run (the first and last are not timed).
    #[arg(long, default_value_t = 12)]
    rounds: u64,
}

impl BenchRoundArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            overrides,
            rounds,
        } = self;
        let config = config_or_defaults(config.as_deref(), &overrides)?;
        if rounds < 3 {
            anyhow::bail!("--rounds must be at least 3 (the first and last are not timed)");
        }
        let result = federated::bench::round_overhead(&config, rounds)?;
        println!("{}", serde_json::to_string(&result)?);
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct BenchAllreduceArgs {
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
}

impl BenchAllreduceArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            bytes,
            iters,
            warmup,
            dtype,
            join_timeout,
            collective_timeout,
            backend,
        } = self;
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
}
