//! The Trainyard trainer: SegNet semantic segmentation on burn.
//!
//! # Brief overview
//! A run is described by a [`config::TrainerConfig`] (sections `model`, `data`,
//! `train`, `checkpoint`) and executed by [`train::train`], which builds a
//! [`model::SegNet`], streams batches from a [`data::Dataset`], optimises with
//! the flat-buffer optimisers of [`train::optim`], validates with
//! [`train::metrics`], and writes atomic [`checkpoint`]s.
//!
//! ```no_run
//! use trainyard_trainer::{config::TrainerConfig, train};
//! let config = TrainerConfig::load("examples/trainer/shapes.yaml".as_ref(), &["train.steps=10".into()])?;
//! let summary = train::train(&config, &train::RunOptions { out_dir: "runs/demo".into(), ..Default::default() })?;
//! println!("mIoU {:?}", summary.val_miou);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod allocator;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod ddp;
pub mod infer;
pub mod instances;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod tensorfile;
pub mod train;
