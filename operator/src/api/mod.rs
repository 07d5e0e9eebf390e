//! The `TrainingJob` resource (`trainyard.dev/v1alpha1`).
//!
//! The CRD schema is generated from these types ([`crd`]) and never edited by
//! hand. Field docs become schema descriptions, so they are written for
//! `kubectl explain`. Bounds, enums and defaults live in the schema (checked by
//! the apiserver and by `trainyard validate`); rules that span fields are CEL
//! `x-kubernetes-validations`; what neither can express is in [`validate`].

pub mod crd;
mod defaults;
pub mod spec;
pub mod status;
pub mod validate;

pub(crate) use defaults::steps as defaults_steps;
pub use spec::*;
pub use status::*;

/// API group of every Trainyard resource.
pub const GROUP: &str = "trainyard.dev";
/// API version of [`TrainingJob`].
pub const VERSION: &str = "v1alpha1";
