//! The SegNet family of semantic-segmentation networks on burn.
//!
//! See [`SegNet`] for the network and [`params`] for named flat access to its
//! tensors.

pub mod layers;
pub mod noise;
pub mod params;
pub mod pool;
mod segnet;
pub mod task_weights;

pub use segnet::{SegNet, SegNetOutput, Stage};
