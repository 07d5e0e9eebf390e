//! The aggregator role: serves tasks and takes updates over HTTP while the
//! round loop (a plain thread) samples, waits, aggregates and checkpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::global::{Global, Updates};
use super::privacy;
use super::update::{self, Rejection, Schema};
use super::{AVAILABLE_WINDOW, FederatedError, LONG_POLL, TASK_PATH, UPDATE_PATH, partition};
use crate::checkpoint::CheckpointDir;
use crate::config::{FederatedConfig, TrainerConfig, client_token};
use crate::eval;
use crate::infer::Predictor;
use crate::model::SegNet;
use crate::model::params::{self, Layout};
use crate::protocol::{CheckpointMessage, ProgressMessage};
use crate::run_dir::{RoundRow, Row, RunDir};
use crate::tensorfile::NamedTensor;
use crate::train::Setup;
use burn::module::Module;
use burn::tensor::Device;

/// How to run the aggregator beyond the config.
pub struct AggregatorOptions {
    /// Run directory (checkpoints, `metrics.jsonl`, `summary.json`).
    pub out_dir: PathBuf,
    /// Continue after the newest round checkpoint.
    pub resume: bool,
    /// Listen address of the federation endpoint.
    pub bind: SocketAddr,
    /// The federation secret client tokens derive from.
    pub secret: String,
    /// Progress to the operator.
    pub report: Option<crate::report::Reporter>,
    /// Raised on SIGTERM: stop after the current round with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Seconds to keep answering `410 Gone` after the last round, so polling
    /// clients learn the job is over and exit cleanly.
    pub linger: Duration,
    /// Serve HTTPS with this configuration ([`super::tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Prometheus metrics to keep current.
    pub metrics: Option<crate::metrics::TrainerMetrics>,
}

/// What a finished federated run reports (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct FederatedSummary {
    /// Rounds completed.
    pub rounds: u64,
    /// Validation mIoU after each evaluated round: (round, mIoU).
    pub val_miou: Vec<(u64, f64)>,
    /// Weighted mean client loss of the last round.
    pub final_loss: Option<f64>,
    /// Updates accepted over the run.
    pub updates_accepted: u64,
    /// Updates rejected, by reason.
    pub updates_rejected: BTreeMap<String, u64>,
    /// Sampled clients that did not answer in time, over the run.
    pub dropped: u64,
    /// Rounds retried for lack of clients.
    pub retried_rounds: u64,
    /// (ε, δ) spent, with privacy on.
    pub epsilon: Option<f64>,
    /// δ of `epsilon`.
    pub delta: Option<f64>,
    /// Parameters (and buffers) per update.
    pub parameters: usize,
    /// Mean seconds of aggregation (decode excluded) per round.
    pub aggregate_seconds: f64,
    /// Wall time.
    pub wall_seconds: f64,
}

/// Clients sampled, and the updates that arrived.
type RoundResult = (usize, BTreeMap<usize, Received>);

struct Received {
    delta: Vec<f32>,
    examples: u64,
    loss: f64,
}

#[derive(Default)]
struct State {
    /// Round in progress (0 between rounds).
    round: u64,
    /// Sampled clients that have not answered.
    open: BTreeSet<usize>,
    /// The global model of the round, encoded once.
    task: axum::body::Bytes,
    received: BTreeMap<usize, Received>,
    last_seen: Vec<Option<Instant>>,
    done: bool,
    rejected: BTreeMap<&'static str, u64>,
    accepted: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    wake: tokio::sync::Notify,
    schema: Schema,
    tokens: Vec<String>,
    /// The largest valid update ([`Schema::max_update_bytes`]).
    max_bytes: usize,
    max_norm: Option<f64>,
    metrics: Option<crate::metrics::TrainerMetrics>,
    /// Clients whose update body is being received: one at a time each.
    in_flight: Mutex<BTreeSet<usize>>,
    /// Updates decoded at once (each holds its body and its values).
    decoding: tokio::sync::Semaphore,
    /// How long an update's body may take to arrive.
    body_timeout: Duration,
    /// Most examples each client can have (its partition, or the dataset).
    example_caps: Vec<u64>,
}

impl Shared {
    fn new(
        fed: &FederatedConfig,
        opts: &AggregatorOptions,
        schema: Schema,
        max_bytes: usize,
        example_caps: Vec<u64>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                last_seen: vec![None; fed.clients],
                ..Default::default()
            }),
            changed: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            schema,
            tokens: (0..fed.clients)
                .map(|i| client_token(&opts.secret, i))
                .collect(),
            max_bytes,
            max_norm: fed.max_update_norm,
            metrics: opts.metrics.clone(),
            in_flight: Mutex::new(BTreeSet::new()),
            decoding: tokio::sync::Semaphore::new(DECODERS),
            body_timeout: body_timeout(max_bytes),
            example_caps,
        }
    }

    /// The job is over (done, failed or stopped): pollers are woken to hear
    /// `410 Gone`.
    fn close(&self) {
        self.state.lock().expect("state").done = true;
        self.wake.notify_waiters();
    }
}

/// Updates decoded concurrently.
const DECODERS: usize = 2;

/// An update's body may take 30 s, plus a second per MiB of the largest
/// valid update (1 MiB/s is a slow client link): a slow body holds at most
/// one update's memory, for a bounded time.
fn body_timeout(max_bytes: usize) -> Duration {
    Duration::from_secs(30 + (max_bytes >> 20) as u64)
}

/// The most examples each client can claim: its partition's size when the
/// aggregator can compute the split (every partition but `own`), otherwise
/// the whole training split, which no client can exceed either.
fn example_caps(
    config: &TrainerConfig,
    fed: &FederatedConfig,
    setup: &crate::train::Setup,
) -> Result<Vec<u64>, FederatedError> {
    let parts = partition::client_parts(
        fed,
        setup.dataset.as_ref(),
        &setup.split.train,
        config.model.classes,
    )?;
    let all = setup.split.train.len() as u64;
    Ok(match parts {
        Some(parts) => parts.iter().map(|p| p.len() as u64).collect(),
        None => vec![all; fed.clients],
    })
}

/// Keeps a client's place among the updates in flight, freed when dropped.
struct InFlight<'a> {
    shared: &'a Shared,
    client: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&self.client);
    }
}

impl Shared {
    fn reject(&self, r: Rejection) -> Rejection {
        if let Some(m) = &self.metrics {
            m.federated_rejected.with_label_values(&[r.reason()]).inc();
        }
        *self
            .state
            .lock()
            .expect("state")
            .rejected
            .entry(r.reason())
            .or_default() += 1;
        tracing::warn!(reason = r.reason(), "rejected: {r}");
        r
    }

    fn check_token(&self, client: usize, header: Option<&str>) -> Result<(), Rejection> {
        let token = self
            .tokens
            .get(client)
            .ok_or(Rejection::UnknownClient(client))?;
        let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
        // Constant-time comparison: the token is a secret.
        let equal = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if equal {
            Ok(())
        } else {
            Err(Rejection::Token(client))
        }
    }

    fn available(&self, now: Instant) -> Vec<usize> {
        let s = self.state.lock().expect("state");
        s.last_seen
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_some_and(|t| now.duration_since(t) < AVAILABLE_WINDOW))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Runs the aggregator until the last round (or a stop request).
pub fn run(
    config: &TrainerConfig,
    opts: &AggregatorOptions,
) -> Result<FederatedSummary, FederatedError> {
    let started = Instant::now();
    let fed = config.federated.clone().ok_or_else(|| {
        FederatedError::Other("the aggregator needs a `federated` config section".into())
    })?;
    let setup = Setup::new(config)?;
    let device = Device::flex().autodiff();
    let model = SegNet::new(&config.model, config.train.seed, &device);
    let schema = Schema::of(&Layout::of(&model));
    let max_bytes = update_limit(&fed, &schema)?;
    let example_caps = example_caps(config, &fed, &setup)?;
    let values = params::named_values(&model)
        .into_iter()
        .flat_map(|(_, v)| v)
        .collect();
    let mut global = Global::new(values, &fed);
    let run = RunDir::open(&opts.out_dir, opts.resume)?;
    let checkpoints = CheckpointDir::new(run.checkpoints_dir());
    let resumed_after = match opts.resume {
        true => resume(
            &checkpoints,
            &mut global,
            &schema,
            &fed,
            opts.metrics.as_ref(),
        )?,
        false => None,
    };
    let start_round = resumed_after.unwrap_or(0) + 1;
    run.write_config(config)?;

    let shared = Arc::new(Shared::new(
        &fed,
        opts,
        schema.clone(),
        max_bytes,
        example_caps,
    ));
    let server_addr = serve(shared.clone(), opts.bind, opts.tls.clone())?;
    tracing::info!(addr = %server_addr, clients = fed.clients, rounds = fed.rounds, "aggregator listening");

    // Rows of rounds after the checkpoint resumed from (a crash, or newer
    // checkpoints set aside) are dropped: those rounds run again.
    let mut metrics_log = run.log(resumed_after)?;
    let mut summary = FederatedSummary {
        rounds: start_round - 1,
        val_miou: Vec::new(),
        final_loss: None,
        updates_accepted: 0,
        updates_rejected: BTreeMap::new(),
        dropped: 0,
        retried_rounds: 0,
        epsilon: None,
        delta: fed.privacy.as_ref().map(|p| p.delta),
        parameters: schema.len,
        aggregate_seconds: 0.0,
        wall_seconds: 0.0,
    };
    let mut aggregate_total = 0.0;
    let mut progress = ProgressMessage::default();
    for round in start_round..=fed.rounds {
        let round_started = Instant::now();
        let (sampled, received) = gather(&shared, &fed, config.train.seed, round, &global.values)
            .inspect_err(|_| shared.close())?;
        summary.retried_rounds += u64::from(sampled.attempts - 1);
        let sampled = sampled.clients;
        let participants = received.len();
        summary.dropped += (sampled - participants) as u64;
        let (updates, loss) = updates_of(received, sampled);

        let t = Instant::now();
        global.aggregate(updates, &fed, config.train.seed, round)?;
        let aggregate_seconds = t.elapsed().as_secs_f64();
        aggregate_total += aggregate_seconds;

        let evaluate = fed.eval_every > 0 && round % fed.eval_every == 0 || round == fed.rounds;
        let val_miou = (evaluate && !setup.split.val.is_empty())
            .then(|| evaluate_global(config, &schema, &global.values, &setup, &device))
            .transpose()?;
        if let Some(v) = val_miou {
            summary.val_miou.push((round, v));
        }
        let t = Instant::now();
        let ck_path = checkpoints.save(
            &global.checkpoint(round, &schema, config),
            config.checkpoint.keep_last,
        )?;
        let row = RoundRow {
            round,
            sampled,
            participants,
            dropped: sampled - participants,
            rejected: shared.state.lock().expect("state").rejected.values().sum(),
            loss,
            val_miou,
            seconds: round_started.elapsed().as_secs_f64(),
            aggregate_seconds,
            checkpoint_seconds: t.elapsed().as_secs_f64(),
            epsilon: global.epsilon(),
            clip_norm: global.clip_norm(),
        };
        metrics_log.write(&Row::Round(row.clone()))?;
        metrics_log.flush()?;
        tracing::info!(round, participants, sampled, loss = ?loss, val_miou = ?val_miou, epsilon = ?row.epsilon, "round done");
        summary.rounds = round;
        summary.final_loss = loss;
        summary.epsilon = row.epsilon;
        publish(&row, &ck_path, opts, &mut progress);
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) && round < fed.rounds {
            shared.close();
            return Err(FederatedError::Stopped(format!(
                "stopped after round {round} on request; checkpoint {} written, continue with --resume",
                ck_path.display()
            )));
        }
    }
    {
        let s = shared.state.lock().expect("state");
        summary.updates_accepted = s.accepted;
        summary.updates_rejected = s
            .rejected
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
    }
    shared.close();
    // Rounds this process ran (a resumed run skips those before start_round).
    let rounds_run = (summary.rounds + 1).saturating_sub(start_round).max(1);
    summary.aggregate_seconds = aggregate_total / rounds_run as f64;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    run.write_summary(&summary)?;
    // Let polling clients see `410 Gone` and exit on their own.
    let deadline = Instant::now() + opts.linger;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(summary)
}

/// The largest update to read: exactly the model's tensors. A configured
/// limit below that would refuse every client, each seeing a closed
/// connection, so it is refused here.
fn update_limit(fed: &FederatedConfig, schema: &Schema) -> Result<usize, FederatedError> {
    let valid_bytes = schema.max_update_bytes();
    let configured = (fed.max_update_mib * (1 << 20) as f64) as usize;
    if configured < valid_bytes {
        return Err(FederatedError::Other(format!(
            "federated.max_update_mib ({} MiB) is below the {:.2} MiB of parameters \
             ({}, f32, with the update's header) every update of this model carries: raise it",
            fed.max_update_mib,
            valid_bytes as f64 / (1 << 20) as f64,
            schema.len
        )));
    }
    Ok(valid_bytes)
}

/// With `--resume`: the newest round checkpoint that loads (newer ones that
/// do not are set aside and counted) into `global`. Returns the round it
/// holds, or `None` where there is none.
fn resume(
    checkpoints: &CheckpointDir,
    global: &mut Global,
    schema: &Schema,
    fed: &FederatedConfig,
    metrics: Option<&crate::metrics::TrainerMetrics>,
) -> Result<Option<u64>, FederatedError> {
    let Some(found) = checkpoints.load_newest()? else {
        return Ok(None);
    };
    if let Some(m) = metrics {
        m.checkpoints_skipped_total
            .inc_by(found.skipped.len() as u64);
    }
    global.restore(&found.checkpoint, &found.path, schema, fed)?;
    let round = found.checkpoint.step;
    tracing::info!(checkpoint = %found.path.display(), round, "resuming after round");
    Ok(Some(round))
}

/// Clients sampled for a round, and the attempts it took.
struct Sampled {
    clients: usize,
    attempts: u32,
}

/// Round `round`, attempted until enough clients answer, at most
/// `federated.round_attempts` times.
fn gather(
    shared: &Shared,
    fed: &FederatedConfig,
    seed: u64,
    round: u64,
    global: &[f32],
) -> Result<(Sampled, BTreeMap<usize, Received>), FederatedError> {
    for attempt in 1..=fed.round_attempts {
        if let Some((clients, received)) = run_round(shared, fed, seed, round, attempt, global)? {
            return Ok((
                Sampled {
                    clients,
                    attempts: attempt,
                },
                received,
            ));
        }
    }
    Err(FederatedError::Quorum(format!(
        "round {round}: fewer than federated.min_clients ({}) clients answered in {} attempts; check the clients' logs, or lower min_clients",
        fed.min_clients, fed.round_attempts
    )))
}

/// The updates to aggregate, and the clients' loss weighted by their examples.
fn updates_of(received: BTreeMap<usize, Received>, sampled: usize) -> (Updates, Option<f64>) {
    let weights: Vec<f64> = received.values().map(|r| r.examples as f64).collect();
    let loss = received
        .values()
        .map(|r| r.loss * r.examples as f64)
        .sum::<f64>()
        / weights.iter().sum::<f64>().max(1.0);
    let deltas = received.into_values().map(|r| r.delta).collect();
    let updates = Updates {
        deltas,
        weights,
        sampled,
    };
    (updates, Some(loss))
}

/// Validation mIoU of the global model.
fn evaluate_global(
    config: &TrainerConfig,
    schema: &Schema,
    values: &[f32],
    setup: &Setup,
    device: &Device,
) -> Result<f64, FederatedError> {
    let model = load(config, schema, values, device)?;
    let predictor = Predictor::from_model(config.clone(), model.valid(), device.clone().inner());
    let report = eval::evaluate(
        &predictor,
        setup.dataset.as_ref(),
        &setup.split.val,
        config.train.batch_size,
        config.train.validation_noise.as_ref(),
    );
    Ok(report.scores.miou)
}

/// A finished round told to Prometheus and to the operator.
fn publish(
    row: &RoundRow,
    checkpoint: &std::path::Path,
    opts: &AggregatorOptions,
    progress: &mut ProgressMessage,
) {
    if let Some(m) = &opts.metrics {
        m.federated_round.set(row.round as i64);
        m.step.set(row.round as i64);
        m.federated_participants.set(row.participants as i64);
        m.federated_round_seconds.set(row.seconds);
        m.checkpoints_total.inc();
        if let Some(l) = row.loss {
            m.loss.set(l);
        }
        if let Some(v) = row.val_miou {
            m.val_miou.set(v);
        }
        if let Some(e) = row.epsilon {
            m.federated_epsilon.set(e);
        }
    }
    if let Some(r) = &opts.report {
        progress.step = row.round;
        progress.loss = row.loss;
        if row.val_miou.is_some() {
            progress.metric = row.val_miou;
        }
        progress.checkpoint = Some(CheckpointMessage {
            step: row.round,
            path: checkpoint.display().to_string(),
        });
        progress.participants = Some(row.participants as u32);
        progress.rejected = Some(row.rejected);
        progress.epsilon = row.epsilon;
        progress.round_seconds = Some(row.seconds);
        r.send(progress.clone());
    }
}

/// A model holding the flat `values` (layout order).
fn load(
    config: &TrainerConfig,
    schema: &Schema,
    values: &[f32],
    device: &Device,
) -> Result<SegNet, FederatedError> {
    let tensors: HashMap<String, NamedTensor> = schema.tensors(values).into_iter().collect();
    params::load_named(
        SegNet::new(&config.model, config.train.seed, device),
        |n| tensors.get(n),
        device,
    )
    .map_err(|e| FederatedError::Other(e.to_string()))
}

/// One attempt at a round: sample, open, wait, close. `None` when too few
/// clients were available or answered.
fn run_round(
    shared: &Shared,
    fed: &FederatedConfig,
    seed: u64,
    round: u64,
    attempt: u32,
    global: &[f32],
) -> Result<Option<RoundResult>, FederatedError> {
    let wait_start = Instant::now();
    let sampling_timeout = Duration::from_secs(fed.sampling_timeout_seconds);
    let available = loop {
        let available = shared.available(Instant::now());
        if available.len() >= fed.min_available {
            break available;
        }
        if wait_start.elapsed() >= sampling_timeout {
            tracing::warn!(
                round,
                attempt,
                available = available.len(),
                needed = fed.min_available,
                "too few clients available; retrying the round"
            );
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Flower's rule: max(fraction·available, min_clients), at most available.
    let k = ((fed.fraction * available.len() as f64).ceil() as usize)
        .max(fed.min_clients)
        .min(available.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (round << 8) ^ u64::from(attempt));
    let chosen: BTreeSet<usize> = sample(&mut rng, available.len(), k)
        .into_iter()
        .map(|i| available[i])
        .collect();
    let metadata = HashMap::from([
        ("round".to_string(), round.to_string()),
        ("local_steps".to_string(), fed.local_steps.to_string()),
        (
            "step_offset".to_string(),
            ((round - 1) * fed.local_steps).to_string(),
        ),
        ("proximal_mu".to_string(), fed.proximal_mu.to_string()),
    ]);
    let task = axum::body::Bytes::from(shared.schema.encode(global, metadata));
    {
        let mut s = shared.state.lock().expect("state");
        s.round = round;
        s.open = chosen.clone();
        s.task = task;
        s.received.clear();
    }
    shared.wake.notify_waiters();
    tracing::info!(round, attempt, sampled = ?chosen, "round open");
    let deadline = Instant::now() + Duration::from_secs(fed.round_timeout_seconds);
    let mut s = shared.state.lock().expect("state");
    while !s.open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(round, missing = ?s.open, "round timed out; dropping clients that did not answer");
            break;
        }
        s = shared.changed.wait_timeout(s, left).expect("state").0;
    }
    s.round = 0;
    s.open.clear();
    let received = std::mem::take(&mut s.received);
    drop(s);
    shared.wake.notify_waiters();
    if received.len() < fed.min_clients {
        tracing::warn!(
            round,
            attempt,
            got = received.len(),
            needed = fed.min_clients,
            "too few updates; retrying the round"
        );
        return Ok(None);
    }
    Ok(Some((chosen.len(), received)))
}

/// Starts the HTTP endpoint on its own thread; returns the bound address.
fn serve(
    shared: Arc<Shared>,
    bind: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<SocketAddr, FederatedError> {
    let listener = std::net::TcpListener::bind(bind)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .map_err(|e| FederatedError::Other(format!("cannot listen on {bind}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| FederatedError::Other(e.to_string()))?;
    std::thread::Builder::new()
        .name("federation-http".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime builds");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a bound listener");
                let app = router(shared);
                crate::serve::serve(listener, app, tls, crate::serve::Limits::default()).await;
            });
        })
        .map_err(|e| FederatedError::Other(e.to_string()))?;
    Ok(addr)
}

fn router(shared: Arc<Shared>) -> axum::Router {
    use axum::extract::{Query, State as S};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};

    #[derive(serde::Deserialize)]
    struct TaskQuery {
        client: usize,
    }
    #[derive(serde::Deserialize)]
    struct UpdateQuery {
        client: usize,
        round: u64,
    }
    fn refuse(r: Rejection) -> Response {
        (
            StatusCode::from_u16(r.status()).expect("a valid status"),
            r.to_string(),
        )
            .into_response()
    }
    fn auth(h: &HeaderMap) -> Option<&str> {
        h.get("authorization").and_then(|v| v.to_str().ok())
    }

    async fn task(
        S(shared): S<Arc<Shared>>,
        Query(q): Query<TaskQuery>,
        headers: HeaderMap,
    ) -> Response {
        if let Err(r) = shared.check_token(q.client, auth(&headers)) {
            return refuse(shared.reject(r));
        }
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let notified = shared.wake.notified();
            {
                let mut s = shared.state.lock().expect("state");
                s.last_seen[q.client] = Some(Instant::now());
                if s.done {
                    return (StatusCode::GONE, "the federated job is done").into_response();
                }
                if s.round > 0 && s.open.contains(&q.client) {
                    let body = s.task.clone(); // a reference count, not a copy
                    return ([("content-type", "application/octet-stream")], body).into_response();
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return StatusCode::NO_CONTENT.into_response(),
            }
        }
    }

    async fn update(
        S(shared): S<Arc<Shared>>,
        Query(q): Query<UpdateQuery>,
        headers: HeaderMap,
        body: axum::body::Body,
    ) -> Response {
        if let Err(r) = shared.check_token(q.client, auth(&headers)) {
            return refuse(shared.reject(r));
        }
        {
            let s = shared.state.lock().expect("state");
            if q.round != s.round {
                let r = Rejection::Stale {
                    got: q.round,
                    current: s.round,
                };
                drop(s);
                return refuse(shared.reject(r));
            }
            if !s.open.contains(&q.client) {
                let r = Rejection::NotExpected {
                    client: q.client,
                    round: q.round,
                };
                drop(s);
                return refuse(shared.reject(r));
            }
        }
        // Declared too large: refused before a byte of the body is read.
        let declared: Option<usize> = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        if let Some(bytes) = declared.filter(|&b| b > shared.max_bytes) {
            return refuse(shared.reject(Rejection::TooLarge {
                bytes,
                limit: shared.max_bytes,
            }));
        }
        if !shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .insert(q.client)
        {
            return refuse(shared.reject(Rejection::Busy(q.client)));
        }
        let _in_flight = InFlight {
            shared: &shared,
            client: q.client,
        };
        let read = tokio::time::timeout(
            shared.body_timeout,
            axum::body::to_bytes(body, shared.max_bytes),
        );
        let bytes = match read.await {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                return refuse(shared.reject(Rejection::TooLarge {
                    bytes: declared.unwrap_or(shared.max_bytes + 1),
                    limit: shared.max_bytes,
                }));
            }
            Err(_) => return refuse(shared.reject(Rejection::Slow(shared.body_timeout))),
        };
        let _decoding = shared.decoding.acquire().await.expect("never closed");
        let checked = tokio::task::spawn_blocking({
            let shared = shared.clone();
            move || -> Result<Received, Rejection> {
                let (delta, meta) = shared.schema.decode(&bytes)?;
                let round: u64 = update::meta(&meta, "round")?;
                if round != q.round {
                    return Err(Rejection::Malformed(format!(
                        "metadata round {round} differs from the query's {}",
                        q.round
                    )));
                }
                let examples: u64 = update::meta(&meta, "examples")?;
                if examples == 0 {
                    return Err(Rejection::Malformed(
                        "metadata `examples` must be at least 1".into(),
                    ));
                }
                let cap = shared.example_caps[q.client];
                if examples > cap {
                    return Err(Rejection::Examples { got: examples, cap });
                }
                let loss: f64 = update::meta(&meta, "loss")?;
                if !loss.is_finite() {
                    return Err(Rejection::Malformed("metadata `loss` is not finite".into()));
                }
                if let Some(bound) = shared.max_norm {
                    let norm = privacy::l2_norm(&delta);
                    if norm > bound {
                        return Err(Rejection::Norm { norm, bound });
                    }
                }
                Ok(Received {
                    delta,
                    examples,
                    loss,
                })
            }
        })
        .await
        .expect("the check does not panic");
        let received = match checked {
            Ok(r) => r,
            Err(r) => return refuse(shared.reject(r)),
        };
        let mut s = shared.state.lock().expect("state");
        // The round may have closed while the body was checked.
        if s.round != q.round || !s.open.remove(&q.client) {
            let r = Rejection::Stale {
                got: q.round,
                current: s.round,
            };
            drop(s);
            return refuse(shared.reject(r));
        }
        s.received.insert(q.client, received);
        s.accepted += 1;
        if let Some(m) = &shared.metrics {
            m.federated_accepted.inc();
        }
        drop(s);
        shared.changed.notify_all();
        StatusCode::OK.into_response()
    }

    axum::Router::new()
        .route(TASK_PATH, get(task))
        .route(UPDATE_PATH, post(update))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared)
}
