//! The trainer's integration tests, one binary (fewer links on slow machines).

// Outputs equal PyTorch's on committed fixtures (pooling, unpooling, whole nets).
mod torch_parity;
// Autodiff gradients equal central finite differences.
mod gradients;
// Collectives over loopback: correctness, bit-identity, dead peers.
mod collective;
// Training runs: learning, exact resume, guarded output directories.
mod training;
// Federated rounds over loopback HTTP: hostile updates, resume, privacy.
mod federated;
// The binary: exit codes and messages on bad input, predict/eval/shapes.
mod cli;

mod util;
