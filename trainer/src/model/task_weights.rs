//! Learned balance of the segmentation and boundary losses: homoscedastic
//! uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).
//!
//! Each task `i` has a learned log-variance `s_i = log σ_i²`, and the
//! objective is `Σ_i exp(−s_i)·L_i + s_i/2` — the paper's form for
//! classification-like likelihoods, which both heads' cross-entropies are.
//! At its optimum in `s_i`, `exp(−s_i) = 1/(2·L_i)`: every task is weighted
//! by the inverse of its own loss, so no hand-set ratio is needed and the
//! balance follows the losses as training moves them. `s = 0` weights both
//! tasks 1, which is where training starts.
//!
//! The log-variances are an ordinary parameter (`task_weights.log_vars`,
//! rank one, so weight noise leaves them alone): the optimiser, checkpoints,
//! all-reduce and federated averaging treat them like every other.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};

use crate::run_dir::LearnedWeights;

/// The tasks, in the order of `log_vars`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Per-pixel classes.
    Segmentation = 0,
    /// Instance boundaries.
    Boundary = 1,
}

/// One learned log-variance per [`Task`].
#[derive(Module, Debug)]
pub struct TaskWeights {
    /// `[2]`: `s_segmentation`, `s_boundary`.
    pub log_vars: Param<Tensor<1>>,
}

impl TaskWeights {
    /// Number of tasks.
    pub const TASKS: usize = 2;

    /// Both log-variances 0 (both tasks weighted 1). Draws nothing, so a
    /// network with them has every other weight as it would without.
    pub fn new(device: &Device) -> Self {
        Self::from_log_vars([0.0; Self::TASKS], device)
    }

    /// Given log-variances (tests, and restoring from a checkpoint by name).
    pub fn from_log_vars(log_vars: [f32; Self::TASKS], device: &Device) -> Self {
        let t = Tensor::from_data(TensorData::new(log_vars.to_vec(), [Self::TASKS]), device);
        Self {
            log_vars: Param::from_tensor(t),
        }
    }

    /// The objective for the losses of one batch: `exp(−s)·L + s/2` per task
    /// present. A batch without instance targets has no boundary loss, and
    /// then its `s` gets no gradient.
    pub fn combine(&self, segmentation: Tensor<1>, boundary: Option<Tensor<1>>) -> Tensor<1> {
        let s = self.log_vars.val();
        let (s, losses) = match boundary {
            Some(b) => (s, Tensor::cat(vec![segmentation, b], 0)),
            None => (s.narrow(0, Task::Segmentation as usize, 1), segmentation),
        };
        s.clone()
            .neg()
            .exp()
            .mul(losses)
            .sum()
            .add(s.sum().mul_scalar(0.5))
    }

    /// The weight each task's loss has now, `exp(−s_i)`, read to the host.
    pub fn weights(&self) -> LearnedWeights {
        let s: Vec<f32> = self
            .log_vars
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 after convert");
        let weight = |t: Task| (-f64::from(s[t as usize])).exp();
        LearnedWeights {
            segmentation: weight(Task::Segmentation),
            boundary: weight(Task::Boundary),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    fn one(v: f32, device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(vec![v], [1]), device)
    }

    #[test]
    fn at_zero_the_objective_is_the_plain_sum() {
        let d = Device::flex();
        let w = TaskWeights::new(&d);
        assert_eq!(
            scalar(w.combine(one(0.7, &d), Some(one(0.2, &d)))),
            0.7 + 0.2
        );
        assert_eq!(
            w.weights(),
            LearnedWeights {
                segmentation: 1.0,
                boundary: 1.0
            }
        );
    }

    #[test]
    fn the_objective_is_exp_minus_s_times_the_loss_plus_half_s() {
        let d = Device::flex();
        let w = TaskWeights::from_log_vars([0.5, -1.0], &d);
        let want = (-0.5f32).exp() * 0.7 + 0.25 + 1.0f32.exp() * 0.2 - 0.5;
        let got = scalar(w.combine(one(0.7, &d), Some(one(0.2, &d))));
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Without a boundary loss only the segmentation term remains.
        let got = scalar(w.combine(one(0.7, &d), None));
        let want = (-0.5f32).exp() * 0.7 + 0.25;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let w = w.weights();
        assert!((w.segmentation - (-0.5f64).exp()).abs() < 1e-7);
        assert!((w.boundary - 1f64.exp()).abs() < 1e-6);
    }
}
