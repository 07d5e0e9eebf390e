//! The Trainyard trainer: SegNet semantic segmentation on burn.
//!
//! # Brief overview
//! A run is described by a [`config::TrainerConfig`] (sections `model`, `data`,
//! `train`, `checkpoint`) and executed by [`train::train`], which builds a
//! [`model::SegNet`], streams batches from a [`data::Dataset`], optimises with
//! the flat-buffer optimisers of [`train::optim`], validates with
//! [`eval::metrics`], and writes atomic [`checkpoint`]s.
//!
//! ```no_run
//! use trainyard_trainer::{config::TrainerConfig, train};
//! let config = TrainerConfig::load("examples/trainer/shapes.yaml".as_ref(), &["train.steps=10".into()])?;
//! let summary = train::train(&config, &train::RunOptions { out_dir: "runs/demo".into(), ..Default::default() })?;
//! println!("mIoU {:?}", summary.val_miou);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

//!
//! # Features
//! `engine` (default) is everything that trains. Without it the crate is only
//! [`cli`], [`config`], [`env`], [`exit`], [`protocol`] and [`run_dir`]: what the operator needs to hand a replica its job,
//! without compiling the ML stack; `serve` adds the bounded HTTP server every
//! Trainyard port uses (the operator's too).

pub mod cli;
pub mod config;
pub mod env;
pub mod exit;
pub mod protocol;
pub mod run_dir;

#[cfg(feature = "engine")]
pub mod allocator;
#[cfg(feature = "engine")]
pub mod bench;
#[cfg(feature = "engine")]
pub mod checkpoint;
#[cfg(feature = "engine")]
pub mod collective;
#[cfg(feature = "engine")]
pub mod data;
#[cfg(feature = "engine")]
pub mod ddp;
#[cfg(feature = "engine")]
pub mod device;
#[cfg(feature = "engine")]
pub mod eval;
#[cfg(feature = "engine")]
pub mod federated;
#[cfg(feature = "engine")]
pub mod infer;
#[cfg(feature = "engine")]
pub mod kernels;
#[cfg(feature = "engine")]
pub mod launch;
#[cfg(feature = "engine")]
pub mod metrics;
#[cfg(feature = "engine")]
pub mod model;
#[cfg(feature = "engine")]
pub mod peft;
#[cfg(feature = "engine")]
pub mod report;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(feature = "engine")]
pub mod tensorfile;
#[cfg(feature = "engine")]
pub mod train;
