//! Optimisers over flat parameter tensors, with PyTorch's update rules.
//!
//! The trainable parameters are one flat `f32` tensor on the compute device
//! (see [`crate::model::params::flat_trainable_of`]) rather than burn's
//! per-tensor optimiser records, so that every piece of state is a named flat
//! buffer: on a GPU the step runs where the gradients are, checkpoints store
//! the state as safetensors, and data-parallel training all-reduces the same
//! layout. Each rule is written as the same sequence of IEEE operations as the
//! host loop it replaced (a test keeps that loop as the reference), so CPU
//! results are bit for bit what they were.

use burn::tensor::{Device, FloatDType, Tensor};

use crate::model::params::{from_host, to_host};

use crate::config::{AdamWConfig, OptimizerConfig, OuterConfig, SgdConfig};

/// An optimiser and its state (on the parameters' device).
// One per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Optimizer {
    /// SGD with optional (Nesterov) momentum.
    Sgd {
        /// Hyper-parameters.
        config: SgdConfig,
        /// Momentum buffer (absent until the first step, as in PyTorch).
        momentum: Option<Tensor<1>>,
    },
    /// AdamW.
    AdamW {
        /// Hyper-parameters.
        config: AdamWConfig,
        /// Steps taken (for bias correction).
        t: u64,
        /// First moment.
        exp_avg: Tensor<1>,
        /// Second moment.
        exp_avg_sq: Tensor<1>,
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
    /// A fresh optimiser for `n` parameters on `device`.
    pub fn new(config: &OptimizerConfig, n: usize, device: &Device) -> Self {
        match config {
            OptimizerConfig::Sgd(c) => Self::Sgd {
                config: c.clone(),
                momentum: None,
            },
            OptimizerConfig::AdamW(c) => Self::AdamW {
                config: c.clone(),
                t: 0,
                exp_avg: Tensor::zeros([n], device),
                exp_avg_sq: Tensor::zeros([n], device),
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

    /// One update of `params` with `grads` at learning rate `lr`; returns the
    /// new parameters.
    pub fn step(&mut self, params: Tensor<1>, grads: Tensor<1>, lr: f64) -> Tensor<1> {
        assert_eq!(params.dims(), grads.dims(), "one gradient per parameter");
        match self {
            Self::Sgd { config, momentum } => {
                let (mu, wd) = (config.momentum as f32, config.weight_decay as f32);
                let lr = lr as f32;
                // d = g + wd·p
                let d = grads.add(params.clone().mul_scalar(wd));
                if mu == 0.0 {
                    return params.sub(d.mul_scalar(lr));
                }
                let buf = match momentum.take() {
                    None => d.clone(),
                    Some(buf) => buf.mul_scalar(mu).add(d.clone()),
                };
                let update = if config.nesterov {
                    d.add(buf.clone().mul_scalar(mu))
                } else {
                    buf.clone()
                };
                *momentum = Some(buf);
                params.sub(update.mul_scalar(lr))
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
                // m = b1·m + (1 − b1)·g ; v = b2·v + ((1 − b2)·g)·g
                let m = exp_avg
                    .clone()
                    .mul_scalar(b1)
                    .add(grads.clone().mul_scalar(1.0 - b1));
                let v = exp_avg_sq
                    .clone()
                    .mul_scalar(b2)
                    .add(grads.clone().mul_scalar(1.0 - b2).mul(grads));
                // p = p·decay − (step_size·m) / (√v / bc2 + eps)
                let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(eps);
                let p = params
                    .mul_scalar(decay)
                    .sub(m.clone().mul_scalar(step_size).div(denom));
                (*exp_avg, *exp_avg_sq) = (m, v);
                p
            }
        }
    }

    /// Named state buffers (copied to the host) and the step counter, for
    /// checkpoints and for handing the state to other ranks.
    pub fn state(&self) -> (u64, Vec<(&'static str, Vec<f32>)>) {
        match self {
            Self::Sgd { momentum, .. } => (
                0,
                vec![(
                    "momentum_buffer",
                    momentum.as_ref().map(to_host).unwrap_or_default(),
                )],
            ),
            Self::AdamW {
                t,
                exp_avg,
                exp_avg_sq,
                ..
            } => (
                *t,
                vec![
                    ("exp_avg", to_host(exp_avg)),
                    ("exp_avg_sq", to_host(exp_avg_sq)),
                ],
            ),
        }
    }

    /// Restores what [`Optimizer::state`] returned onto `device`. `get`
    /// yields a named buffer.
    pub fn load_state(
        &mut self,
        t_saved: u64,
        n: usize,
        mut get: impl FnMut(&str) -> Option<Vec<f32>>,
        device: &Device,
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
            Self::Sgd { momentum, .. } => {
                let v = take("momentum_buffer", true)?;
                *momentum = (!v.is_empty()).then(|| from_host(v, device));
            }
            Self::AdamW {
                t,
                exp_avg,
                exp_avg_sq,
                ..
            } => {
                *exp_avg = from_host(take("exp_avg", false)?, device);
                *exp_avg_sq = from_host(take("exp_avg_sq", false)?, device);
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
/// (PyTorch's `clip_grad_norm_`). Returns the scaled gradients and the norm
/// before clipping.
pub fn clip_grad_norm(grads: Tensor<1>, max_norm: f64) -> (Tensor<1>, f64) {
    let norm = grad_norm(&grads);
    if norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        return (grads.mul_scalar(scale), norm);
    }
    (grads, norm)
}

/// Global L2 norm, accumulated in f64 on the gradients' device; one scalar
/// comes back to the host.
pub fn grad_norm(grads: &Tensor<1>) -> f64 {
    if grads.dims()[0] == 0 {
        return 0.0;
    }
    let g = grads.clone().cast(FloatDType::F64);
    g.clone().mul(g).sum().into_scalar::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::pseudo_random;

    fn cpu() -> Device {
        Device::flex()
    }

    /// Runs `o` for one step on host values.
    fn step(o: &mut Optimizer, p: &mut [f32], g: &[f32], lr: f64) {
        let out = o.step(
            from_host(p.to_vec(), &cpu()),
            from_host(g.to_vec(), &cpu()),
            lr,
        );
        p.copy_from_slice(&to_host(&out));
    }

    /// The host loops these optimisers replaced, kept as the reference the
    /// tensor rules must match bit for bit.
    mod reference {
        use crate::config::{AdamWConfig, SgdConfig};

        pub fn sgd(c: &SgdConfig, p: &mut [f32], g: &[f32], buf: &mut Vec<f32>, lr: f64) {
            let (mu, wd, lr) = (c.momentum as f32, c.weight_decay as f32, lr as f32);
            if mu == 0.0 {
                for (p, &g) in p.iter_mut().zip(g) {
                    *p -= lr * (g + wd * *p);
                }
                return;
            }
            let first = buf.is_empty();
            if first {
                buf.resize(p.len(), 0.0);
            }
            for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let d = g + wd * *p;
                *b = if first { d } else { mu * *b + d };
                let update = if c.nesterov { d + mu * *b } else { *b };
                *p -= lr * update;
            }
        }

        #[allow(clippy::too_many_arguments)]
        pub fn adamw(
            c: &AdamWConfig,
            t: u64,
            p: &mut [f32],
            g: &[f32],
            m: &mut [f32],
            v: &mut [f32],
            lr: f64,
        ) {
            let (b1, b2) = (c.beta1, c.beta2);
            let bc1 = 1.0 - b1.powi(t as i32);
            let bc2_sqrt = (1.0 - b2.powi(t as i32)).sqrt();
            let step_size = (lr / bc1) as f32;
            let decay = (1.0 - lr * c.weight_decay) as f32;
            let (b1, b2, eps, bc2_sqrt) = (b1 as f32, b2 as f32, c.eps as f32, bc2_sqrt as f32);
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *p *= decay;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
            }
        }
    }

    /// Five steps of every rule on the device tensors equal the host loops
    /// exactly: the CPU results did not move when the optimiser went to the
    /// device.
    #[test]
    fn tensor_rules_equal_the_host_loops_bit_for_bit() {
        let n = 1000;
        let sgds = [
            SgdConfig {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 1e-4,
            },
            SgdConfig {
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.0,
            },
            SgdConfig {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-2,
            },
        ];
        for c in sgds {
            let mut o = Optimizer::new(&OptimizerConfig::Sgd(c.clone()), n, &cpu());
            let (mut ours, mut theirs, mut buf) =
                (pseudo_random(n, 1), pseudo_random(n, 1), Vec::new());
            for k in 0..5 {
                let g = pseudo_random(n, 10 + k);
                step(&mut o, &mut ours, &g, 0.05);
                reference::sgd(&c, &mut theirs, &g, &mut buf, 0.05);
            }
            assert!(
                ours.iter()
                    .zip(&theirs)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{c:?}"
            );
            assert_eq!(o.state().1[0].1, buf, "{c:?}");
        }
        let c = AdamWConfig::default();
        let mut o = Optimizer::new(&OptimizerConfig::AdamW(c.clone()), n, &cpu());
        let mut ours = pseudo_random(n, 2);
        let mut theirs = ours.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for k in 0..5 {
            let g = pseudo_random(n, 20 + k);
            let lr = 0.003 * (k + 1) as f64;
            step(&mut o, &mut ours, &g, lr);
            reference::adamw(&c, k + 1, &mut theirs, &g, &mut m, &mut v, lr);
        }
        assert!(
            ours.iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let (t, state) = o.state();
        assert_eq!((t, &state[0].1, &state[1].1), (5, &m, &v));
    }

    /// Reference values from `torch.optim` on the same inputs (computed by hand
    /// from the documented update rules, checked with PyTorch 2.x).
    #[test]
    fn sgd_nesterov_matches_pytorch_rule() {
        let cfg = OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        });
        let mut o = Optimizer::new(&cfg, 1, &cpu());
        let mut p = [1.0f32];
        step(&mut o, &mut p, &[0.5], 0.1);
        // d = 0.5 + 0.1*1 = 0.6; buf = 0.6; update = 0.6 + 0.9*0.6 = 1.14
        assert!((p[0] - (1.0 - 0.114)).abs() < 1e-6, "{}", p[0]);
        step(&mut o, &mut p, &[0.5], 0.1);
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
        let mut o = Optimizer::new(&cfg, 2, &cpu());
        let mut p = [1.0f32, -2.0];
        step(&mut o, &mut p, &[0.3, -0.2], 0.01);
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
        let mut a = Optimizer::new(&cfg, 3, &cpu());
        let mut p = [1.0f32, 2.0, 3.0];
        step(&mut a, &mut p, &[0.1, 0.2, 0.3], 0.1);
        let (t, bufs) = a.state();
        let mut b = Optimizer::new(&cfg, 3, &cpu());
        b.load_state(
            t,
            3,
            |k| bufs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
            &cpu(),
        )
        .unwrap();
        assert_eq!(b.state(), (t, bufs.clone()));
        let err = b.load_state(
            t,
            4,
            |k| bufs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
            &cpu(),
        );
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
        let (g, norm) = clip_grad_norm(from_host(vec![3.0, 4.0], &cpu()), 1.0);
        assert_eq!(norm, 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let (small, _) = clip_grad_norm(from_host(vec![0.3, 0.4], &cpu()), 1.0);
        assert_eq!(to_host(&small), [0.3, 0.4]);
        assert_eq!(grad_norm(&from_host(Vec::new(), &cpu())), 0.0);
    }
}
