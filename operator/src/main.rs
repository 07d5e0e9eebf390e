//! `trainyard`: the Trainyard operator and command-line interface.
//!
//! The TrainingJob API, the planner, `trainyard local` and the Kubernetes
//! controller are not built yet; until then this binary only describes itself.

use clap::Parser;

/// Trainyard: Kubernetes-native training orchestration.
///
/// The operator and `trainyard local` are not implemented yet. To train today,
/// use the trainer directly: `trainyard-trainer train --config FILE --out DIR`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("trainyard: no subcommands yet; see `trainyard --help`");
    std::process::exit(2);
}
