//! Federated rounds over loopback HTTP: hostile updates are refused and
//! counted, an aggregator resumes after its last round, and privacy is
//! accounted.

use std::collections::HashMap;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use trainyard_trainer::config::{TrainerConfig, client_token};
use trainyard_trainer::federated::aggregator::{self, AggregatorOptions, FederatedSummary};
use trainyard_trainer::federated::client::{self, ClientOptions};
use trainyard_trainer::federated::{FederatedError, TASK_PATH, UPDATE_PATH, privacy};
use trainyard_trainer::tensorfile::{self, NamedTensor};

use crate::util::{round_rows, tiny_config};

const SECRET: &str = "test-secret";

fn config(extra: &[&str]) -> TrainerConfig {
    let mut all = vec![
        "federated={clients: 3, rounds: 2, local_steps: 2, min_clients: 2, min_available: 2, sampling_timeout_seconds: 60, round_timeout_seconds: 60}",
    ];
    all.extend_from_slice(extra);
    tiny_config(&all)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_aggregator(
    config: &TrainerConfig,
    out: &Path,
    port: u16,
    resume: bool,
) -> JoinHandle<Result<FederatedSummary, FederatedError>> {
    start_aggregator_with(config, out, port, resume, None)
}

fn start_aggregator_with(
    config: &TrainerConfig,
    out: &Path,
    port: u16,
    resume: bool,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> JoinHandle<Result<FederatedSummary, FederatedError>> {
    let options = AggregatorOptions {
        linger: Duration::from_secs(2),
        tls,
        ..options(out, port, resume)
    };
    let config = config.clone();
    std::thread::spawn(move || aggregator::run(&config, &options))
}

/// A test aggregator on 127.0.0.1:`port` (0: any) writing to `out`.
fn options(out: &Path, port: u16, resume: bool) -> AggregatorOptions {
    AggregatorOptions {
        out_dir: out.to_path_buf(),
        resume,
        bind: ([127, 0, 0, 1], port).into(),
        secret: SECRET.into(),
        report: None,
        stop: None,
        linger: Duration::ZERO,
        tls: None,
        metrics: None,
    }
}

/// Why an aggregator refuses to start in `out` (it must).
fn start_error(config: &TrainerConfig, out: &Path) -> String {
    aggregator::run(config, &options(out, 0, false))
        .unwrap_err()
        .to_string()
}

type ClientRun = JoinHandle<Result<client::ClientSummary, FederatedError>>;

fn start_client(config: &TrainerConfig, index: usize, port: u16) -> ClientRun {
    start_client_with(config, index, format!("http://127.0.0.1:{port}"), None, 60)
}

fn start_client_with(
    config: &TrainerConfig,
    index: usize,
    aggregator: String,
    tls: Option<ureq::tls::TlsConfig>,
    join_seconds: u64,
) -> ClientRun {
    let config = config.clone();
    std::thread::spawn(move || {
        client::run(
            &config,
            &ClientOptions {
                index,
                aggregator,
                token: client_token(SECRET, index),
                join_timeout: Duration::from_secs(join_seconds),
                stop: None,
                tls,
                metrics: None,
            },
        )
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn update_bytes(tensors: &[(String, NamedTensor)], round: u64) -> Vec<u8> {
    tensorfile::to_bytes(
        tensors,
        HashMap::from([
            ("round".to_string(), round.to_string()),
            ("examples".to_string(), "10".to_string()),
            ("loss".to_string(), "0.5".to_string()),
        ]),
    )
}

/// Client 2 is an attacker with a valid token: every malformed update it
/// sends is refused with the right status and counted by reason, while the
/// honest clients' rounds complete; its last, well-formed update counts.
#[test]
fn hostile_updates_are_refused_counted_and_never_aggregated() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let c = config(&[
        "federated.rounds=1",
        "federated.min_clients=3",
        "federated.min_available=3",
        "federated.max_update_norm=1000",
        "federated.max_update_mib=0.2",
    ]);
    let agg = start_aggregator(&c, dir.path(), port, false);
    let honest: Vec<_> = (0..2).map(|i| start_client(&c, i, port)).collect();
    let base = format!("http://127.0.0.1:{port}");
    let a = agent();
    // The aggregator builds its dataset and model before it listens.
    let start = std::time::Instant::now();
    while a.get(format!("{base}/healthz")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the aggregator never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = format!("Bearer {}", client_token(SECRET, 2));
    let status =
        |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| r.unwrap().status().as_u16();

    // A wrong token gets nothing.
    assert_eq!(
        status(
            a.get(format!("{base}{TASK_PATH}?client=2"))
                .header("Authorization", "Bearer nope")
                .call()
        ),
        401
    );
    // The real token gets the round's global model once sampled.
    let global = loop {
        let mut r = a
            .get(format!("{base}{TASK_PATH}?client=2"))
            .header("Authorization", &token)
            .call()
            .unwrap();
        if r.status().as_u16() == 200 {
            break r
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .unwrap();
        }
    };
    let file = tensorfile::parse(Path::new("global"), &global).unwrap();
    assert_eq!(file.metadata["round"], "1");
    let mut names: Vec<&String> = file.tensors.keys().collect();
    names.sort();
    let zeros: Vec<(String, NamedTensor)> = names
        .iter()
        .map(|n| {
            let t = &file.tensors[*n];
            (
                (*n).clone(),
                NamedTensor {
                    shape: t.shape.clone(),
                    values: vec![0.0; t.values.len()],
                },
            )
        })
        .collect();
    let post = |query: &str, auth: &str, body: Vec<u8>| {
        status(
            a.post(format!("{base}{UPDATE_PATH}?{query}"))
                .header("Authorization", auth)
                .send(&body[..]),
        )
    };
    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, NamedTensor)>);
    let with = |f: Edit| {
        let mut t = zeros.clone();
        f(&mut t);
        update_bytes(&t, 1)
    };
    assert_eq!(
        post("client=2&round=1", "Bearer nope", update_bytes(&zeros, 1)),
        401
    );
    assert_eq!(
        post("client=7&round=1", &token, update_bytes(&zeros, 1)),
        404
    );
    assert_eq!(
        post("client=2&round=5", &token, update_bytes(&zeros, 5)),
        409
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            with(&|t| t[0].1.values[0] = f32::NAN)
        ),
        422
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            with(&|t| {
                t.pop();
            })
        ),
        422
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            with(&|t| t.push((
                "backdoor.weight".into(),
                NamedTensor {
                    shape: vec![1],
                    values: vec![1.0]
                }
            )))
        ),
        422
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            with(&|t| {
                let w = t.iter_mut().find(|(_, x)| x.shape.len() > 1).unwrap();
                w.1.shape = vec![w.1.values.len()];
            })
        ),
        422
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            with(&|t| t[0].1.values.iter_mut().for_each(|v| *v = 1e6))
        ),
        422
    );
    assert_eq!(
        post(
            "client=2&round=1",
            &token,
            b"definitely not safetensors".to_vec()
        ),
        422
    );
    // A server may answer 413 and close before an oversize body is through
    // (hyper does); the client then sees a broken pipe or a reset instead of
    // the answer. The refusal is counted either way (checked below).
    match a
        .post(format!("{base}{UPDATE_PATH}?client=2&round=1"))
        .header("Authorization", &token)
        .send(&vec![0u8; 300 * 1024][..])
    {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(ureq::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => panic!("oversize update: {e}"),
    }
    // Claiming more examples than its partition holds, to take FedAvg's weight.
    let greedy = tensorfile::to_bytes(
        &zeros,
        HashMap::from([
            ("round".to_string(), "1".to_string()),
            ("examples".to_string(), u64::MAX.to_string()),
            ("loss".to_string(), "0.5".to_string()),
        ]),
    );
    assert_eq!(post("client=2&round=1", &token, greedy), 422);
    // A well-formed update is still taken, once.
    assert_eq!(
        post("client=2&round=1", &token, update_bytes(&zeros, 1)),
        200
    );
    assert_eq!(
        post("client=2&round=1", &token, update_bytes(&zeros, 1)),
        409
    );

    let summary = agg.join().unwrap().unwrap();
    for h in honest {
        assert_eq!(h.join().unwrap().unwrap().rounds, 1);
    }
    assert_eq!(summary.updates_accepted, 3);
    let rejected = &summary.updates_rejected;
    for (reason, n) in [
        ("token", 2),
        ("unknown_client", 1),
        ("stale_round", 1),
        ("non_finite", 1),
        ("names", 2),
        ("shape", 1),
        ("norm", 1),
        ("malformed", 1),
        ("too_large", 1),
        ("not_expected", 1),
        ("examples", 1),
    ] {
        assert_eq!(
            rejected.get(reason).copied(),
            Some(n),
            "{reason}: {rejected:?}"
        );
    }
}

/// A size limit below what one honest update weighs would refuse every
/// client: the aggregator says so at start, naming the field.
#[test]
fn an_update_limit_below_the_models_size_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&["federated.max_update_mib=0.001"]);
    let e = start_error(&c, dir.path());
    assert!(
        e.contains("federated.max_update_mib") && e.contains("raise it"),
        "{e}"
    );
}

/// Two rounds, then a new aggregator process resumes at round 3 with the
/// same global model and server state, and runs to round 4. The model
/// learns its task weights: the clients train the log-variances and the
/// aggregator averages them like every other parameter.
#[test]
fn a_restarted_aggregator_resumes_after_its_last_round() {
    const LEARNED: [&str; 2] = [
        "model.boundary_head=true",
        "model.task_weighting=uncertainty",
    ];
    let config = |extra: &[&str]| config(&[extra, &LEARNED].concat());
    let dir = tempfile::tempdir().unwrap();
    let c = config(&["federated.clients=2"]);
    let port = free_port();
    let agg = start_aggregator(&c, dir.path(), port, false);
    let clients: Vec<_> = (0..2).map(|i| start_client(&c, i, port)).collect();
    assert_eq!(agg.join().unwrap().unwrap().rounds, 2);
    clients
        .into_iter()
        .for_each(|h| assert!(h.join().unwrap().is_ok()));
    // Without --resume the directory is guarded.
    let e = start_error(&c, dir.path());
    assert!(e.contains("--resume"), "{e}");

    let more = config(&["federated.clients=2", "federated.rounds=4"]);
    let port = free_port();
    let agg = start_aggregator(&more, dir.path(), port, true);
    let clients: Vec<_> = (0..2).map(|i| start_client(&more, i, port)).collect();
    let summary = agg.join().unwrap().unwrap();
    clients
        .into_iter()
        .for_each(|h| assert!(h.join().unwrap().is_ok()));
    assert_eq!(summary.rounds, 4);
    let rounds: Vec<u64> = round_rows(dir.path()).iter().map(|r| r.round).collect();
    assert_eq!(rounds, [1, 2, 3, 4], "no round ran twice");
    let global = trainyard_trainer::checkpoint::CheckpointDir::new(dir.path().join("checkpoints"))
        .load_newest()
        .unwrap()
        .unwrap();
    let log_vars = global
        .checkpoint
        .tensor("task_weights.log_vars")
        .expect("the global model has learned task weights");
    assert!(log_vars.values.iter().all(|s| *s != 0.0), "{log_vars:?}");
}

/// A corrupt newest round checkpoint does not stop the aggregator: it
/// resumes after the round before, runs the lost round again, and the round
/// log holds each round once.
#[test]
fn a_corrupt_round_checkpoint_is_skipped_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&["federated.clients=2"]);
    let port = free_port();
    let agg = start_aggregator(&c, dir.path(), port, false);
    let clients: Vec<_> = (0..2).map(|i| start_client(&c, i, port)).collect();
    assert_eq!(agg.join().unwrap().unwrap().rounds, 2);
    clients
        .into_iter()
        .for_each(|h| assert!(h.join().unwrap().is_ok()));
    let newest = dir.path().join("checkpoints/step-00000002.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();

    let more = config(&["federated.clients=2", "federated.rounds=3"]);
    let port = free_port();
    let agg = start_aggregator(&more, dir.path(), port, true);
    let clients: Vec<_> = (0..2).map(|i| start_client(&more, i, port)).collect();
    let summary = agg.join().unwrap().unwrap();
    clients
        .into_iter()
        .for_each(|h| assert!(h.join().unwrap().is_ok()));
    assert_eq!(summary.rounds, 3);
    let rounds: Vec<u64> = round_rows(dir.path()).iter().map(|r| r.round).collect();
    assert_eq!(rounds, [1, 2, 3], "round 2 ran again and is logged once");
    assert!(
        dir.path()
            .join("checkpoints/step-00000002.safetensors.skipped")
            .exists()
    );
}

/// With privacy on, the summary reports the ε the accountant gives for the
/// rounds run (every client sampled: q = 1).
#[test]
fn private_rounds_report_the_epsilon_spent() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&[
        "federated.clients=2",
        "federated.privacy={clip_norm: 0.5, noise_multiplier: 1.5, delta: 1e-5}",
    ]);
    let port = free_port();
    let agg = start_aggregator(&c, dir.path(), port, false);
    let clients: Vec<_> = (0..2).map(|i| start_client(&c, i, port)).collect();
    let summary = agg.join().unwrap().unwrap();
    clients
        .into_iter()
        .for_each(|h| assert!(h.join().unwrap().is_ok()));
    let orders = privacy::default_orders();
    let rdp: Vec<f64> = orders
        .iter()
        .map(|&a| 2.0 * privacy::rdp_sampled_gaussian(1.0, 1.5, a))
        .collect();
    let (want, _) = privacy::epsilon(&orders, &rdp, 1e-5);
    let got = summary.epsilon.expect("epsilon reported");
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert_eq!(summary.delta, Some(1e-5));
}

/// Over HTTPS: a client that trusts the test CA completes the rounds; a
/// client without that trust never gets a task (the handshake fails) and
/// gives up as unreachable.
#[test]
fn rounds_run_over_tls_and_untrusted_clients_are_refused() {
    use trainyard_trainer::federated::tls;
    let fixtures = crate::util::fixture("tls");
    let dir = tempfile::tempdir().unwrap();
    let c = config(&["federated.clients=2", "federated.rounds=1"]);
    let port = free_port();
    let server = tls::server_config(&fixtures.join("tls.crt"), &fixtures.join("tls.key")).unwrap();
    let agg = start_aggregator_with(&c, dir.path(), port, false, Some(server));
    let client = |index: usize, tls: Option<ureq::tls::TlsConfig>, join: u64| {
        start_client_with(&c, index, format!("https://localhost:{port}"), tls, join)
    };
    let trust = tls::client_tls(&fixtures.join("ca.crt")).unwrap();
    // Web PKI roots do not include the test CA.
    let untrusted = client(1, None, 3).join().unwrap().unwrap_err();
    assert!(
        matches!(untrusted, FederatedError::Unreachable(_)),
        "{untrusted}"
    );
    let honest: Vec<_> = (0..2).map(|i| client(i, Some(trust.clone()), 60)).collect();
    let summary = agg.join().unwrap().unwrap();
    assert_eq!(summary.rounds, 1);
    for h in honest {
        assert_eq!(h.join().unwrap().unwrap().rounds, 1);
    }
    // A missing or wrong file is a clear error naming it.
    let e = tls::server_config(&fixtures.join("nope.crt"), &fixtures.join("tls.key")).unwrap_err();
    assert!(e.to_string().contains("nope.crt"), "{e}");
    let e = tls::client_tls(&fixtures.join("tls.key")).unwrap_err();
    assert!(e.to_string().contains("tls.key"), "{e}");
}
