//! End to end through the `trainyard` binary: validate, crd, and `local`
//! runs of real multi-process training (success, a killed worker, Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trainyard_trainer::run_dir::{RoundRow, Row, RunDir};

fn trainyard() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trainyard"))
}

/// The trainer binary cargo built beside ours (`cargo test --workspace`).
fn trainer() -> PathBuf {
    let path = trainyard().with_file_name("trainyard-trainer");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so the trainer is built",
        path.display()
    );
    path
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A small 2-worker job: seconds per run, checkpoints every 5 steps.
fn manifest(name: &str, steps: u64) -> String {
    format!(
        r#"apiVersion: trainyard.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  mode: Distributed
  image: trainer:test
  model: {{widths: [8, 16], classes: 4}}
  data: {{shapes: {{samples: 128, imageSize: 32, seed: 3}}, validationFraction: 0.125}}
  training:
    steps: {steps}
    batchSize: 4
    optimizer: {{type: AdamW, lr: 0.003}}
    schedule: {{warmupSteps: 2}}
    validateEvery: 0
    logEvery: 1
    threads: 1
  distributed: {{workers: 2, joinTimeoutSeconds: 60, collectiveTimeoutSeconds: 20}}
  checkpoints: {{intervalSteps: 5, keep: 2}}
  runPolicy: {{backoffLimit: 2, startupTimeoutSeconds: 120}}
"#
    )
}

fn write_manifest(dir: &Path, name: &str, steps: u64) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, manifest(name, steps)).unwrap();
    path
}

fn local(file: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(trainyard());
    cmd.arg("local")
        .arg(file)
        .arg("--out")
        .arg(out)
        .arg("--trainer")
        .arg(trainer())
        .arg("--grace-seconds")
        .arg("20")
        .arg("--no-progress");
    cmd
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn logs(out: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(out.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        all.push_str(&format!("--- {}\n", entry.path().display()));
        all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    all
}

fn explain(out: &Output, dir: &Path) -> String {
    format!(
        "status {:?}\nstderr:\n{}\nlogs:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        logs(dir)
    )
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pid_of(out: &Path, replica: &str) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(out.join("replicas.json")).ok()?;
    let records: serde_json::Value = serde_json::from_str(&text).ok()?;
    records.as_array()?.iter().find_map(|r| {
        (r["name"] == replica && r["state"] == "Running").then(|| {
            (
                r["pid"].as_i64().unwrap() as i32,
                r["attempt"].as_u64().unwrap(),
            )
        })
    })
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn a_two_worker_job_trains_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), "ok", 60);
    let out = dir.path().join("out");
    let result = local(&file, &out).output().unwrap();
    assert!(result.status.success(), "{}", explain(&result, &out));
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["restarts"], 0);
    assert_eq!(status["progress"]["step"], 60);
    assert_eq!(status["progress"]["totalSteps"], 60);
    assert_eq!(status["progress"]["summary"], "100% 60/60");
    assert_eq!(status["progress"]["lastCheckpoint"]["step"], 60);
    let running = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Running")
        .expect("a Running condition was recorded");
    assert_eq!(running["status"], "False");
    let summary = json(&out.join("replicas/ok-worker-0/summary.json"));
    assert_eq!(summary["world_size"], 2);
    assert_eq!(summary["steps"], 60);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("GangRunning"), "{stderr}");
    assert!(stderr.contains("Succeeded"), "{stderr}");
}

/// Starts `trainyard local` in the background and returns once rank 0 of
/// job `name` has written its first checkpoint.
fn start_until_checkpoint(file: &Path, out: &Path, name: &str) -> std::process::Child {
    let child = local(file, out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let checkpoints = out.join(format!("replicas/{name}-worker-0/checkpoints"));
    wait_for("a first checkpoint", Duration::from_secs(120), || {
        std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.next().is_some())
    });
    child
}

#[test]
fn a_killed_worker_restarts_the_gang_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), "kill", 300);
    let out = dir.path().join("out");
    let child = start_until_checkpoint(&file, &out, "kill");
    let (pid, attempt) = pid_of(&out, "kill-worker-1").expect("worker 1 runs");
    assert_eq!(attempt, 0);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", explain(&result, &out));
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["restarts"], 1);
    assert_eq!(status["attempt"], 1);
    let summary = json(&out.join("replicas/kill-worker-0/summary.json"));
    let resumed = summary["resumed_from"]
        .as_u64()
        .expect("the second attempt resumed");
    assert!(
        resumed >= 5 && resumed.is_multiple_of(5),
        "resumed from step {resumed}"
    );
    assert_eq!(summary["steps"], 300);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("kill-worker-1 exited with code 137 (SIGKILL)"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_stops_every_replica_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), "intr", 5000);
    let out = dir.path().join("out");
    let child = start_until_checkpoint(&file, &out, "intr");
    let checkpoints = out.join("replicas/intr-worker-0/checkpoints");
    let pids: Vec<i32> = ["intr-worker-0", "intr-worker-1"]
        .iter()
        .map(|r| pid_of(&out, r).expect("running").0)
        .collect();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let result = child.wait_with_output().unwrap();
    assert_eq!(
        result.status.code(),
        Some(130),
        "{}",
        explain(&result, &out)
    );
    for pid in pids {
        assert!(!alive(pid), "replica {pid} outlived trainyard local");
    }
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Suspended");
    assert_eq!(status["reason"], "Interrupted");
    // The interrupted trainers checkpointed on SIGTERM; shorten the job and rerun.
    let newest = std::fs::read_dir(&checkpoints)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    std::fs::write(&file, manifest("intr", newest + 10)).unwrap();
    let result = local(&file, &out).output().unwrap();
    assert!(result.status.success(), "{}", explain(&result, &out));
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["restarts"], 0, "an interruption is not a failure");
    assert_eq!(status["attempt"], 1);
    let summary = json(&out.join("replicas/intr-worker-0/summary.json"));
    assert_eq!(summary["resumed_from"].as_u64(), Some(newest));
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        manifest("bad", 10)
            .replace("workers: 2", "workers: 0")
            .replace("batchSize: 4", "batchSize: 4\n    epochs: 2"),
    )
    .unwrap();
    let out = Command::new(trainyard())
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("spec.distributed.workers: "), "{stdout}");
    let file2 = dir.path().join("bad2.yaml");
    std::fs::write(
        &file2,
        manifest("bad", 10).replace("steps: 10", "steps: 10\n    epochs: 2"),
    )
    .unwrap();
    let out = Command::new(trainyard())
        .arg("validate")
        .arg(&file2)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("spec.training: set at most one of training.steps and training.epochs"),
        "{stdout}"
    );
    // A run refuses an invalid manifest before starting anything.
    let run = local(&file, &dir.path().join("never")).output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(!dir.path().join("never").exists());
}

#[test]
fn every_example_manifest_validates_and_crd_prints_the_chart_copy() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(trainyard())
                .arg("validate")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            );
            seen += 1;
        }
    }
    assert!(seen >= 1, "no manifests in examples/");
    let out = Command::new(trainyard()).arg("crd").output().unwrap();
    let chart = std::fs::read_to_string(repo().join(trainyard::api::crd::CHART_PATH)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), chart);
}

/// The README's first command, on the example exactly as shipped.
#[test]
fn the_distributed_example_runs_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = local(&repo().join("examples/distributed-shapes.yaml"), &out)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", explain(&result, &out));
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Succeeded");
    let summary = json(&out.join("replicas/shapes-ddp-worker-0/summary.json"));
    assert_eq!(summary["world_size"], 2);
    let miou = summary["val_miou"].as_f64().unwrap();
    assert!(miou > 0.85, "validation mIoU {miou}");

    // The PEFT example fine-tunes that very base on shifted data: only the
    // base path differs from the file as shipped.
    let ck = out.join("replicas/shapes-ddp-worker-0/checkpoints/step-00000750.safetensors");
    assert!(
        ck.is_file(),
        "the base the PEFT example names: {}",
        ck.display()
    );
    let manifest = std::fs::read_to_string(repo().join("examples/peft-shapes.yaml"))
        .unwrap()
        .replace(
            "runs/shapes-ddp/replicas/shapes-ddp-worker-0/checkpoints/step-00000750.safetensors",
            ck.to_str().unwrap(),
        );
    let file = dir.path().join("peft-shapes.yaml");
    std::fs::write(&file, manifest).unwrap();
    let peft_out = dir.path().join("peft");
    let result = local(&file, &peft_out).output().unwrap();
    assert!(result.status.success(), "{}", explain(&result, &peft_out));
    let run = peft_out.join("replicas/shapes-peft-worker-0");
    let summary = json(&run.join("summary.json"));
    let (base, adapted) = (
        summary["base_val_miou"].as_f64().unwrap(),
        summary["val_miou"].as_f64().unwrap(),
    );
    assert!(
        adapted > base + 0.01,
        "shifted data: base mIoU {base} → adapted {adapted}"
    );
    let (trainable, all) = (
        summary["parameters"].as_u64().unwrap(),
        summary["model_values"].as_u64().unwrap(),
    );
    assert!(trainable * 5 < all, "trainable {trainable} of {all}");
    let adapter_bytes = summary["adapter_bytes"].as_u64().unwrap();
    let full_bytes = std::fs::metadata(&ck).unwrap().len();
    assert!(
        adapter_bytes * 3 < full_bytes,
        "adapter {adapter_bytes} B vs full {full_bytes} B"
    );
    assert!(run.join("adapter/adapter_config.json").is_file());
    eprintln!(
        "PEFT example: base mIoU {base:.3} -> adapted {adapted:.3}; trainable {trainable} of {all} values ({:.1}%); adapter {adapter_bytes} B vs full checkpoint {full_bytes} B",
        100.0 * trainable as f64 / all as f64
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET /metrics` on 127.0.0.1:`port`, if it answers 200.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the first sample whose line starts with `series`.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// promtool from $PROMTOOL or PATH. CI must have it (`.ci/run` installs it);
/// elsewhere its absence skips only the promtool half of a test.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PROMTOOL").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide promtool (scripts/promtool installs it; set PROMTOOL)"
        );
        eprintln!(
            "promtool not found: skipping `promtool check metrics` (scripts/promtool installs it)"
        );
    }
    found
}

/// Real scrapes, mid-run, of the job metrics (`--metrics-addr`) and of rank
/// 0's trainer (`--trainer-metrics-addr`): both carry the live step, and both
/// pass `promtool check metrics` (names, types, help, units).
#[test]
fn a_local_run_serves_job_and_trainer_metrics_that_promtool_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_manifest(dir.path(), "scraped", 150);
    let out = dir.path().join("out");
    let (job_port, trainer_port) = (free_port(), free_port());
    let run = local(&file, &out)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{job_port}"))
        .arg("--trainer-metrics-addr")
        .arg(format!("127.0.0.1:{trainer_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut job, mut trainer) = (String::new(), String::new());
    wait_for(
        "both endpoints to show training steps",
        Duration::from_secs(120),
        || {
            job = scrape(job_port).unwrap_or_default();
            trainer = scrape(trainer_port).unwrap_or_default();
            sample(&job, r#"trainyard_job_step{job_name="scraped""#).is_some_and(|s| s >= 1.0)
                && sample(&trainer, "trainyard_trainer_step ").is_some_and(|s| s >= 1.0)
        },
    );
    let output = run.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", explain(&output, &out));
    assert_eq!(
        sample(
            &job,
            r#"trainyard_jobs{mode="Distributed",phase="Running"}"#
        ),
        Some(1.0),
        "{job}"
    );
    assert_eq!(
        sample(&job, "trainyard_jobs_created_total{"),
        Some(1.0),
        "{job}"
    );
    let Some(promtool) = promtool() else { return };
    for (what, exposition) in [("job", &job), ("trainer", &trainer)] {
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(exposition.as_bytes())
            .unwrap();
        let result = check.wait_with_output().unwrap();
        assert!(
            result.status.success(),
            "promtool check metrics on the {what} scrape:\n{}{}\n--- scrape:\n{exposition}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}

/// The federated example as shipped: five clients on a non-IID split, FedAvg.
/// One client is killed mid-training; it is restarted alone, the job still
/// succeeds, and the global model's validation mIoU improves over the rounds.
#[test]
fn the_federated_example_survives_a_killed_client_and_improves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let child = local(&repo().join("examples/federated-shapes.yaml"), &out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rounds = out.join("replicas/shapes-fl-aggregator-0/metrics.jsonl");
    wait_for("round 2", Duration::from_secs(180), || {
        std::fs::read_to_string(&rounds).is_ok_and(|t| t.lines().count() >= 2)
    });
    let (pid, _) = pid_of(&out, "shapes-fl-client-3").expect("client 3 runs");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", explain(&result, &out));
    let status = json(&out.join("status.json"));
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["restarts"], 1);
    assert_eq!(status["progress"]["round"], 12);
    assert_eq!(status["progress"]["totalRounds"], 12);
    assert!(status["progress"]["participants"].as_u64().unwrap() >= 3);
    assert_eq!(status["progress"]["updatesRejected"], 0);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("ReplicaRestarted"), "{stderr}");
    // Progress is counted in rounds, as the aggregator posted it.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("progress "))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.contains("/12 rounds ")),
        "{lines:?}"
    );
    // The aggregator's rows, read through the trainer's own row types.
    let rows: Vec<RoundRow> = RunDir::at(rounds.parent().unwrap())
        .rows()
        .unwrap()
        .into_iter()
        .filter_map(Row::round)
        .collect();
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.participants >= 3));
    let miou: Vec<f64> = rows.iter().filter_map(|r| r.val_miou).collect();
    let (first, last) = (miou[0], *miou.last().unwrap());
    assert!(last > first + 0.03, "validation mIoU {first} → {last}");
    let summary = json(&out.join("replicas/shapes-fl-aggregator-0/summary.json"));
    assert_eq!(summary["rounds"], 12);
    assert_eq!(summary["updates_rejected"], serde_json::json!({}));
    // The restarted client trained again after rejoining.
    let client = json(&out.join("replicas/shapes-fl-client-3/summary.json"));
    assert!(client["rounds"].as_u64().unwrap() >= 1, "{client}");
}

/// One runner per output directory, and no replica outlives its runner: a
/// second `trainyard local` on a running `--out` is refused naming the first
/// one's pid, and SIGKILL of the runner (which gets no chance to stop
/// anything) takes its replicas with it.
#[test]
fn one_runner_per_out_and_replicas_die_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), "lock", 1_000_000);
    let out = dir.path().join("out");
    let mut runner = local(&manifest, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    wait_for("both workers", Duration::from_secs(60), || {
        pids = ["lock-worker-0", "lock-worker-1"]
            .iter()
            .filter_map(|r| pid_of(&out, r).map(|(pid, _)| pid))
            .collect();
        pids.len() == 2
    });
    let second = local(&manifest, &out).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains(&format!("pid {}", runner.id())), "{err}");
    assert!(
        pids.iter().all(|&p| alive(p)),
        "the second runner touched nothing"
    );
    kill(Pid::from_raw(runner.id() as i32), Signal::SIGKILL).unwrap();
    runner.wait().unwrap();
    wait_for(
        "the replicas to die with the runner",
        Duration::from_secs(10),
        || pids.iter().all(|&p| !alive(p)),
    );
}
