//! The `federated` section: rounds, client sampling, aggregation, privacy
//! and partitioning. Light (serde only), so the operator embeds it as is.

use serde::{Deserialize, Serialize};

use super::{ConfigError, check_non_negative, check_positive};

/// Federated learning: an aggregator and `clients` clients that keep their data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederatedConfig {
    /// Client replicas, each training on its own partition.
    pub clients: usize,
    /// Aggregation rounds.
    pub rounds: u64,
    /// Optimiser steps each sampled client runs per round (on its own data).
    pub local_steps: u64,
    /// Fraction of available clients sampled per round (Flower's `fraction_fit`).
    pub fraction: f64,
    /// Fewest updates that complete a round (Flower's `min_fit_clients`); a
    /// round with fewer is retried.
    pub min_clients: usize,
    /// Clients that must be available before a round samples (Flower's
    /// `min_available_clients`).
    pub min_available: usize,
    /// Seconds a round waits for `min_available` clients before it is retried,
    /// so a round never waits for ever (Flower's most common hang).
    pub sampling_timeout_seconds: u64,
    /// Seconds sampled clients have to return their update; late ones are dropped.
    pub round_timeout_seconds: u64,
    /// Attempts of one round before the job fails.
    pub round_attempts: u32,
    /// How client updates are combined.
    pub aggregation: Aggregation,
    /// How the aggregate moves the global model.
    pub server_optimizer: ServerOptimizer,
    /// FedProx: clients add (μ/2)‖w − w_global‖² to their loss; 0 is FedAvg.
    pub proximal_mu: f64,
    /// Updates whose L2 norm exceeds this are rejected as hostile.
    pub max_update_norm: Option<f64>,
    /// Largest update body accepted, MiB.
    #[serde(alias = "max_update_mb")]
    pub max_update_mib: f64,
    /// Central differential privacy (clip every update, noise the mean).
    pub privacy: Option<PrivacyConfig>,
    /// How the training samples are split across clients.
    pub partition: Partition,
    /// Evaluate the global model on the validation split every this many
    /// rounds (and at the end); 0 only at the end.
    pub eval_every: u64,
}

impl Default for FederatedConfig {
    fn default() -> Self {
        Self {
            clients: 2,
            rounds: 10,
            local_steps: 20,
            fraction: 1.0,
            min_clients: 2,
            min_available: 2,
            sampling_timeout_seconds: 300,
            round_timeout_seconds: 600,
            round_attempts: 3,
            aggregation: Aggregation::default(),
            server_optimizer: ServerOptimizer::default(),
            proximal_mu: 0.0,
            max_update_norm: None,
            max_update_mib: 1024.0,
            privacy: None,
            partition: Partition::default(),
            eval_every: 1,
        }
    }
}

/// How client updates are combined into one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    /// Mean weighted by each client's number of examples (FedAvg).
    #[default]
    Mean,
    /// Coordinate-wise median (FedMedian).
    Median,
    /// Coordinate-wise mean after dropping the `beta` fraction of largest and
    /// of smallest values (FedTrimmedAvg).
    TrimmedMean {
        /// Fraction cut from each end, in [0, 0.5).
        #[serde(default = "trim_beta")]
        beta: f64,
    },
    /// Krum / Multi-Krum: keep the `keep` updates closest to their
    /// n − f − 2 nearest neighbours and average them.
    Krum {
        /// Byzantine clients tolerated (f).
        #[serde(default)]
        byzantine: usize,
        /// Updates averaged (1 is Krum, more is Multi-Krum).
        #[serde(default = "krum_keep")]
        keep: usize,
    },
}

impl Aggregation {
    /// TrimmedMean's `beta` where none is set (Flower's FedTrimmedAvg default).
    pub const TRIM_BETA: f64 = 0.2;
    /// Krum's `byzantine` where none is set.
    pub const KRUM_BYZANTINE: usize = 0;
    /// Krum's `keep` where none is set: plain Krum.
    pub const KRUM_KEEP: usize = 1;
}

fn trim_beta() -> f64 {
    Aggregation::TRIM_BETA
}

fn krum_keep() -> usize {
    Aggregation::KRUM_KEEP
}

/// The server optimiser, applied to the aggregated update as a pseudo-gradient
/// (FedOpt, Reddi et al. 2021).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// w ← w + lr·Δ (lr 1 is FedAvg); with momentum, FedAvgM.
    Sgd {
        /// Server learning rate.
        #[serde(default = "sgd_server_lr")]
        lr: f64,
        /// Server momentum.
        #[serde(default)]
        momentum: f64,
    },
    /// FedAdam.
    Adam(AdaptiveServer),
    /// FedYogi.
    Yogi(AdaptiveServer),
}

impl ServerOptimizer {
    /// Sgd's server learning rate where none is set: 1 applies the
    /// aggregated update as it is (FedAvg).
    pub const SGD_LR: f64 = 1.0;
    /// Sgd's server momentum where none is set (none: FedAvg, not FedAvgM).
    pub const SGD_MOMENTUM: f64 = 0.0;
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self::Sgd {
            lr: Self::SGD_LR,
            momentum: Self::SGD_MOMENTUM,
        }
    }
}

fn sgd_server_lr() -> f64 {
    ServerOptimizer::SGD_LR
}

/// FedAdam / FedYogi settings (Flower's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveServer {
    /// Server learning rate η.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Adaptivity τ.
    pub tau: f64,
    /// How FedAdam's step size is corrected for the moments' zero start;
    /// absent: as Flower does for the rule (FedAdam `flower`, FedYogi `none`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias_correction: Option<BiasCorrection>,
}

/// Bias correction of an adaptive server optimiser's step size η.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BiasCorrection {
    /// Flower's `FedAdam`: η·√(1 − β2^(t+1)) / (1 − β1^(t+1)) in round t
    /// (counted from 1), so the same job gives Flower's model.
    Flower,
    /// Reddi et al. (2020), Algorithm 2: η as it is.
    None,
}

impl Default for AdaptiveServer {
    fn default() -> Self {
        Self {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            bias_correction: None,
        }
    }
}

/// Central differential privacy with fixed or adaptive clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Each update is scaled down to at most this L2 norm (C).
    pub clip_norm: f64,
    /// Noise multiplier z: the mean gets N(0, (z·C/m)²) per coordinate.
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Adapt C towards the `target_quantile` of update norms (Andrew et al. 2019).
    #[serde(alias = "adaptive")]
    pub adaptive_clipping: Option<AdaptiveClipping>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            adaptive_clipping: None,
        }
    }
}

/// Adaptive clipping (geometric update of C towards a norm quantile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveClipping {
    /// Fraction of updates that should be unclipped.
    pub target_quantile: f64,
    /// Learning rate of log C.
    pub lr: f64,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: 0.5,
            lr: 0.2,
        }
    }
}

/// How training samples are split across clients (deterministic by `seed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// Equal random shares.
    Iid {
        /// Seed of the split.
        #[serde(default)]
        seed: u64,
    },
    /// Per-class proportions drawn from Dirichlet(α) (smaller α is more skewed).
    Dirichlet {
        /// Concentration α.
        #[serde(default = "dirichlet_alpha")]
        alpha: f64,
        /// Seed of the split.
        #[serde(default)]
        seed: u64,
    },
    /// Each client sees only samples whose dominant class is one of
    /// `classes_per_client` classes.
    Classes {
        /// Classes each client holds.
        #[serde(default = "classes_per_client")]
        classes_per_client: usize,
        /// Seed of the split.
        #[serde(default)]
        seed: u64,
    },
    /// Each client reads its own `data` as configured (real deployments:
    /// every client mounts its own volume); nothing is split.
    Own,
}

impl Partition {
    /// Dirichlet's α where none is set.
    pub const DIRICHLET_ALPHA: f64 = 0.5;
    /// Classes' classes per client where none is set.
    pub const CLASSES_PER_CLIENT: usize = 2;
}

fn dirichlet_alpha() -> f64 {
    Partition::DIRICHLET_ALPHA
}

fn classes_per_client() -> usize {
    Partition::CLASSES_PER_CLIENT
}

impl Default for Partition {
    fn default() -> Self {
        Self::Iid { seed: 0 }
    }
}

impl FederatedConfig {
    /// Semantic checks; `classes` is the model's class count.
    pub fn validate(&self, classes: usize) -> Result<(), ConfigError> {
        let f = "federated";
        let bad = |field: &str, message: String| {
            Err(ConfigError::invalid(format!("{f}.{field}"), message))
        };
        if self.clients == 0 {
            return bad("clients", "must be at least 1".into());
        }
        if self.rounds == 0 {
            return bad("rounds", "must be at least 1".into());
        }
        if self.local_steps == 0 {
            return bad("local_steps", "must be at least 1".into());
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return bad("fraction", "must be in (0, 1], e.g. 0.5".into());
        }
        if self.min_clients == 0 || self.min_clients > self.clients {
            return bad(
                "min_clients",
                format!("must be between 1 and clients ({})", self.clients),
            );
        }
        if self.min_available < self.min_clients || self.min_available > self.clients {
            return bad(
                "min_available",
                format!(
                    "must be between min_clients ({}) and clients ({})",
                    self.min_clients, self.clients
                ),
            );
        }
        for (field, v) in [
            ("sampling_timeout_seconds", self.sampling_timeout_seconds),
            ("round_timeout_seconds", self.round_timeout_seconds),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.round_attempts == 0 {
            return bad("round_attempts", "must be at least 1".into());
        }
        match &self.aggregation {
            Aggregation::Mean | Aggregation::Median => {}
            Aggregation::TrimmedMean { beta } => {
                if !(0.0..0.5).contains(beta) {
                    return bad("aggregation.beta", "must be in [0, 0.5)".into());
                }
            }
            Aggregation::Krum { byzantine, keep } => {
                // Krum scores each update by its n − f − 2 nearest
                // neighbours, so a round needs n ≥ f + 3 updates.
                if self.min_clients < byzantine + 3 {
                    return bad(
                        "aggregation.byzantine",
                        format!(
                            "Krum needs min_clients ≥ byzantine + 3 ({}), got min_clients {}",
                            byzantine + 3,
                            self.min_clients
                        ),
                    );
                }
                if *keep == 0 || *keep > self.min_clients - byzantine {
                    return bad(
                        "aggregation.keep",
                        format!(
                            "must be between 1 and min_clients − byzantine ({})",
                            self.min_clients - byzantine
                        ),
                    );
                }
            }
        }
        match &self.server_optimizer {
            ServerOptimizer::Sgd { lr, momentum } => {
                check_positive("federated.server_optimizer.lr", *lr)?;
                if !(0.0..1.0).contains(momentum) {
                    return bad("server_optimizer.momentum", "must be in [0, 1)".into());
                }
            }
            ServerOptimizer::Adam(a) | ServerOptimizer::Yogi(a) => {
                check_positive("federated.server_optimizer.lr", a.lr)?;
                check_positive("federated.server_optimizer.tau", a.tau)?;
                for (field, b) in [("beta1", a.beta1), ("beta2", a.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(
                            &format!("server_optimizer.{field}"),
                            "must be in [0, 1)".into(),
                        );
                    }
                }
            }
        }
        check_non_negative("federated.proximal_mu", self.proximal_mu)?;
        if let Some(n) = self.max_update_norm {
            check_positive("federated.max_update_norm", n)?;
        }
        check_positive("federated.max_update_mib", self.max_update_mib)?;
        if let Some(p) = &self.privacy {
            check_positive("federated.privacy.clip_norm", p.clip_norm)?;
            check_non_negative("federated.privacy.noise_multiplier", p.noise_multiplier)?;
            if !(p.delta > 0.0 && p.delta < 1.0) {
                return bad("privacy.delta", "must be in (0, 1), e.g. 1e-5".into());
            }
            if let Some(a) = &p.adaptive_clipping
                && !(a.target_quantile > 0.0 && a.target_quantile < 1.0 && a.lr > 0.0)
            {
                return bad(
                    "privacy.adaptive_clipping",
                    "target_quantile must be in (0, 1) and lr positive".into(),
                );
            }
            if self.aggregation != Aggregation::Mean {
                return bad(
                    "privacy",
                    "the privacy guarantee is computed for the mean; use aggregation kind mean"
                        .into(),
                );
            }
        }
        match &self.partition {
            Partition::Iid { .. } | Partition::Own => {}
            Partition::Dirichlet { alpha, .. } => {
                check_positive("federated.partition.alpha", *alpha)?
            }
            Partition::Classes {
                classes_per_client, ..
            } => {
                if *classes_per_client == 0 || *classes_per_client > classes {
                    return bad(
                        "partition.classes_per_client",
                        format!("must be between 1 and model.classes ({classes})"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// The token client `index` presents to the aggregator: HMAC-SHA256 of its
/// index under the job's federation secret, hex. The aggregator holds the
/// secret and derives every token; each client receives only its own, so a
/// compromised client cannot speak for another.
pub fn client_token(secret: &str, index: usize) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("trainyard-federated-client/{index}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_fields_left_out_take_the_one_default() {
        let parse = |yaml: &str| serde_yaml::from_str::<serde_yaml::Value>(yaml).unwrap();
        let a: Aggregation = serde_yaml::from_value(parse("kind: trimmed_mean")).unwrap();
        assert_eq!(
            a,
            Aggregation::TrimmedMean {
                beta: Aggregation::TRIM_BETA
            }
        );
        let a: Aggregation = serde_yaml::from_value(parse("kind: krum")).unwrap();
        assert_eq!(
            a,
            Aggregation::Krum {
                byzantine: Aggregation::KRUM_BYZANTINE,
                keep: Aggregation::KRUM_KEEP
            }
        );
        let p: Partition = serde_yaml::from_value(parse("kind: dirichlet")).unwrap();
        assert_eq!(
            p,
            Partition::Dirichlet {
                alpha: Partition::DIRICHLET_ALPHA,
                seed: 0
            }
        );
        let p: Partition = serde_yaml::from_value(parse("kind: classes")).unwrap();
        assert_eq!(
            p,
            Partition::Classes {
                classes_per_client: Partition::CLASSES_PER_CLIENT,
                seed: 0
            }
        );
        let s: ServerOptimizer = serde_yaml::from_value(parse("kind: sgd")).unwrap();
        assert_eq!(s, ServerOptimizer::default());
    }

    #[test]
    fn defaults_validate_and_bad_values_name_their_field() {
        FederatedConfig::default().validate(4).unwrap();
        let cases: Vec<(FederatedConfig, &str)> = vec![
            (
                FederatedConfig {
                    min_clients: 3,
                    ..Default::default()
                },
                "federated.min_clients",
            ),
            (
                FederatedConfig {
                    fraction: 0.0,
                    ..Default::default()
                },
                "federated.fraction",
            ),
            (
                FederatedConfig {
                    clients: 5,
                    min_clients: 3,
                    min_available: 3,
                    aggregation: Aggregation::Krum {
                        byzantine: 1,
                        keep: 1,
                    },
                    ..Default::default()
                },
                "federated.aggregation.byzantine",
            ),
            (
                FederatedConfig {
                    partition: Partition::Classes {
                        classes_per_client: 5,
                        seed: 0,
                    },
                    ..Default::default()
                },
                "federated.partition.classes_per_client",
            ),
            (
                FederatedConfig {
                    privacy: Some(PrivacyConfig::default()),
                    aggregation: Aggregation::Median,
                    ..Default::default()
                },
                "federated.privacy",
            ),
        ];
        for (config, field) in cases {
            let e = config.validate(4).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn client_tokens_differ_by_client_and_secret() {
        let a = client_token("s", 0);
        assert_eq!(a.len(), 64);
        assert_eq!(a, client_token("s", 0));
        assert_ne!(a, client_token("s", 1));
        assert_ne!(a, client_token("t", 0));
    }
}
