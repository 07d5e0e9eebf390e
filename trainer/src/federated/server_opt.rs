//! Server optimisers: how the aggregated client change Δ (mean of
//! `local − global`) moves the global model. FedAvg and FedAvgM are the
//! local-SGD outer optimiser of data-parallel training (pseudo-gradient −Δ);
//! FedAdam and FedYogi follow Flower's `FedAdam`/`FedYogi` updates, FedAdam's
//! step-size bias correction included unless `bias_correction: none` asks
//! for Reddi et al.'s uncorrected rule.

use crate::config::{AdaptiveServer, BiasCorrection, OuterConfig, ServerOptimizer};
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
                let correction = config.bias_correction.unwrap_or(if *yogi {
                    BiasCorrection::None
                } else {
                    BiasCorrection::Flower
                });
                let lr = match correction {
                    BiasCorrection::None => config.lr,
                    BiasCorrection::Flower => {
                        // Flower's exponent is the round plus one.
                        let e = *t as f64 + 1.0;
                        config.lr * (1.0 - config.beta2.powf(e)).sqrt()
                            / (1.0 - config.beta1.powf(e))
                    }
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

    /// Flower's FedAdam (fedadam.py: η·√(1 − β2^(round+1)) / (1 − β1^(round+1)),
    /// rounds from 1) and FedYogi written out for one coordinate; and Reddi
    /// et al.'s FedAdam without the correction.
    #[test]
    fn adam_and_yogi_match_flowers_formulas() {
        let a = AdaptiveServer {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            bias_correction: None,
        };
        let deltas = [0.5f64, -0.2, 0.3];
        for (yogi, correction) in [
            (false, None),
            (true, None),
            (false, Some(BiasCorrection::None)),
        ] {
            let a = AdaptiveServer {
                bias_correction: correction,
                ..a.clone()
            };
            let corrected = !yogi && correction.is_none();
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
                let round = (t + 1) as f64;
                let lr = if corrected {
                    0.1 * (1.0 - 0.99f64.powf(round + 1.0)).sqrt()
                        / (1.0 - 0.9f64.powf(round + 1.0))
                } else {
                    0.1
                };
                rw += lr * m / (v.sqrt() + 1e-3);
                assert!(
                    (w[0] as f64 - rw).abs() < 1e-5,
                    "yogi={yogi} {correction:?} round {round}: {} vs {rw}",
                    w[0]
                );
            }
        }
    }

    /// Flower 1.42.0's own `FedAdam` and `FedYogi` (`aggregate_fit` over one
    /// client whose model is w + Δ; η 0.1, β 0.9/0.99, τ 1e-3), three rounds,
    /// printed by that version's strategies; the same deltas here.
    #[test]
    fn three_rounds_equal_flowers_own_strategies() {
        let deltas = [[0.5f32, -0.2, 0.1], [-0.2, 0.3, 0.05], [0.3, 0.1, -0.4]];
        let flower_adam = [
            [1.072790177779471, -2.070710462623849, 0.5674963506864013],
            [1.1018981706539017, -2.05008538471658, 0.6408607875529332],
            [1.1506129378300334, -2.0186470106371077, 0.6036527521451124],
        ];
        let flower_yogi = [
            [1.0980392694473267, -2.095238208770752, 0.5909091234207153],
            [1.143616795539856, -2.062854290008545, 0.7058484554290771],
            [1.2274235486984253, -2.008711099624634, 0.6414280533790588],
        ];
        for (rule, expected) in [
            (
                ServerOptimizer::Adam(AdaptiveServer::default()),
                flower_adam,
            ),
            (
                ServerOptimizer::Yogi(AdaptiveServer::default()),
                flower_yogi,
            ),
        ] {
            let mut s = Server::new(&rule);
            let mut w = vec![1.0f32, -2.0, 0.5];
            for (round, (d, e)) in deltas.iter().zip(&expected).enumerate() {
                s.step(&mut w, d);
                for (ours, theirs) in w.iter().zip(e) {
                    assert!(
                        (f64::from(*ours) - theirs).abs() < 2e-6,
                        "{} round {}: {w:?} vs Flower's {e:?}",
                        s.kind(),
                        round + 1
                    );
                }
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
