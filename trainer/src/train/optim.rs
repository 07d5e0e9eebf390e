//! Optimisers over flat `f32` parameter buffers, with PyTorch's update rules.
//!
//! They work on host vectors rather than burn's per-tensor optimiser records so
//! that every piece of state is a named flat buffer: checkpoints store it as
//! safetensors, data-parallel training all-reduces the same layout, and the
//! federated server can reuse the rules on model deltas.

use crate::config::{AdamWConfig, OptimizerConfig, OuterConfig, SgdConfig};

/// An optimiser and its state.
#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    /// SGD with optional (Nesterov) momentum.
    Sgd {
        /// Hyper-parameters.
        config: SgdConfig,
        /// Momentum buffer (empty until the first step, as in PyTorch).
        momentum: Vec<f32>,
    },
    /// AdamW.
    AdamW {
        /// Hyper-parameters.
        config: AdamWConfig,
        /// Steps taken (for bias correction).
        t: u64,
        /// First moment.
        exp_avg: Vec<f32>,
        /// Second moment.
        exp_avg_sq: Vec<f32>,
    },
}

/// A state buffer does not fit the parameters it should describe.
#[derive(Debug, thiserror::Error)]
#[error(
    "optimizer state `{slot}` has {got} values but the model has {expected} trainable parameters"
)]
pub struct StateMismatch {
    /// Which buffer.
    pub slot: String,
    /// Its length.
    pub got: usize,
    /// The parameter count.
    pub expected: usize,
}

impl Optimizer {
    /// A fresh optimiser for `n` parameters.
    pub fn new(config: &OptimizerConfig, n: usize) -> Self {
        match config {
            OptimizerConfig::Sgd(c) => Self::Sgd {
                config: c.clone(),
                momentum: Vec::new(),
            },
            OptimizerConfig::AdamW(c) => Self::AdamW {
                config: c.clone(),
                t: 0,
                exp_avg: vec![0.0; n],
                exp_avg_sq: vec![0.0; n],
            },
        }
    }

    /// Short name, stored in checkpoints.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::AdamW { .. } => "adamw",
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        assert_eq!(params.len(), grads.len(), "one gradient per parameter");
        match self {
            Self::Sgd { config, momentum } => {
                let (mu, wd) = (config.momentum as f32, config.weight_decay as f32);
                let lr = lr as f32;
                if mu == 0.0 {
                    for (p, &g) in params.iter_mut().zip(grads) {
                        *p -= lr * (g + wd * *p);
                    }
                    return;
                }
                let first = momentum.is_empty();
                if first {
                    momentum.resize(params.len(), 0.0);
                }
                for ((p, &g), buf) in params.iter_mut().zip(grads).zip(momentum.iter_mut()) {
                    let d = g + wd * *p;
                    *buf = if first { d } else { mu * *buf + d };
                    let update = if config.nesterov { d + mu * *buf } else { *buf };
                    *p -= lr * update;
                }
            }
            Self::AdamW {
                config,
                t,
                exp_avg,
                exp_avg_sq,
            } => {
                *t += 1;
                let (b1, b2) = (config.beta1, config.beta2);
                let bc1 = 1.0 - b1.powi(*t as i32);
                let bc2_sqrt = (1.0 - b2.powi(*t as i32)).sqrt();
                let step_size = (lr / bc1) as f32;
                let decay = (1.0 - lr * config.weight_decay) as f32;
                let (b1, b2, eps, bc2_sqrt) =
                    (b1 as f32, b2 as f32, config.eps as f32, bc2_sqrt as f32);
                for (((p, &g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(exp_avg.iter_mut())
                    .zip(exp_avg_sq.iter_mut())
                {
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            }
        }
    }

    /// Named state buffers and the step counter, for checkpoints.
    pub fn state(&self) -> (u64, Vec<(&'static str, &[f32])>) {
        match self {
            Self::Sgd { momentum, .. } => (0, vec![("momentum_buffer", momentum.as_slice())]),
            Self::AdamW {
                t,
                exp_avg,
                exp_avg_sq,
                ..
            } => (
                *t,
                vec![
                    ("exp_avg", exp_avg.as_slice()),
                    ("exp_avg_sq", exp_avg_sq.as_slice()),
                ],
            ),
        }
    }

    /// Restores what [`Optimizer::state`] returned. `get` yields a named buffer.
    pub fn load_state(
        &mut self,
        t_saved: u64,
        n: usize,
        mut get: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), StateMismatch> {
        let mut take = |slot: &str, allow_empty: bool| -> Result<Vec<f32>, StateMismatch> {
            let v = get(slot).unwrap_or_default();
            if v.len() == n || (allow_empty && v.is_empty()) {
                Ok(v)
            } else {
                Err(StateMismatch {
                    slot: slot.to_owned(),
                    got: v.len(),
                    expected: n,
                })
            }
        };
        match self {
            Self::Sgd { momentum, .. } => *momentum = take("momentum_buffer", true)?,
            Self::AdamW {
                t,
                exp_avg,
                exp_avg_sq,
                ..
            } => {
                *exp_avg = take("exp_avg", false)?;
                *exp_avg_sq = take("exp_avg_sq", false)?;
                *t = t_saved;
            }
        }
        Ok(())
    }
}

/// The outer optimiser of local SGD (DiLoCo) and of federated server updates:
/// SGD with (Nesterov) momentum applied to the pseudo-gradient
/// `anchor − average`, where `anchor` is the last agreed model and `average`
/// the mean of what the workers made of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterOptimizer {
    /// Hyper-parameters.
    pub config: OuterConfig,
    /// Momentum buffer (empty until the first step).
    pub momentum: Vec<f32>,
}

impl OuterOptimizer {
    /// A fresh outer optimiser.
    pub fn new(config: &OuterConfig) -> Self {
        Self {
            config: config.clone(),
            momentum: Vec::new(),
        }
    }

    /// Moves `anchor` one outer step towards `average`.
    pub fn step(&mut self, anchor: &mut [f32], average: &[f32]) {
        assert_eq!(anchor.len(), average.len(), "one average per parameter");
        let (lr, mu) = (self.config.lr as f32, self.config.momentum as f32);
        let first = self.momentum.is_empty();
        if first {
            self.momentum.resize(anchor.len(), 0.0);
        }
        for ((a, &v), b) in anchor.iter_mut().zip(average).zip(self.momentum.iter_mut()) {
            let g = *a - v;
            *b = if first { g } else { mu * *b + g };
            let d = if self.config.nesterov {
                g + mu * *b
            } else {
                *b
            };
            *a -= lr * d;
        }
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grads {
            *g *= scale;
        }
    }
    norm
}

/// Global L2 norm, accumulated in f64.
pub fn grad_norm(grads: &[f32]) -> f64 {
    grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from `torch.optim` on the same inputs (computed by hand
    /// from the documented update rules, checked with PyTorch 2.x).
    #[test]
    fn sgd_nesterov_matches_pytorch_rule() {
        let cfg = OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        });
        let mut o = Optimizer::new(&cfg, 1);
        let mut p = [1.0f32];
        o.step(&mut p, &[0.5], 0.1);
        // d = 0.5 + 0.1*1 = 0.6; buf = 0.6; update = 0.6 + 0.9*0.6 = 1.14
        assert!((p[0] - (1.0 - 0.114)).abs() < 1e-6, "{}", p[0]);
        o.step(&mut p, &[0.5], 0.1);
        // d = 0.5 + 0.1*0.886 = 0.5886; buf = 0.9*0.6 + 0.5886 = 1.1286; update = 0.5886 + 0.9*1.1286
        let expect = 0.886 - 0.1 * (0.5886 + 0.9 * 1.1286);
        assert!((p[0] - expect).abs() < 1e-6, "{} vs {expect}", p[0]);
    }

    #[test]
    fn adamw_first_steps_follow_the_bias_corrected_rule() {
        let cfg = OptimizerConfig::AdamW(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        });
        let mut o = Optimizer::new(&cfg, 2);
        let mut p = [1.0f32, -2.0];
        o.step(&mut p, &[0.3, -0.2], 0.01);
        // Step 1: m̂ = g, v̂ = g², so the step is lr·sign(g) (up to eps), after decay.
        assert!(
            (p[0] - (1.0 * (1.0 - 1e-4) - 0.01)).abs() < 1e-6,
            "{}",
            p[0]
        );
        assert!(
            (p[1] - (-2.0 * (1.0 - 1e-4) + 0.01)).abs() < 1e-6,
            "{}",
            p[1]
        );
        let (t, state) = o.state();
        assert_eq!(t, 1);
        assert_eq!(state[0].1.len(), 2);
    }

    #[test]
    fn state_round_trips_and_mismatches_are_refused() {
        let cfg = OptimizerConfig::default();
        let mut a = Optimizer::new(&cfg, 3);
        let mut p = [1.0f32, 2.0, 3.0];
        a.step(&mut p, &[0.1, 0.2, 0.3], 0.1);
        let (t, bufs) = a.state();
        let bufs: Vec<(String, Vec<f32>)> = bufs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect();
        let mut b = Optimizer::new(&cfg, 3);
        b.load_state(t, 3, |k| {
            bufs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .unwrap();
        assert_eq!(a, b);
        let err = b.load_state(t, 4, |k| {
            bufs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        });
        assert!(err.is_err());
    }

    #[test]
    fn outer_step_with_unit_lr_and_no_momentum_lands_on_the_average() {
        let mut o = OuterOptimizer::new(&OuterConfig {
            lr: 1.0,
            momentum: 0.0,
            nesterov: false,
        });
        let mut anchor = [1.0f32, -2.0];
        o.step(&mut anchor, &[0.5, 1.0]);
        assert_eq!(anchor, [0.5, 1.0]);
    }

    #[test]
    fn outer_nesterov_overshoots_along_the_pseudo_gradient() {
        let mut o = OuterOptimizer::new(&OuterConfig::default());
        let mut anchor = [1.0f32];
        o.step(&mut anchor, &[0.9]);
        // g = 0.1, buf = 0.1, d = 0.1 + 0.9·0.1 = 0.19, anchor = 1 − 0.7·0.19
        assert!((anchor[0] - (1.0 - 0.7 * 0.19)).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = [3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = [0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, [0.3, 0.4]);
    }
}
