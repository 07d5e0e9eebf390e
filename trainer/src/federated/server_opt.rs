//! Server optimisers: how the aggregated client change Δ (mean of
//! `local − global`) moves the global model. FedAvg and FedAvgM are the
//! local-SGD outer optimiser of data-parallel training (pseudo-gradient −Δ);
//! FedAdam and FedYogi follow Flower's `FedAdam`/`FedYogi` updates.

use crate::config::{AdaptiveServer, OuterConfig, ServerOptimizer};
use crate::train::optim::OuterOptimizer;

/// A server optimiser with its state.
#[derive(Debug, Clone)]
pub enum Server {
    /// FedAvg / FedAvgM.
    Sgd(OuterOptimizer),
    /// FedAdam or FedYogi.
    Adaptive {
        /// Settings.
        config: AdaptiveServer,
        /// Yogi's sign-controlled second moment instead of Adam's EMA.
        yogi: bool,
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
        /// Rounds applied.
        t: u64,
    },
}

impl Server {
    /// A fresh optimiser.
    pub fn new(config: &ServerOptimizer) -> Self {
        match config {
            ServerOptimizer::Sgd { lr, momentum } => Self::Sgd(OuterOptimizer::new(&OuterConfig {
                lr: *lr,
                momentum: *momentum,
                nesterov: false,
            })),
            ServerOptimizer::Adam(a) => Self::adaptive(a, false),
            ServerOptimizer::Yogi(a) => Self::adaptive(a, true),
        }
    }

    fn adaptive(config: &AdaptiveServer, yogi: bool) -> Self {
        Self::Adaptive {
            config: config.clone(),
            yogi,
            m: Vec::new(),
            v: Vec::new(),
            t: 0,
        }
    }

    /// Applies the aggregated change `delta` to `global`.
    pub fn step(&mut self, global: &mut [f32], delta: &[f32]) {
        assert_eq!(global.len(), delta.len());
        match self {
            Self::Sgd(outer) => {
                let target: Vec<f32> = global.iter().zip(delta).map(|(w, d)| w + d).collect();
                outer.step(global, &target);
            }
            Self::Adaptive {
                config,
                yogi,
                m,
                v,
                t,
            } => {
                if m.is_empty() {
                    m.resize(global.len(), 0.0);
                    v.resize(global.len(), 0.0);
                }
                *t += 1;
                let (b1, b2, tau) = (config.beta1 as f32, config.beta2 as f32, config.tau as f32);
                // Flower's FedAdam corrects the learning rate for bias; its
                // FedYogi does not.
                let lr = if *yogi {
                    config.lr
                } else {
                    let t = *t as f64;
                    config.lr * (1.0 - config.beta2.powf(t)).sqrt() / (1.0 - config.beta1.powf(t))
                } as f32;
                for (((w, &d), m), v) in global
                    .iter_mut()
                    .zip(delta)
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                {
                    *m = b1 * *m + (1.0 - b1) * d;
                    let d2 = d * d;
                    *v = if *yogi {
                        *v - (1.0 - b2) * d2 * (*v - d2).signum() * f32::from(*v != d2)
                    } else {
                        b2 * *v + (1.0 - b2) * d2
                    };
                    *w += lr * *m / (v.sqrt() + tau);
                }
            }
        }
    }

    /// Checkpointable state: named buffers and the step counter.
    pub fn state(&self) -> (u64, Vec<(&'static str, Vec<f32>)>) {
        match self {
            Self::Sgd(o) => (0, vec![("server/momentum", o.momentum.clone())]),
            Self::Adaptive { m, v, t, .. } => {
                (*t, vec![("server/m", m.clone()), ("server/v", v.clone())])
            }
        }
    }

    /// Restores [`Server::state`].
    pub fn load_state(&mut self, step: u64, get: impl Fn(&str) -> Option<Vec<f32>>) {
        match self {
            Self::Sgd(o) => o.momentum = get("server/momentum").unwrap_or_default(),
            Self::Adaptive { m, v, t, .. } => {
                *m = get("server/m").unwrap_or_default();
                *v = get("server/v").unwrap_or_default();
                *t = step;
            }
        }
    }

    /// A name for checkpoints.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sgd(_) => "federated-sgd",
            Self::Adaptive { yogi: false, .. } => "federated-adam",
            Self::Adaptive { yogi: true, .. } => "federated-yogi",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_adds_the_mean_change_and_fedavgm_accumulates_it() {
        let mut s = Server::new(&ServerOptimizer::Sgd {
            lr: 1.0,
            momentum: 0.0,
        });
        let mut w = vec![1.0, 2.0];
        s.step(&mut w, &[0.5, -1.0]);
        assert_eq!(w, vec![1.5, 1.0]);
        let mut s = Server::new(&ServerOptimizer::Sgd {
            lr: 1.0,
            momentum: 0.5,
        });
        let mut w = vec![0.0];
        s.step(&mut w, &[1.0]); // m = 1
        s.step(&mut w, &[1.0]); // m = 0.5 + 1
        assert_eq!(w, vec![2.5]);
    }

    /// Flower's FedAdam and FedYogi written out for one coordinate.
    #[test]
    fn adam_and_yogi_match_flowers_formulas() {
        let a = AdaptiveServer {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let deltas = [0.5f64, -0.2, 0.3];
        for yogi in [false, true] {
            let mut s = Server::new(&if yogi {
                ServerOptimizer::Yogi(a.clone())
            } else {
                ServerOptimizer::Adam(a.clone())
            });
            let mut w = vec![1.0f32];
            let (mut rw, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
            for (t, &d) in deltas.iter().enumerate() {
                s.step(&mut w, &[d as f32]);
                m = 0.9 * m + 0.1 * d;
                v = if yogi {
                    v - 0.01 * d * d * (v - d * d).signum()
                } else {
                    0.99 * v + 0.01 * d * d
                };
                let t = (t + 1) as f64;
                let lr = if yogi {
                    0.1
                } else {
                    0.1 * (1.0 - 0.99f64.powf(t)).sqrt() / (1.0 - 0.9f64.powf(t))
                };
                rw += lr * m / (v.sqrt() + 1e-3);
                assert!(
                    (w[0] as f64 - rw).abs() < 1e-5,
                    "yogi={yogi} t={t}: {} vs {rw}",
                    w[0]
                );
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let mut s = Server::new(&ServerOptimizer::Adam(AdaptiveServer::default()));
        let mut w = vec![1.0f32, 2.0];
        s.step(&mut w, &[0.1, 0.2]);
        let (t, bufs) = s.state();
        let mut r = Server::new(&ServerOptimizer::Adam(AdaptiveServer::default()));
        r.load_state(t, |n| {
            bufs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())
        });
        let (mut a, mut b) = (w.clone(), w.clone());
        s.step(&mut a, &[0.3, -0.1]);
        r.step(&mut b, &[0.3, -0.1]);
        assert_eq!(a, b);
    }
}
