//! Local SGD and DiLoCo: ranks step on their own and average parameters
//! every `every` steps instead of gradients every step; the average moves
//! the last agreed parameters (the anchor) directly, or through an outer
//! Nesterov optimiser (DiLoCo).

use burn::tensor::Tensor;

use super::DataParallel;
use crate::collective::CollectiveError;
use crate::config::LocalSgdConfig;
use crate::model::params;
use crate::train::optim::OuterOptimizer;

/// Checkpoint slot of the outer optimiser's momentum.
pub const OUTER_MOMENTUM: &str = "outer.momentum_buffer";

/// A rank's local-SGD state.
#[derive(Debug, Clone)]
pub struct LocalSgd {
    every: u64,
    /// The outer optimiser (DiLoCo), if any.
    pub outer: Option<OuterOptimizer>,
    /// The last parameters the ranks agreed on (host: used every `every` steps).
    anchor: Vec<f32>,
}

impl LocalSgd {
    /// Local SGD from the agreed parameters `anchor`.
    pub fn new(config: &LocalSgdConfig, anchor: &Tensor<1>) -> Self {
        Self {
            every: config.every,
            outer: config.outer.as_ref().map(OuterOptimizer::new),
            anchor: params::to_host(anchor),
        }
    }

    /// Moves the anchor to `anchor` (the start state every rank adopted).
    pub fn reset(&mut self, anchor: &Tensor<1>) {
        self.anchor = params::to_host(anchor);
    }

    /// Whether the ranks synchronise after step `done` of `steps` (also on the
    /// last step and when stopping, so a checkpoint holds agreed parameters).
    pub fn due(&self, done: u64, steps: u64, stopping: bool) -> bool {
        done.is_multiple_of(self.every) || done == steps || stopping
    }

    /// Averages what the ranks made of the anchor, moves the anchor (through
    /// the outer optimiser, if any) and returns it: every rank restarts from it.
    pub fn synchronise(
        &mut self,
        params: Tensor<1>,
        group: Option<&mut DataParallel>,
    ) -> Result<Tensor<1>, CollectiveError> {
        let device = params.device();
        let average = match group {
            Some(g) => g.average(params)?,
            None => params,
        };
        let average = params::to_host(&average);
        match self.outer.as_mut() {
            Some(outer) => outer.step(&mut self.anchor, &average),
            None => self.anchor = average,
        }
        Ok(params::from_host(self.anchor.clone(), &device))
    }
}
