//! The client role: poll for a task, train `local_steps` on this client's
//! own partition starting from the global model, send back the change.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;

use super::update::{self, Schema};
use super::{FederatedError, LONG_POLL, TASK_PATH, UPDATE_PATH, partition};
use crate::config::TrainerConfig;
use crate::model::SegNet;
use crate::model::params::{self, Layout, Trainable};
use crate::tensorfile::NamedTensor;
use crate::train::learner::Learner;
use crate::train::{Prefetch, Setup, schedule};

/// How to run a client beyond the config.
pub struct ClientOptions {
    /// This client's index (0-based).
    pub index: usize,
    /// `http://host:port` of the aggregator.
    pub aggregator: String,
    /// This client's token.
    pub token: String,
    /// How long the aggregator may be unreachable (start-up, restart)
    /// before the client gives up (exit 75: a restart may help).
    pub join_timeout: Duration,
    /// Raised on SIGTERM.
    pub stop: Option<Arc<AtomicBool>>,
    /// Trust for an HTTPS aggregator ([`super::tls::client_tls`]).
    pub tls: Option<ureq::tls::TlsConfig>,
    /// Prometheus metrics to keep current.
    pub metrics: Option<crate::metrics::TrainerMetrics>,
}

/// What a client did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientSummary {
    /// Rounds this client trained in.
    pub rounds: u64,
    /// Training samples in its partition.
    pub examples: usize,
    /// Updates the aggregator refused (stale rounds after a slow round, say).
    pub refused: u64,
}

/// Runs the client until the aggregator says the job is done.
pub fn run(config: &TrainerConfig, opts: &ClientOptions) -> Result<ClientSummary, FederatedError> {
    let fed = config.federated.clone().ok_or_else(|| {
        FederatedError::Other("a client needs a `federated` config section".into())
    })?;
    if opts.index >= fed.clients {
        return Err(FederatedError::Refused(format!(
            "client index {} is outside federated.clients ({})",
            opts.index, fed.clients
        )));
    }
    let mut setup = Setup::new(config)?;
    if let Some(mut parts) = partition::client_parts(
        &fed,
        setup.dataset.as_ref(),
        &setup.split.train,
        config.model.classes,
    )? {
        setup.split.train = parts.swap_remove(opts.index);
    }
    let examples = setup.split.train.len();
    tracing::info!(client = opts.index, examples, "client partition ready");
    // The schedule spans every round's local steps.
    let mut schedule_config = config.train.clone();
    schedule_config.steps = fed.rounds * fed.local_steps;
    // A client trains where train.device says; the aggregator only averages.
    let device = crate::device::resolve(config.train.device, 0)
        .map_err(crate::train::TrainError::from)?
        .device
        .autodiff();
    let template = SegNet::new(&config.model, config.train.seed, &device);
    let schema = Schema::of(&Layout::of(&template));
    let mut agent = ureq::Agent::config_builder()
        .timeout_global(Some(LONG_POLL + Duration::from_secs(30)))
        .http_status_as_error(false);
    if let Some(tls) = &opts.tls {
        agent = agent.tls_config(tls.clone());
    }
    let agent: ureq::Agent = agent.build().into();
    let base = opts.aggregator.trim_end_matches('/');
    let auth = format!("Bearer {}", opts.token);
    let mut summary = ClientSummary {
        rounds: 0,
        examples,
        refused: 0,
    };
    let mut unreachable_since: Option<Instant> = None;
    loop {
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Err(FederatedError::Stopped("stopped on request".into()));
        }
        let url = format!("{base}{TASK_PATH}?client={}", opts.index);
        let mut response = match agent.get(&url).header("Authorization", &auth).call() {
            Ok(r) => {
                unreachable_since = None;
                r
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > opts.join_timeout {
                    return Err(FederatedError::Unreachable(format!(
                        "the aggregator at {base} was unreachable for {}s: {e}",
                        opts.join_timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {}
            204 => continue,
            410 => {
                tracing::info!(
                    client = opts.index,
                    rounds = summary.rounds,
                    "the aggregator says the job is done"
                );
                return Ok(summary);
            }
            401 | 403 | 404 => {
                let body = response.body_mut().read_to_string().unwrap_or_default();
                return Err(FederatedError::Refused(format!(
                    "the aggregator refused client {}: {body}",
                    opts.index
                )));
            }
            code => {
                tracing::warn!(code, "unexpected answer to a task request; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|e| FederatedError::Unreachable(format!("reading the global model: {e}")))?;
        let (global, meta) = schema.decode(&bytes).map_err(|r| {
            FederatedError::Other(format!(
                "the aggregator sent a model that does not fit ours: {r}"
            ))
        })?;
        let field = |k: &str| {
            update::meta::<u64>(&meta, k).map_err(|r| FederatedError::Other(r.to_string()))
        };
        let (round, steps, offset) = (
            field("round")?,
            field("local_steps")?,
            field("step_offset")?,
        );
        let mu: f64 =
            update::meta(&meta, "proximal_mu").map_err(|r| FederatedError::Other(r.to_string()))?;
        let t = Instant::now();
        let (local, loss) = train_locally(
            config,
            &schedule_config,
            &setup,
            &schema,
            &global,
            steps,
            offset,
            mu,
            opts.index,
            &device,
        )?;
        let delta: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
        let body = schema.encode(
            &delta,
            HashMap::from([
                ("round".to_string(), round.to_string()),
                ("examples".to_string(), examples.to_string()),
                ("loss".to_string(), loss.to_string()),
            ]),
        );
        let url = format!("{base}{UPDATE_PATH}?client={}&round={round}", opts.index);
        match agent
            .post(&url)
            .header("Authorization", &auth)
            .send(&body[..])
        {
            Ok(r) if r.status().as_u16() == 200 => {
                summary.rounds += 1;
                if let Some(m) = &opts.metrics {
                    m.step.set(summary.rounds as i64);
                    m.steps_total.inc_by(steps);
                    m.samples_total.inc_by(
                        steps * (config.train.batch_size as u64) * config.train.accumulate_steps,
                    );
                    m.loss.set(loss);
                }
                tracing::info!(
                    client = opts.index,
                    round,
                    loss,
                    seconds = t.elapsed().as_secs_f64(),
                    "update accepted"
                );
            }
            Ok(mut r) => {
                summary.refused += 1;
                let body = r.body_mut().read_to_string().unwrap_or_default();
                tracing::warn!(client = opts.index, round, status = r.status().as_u16(), %body, "update refused");
            }
            Err(e) => {
                tracing::warn!(client = opts.index, round, error = %e, "could not send the update; waiting for the next task")
            }
        }
    }
}

/// `steps` optimiser steps from `global` on this client's partition, with
/// FedProx's proximal term when `mu > 0`. Returns the local model (flat,
/// layout order: parameters and buffers) and the mean loss.
#[allow(clippy::too_many_arguments)]
fn train_locally(
    config: &TrainerConfig,
    schedule_config: &crate::config::TrainConfig,
    setup: &Setup,
    schema: &Schema,
    global: &[f32],
    steps: u64,
    offset: u64,
    mu: f64,
    index: usize,
    device: &Device,
) -> Result<(Vec<f32>, f64), FederatedError> {
    let tensors: HashMap<String, NamedTensor> = schema.tensors(global).into_iter().collect();
    let model = params::load_named(
        SegNet::new(&config.model, config.train.seed, device),
        |n| tensors.get(n),
        device,
    )
    .map_err(|e| FederatedError::Other(e.to_string()))?;
    // Clients are stateless between rounds (FedAvg): a fresh optimiser each round.
    let mut learner = Learner::new(model, Trainable::All, &config.train.optimizer, device);
    let anchor = learner.params().clone();
    let accumulate = config.train.accumulate_steps;
    // Each client draws its own sample order (seeded by its index).
    let prefetch = Prefetch::spawn_for(
        setup,
        config.data.seed.wrapping_add(index as u64 * 7919),
        offset * accumulate..(offset + steps) * accumulate,
    );
    let mut loss_sum = 0.0;
    for step in offset..offset + steps {
        let lr = schedule::learning_rate(schedule_config, step);
        let micro_batches = (0..accumulate).map(|_| prefetch.next().0);
        let (loss, mut grads) = learner.mean_gradient(micro_batches, config, step);
        if !loss.is_finite() {
            return Err(FederatedError::Other(format!(
                "local loss is {loss} at step {step}; lower train.lr"
            )));
        }
        if mu > 0.0 {
            // ∇ (μ/2)‖w − w_global‖² = μ (w − w_global)
            let pull = learner
                .params()
                .clone()
                .sub(anchor.clone())
                .mul_scalar(mu as f32);
            grads = grads.add(pull);
        }
        learner.apply(grads, lr, config.train.grad_clip_norm);
        loss_sum += loss as f64;
    }
    let model = learner.model();
    let local: Vec<f32> = params::named_values(model)
        .into_iter()
        .flat_map(|(_, v)| v)
        .collect();
    Ok((local, loss_sum / steps as f64))
}
