//! The `trainyard-trainer` binary as a user meets it.

use std::path::Path;
use std::process::{Command, Output};

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small job that would run far longer than any test: for tests that stop
/// or kill a trainer mid-run.
fn endless_job(dir: &Path) -> String {
    write(
        dir,
        "job.yaml",
        "model: {widths: [8, 16]}\n\
         data: {shapes: {samples: 64, image_size: 32}}\n\
         train: {steps: 1000000, batch_size: 4, validate_every: 0, decay: {kind: constant}}\n\
         checkpoint: {every: 0}\n",
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn bad_input_exits_non_zero_naming_the_field_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--config".into(),
                write(dir.path(), "a.yaml", "train: {batch_size: 0}"),
            ],
            "train.batch_size",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "b.yaml", "train: {lr: -0.1}"),
            ],
            "train.lr",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "c.yaml", "trian: {steps: 3}"),
            ],
            "trian",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "d.yaml", "train: {steps: many}"),
            ],
            "train.steps",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "e.yaml", "train: [1, 2"),
            ],
            "e.yaml",
        ),
        (
            vec![
                "--config".into(),
                dir.path().join("missing.yaml").to_str().unwrap().into(),
            ],
            "missing.yaml",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "f.yaml", ""),
                "--set".into(),
                "train.steps".into(),
            ],
            "key=value",
        ),
        (
            vec![
                "--config".into(),
                write(
                    dir.path(),
                    "g.yaml",
                    "data: {shapes: null, folder: {path: /nonexistent/ds}}",
                ),
            ],
            "/nonexistent/ds/images",
        ),
        (
            vec![
                "--config".into(),
                write(dir.path(), "h.yaml", ""),
                "--threads".into(),
                "0".into(),
            ],
            "--threads",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["train", "--out", out];
        all.extend(args.iter().map(String::as_str));
        let o = trainer(&all);
        assert!(!o.status.success(), "{all:?} should fail");
        let e = stderr(&o);
        assert!(
            e.contains(needle),
            "{all:?}: stderr does not name `{needle}`:\n{e}"
        );
        assert!(!e.contains("panicked"), "{all:?} panicked:\n{e}");
    }
}

#[test]
fn help_documents_the_options() {
    let o = trainer(&["train", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--config",
        "--out",
        "--resume",
        "--set",
        "--metrics-addr",
        "--threads",
    ] {
        assert!(help.contains(flag), "{flag} undocumented");
    }
}

/// shapes → train (boundary head) → eval on the folder → predict writes masks,
/// overlays and instance maps.
#[test]
fn shapes_train_eval_predict_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = trainer(&[
        "shapes",
        "--out",
        data.to_str().unwrap(),
        "--samples",
        "12",
        "--size",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let config = write(
        dir.path(),
        "job.yaml",
        &format!(
            "model: {{widths: [8, 16], boundary_head: true}}\n\
             data: {{shapes: null, folder: {{path: {}}}, validation_fraction: 0.25}}\n\
             train: {{steps: 3, batch_size: 4, validate_every: 0}}\n",
            data.display()
        ),
    );
    let run = dir.path().join("run");
    let o = trainer(&["train", "--config", &config, "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 3);
    for key in [
        "final_loss",
        "val_miou",
        "val_pixel_accuracy",
        "samples_per_sec",
        "wall_seconds",
        "peak_rss_bytes",
    ] {
        assert!(
            summary.get(key).is_some_and(|v| !v.is_null()),
            "summary lacks {key}: {summary}"
        );
    }
    let checkpoint = run.join("checkpoints/step-00000003.safetensors");
    assert!(checkpoint.exists());

    let o = trainer(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["samples"], 12);
    assert!(report["miou"].as_f64().unwrap() >= 0.0);
    assert!(report.get("noise").is_none(), "clean scores carry no noise");

    let noisy = |seed: &str| {
        let o = trainer(&[
            "eval",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--input-noise",
            "0.3",
            "--weight-noise",
            "0.2",
            "--noise-seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    assert_eq!(
        noisy("3"),
        noisy("3"),
        "the same noise gives the same scores"
    );
    let report: serde_json::Value = serde_json::from_slice(&noisy("3")).unwrap();
    assert_eq!(
        report["noise"],
        serde_json::json!({"input_sigma": 0.3, "weight_sigma": 0.2, "seed": 3})
    );
    let o = trainer(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--weight-noise",
        "-1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--weight-noise") && stderr(&o).contains("non-negative"),
        "{}",
        stderr(&o)
    );

    let pred = dir.path().join("pred");
    let o = trainer(&[
        "predict",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for suffix in ["mask", "overlay", "instances"] {
        let p = pred.join(format!("00000_{suffix}.png"));
        assert!(p.exists(), "{} missing", p.display());
    }
    let mask = image::open(pred.join("00000_mask.png"))
        .unwrap()
        .into_luma8();
    assert_eq!(mask.dimensions(), (32, 32));
    assert!(mask.pixels().all(|p| p.0[0] < 4), "class indices only");

    let o = trainer(&[
        "predict",
        "--checkpoint",
        run.join("config.json").to_str().unwrap(),
        "--input",
        data.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
}

/// Every example config parses and trains (two steps on fewer samples).
#[test]
fn example_configs_run() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/trainer");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let out = tempfile::tempdir().unwrap();
        let o = trainer(&[
            "train",
            "--config",
            path.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--set",
            "train.steps=2",
            "--set",
            "data.shapes.samples=40",
            "--set",
            "train.batch_size=4",
        ]);
        assert!(o.status.success(), "{}: {}", path.display(), stderr(&o));
    }
    assert!(
        seen >= 1,
        "no example configs found in {}",
        examples.display()
    );
}

/// SIGTERM (what Kubernetes sends an evicted pod) ends the run after the
/// current step with a checkpoint of it, exit status 143; `--resume` then
/// continues with every step logged exactly once.
#[test]
fn sigterm_checkpoints_the_current_step_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let config = endless_job(dir.path());
    let run = dir.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
        .args(["train", "--config", &config, "--out", run.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let metrics = run.join("metrics.jsonl");
    // Metrics rows are buffered; wait until the run is clearly under way.
    while started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(300));
        if run.join("config.json").exists() && started.elapsed() > std::time::Duration::from_secs(2)
        {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let checkpoints: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "one checkpoint, of the step the run stopped at"
    );
    let stopped: u64 = checkpoints[0]
        .trim_start_matches("step-")
        .trim_end_matches(".safetensors")
        .parse()
        .unwrap();
    assert!(stopped > 0);

    let end = format!("train.steps={}", stopped + 5);
    let o = trainer(&[
        "train",
        "--config",
        &config,
        "--out",
        run.to_str().unwrap(),
        "--resume",
        "--set",
        &end,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=stopped + 5).collect::<Vec<_>>());
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

fn with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"));
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A wrong group environment is a clear error and a non-zero exit, never a hang.
#[test]
fn bad_group_environments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "job.yaml", "train: {steps: 1}\n");
    let out = dir.path().join("run");
    let args = [
        "train",
        "--config",
        &config,
        "--out",
        out.to_str().unwrap(),
        "--join-timeout",
        "1",
    ];
    let port = free_port();
    // A wrong env is permanent (exit 1); an absent rank 0 may yet appear (75).
    for (env, needle, code) in [
        (vec![("WORLD_SIZE", "0")], "WORLD_SIZE", 1),
        (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK", 1),
        (
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
                ("TRAINYARD_GROUP_SECRET", crate::util::SECRET),
            ],
            "could not reach the rendezvous store",
            75,
        ),
        // A group without the job's secret, or with a short one, is refused.
        (
            vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", &port)],
            "TRAINYARD_GROUP_SECRET is not set",
            1,
        ),
        (
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("TRAINYARD_GROUP_SECRET", "short"),
            ],
            "TRAINYARD_GROUP_SECRET",
            1,
        ),
    ] {
        let started = std::time::Instant::now();
        let o = with_env(&args, &env);
        assert_eq!(o.status.code(), Some(code), "{env:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{env:?}: {}", stderr(&o));
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }
}

/// When a rank dies, the others fail within the collective timeout with an
/// error naming a peer, and exit with the retryable code so the group is restarted.
#[test]
fn killing_a_rank_fails_the_others_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = endless_job(dir.path());
    let port = free_port();
    let spawn = |rank: &str| {
        let out = dir.path().join(format!("run{rank}"));
        Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
            .args([
                "train",
                "--config",
                &config,
                "--out",
                out.to_str().unwrap(),
                "--collective-timeout",
                "3",
            ])
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
                ("RUST_LOG", "warn"),
                ("TRAINYARD_GROUP_SECRET", crate::util::SECRET),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = spawn("0");
    let mut rank1 = spawn("1");
    // Let the group form and train a little (rank 0 writes config.json once joined).
    let started = std::time::Instant::now();
    while !dir.path().join("run0/config.json").exists()
        && started.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    rank1.kill().unwrap();
    let _ = rank1.wait();
    let killed = std::time::Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(trainyard_trainer::exit::RETRYABLE)),
        "rank 0 must fail with the retryable code: {err}"
    );
    assert!(
        err.contains("rank 1"),
        "the error names the dead peer: {err}"
    );
    assert!(
        killed.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        killed.elapsed()
    );
}

/// Asking for a GPU where there is none fails at once with the fix, never a
/// panic from inside a GPU runtime.
#[test]
fn cuda_without_a_gpu_fails_at_once_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = endless_job(dir.path());
    let out = dir.path().join("run");
    let started = std::time::Instant::now();
    let o = trainer(&[
        "train",
        "--config",
        &config,
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.device=cuda",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("train.device is cuda"), "{err}");
    assert!(err.contains("set train.device to cpu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

/// The children of `pid`, from procfs.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// One variable of a running process's environment.
fn env_of(pid: u32, key: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{key}=")).map(str::to_owned)
    })
}

/// `launch` of an endless two-process CPU job; returns the supervisor and its
/// two children once rank 0 has joined the group and started training.
fn launch_two(dir: &Path) -> (std::process::Child, Vec<u32>) {
    let config = endless_job(dir);
    let run = dir.join("run");
    let supervisor = Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--grace-seconds",
            "20",
            "--",
            "train",
            "--config",
            &config,
            "--out",
            run.to_str().unwrap(),
            "--collective-timeout",
            "3",
            "--threads",
            "1",
        ])
        .envs([
            ("MASTER_PORT", free_port().as_str()),
            ("RUST_LOG", "warn"),
            ("TRAINYARD_GROUP_SECRET", crate::util::SECRET),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !run.join("config.json").exists()
        && started.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let kids = children(supervisor.id());
    assert_eq!(kids.len(), 2, "one process per local rank");
    (supervisor, kids)
}

/// The supervisor starts one trainer per local rank with torchrun's
/// variables; when one dies the other is stopped and the pod exits with the
/// code that makes the operator restart the gang.
#[test]
fn launch_runs_one_rank_per_process_and_a_dead_one_stops_the_pod_with_75() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, kids) = launch_two(dir.path());
    let mut ranks: Vec<(String, String, String)> = kids
        .iter()
        .map(|&p| {
            (
                env_of(p, "RANK").unwrap(),
                env_of(p, "LOCAL_RANK").unwrap(),
                env_of(p, "WORLD_SIZE").unwrap(),
            )
        })
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        [
            ("0".into(), "0".into(), "2".into()),
            ("1".into(), "1".into(), "2".into())
        ]
    );
    let victim = kids
        .iter()
        .find(|&&p| env_of(p, "RANK").as_deref() == Some("1"))
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    let killed = std::time::Instant::now();
    let out = supervisor.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        killed.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        killed.elapsed()
    );
    assert!(
        kids.iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists()),
        "no child outlives the supervisor"
    );
}

/// SIGTERM to the supervisor reaches every rank: they checkpoint the same
/// step and the pod exits 143 (resumable).
#[test]
fn launch_forwards_sigterm_and_the_ranks_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, _) = launch_two(dir.path());
    Command::new("kill")
        .args(["-TERM", &supervisor.id().to_string()])
        .status()
        .unwrap();
    let out = supervisor.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    let checkpoints = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .unwrap()
        .count();
    assert_eq!(
        checkpoints, 1,
        "rank 0 wrote the step the group stopped at: {err}"
    );
}

/// The supervisor's own mistakes are named.
#[test]
fn launch_refuses_an_inconsistent_node() {
    let o = with_env(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "train",
            "--out",
            "/nonexistent",
        ],
        &[("WORLD_SIZE", "3")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("WORLD_SIZE"), "{}", stderr(&o));
}

/// What an outsider on the network can try against a job's rendezvous port
/// while rank 0 waits for rank 1: squat rank 1 with a guessed secret, speak
/// the old plain protocol (a JOIN, a flood of 1 MiB SETs), send garbage and
/// hold silent connections. None of it is served, and the real rank 1 joins
/// and the job trains to the end.
#[test]
fn outsiders_at_the_rendezvous_port_cannot_stop_a_two_rank_job() {
    use std::io::Write;
    use trainyard_trainer::collective::auth::{self, GroupKey, Purpose};
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "job.yaml",
        "model: {widths: [8, 16]}\n\
         data: {shapes: {samples: 64, image_size: 32}}\n\
         train: {steps: 12, batch_size: 4, validate_every: 0}\n\
         checkpoint: {every: 6}\n",
    );
    let port = free_port();
    let spawn = |rank: &str| {
        let out = dir.path().join(format!("run{rank}"));
        Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
            .args([
                "train",
                "--config",
                &config,
                "--out",
                out.to_str().unwrap(),
                "--threads",
                "1",
            ])
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_PORT", &port),
                ("RUST_LOG", "warn"),
                ("TRAINYARD_GROUP_SECRET", crate::util::SECRET),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = spawn("0");
    let addr = format!("127.0.0.1:{port}");
    let connect = || loop {
        if let Ok(s) = std::net::TcpStream::connect(&addr) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // A squatter for rank 1 with a guessed secret: refused.
    let guess = GroupKey::new("guessed-secret-123").unwrap();
    assert!(
        auth::connect(
            &mut connect(),
            &guess,
            Purpose::Store,
            &auth::claim(&[1, 2, 0])
        )
        .is_err()
    );
    // The old plain protocol: JOIN as rank 1, then SETs of 1 MiB each.
    let mut plain = connect();
    let frame = |v: &[u8]| [&(v.len() as u32).to_le_bytes()[..], v].concat();
    let mut join = vec![1u8];
    for v in [1u64, 2, 0] {
        join.extend(frame(&v.to_le_bytes()));
    }
    let _ = plain.write_all(&join);
    let mut flood = connect();
    let big = vec![7u8; 1 << 20];
    for i in 0..32 {
        let mut set = vec![2u8];
        set.extend(frame(format!("k{i}").as_bytes()));
        set.extend(frame(&big));
        if flood.write_all(&set).is_err() {
            break; // closed, as it should be
        }
    }
    let _ = connect().write_all(&[0x5A; 4096]);
    let silent: Vec<_> = (0..6).map(|_| connect()).collect();
    let rank1 = spawn("1");
    let (out0, out1) = (
        rank0.wait_with_output().unwrap(),
        rank1.wait_with_output().unwrap(),
    );
    let err0 = String::from_utf8_lossy(&out0.stderr);
    assert!(out0.status.success(), "rank 0: {err0}");
    assert!(
        out1.status.success(),
        "rank 1: {}",
        String::from_utf8_lossy(&out1.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run0/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (summary["steps"].as_u64(), summary["world_size"].as_u64()),
        (Some(12), Some(2))
    );
    assert!(
        err0.contains("rendezvous store closed a connection"),
        "{err0}"
    );
    drop(silent);
}

/// A truncated newest checkpoint (a node lost mid-write on a volume without
/// atomic rename, a disk fault) no longer fails the job for good: resume
/// takes the newest one that loads, says which it skipped and why, and the
/// run continues from there.
#[test]
fn resume_skips_a_truncated_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "job.yaml",
        "model: {widths: [8, 16]}\n\
         data: {shapes: {samples: 64, image_size: 32}}\n\
         train: {steps: 8, batch_size: 4, validate_every: 0}\n\
         checkpoint: {every: 4, keep_last: 3}\n",
    );
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let o = trainer(&["train", "--config", &config, "--out", run]);
    assert!(o.status.success(), "{}", stderr(&o));
    let newest = Path::new(run).join("checkpoints/step-00000008.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() - 100]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
        .args([
            "train",
            "--config",
            &config,
            "--out",
            run,
            "--resume",
            "--set",
            "train.steps=12",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("skipping a checkpoint") && err.contains("step-00000008"),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(run).join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["resumed_from"], 4);
    assert_eq!(summary["steps"], 12);
}

/// The peak memory of a process, from procfs.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A sampled client with its own valid token (or several) cannot make the
/// aggregator buffer more than one update each: bodies declared larger than
/// a valid update are refused unread, undeclared ones are cut off at that
/// size, a second update in flight from the same client is refused, and a
/// silent body holds nothing. Measured as the aggregator process's peak RSS
/// (VmHWM), against clients × 2 × the largest valid update + 32 MiB.
#[test]
fn hostile_clients_cannot_grow_the_aggregators_memory() {
    use std::io::{BufRead, BufReader, Read, Write};
    use trainyard_trainer::config::client_token;
    const SECRET: &str = "aggregator memory test secret";
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "fl.yaml",
        "model: {widths: [8, 16]}\n\
         data: {shapes: {samples: 64, image_size: 32}}\n\
         train: {batch_size: 4}\n\
         federated: {clients: 3, rounds: 1, min_clients: 3, min_available: 3}\n",
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agg = Command::new(env!("CARGO_BIN_EXE_trainyard-trainer"))
        .args([
            "aggregate",
            "--config",
            &config,
            "--out",
            dir.path().join("agg").to_str().unwrap(),
            "--bind",
            &addr,
            "--threads",
            "1",
        ])
        .envs([
            ("TRAINYARD_FEDERATION_SECRET", SECRET),
            ("RUST_LOG", "error"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let request = |head: String| -> std::net::TcpStream {
        let mut s = loop {
            if let Ok(s) = std::net::TcpStream::connect(&addr) {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s
    };
    let status_of = |s: &mut std::net::TcpStream| -> u16 {
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap_or(0);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let auth = |i: usize| format!("Bearer {}", client_token(SECRET, i));
    // Every client polls, so the round opens and samples all three.
    let pollers: Vec<_> = (0..3)
        .map(|i| {
            let mut s = request(format!(
                "GET /v1/federated/task?client={i} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
                auth(i)
            ));
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all);
                all
            })
        })
        .collect();
    for p in pollers {
        let got = p.join().unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        );
    }
    let baseline = vm_hwm_kib(agg.id());
    let post = |client: usize, framing: &str| {
        request(format!(
            "POST /v1/federated/update?client={client}&round=1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n{framing}\r\n",
            auth(client)
        ))
    };
    // Four updates of 256 MiB declared, from each client: refused unread.
    let declared: Vec<_> = (0..3)
        .flat_map(|c| (0..4).map(move |_| c))
        .map(|c| {
            let mut s = post(c, "Content-Length: 268435456\r\n");
            let _ = s.write_all(&vec![0u8; 1 << 20]);
            status_of(&mut s)
        })
        .collect();
    assert!(declared.iter().all(|&c| c == 413), "{declared:?}");
    // Undeclared (chunked) bodies streamed at once from every client: cut off.
    let chunk = [
        format!("{:x}\r\n", 1 << 20).into_bytes(),
        vec![7u8; 1 << 20],
        b"\r\n".to_vec(),
    ]
    .concat();
    let streams: Vec<_> = (0..3)
        .map(|c| {
            let chunk = chunk.clone();
            let mut s = post(c, "Transfer-Encoding: chunked\r\n");
            std::thread::spawn(move || {
                for _ in 0..64 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                status_of(&mut s)
            })
        })
        .collect();
    let cut: Vec<u16> = streams.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(cut.iter().all(|&c| c == 413 || c == 0), "{cut:?}");
    // A silent body holds its client's place: a second update from it is refused.
    let _silent = post(1, "Content-Length: 1000\r\n");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut second = post(1, "Content-Length: 10\r\n");
    let _ = second.write_all(&[0u8; 10]);
    assert_eq!(status_of(&mut second), 429);
    let peak = vm_hwm_kib(agg.id());
    let model = trainyard_trainer::model::SegNet::new(
        &trainyard_trainer::config::TrainerConfig::load(Path::new(&config), &[])
            .unwrap()
            .model,
        0,
        &burn::tensor::Device::flex(),
    );
    let update_kib = trainyard_trainer::federated::update::Schema::of(
        &trainyard_trainer::model::params::Layout::of(&model),
    )
    .max_update_bytes() as u64
        / 1024;
    let bound = baseline + 3 * 2 * update_kib + 32 * 1024;
    eprintln!(
        "aggregator VmHWM: {baseline} KiB before the attacks, {peak} KiB after; bound {bound} KiB (largest valid update {update_kib} KiB)"
    );
    agg.kill().unwrap();
    let _ = agg.wait();
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB above the bound {bound} KiB (baseline {baseline} KiB)"
    );
}
