//! Benchmarks of the federated machinery (`bench/federated.sh` runs them
//! beside Flower): aggregation time per round, and a round's overhead —
//! everything but local training — with clients that answer at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::aggregate::aggregate;
use super::aggregator::{self, AggregatorOptions};
use super::{FederatedError, TASK_PATH, UPDATE_PATH};
use crate::config::{Aggregation, TrainerConfig, client_token};
use crate::tensorfile::{self, NamedTensor};

/// Aggregation timing.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateBench {
    /// Rule.
    pub rule: String,
    /// Updates per round.
    pub clients: usize,
    /// f32 values per update.
    pub params: usize,
    /// Timed repetitions.
    pub iters: usize,
    /// Median seconds per aggregation.
    pub median_seconds: f64,
    /// Update bytes read per second, GB/s.
    pub read_gbps: f64,
}

/// Times `rule` over `clients` random updates of `params` values.
pub fn aggregate_time(
    rule: &Aggregation,
    clients: usize,
    params: usize,
    iters: usize,
) -> AggregateBench {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let updates: Vec<Vec<f32>> = (0..clients)
        .map(|_| {
            (0..params)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let weights: Vec<f64> = (0..clients).map(|i| (10 + i) as f64).collect();
    let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let out = aggregate(rule, &refs, &weights).expect("consistent inputs");
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    AggregateBench {
        rule: format!("{rule:?}"),
        clients,
        params,
        iters: times.len(),
        median_seconds: median,
        read_gbps: (clients * params * 4) as f64 / median / 1e9,
    }
}

/// Round-overhead timing.
#[derive(Debug, Clone, Serialize)]
pub struct RoundBench {
    /// Clients per round.
    pub clients: usize,
    /// Values per update (the model's parameters and buffers).
    pub params: usize,
    /// Rounds timed (the first, with start-up, and the last, with the final
    /// evaluation, are excluded).
    pub rounds: usize,
    /// Median seconds per round.
    pub median_round_seconds: f64,
    /// Of which aggregation and the server step (median).
    pub median_aggregate_seconds: f64,
    /// Of which writing the round checkpoint (median).
    pub median_checkpoint_seconds: f64,
}

/// Runs an aggregator and `clients` clients that answer every task at once
/// with a zero update, so a round's time is all overhead: sampling, encoding
/// and serving the model, decoding and checking updates, aggregation, the
/// server step and the round checkpoint.
pub fn round_overhead(config: &TrainerConfig, rounds: u64) -> Result<RoundBench, FederatedError> {
    let fed = config
        .federated
        .clone()
        .ok_or_else(|| FederatedError::Other("bench-round needs a federated section".into()))?;
    let clients = fed.clients;
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| FederatedError::Other(e.to_string()))?
        .port();
    let dir = std::env::temp_dir().join(format!("trainyard-bench-round-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = config.clone();
    let f = config.federated.as_mut().expect("checked above");
    f.rounds = rounds;
    f.eval_every = 0;
    let secret = "bench".to_string();
    let agg = {
        let (config, dir, secret) = (config.clone(), dir.clone(), secret.clone());
        std::thread::spawn(move || {
            aggregator::run(
                &config,
                &AggregatorOptions {
                    out_dir: dir,
                    resume: false,
                    bind: ([127, 0, 0, 1], port).into(),
                    secret,
                    report: None,
                    stop: None,
                    linger: Duration::from_secs(1),
                    tls: None,
                    metrics: None,
                },
            )
        })
    };
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let token = format!("Bearer {}", client_token(&secret, i));
            std::thread::spawn(move || null_client(port, i, &token))
        })
        .collect();
    let summary = agg.join().expect("the aggregator does not panic")?;
    for w in workers {
        w.join().expect("clients do not panic");
    }
    let rows = crate::run_dir::RunDir::at(&dir).rows();
    let _ = std::fs::remove_dir_all(&dir);
    let rows: Vec<crate::run_dir::RoundRow> = rows?
        .into_iter()
        .filter_map(crate::run_dir::Row::round)
        .collect();
    // The first round includes start-up, the last the final evaluation.
    let middle = if rows.len() > 2 {
        &rows[1..rows.len() - 1]
    } else {
        &rows[..]
    };
    let median = |key: fn(&crate::run_dir::RoundRow) -> f64| {
        let mut v: Vec<f64> = middle.iter().map(key).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Ok(RoundBench {
        clients,
        params: summary.parameters,
        rounds: middle.len(),
        median_round_seconds: median(|r| r.seconds),
        median_aggregate_seconds: median(|r| r.aggregate_seconds),
        median_checkpoint_seconds: median(|r| r.checkpoint_seconds),
    })
}

/// Polls for tasks and answers each with a zero update of the same tensors.
fn null_client(port: u16, index: usize, token: &str) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("http://127.0.0.1:{port}");
    loop {
        let Ok(mut r) = agent
            .get(format!("{base}{TASK_PATH}?client={index}"))
            .header("Authorization", token)
            .call()
        else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        match r.status().as_u16() {
            200 => {}
            410 => return,
            _ => continue,
        }
        let bytes = r
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap_or_default();
        let Ok(global) = tensorfile::parse(std::path::Path::new("task"), &bytes) else {
            continue;
        };
        let round = global.metadata.get("round").cloned().unwrap_or_default();
        let zeros: Vec<(String, NamedTensor)> = global
            .tensors
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    NamedTensor {
                        values: vec![0.0; t.values.len()],
                        shape: t.shape,
                    },
                )
            })
            .collect();
        let body = tensorfile::to_bytes(
            &zeros,
            HashMap::from([
                ("round".to_string(), round.clone()),
                ("examples".to_string(), "1".to_string()),
                ("loss".to_string(), "0".to_string()),
            ]),
        );
        let _ = agent
            .post(format!("{base}{UPDATE_PATH}?client={index}&round={round}"))
            .header("Authorization", token)
            .send(&body[..]);
    }
}
