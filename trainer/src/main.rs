//! `trainyard-trainer`: the command-line entry point.

mod commands;

use clap::{Parser, Subcommand};
use commands::bench::{
    BenchAggregateArgs, BenchAllreduceArgs, BenchParityArgs, BenchRoundArgs, BenchStepArgs,
};
use commands::federated::{AggregateArgs, ClientArgs};
use commands::model::{AdapterArgs, EvalArgs, PredictArgs, ShapesArgs};
use commands::train::{LaunchArgs, TrainArgs};
use trainyard_trainer::cli;

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

#[derive(Subcommand)]
enum Command {
    /// Run one trainer process per GPU of this pod, as torchrun's
    /// --nproc-per-node does: each gets LOCAL_RANK (its GPU),
    /// RANK = GROUP_RANK·N + LOCAL_RANK and WORLD_SIZE. Signals are forwarded;
    /// when one process fails the others are stopped, and the exit code is
    /// the one that tells the operator whether a restart can help.
    #[command(name = cli::LAUNCH)]
    Launch(LaunchArgs),
    /// Train a model.
    #[command(name = cli::TRAIN)]
    Train(TrainArgs),
    /// Federated aggregator: samples clients each round, aggregates their
    /// updates, evaluates and checkpoints the global model.
    #[command(name = cli::AGGREGATE)]
    Aggregate(AggregateArgs),
    /// Federated client: trains on its own partition when sampled and sends
    /// back only the change to the global model.
    #[command(name = cli::CLIENT)]
    Client(ClientArgs),
    /// LoRA adapters in Hugging Face PEFT's format: create one for a base,
    /// run a base with one, or merge one into a full checkpoint.
    Adapter(AdapterArgs),
    /// Write class masks and colour overlays (and instance masks, when the
    /// model has a boundary head) for every image in a directory.
    Predict(PredictArgs),
    /// Report pixel accuracy and mIoU (and panoptic quality with a boundary head)
    /// as one JSON line.
    Eval(EvalArgs),
    /// Measure training-step throughput (forward, backward, optimiser step) on
    /// a fixed random batch and print one JSON line (used by bench/segnet_cpu.sh).
    BenchStep(BenchStepArgs),
    /// One batch of the config's network on --device and on the CPU: the
    /// loss and the flat gradient's largest difference, as one JSON line
    /// (bench/gpu-check.sh).
    BenchParity(BenchParityArgs),
    /// What this machine offers the trainer: CUDA built in, the NVIDIA driver,
    /// visible GPUs and NCCL, as one JSON line.
    Devices,
    /// Aggregation time of one federated round over random updates (one
    /// JSON line; bench/federated.sh compares it with Flower's aggregate()).
    BenchAggregate(BenchAggregateArgs),
    /// Round overhead of federated training (everything but local training):
    /// an aggregator and clients that answer at once, on loopback.
    BenchRound(BenchRoundArgs),
    /// All-reduce bandwidth of the CPU ring. Run by every rank with the
    /// torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    /// rank 0 prints one JSON line (nccl-tests' algbw and busbw).
    BenchAllreduce(BenchAllreduceArgs),
    /// Write synthetic shapes samples as an image folder (images/, masks/).
    Shapes(ShapesArgs),
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(&cli.command, Command::BenchStep(a) if a.default_malloc) {
        trainyard_trainer::allocator::keep_freed_memory();
    }
    init_logging(cli.log_format);
    // The supervisor's exit code is its children's verdict, not an error's.
    if let Command::Launch(launch) = &cli.command {
        return match launch.run() {
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

/// Runs one subcommand.
fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Launch(_) => unreachable!("handled in main"),
        Command::Train(a) => a.run(),
        Command::Aggregate(a) => a.run(),
        Command::Client(a) => a.run(),
        Command::Adapter(a) => a.run(),
        Command::Predict(a) => a.run(),
        Command::Eval(a) => a.run(),
        Command::Shapes(a) => a.run(),
        Command::Devices => commands::model::devices(),
        Command::BenchStep(a) => a.run(),
        Command::BenchParity(a) => a.run(),
        Command::BenchAggregate(a) => a.run(),
        Command::BenchRound(a) => a.run(),
        Command::BenchAllreduce(a) => a.run(),
    }
}
