//! The aggregator's state across rounds: the global model, the server
//! optimiser and, with privacy on, the accountant and the sampling history.
//! It is what a round checkpoint holds, so a resumed aggregator continues
//! exactly (ε included).

use std::collections::HashMap;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::privacy::{self, Accountant};
use super::server_opt::Server;
use super::update::Schema;
use super::{FederatedError, aggregate};
use crate::checkpoint::Checkpoint;
use crate::config::{FederatedConfig, TrainerConfig};
use crate::tensorfile::NamedTensor;

/// Checkpoint slot of the clipping norm (adaptive clipping moves it).
const CLIP_NORM: &str = "privacy/clip_norm";
/// Checkpoint slot of the clients sampled in every round so far.
const SAMPLED: &str = "privacy/sampled";

/// The global model and what moves it.
pub(super) struct Global {
    /// The model's parameters and buffers, flat in layout order.
    pub values: Vec<f32>,
    server: Server,
    /// The privacy accountant, with privacy on.
    pub accountant: Option<Accountant>,
    /// Clients sampled in each round so far: the accountant's history.
    sampled: Vec<f32>,
}

/// A round's updates, ready to aggregate.
pub(super) struct Updates {
    /// Each client's delta.
    pub deltas: Vec<Vec<f32>>,
    /// Each client's example count (the FedAvg weights).
    pub weights: Vec<f64>,
    /// Clients sampled (the sampling rate's numerator under privacy).
    pub sampled: usize,
}

impl Global {
    /// Round 0: `values` (a fresh model's), the configured server optimiser
    /// and a fresh accountant.
    pub fn new(values: Vec<f32>, fed: &FederatedConfig) -> Self {
        Self {
            values,
            server: Server::new(&fed.server_optimizer),
            accountant: fed.privacy.as_ref().map(Accountant::new),
            sampled: Vec::new(),
        }
    }

    /// Takes the state of `ck` (read from `path`), checking that it holds
    /// exactly `schema`'s tensors.
    pub fn restore(
        &mut self,
        ck: &Checkpoint,
        path: &Path,
        schema: &Schema,
        fed: &FederatedConfig,
    ) -> Result<(), FederatedError> {
        let by_name: HashMap<&str, &NamedTensor> =
            ck.model.iter().map(|(n, t)| (n.as_str(), t)).collect();
        self.values.clear();
        for (name, shape) in &schema.entries {
            let t = by_name
                .get(name.as_str())
                .filter(|t| &t.shape == shape)
                .ok_or_else(|| {
                    FederatedError::Other(format!(
                        "{}: tensor `{name}` is missing or has another shape",
                        path.display()
                    ))
                })?;
            self.values.extend_from_slice(&t.values);
        }
        let get = |slot: &str| {
            ck.optimizer_state
                .iter()
                .find(|(n, _)| n == slot)
                .map(|(_, v)| v.clone())
        };
        self.server.load_state(ck.optimizer_step, get);
        if let (Some(a), Some(p)) = (self.accountant.as_mut(), fed.privacy.as_ref()) {
            self.sampled = get(SAMPLED).unwrap_or_default();
            let clip = get(CLIP_NORM)
                .and_then(|v| v.first().copied())
                .map_or(p.clip_norm, f64::from);
            let rounds: Vec<(f64, u64)> = self
                .sampled
                .iter()
                .map(|&m| (m as f64 / fed.clients as f64, 1))
                .collect();
            *a = Accountant::restore(p, clip, &rounds);
        }
        Ok(())
    }

    /// Aggregates round `round`'s updates and takes the server optimiser's
    /// step. With privacy on: each delta clipped, the plain mean noised
    /// (Gaussian mechanism), the clip norm adapted and the round accounted;
    /// otherwise the configured (robust) aggregation of the weighted deltas.
    /// The noise is a function of the seed and the round, so a resumed run
    /// draws what an uninterrupted one would.
    pub fn aggregate(
        &mut self,
        mut updates: Updates,
        fed: &FederatedConfig,
        seed: u64,
        round: u64,
    ) -> Result<(), FederatedError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let delta = match (self.accountant.as_mut(), fed.privacy.as_ref()) {
            (Some(acc), Some(p)) => {
                let m = updates.deltas.len();
                let (sigma, count_sigma) = acc.noise(m).map_err(FederatedError::Other)?;
                let c = acc.clip_norm;
                let unclipped = updates
                    .deltas
                    .iter_mut()
                    .map(|d| privacy::clip(d, c))
                    .filter(|&n| n <= c)
                    .count();
                let refs: Vec<&[f32]> = updates.deltas.iter().map(Vec::as_slice).collect();
                let mut mean = aggregate::weighted_mean(&refs, &vec![1.0; m])
                    .map_err(|e| FederatedError::Other(e.to_string()))?;
                privacy::add_gaussian_noise(&mut mean, sigma, &mut rng);
                if let (Some(adaptive), Some(sb)) = (p.adaptive_clipping.as_ref(), count_sigma) {
                    let noisy = unclipped as f64
                        + rand_distr::Distribution::sample(
                            &rand_distr::Normal::new(0.0, sb).expect("finite σ"),
                            &mut rng,
                        );
                    acc.adapt(adaptive, noisy, m);
                }
                // Sampling rate: sampled clients over the population.
                acc.account(updates.sampled as f64 / fed.clients as f64, 1);
                self.sampled.push(updates.sampled as f32);
                mean
            }
            _ => {
                let refs: Vec<&[f32]> = updates.deltas.iter().map(Vec::as_slice).collect();
                let (agg, used) =
                    aggregate::aggregate(&fed.aggregation, &refs, &updates.weights)
                        .map_err(|e| FederatedError::Other(format!("round {round}: {e}")))?;
                if used.len() < refs.len() {
                    tracing::info!(
                        round,
                        kept = used.len(),
                        of = refs.len(),
                        "robust aggregation kept a subset"
                    );
                }
                agg
            }
        };
        self.server.step(&mut self.values, &delta);
        Ok(())
    }

    /// ε spent so far, with privacy on.
    pub fn epsilon(&self) -> Option<f64> {
        self.accountant.as_ref().map(|a| a.epsilon().0)
    }

    /// The clipping norm in force, with privacy on.
    pub fn clip_norm(&self) -> Option<f64> {
        self.accountant.as_ref().map(|a| a.clip_norm)
    }

    /// The checkpoint after round `round`.
    pub fn checkpoint(&self, round: u64, schema: &Schema, config: &TrainerConfig) -> Checkpoint {
        let (model_step, buffers) = self.server.state();
        let mut optimizer_state: Vec<(String, Vec<f32>)> = buffers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        if let Some(acc) = &self.accountant {
            optimizer_state.push((CLIP_NORM.into(), vec![acc.clip_norm as f32]));
            optimizer_state.push((SAMPLED.into(), self.sampled.clone()));
        }
        Checkpoint {
            step: round,
            data_position: 0,
            model: schema.tensors(&self.values),
            optimizer: self.server.kind().into(),
            optimizer_step: model_step,
            optimizer_state,
            config: config.clone(),
        }
    }
}
