//! End-to-end training runs on small synthetic data.

use trainyard_trainer::checkpoint::{Checkpoint, CheckpointDir};
use trainyard_trainer::eval::metrics::Confusion;
use trainyard_trainer::run_dir::RunDirError;
use trainyard_trainer::train::{RunOptions, Setup, TrainError, train};

use crate::util::{tiny_config, train_rows, val_rows};

fn opts(dir: &std::path::Path, resume: bool) -> RunOptions {
    RunOptions {
        out_dir: dir.to_owned(),
        resume,
        ..Default::default()
    }
}

/// What predicting background everywhere scores on the validation split:
/// IoU(background) = background share, IoU = 0 for every other class present.
fn background_only_miou(config: &trainyard_trainer::config::TrainerConfig) -> f64 {
    let setup = Setup::new(config).unwrap();
    let mut confusion = Confusion::new(config.model.classes);
    for &i in &setup.split.val {
        let s = setup.dataset.get(i);
        confusion.add(&s.mask, &vec![0; s.mask.len()]);
    }
    confusion.scores().miou
}

/// The CI learning check: a short run must halve the loss and lift mIoU well
/// above what predicting background everywhere scores.
#[test]
fn short_run_learns_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&[
        "model.widths=[16, 32]",
        "data.shapes.samples=400",
        "data.shapes.max_shapes=3",
        "data.validation_fraction=0.1",
        "train.batch_size=8",
        "train.steps=300",
        "train.warmup_steps=10",
        "train.lr=0.005",
        "train.class_weights=[0.3, 1, 1, 1]",
        "train.validate_every=0",
        "checkpoint.every=0",
    ]);
    let summary = train(&config, &opts(dir.path(), false)).unwrap();
    let rows = train_rows(dir.path());
    let mean = |r: &[trainyard_trainer::run_dir::TrainRow]| {
        r.iter().map(|v| v.loss).sum::<f64>() / r.len() as f64
    };
    let (first, last) = (mean(&rows[..10]), mean(&rows[rows.len() - 10..]));
    assert!(last < 0.5 * first, "loss fell from {first:.3} to {last:.3}");
    let miou = summary.val_miou.unwrap();
    let baseline = background_only_miou(&config);
    assert!(
        miou > baseline * 1.4,
        "val mIoU {miou:.3} vs background-only {baseline:.3}"
    );
    assert!(summary.samples_per_sec > 0.0 && summary.peak_rss_bytes.unwrap() > 0);
    eprintln!(
        "short run: loss {first:.3} -> {last:.3}, val mIoU {miou:.3} (background-only {baseline:.3})"
    );
}

/// A copy of a finished run as a crash right after the checkpoint of `step`
/// leaves it: later checkpoints are gone, but the metrics rows written after
/// `step` are still in the file.
fn crashed_copy(full: &std::path::Path, step: u64) -> tempfile::TempDir {
    let crashed = tempfile::tempdir().unwrap();
    for entry in ["config.json", "metrics.jsonl"] {
        std::fs::copy(full.join(entry), crashed.path().join(entry)).unwrap();
    }
    let src = CheckpointDir::new(full.join("checkpoints"));
    let dst = CheckpointDir::new(crashed.path().join("checkpoints"));
    std::fs::create_dir_all(crashed.path().join("checkpoints")).unwrap();
    std::fs::copy(src.path_for(step), dst.path_for(step)).unwrap();
    crashed
}

/// Resuming replays the uninterrupted run step for step: same losses, learning
/// rates and gradient norms, same final weights, BN statistics and optimiser state.
fn assert_resume_is_exact(extra: &[&str], crash_at: u64) {
    let config = tiny_config(extra);
    let full = tempfile::tempdir().unwrap();
    train(&config, &opts(full.path(), false)).unwrap();
    let crashed = crashed_copy(full.path(), crash_at);
    let summary = train(&config, &opts(crashed.path(), true)).unwrap();
    assert_eq!(summary.resumed_from, Some(crash_at));
    assert_eq!(train_rows(crashed.path()), train_rows(full.path()));
    let last = config.train.steps;
    let a = Checkpoint::load(&CheckpointDir::new(full.path().join("checkpoints")).path_for(last))
        .unwrap();
    let b =
        Checkpoint::load(&CheckpointDir::new(crashed.path().join("checkpoints")).path_for(last))
            .unwrap();
    // Compared by name, so a failure names the tensor instead of printing it.
    for ((name, x), (other, y)) in a.model.iter().zip(&b.model) {
        assert_eq!(name, other);
        assert!(x == y, "tensor {name} differs after resuming");
    }
    for ((name, x), (_, y)) in a.optimizer_state.iter().zip(&b.optimizer_state) {
        assert!(x == y, "optimizer state {name} differs after resuming");
    }
}

#[test]
fn adamw_resume_with_input_noise_is_exact() {
    assert_resume_is_exact(&["data.noise={sigma: 0.2, probability: 0.5}"], 3);
}

#[test]
fn sgd_nesterov_resume_is_exact() {
    assert_resume_is_exact(
        &[
            "train.optimizer={kind: sgd, momentum: 0.9, nesterov: true}",
            "train.steps=4",
            "checkpoint.every=2",
        ],
        2,
    );
}

#[test]
fn an_existing_run_is_not_overwritten_and_mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&["train.steps=3"]);
    train(&config, &opts(dir.path(), false)).unwrap();

    let again = train(&config, &opts(dir.path(), false)).unwrap_err();
    assert!(
        matches!(again, TrainError::RunDir(RunDirError::Exists { .. })),
        "{again}"
    );
    assert!(again.to_string().contains("--resume"));

    let wider = tiny_config(&["train.steps=6", "model.widths=[8, 32]"]);
    let e = train(&wider, &opts(dir.path(), true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("step-00000003.safetensors") && e.contains("shape"),
        "{e}"
    );

    let sgd = tiny_config(&["train.steps=6", "train.optimizer.kind=sgd"]);
    let e = train(&sgd, &opts(dir.path(), true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer"), "{e}");

    let ck = CheckpointDir::new(dir.path().join("checkpoints")).path_for(3);
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let e = train(&tiny_config(&["train.steps=6"]), &opts(dir.path(), true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("step-00000003.safetensors") && e.contains("corrupt"),
        "{e}"
    );
}

/// Resuming a run that already finished changes nothing and still reports
/// its last loss and validation scores.
#[test]
fn resuming_a_finished_run_reports_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(&["train.steps=3"]);
    let first = train(&config, &opts(dir.path(), false)).unwrap();
    let again = train(&config, &opts(dir.path(), true)).unwrap();
    assert_eq!(again.resumed_from, Some(3));
    assert_eq!(again.final_loss, first.final_loss);
    assert_eq!(again.val_miou, first.val_miou);
    assert_eq!(train_rows(dir.path()).len(), 3, "no step is logged twice");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Trains `world` ranks as threads of this process; returns rank 0's run directory.
fn train_group(
    config: &trainyard_trainer::config::TrainerConfig,
    world: usize,
) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let others: Vec<tempfile::TempDir> = (1..world).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut dirs = vec![root.path().to_owned()];
    dirs.extend(others.iter().map(|d| d.path().to_owned()));
    train_group_in(config, &dirs, false);
    // Only rank 0 writes outputs.
    for d in &others {
        assert!(
            std::fs::read_dir(d.path()).unwrap().next().is_none(),
            "rank > 0 wrote files"
        );
    }
    root
}

/// Trains one rank per directory in `dirs` (rank 0 first) as threads.
fn train_group_in(
    config: &trainyard_trainer::config::TrainerConfig,
    dirs: &[std::path::PathBuf],
    resume: bool,
) {
    use trainyard_trainer::collective::DistEnv;
    let world = dirs.len();
    let port = free_port().to_string();
    let handles: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(rank, out)| {
            let (config, port, out) = (config.clone(), port.clone(), out.clone());
            std::thread::spawn(move || {
                let vars = [
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", world.to_string()),
                    ("MASTER_PORT", port),
                    ("TRAINYARD_GROUP_SECRET", crate::util::SECRET.to_string()),
                ];
                let dist = DistEnv::from_lookup(|k| {
                    vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
                })
                .unwrap();
                let opts = RunOptions {
                    out_dir: out,
                    resume,
                    dist: Some(dist),
                    ..Default::default()
                };
                train(&config, &opts).unwrap()
            })
        })
        .collect();
    let summaries: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        summaries
            .iter()
            .all(|s| s.world_size == world && s.bytes_communicated > 0)
    );
}

fn final_model(dir: &std::path::Path, step: u64) -> Vec<(String, Vec<f32>)> {
    let ck = Checkpoint::load(&CheckpointDir::new(dir.join("checkpoints")).path_for(step)).unwrap();
    ck.model.into_iter().map(|(n, t)| (n, t.values)).collect()
}

/// Data-parallel training over N ranks takes exactly the steps of one process
/// accumulating N micro-batches: the same samples per micro-batch, batch norm
/// over each micro-batch, the mean gradient. Two ranks sum in the same order
/// as accumulation, so they agree bit for bit; with four, the ring's summation
/// order differs from the sequential one, so they agree to rounding. AdamW
/// divides by √v, which magnifies rounding in near-zero gradients, so the bound
/// is absolute: 1e-6 (measured: 1.1e-7), under 0.01% of the 0.012 a weight
/// can move in 4 steps at lr 0.003. Weight noise is drawn per step, the same
/// on every rank and for every micro-batch, so it keeps the equality. The
/// task weights are learned, and their log-variances are averaged with the
/// rest.
#[test]
fn data_parallel_equals_accumulating_the_same_micro_batches() {
    for (world, tolerance) in [(2usize, 0.0f32), (4, 1e-6)] {
        let group_config = tiny_config(&[
            "train.steps=4",
            "checkpoint.every=0",
            "data.noise={sigma: 0.1, probability: 0.5}",
            "train.weight_noise={sigma: 0.1}",
            "model.boundary_head=true",
            "model.task_weighting=uncertainty",
        ]);
        let mut single = group_config.clone();
        single.train.accumulate_steps = world as u64;
        let alone = tempfile::tempdir().unwrap();
        train(&single, &opts(alone.path(), false)).unwrap();
        let group = train_group(&group_config, world);
        let (a, b) = (final_model(alone.path(), 4), final_model(group.path(), 4));
        let log_vars = a.iter().find(|(n, _)| n == "task_weights.log_vars");
        assert!(
            log_vars.is_some_and(|(_, s)| s.iter().all(|v| *v != 0.0)),
            "the log-variances are trained: {log_vars:?}"
        );
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            if name.contains("running_") {
                continue; // averaged across ranks vs updated per micro-batch: see train()
            }
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= tolerance,
                "world {world}: {name} differs by {worst:e}"
            );
        }
    }
}

/// Local SGD that averages parameters after every step is synchronous SGD:
/// with plain SGD, mean(p − lr·g_r) = p − lr·mean(g_r) up to rounding.
#[test]
fn local_sgd_every_step_equals_synchronous_training() {
    let base = [
        "train.steps=3",
        "checkpoint.every=0",
        "train.optimizer={kind: sgd, momentum: 0}",
        "train.grad_clip_norm=null",
    ];
    let synchronous = train_group(&tiny_config(&base), 2);
    let mut local = base.to_vec();
    local.push("train.local_sgd={every: 1}");
    let local = train_group(&tiny_config(&local), 2);
    for ((name, x), (_, y)) in final_model(synchronous.path(), 3)
        .iter()
        .zip(&final_model(local.path(), 3))
    {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{name} differs by {worst:e}");
    }
}

/// DiLoCo-style local SGD (outer Nesterov momentum) trains across ranks, and
/// its outer momentum is checkpointed: resuming replays the run exactly.
#[test]
fn diloco_trains_and_resumes_exactly() {
    let extra = [
        "train.local_sgd={every: 2, outer: {lr: 0.7, momentum: 0.9}}",
        "checkpoint.every=2",
    ];
    let group = train_group(&tiny_config(&extra), 2);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(group.path().join("summary.json")).unwrap()).unwrap();
    assert!(summary["final_loss"].as_f64().unwrap().is_finite());
    assert_resume_is_exact(&extra, 2);
}

/// bf16 gradient compression halves the gradient bytes and still trains.
#[test]
fn compressed_gradients_halve_the_traffic_and_train() {
    let extra = ["train.steps=3", "checkpoint.every=0"];
    let full = train_group(&tiny_config(&extra), 2);
    let mut compressed = extra.to_vec();
    compressed.push("train.compression=bf16");
    let half = train_group(&tiny_config(&compressed), 2);
    let read = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(full.path()), read(half.path()));
    let (bytes_full, bytes_half) = (
        a["bytes_communicated"].as_u64().unwrap(),
        b["bytes_communicated"].as_u64().unwrap(),
    );
    assert!(
        bytes_half < bytes_full * 6 / 10,
        "{bytes_half} vs {bytes_full}"
    );
    assert!(b["final_loss"].as_f64().unwrap().is_finite());
    // One bf16 rounding of each gradient barely moves the first steps.
    let (la, lb) = (
        a["final_loss"].as_f64().unwrap(),
        b["final_loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() < 0.05 * la.abs(), "{la} vs {lb}");
}

/// Small buckets change how many all-reduces run, not the result: with two
/// ranks each element is still one exact a + b.
#[test]
fn gradient_buckets_do_not_change_the_result() {
    let whole = train_group(&tiny_config(&["train.steps=2", "checkpoint.every=0"]), 2);
    let buckets = train_group(
        &tiny_config(&[
            "train.steps=2",
            "checkpoint.every=0",
            "train.bucket_mib=0.004",
        ]),
        2,
    );
    assert_eq!(final_model(whole.path(), 2), final_model(buckets.path(), 2));
}

/// Top-k with every entry kept is the plain average (same sums, same order
/// for two ranks); a small ratio cuts the traffic and still trains.
#[test]
fn topk_keeping_everything_equals_plain_averaging_and_small_ratios_train() {
    let base = ["train.steps=2", "checkpoint.every=0"];
    let plain = train_group(&tiny_config(&base), 2);
    let mut all = base.to_vec();
    all.push("train.topk={ratio: 1.0}");
    let all = train_group(&tiny_config(&all), 2);
    assert_eq!(final_model(plain.path(), 2), final_model(all.path(), 2));

    let mut sparse = base.to_vec();
    sparse.push("train.topk={ratio: 0.05}");
    let sparse = train_group(&tiny_config(&sparse), 2);
    let read = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap()
    };
    let (p, s) = (read(plain.path()), read(sparse.path()));
    assert!(
        s["bytes_communicated"].as_u64().unwrap() < p["bytes_communicated"].as_u64().unwrap() / 3
    );
    assert!(s["final_loss"].as_f64().unwrap().is_finite());
}

/// A data-parallel run resumed from rank 0's checkpoint (the other ranks have
/// none: they adopt rank 0's state) continues exactly like the uninterrupted
/// run.
#[test]
fn data_parallel_resume_is_exact() {
    let config = tiny_config(&["train.steps=4", "checkpoint.every=2"]);
    let full = train_group(&config, 2);
    let crashed = crashed_copy(full.path(), 2);
    let other = tempfile::tempdir().unwrap();
    train_group_in(
        &config,
        &[crashed.path().to_owned(), other.path().to_owned()],
        true,
    );
    assert_eq!(train_rows(crashed.path()), train_rows(full.path()));
    assert_eq!(final_model(crashed.path(), 4), final_model(full.path(), 4));
}

/// Ranks validate disjoint shards and sum their counts exactly: the reported
/// scores equal scoring the whole split with the final model in one process.
#[test]
fn sharded_validation_equals_scoring_the_whole_split() {
    let config = tiny_config(&[
        "train.steps=3",
        "checkpoint.every=0",
        "model.boundary_head=true",
    ]);
    let run = train_group(&config, 3);
    let rows: Vec<_> = val_rows(run.path()).into_iter().map(|v| v.report).collect();
    let last = rows.last().expect("a validation row at the last step");
    let predictor = trainyard_trainer::infer::Predictor::load(
        &CheckpointDir::new(run.path().join("checkpoints")).path_for(3),
    )
    .unwrap();
    let setup = Setup::new(&config).unwrap();
    let whole = trainyard_trainer::eval::evaluate(
        &predictor,
        setup.dataset.as_ref(),
        &setup.split.val,
        4,
        None,
    );
    assert_eq!(last.samples, setup.split.val.len());
    assert_eq!(last.scores.miou, whole.scores.miou);
    assert_eq!(last.scores.pixel_accuracy, whole.scores.pixel_accuracy);
    assert!(last.boundary_f1.is_some());
    assert_eq!(last.boundary_f1, whole.boundary_f1);
    // IoU sums are f64 and add up in another order across shards.
    let (ours, theirs) = (
        last.panoptic.as_ref().unwrap().pq,
        whole.panoptic.unwrap().pq,
    );
    assert!((ours - theirs).abs() < 1e-12, "{ours} vs {theirs}");
}

/// Fine-tuning a base on shifted data (under weight noise) trains only the
/// adapter and the saved head: the rest of the base is bit-identical
/// afterwards, the optimiser holds state for the adapter alone, and the
/// adapter written in PEFT's format reproduces the fine-tuned model on top of
/// the base.
#[test]
fn fine_tuning_trains_only_the_adapter_and_writes_it_in_peft_format() {
    use burn::tensor::{Device, Tensor, TensorData};
    use trainyard_trainer::model::params::Layout;
    use trainyard_trainer::peft::{adapter, base};

    let dir = tempfile::tempdir().unwrap();
    let base_config = tiny_config(&[]);
    train(&base_config, &opts(&dir.path().join("base"), false)).unwrap();
    let base_ck = CheckpointDir::new(dir.path().join("base/checkpoints"))
        .latest()
        .unwrap()
        .unwrap();

    let run = dir.path().join("ft");
    let peft = format!(
        "peft={{base: '{}', r: 2, lora_alpha: 4, target_modules: [conv], modules_to_save: [head]}}",
        base_ck.display()
    );
    // Under weight noise, so the test also shows that noise on the frozen
    // base's weights leaves them frozen (the draw multiplies copies).
    let ft_config = tiny_config(&[
        "data.shapes.seed=99",
        &peft,
        "train.weight_noise={sigma: 0.1}",
    ]);
    let summary = train(&ft_config, &opts(&run, false)).unwrap();

    let tuned = Checkpoint::load(
        &CheckpointDir::new(run.join("checkpoints"))
            .latest()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let original = Checkpoint::load(&base_ck).unwrap();
    let trained: usize = tuned
        .model
        .iter()
        .filter(|(n, _)| n.contains(".lora_") || n.starts_with("head."))
        .map(|(_, t)| t.values.len())
        .sum();
    assert_eq!(
        summary.parameters, trained,
        "only adapters and the head are trained"
    );
    assert!(
        summary.parameters * 4 < summary.model_values,
        "{} of {}",
        summary.parameters,
        summary.model_values
    );
    let adam_slots: usize = tuned.optimizer_state.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(
        adam_slots,
        2 * trained,
        "optimiser state only for what is trained"
    );
    for (name, t) in &original.model {
        let now = &tuned.tensor(name).unwrap().values;
        if name.starts_with("head.") {
            assert_ne!(now, &t.values, "{name} is trained");
        } else if !name.contains("running_") {
            assert_eq!(now, &t.values, "{name} is frozen");
        }
    }

    // Base + the PEFT-format adapter = the fine-tuned model.
    let adapter_dir = summary.adapter.clone().expect("an adapter is written");
    assert!(summary.adapter_bytes.unwrap() > 0);
    let device = Device::flex();
    let x = Tensor::<4>::from_data(
        TensorData::new(vec![0.25f32; 2 * 3 * 32 * 32], [2, 3, 32, 32]),
        &device,
    );
    let (with_adapter, _) = adapter::load(
        &adapter_dir,
        base::load_base(&base_ck, &ft_config, &device).unwrap(),
        &device,
    )
    .unwrap();
    // The fine-tuned checkpoint's running statistics moved with the new data;
    // the adapter does not carry them, so compare on the adapted base alone.
    let layout = Layout::of(&with_adapter);
    assert!(
        layout
            .entries
            .iter()
            .any(|e| e.name.ends_with("lora_a.weight"))
    );
    let tuned_net = {
        let mut net = with_adapter.clone();
        let by_name: std::collections::HashMap<&str, &trainyard_trainer::tensorfile::NamedTensor> =
            tuned
                .model
                .iter()
                .filter(|(n, _)| !n.contains("running_"))
                .map(|(n, t)| (n.as_str(), t))
                .collect();
        let all = trainyard_trainer::model::params::named_values(&net);
        let values: Vec<trainyard_trainer::tensorfile::NamedTensor> = all
            .iter()
            .map(|(e, v)| {
                by_name.get(e.name.as_str()).map_or(
                    trainyard_trainer::tensorfile::NamedTensor {
                        shape: e.shape.clone(),
                        values: v.clone(),
                    },
                    |t| (*t).clone(),
                )
            })
            .collect();
        let named: std::collections::HashMap<String, trainyard_trainer::tensorfile::NamedTensor> =
            all.iter()
                .map(|(e, _)| e.name.clone())
                .zip(values)
                .collect();
        net = trainyard_trainer::model::params::load_named(net, |n| named.get(n), &device).unwrap();
        net
    };
    let a: Vec<f32> = with_adapter
        .forward(x.clone())
        .logits
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let b: Vec<f32> = tuned_net
        .forward(x)
        .logits
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    assert_eq!(a, b);
}

/// Weight noise of σ = 0 multiplies every weight by exactly one on the way to
/// the forward pass: if the gradients did not reach the clean weights through
/// that product, or BN statistics were kept by the noisy copy, the runs differ.
#[test]
fn zero_weight_noise_trains_bit_for_bit_as_without_it() {
    let plain = tiny_config(&["train.steps=3", "checkpoint.every=0"]);
    let zero = tiny_config(&[
        "train.steps=3",
        "checkpoint.every=0",
        "train.weight_noise={sigma: 0}",
    ]);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&plain, &opts(a.path(), false)).unwrap();
    train(&zero, &opts(b.path(), false)).unwrap();
    assert_eq!(train_rows(a.path()), train_rows(b.path()));
    for ((name, x), (_, y)) in final_model(a.path(), 3)
        .iter()
        .zip(&final_model(b.path(), 3))
    {
        assert!(x == y, "{name} differs with zero weight noise");
    }
}

/// The weight noise is a function of (seed, step): a resumed run draws what
/// the uninterrupted one drew. Validation under noise is labelled with it.
#[test]
fn resume_under_weight_noise_is_exact_and_validation_names_its_noise() {
    let noise = "train.validation_noise={input_sigma: 0.2, weight_sigma: 0.1, seed: 4}";
    assert_resume_is_exact(&["train.weight_noise={sigma: 0.2}", noise], 3);
    let config = tiny_config(&["train.steps=3", "checkpoint.every=0", noise]);
    let run = tempfile::tempdir().unwrap();
    train(&config, &opts(run.path(), false)).unwrap();
    let rows = val_rows(run.path());
    assert!(!rows.is_empty());
    for r in rows {
        assert_eq!(r.report.noise, config.train.validation_noise);
    }
}

/// Scoring under noise is reproducible, does not depend on how the samples
/// are batched or sharded, and is not the clean score.
#[test]
fn scores_under_noise_are_reproducible_and_independent_of_sharding() {
    use trainyard_trainer::config::EvalNoise;
    use trainyard_trainer::eval;
    // A model that has learnt something, so its predictions are not one class
    // everywhere and noise can change them.
    let config = tiny_config(&["model.boundary_head=true", "checkpoint.every=0"]);
    let run = tempfile::tempdir().unwrap();
    train(&config, &opts(run.path(), false)).unwrap();
    let steps = config.train.steps;
    let predictor = trainyard_trainer::infer::Predictor::load(
        &CheckpointDir::new(run.path().join("checkpoints")).path_for(steps),
    )
    .unwrap();
    let setup = Setup::new(&config).unwrap();
    let noise = EvalNoise {
        input_sigma: 0.3,
        weight_sigma: 0.2,
        seed: 5,
    };
    let (data, val) = (setup.dataset.as_ref(), &setup.split.val);
    let whole = eval::evaluate(&predictor, data, val, 4, Some(&noise));
    assert_eq!(
        whole,
        eval::evaluate(&predictor, data, val, 4, Some(&noise))
    );
    assert_eq!(whole.noise, Some(noise));
    let (even, odd): (Vec<usize>, Vec<usize>) = val.iter().partition(|&&i| i % 2 == 0);
    let mut shards = eval::accumulate(&predictor, data, &even, 3, true, Some(&noise));
    shards.add_words(&eval::accumulate(&predictor, data, &odd, 5, true, Some(&noise)).to_words());
    let sharded = shards.report();
    assert_eq!(sharded.scores, whole.scores);
    assert_eq!(sharded.boundary_f1, whole.boundary_f1);
    let (ours, theirs) = (
        sharded.panoptic.unwrap().pq,
        whole.panoptic.clone().unwrap().pq,
    );
    assert!((ours - theirs).abs() < 1e-12, "{ours} vs {theirs}");
    let clean = eval::evaluate(&predictor, data, val, 4, None);
    assert_ne!(clean.scores, whole.scores);
    for (input_sigma, weight_sigma) in [(0.3, 0.0), (0.0, 0.2)] {
        let one = EvalNoise {
            input_sigma,
            weight_sigma,
            seed: 5,
        };
        let scores = eval::evaluate(&predictor, data, val, 4, Some(&one)).scores;
        assert_ne!(
            scores, clean.scores,
            "σ input {input_sigma}, weights {weight_sigma}"
        );
    }
}

/// Learned task weights are parameters like any other: a resumed run
/// replays them exactly, validation rows report them, and they move away
/// from the 1 they start at.
#[test]
fn learned_task_weights_resume_exactly_and_are_reported() {
    let learned = [
        "model.boundary_head=true",
        "model.task_weighting=uncertainty",
    ];
    assert_resume_is_exact(&learned, 3);
    let run = tempfile::tempdir().unwrap();
    train(&tiny_config(&learned), &opts(run.path(), false)).unwrap();
    let rows = val_rows(run.path());
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let w = r
            .task_weights
            .expect("validation reports the learned weights");
        assert!(
            w.segmentation != 1.0 && w.boundary != 1.0,
            "step {}: {w:?}",
            r.step
        );
    }
    let fixed = tempfile::tempdir().unwrap();
    train(
        &tiny_config(&["model.boundary_head=true"]),
        &opts(fixed.path(), false),
    )
    .unwrap();
    assert!(
        val_rows(fixed.path())
            .iter()
            .all(|r| r.task_weights.is_none()),
        "fixed weights are not reported as learned"
    );
}

/// Fine-tuning with learned task weights on a base trained without them:
/// the log-variances start at 0, are trained beside the adapter (they are
/// part of the objective), are kept in the run's checkpoints, and stay out
/// of the PEFT adapter file, which holds only what changes the network.
#[test]
fn fine_tuning_learns_the_task_balance_outside_the_adapter() {
    use trainyard_trainer::peft::adapter::WEIGHTS_FILE;
    let dir = tempfile::tempdir().unwrap();
    train(
        &tiny_config(&["model.boundary_head=true", "train.steps=3"]),
        &opts(&dir.path().join("base"), false),
    )
    .unwrap();
    let base_ck = CheckpointDir::new(dir.path().join("base/checkpoints"))
        .latest()
        .unwrap()
        .unwrap();
    let peft = format!(
        "peft={{base: '{}', r: 2, lora_alpha: 4, target_modules: [conv]}}",
        base_ck.display()
    );
    let config = tiny_config(&[
        "model.boundary_head=true",
        "model.task_weighting=uncertainty",
        "train.steps=3",
        &peft,
    ]);
    let run = dir.path().join("ft");
    let summary = train(&config, &opts(&run, false)).unwrap();
    let tuned = final_model(&run, 3);
    let (_, log_vars) = tuned
        .iter()
        .find(|(n, _)| n == "task_weights.log_vars")
        .expect("the run's checkpoint keeps the log-variances");
    assert!(log_vars.iter().all(|s| *s != 0.0), "{log_vars:?} trained");
    let adapter_values: usize = tuned
        .iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(_, v)| v.len())
        .sum();
    assert_eq!(summary.parameters, adapter_values + log_vars.len());

    let file = std::fs::read(summary.adapter.unwrap().join(WEIGHTS_FILE)).unwrap();
    let names = safetensors::SafeTensors::deserialize(&file)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(!names.is_empty());
    assert!(
        names.iter().all(|n| n.contains(".lora_")),
        "only adapter factors in the PEFT file: {names:?}"
    );
    // The base's own balance is not used by a run with fixed weights.
    let learned_base = dir.path().join("learned");
    train(
        &tiny_config(&[
            "model.boundary_head=true",
            "model.task_weighting=uncertainty",
            "train.steps=3",
        ]),
        &opts(&learned_base, false),
    )
    .unwrap();
    let fixed_ft = tiny_config(&[
        "model.boundary_head=true",
        "train.steps=3",
        &format!(
            "peft={{base: '{}', r: 2, lora_alpha: 4, target_modules: [conv]}}",
            CheckpointDir::new(learned_base.join("checkpoints"))
                .latest()
                .unwrap()
                .unwrap()
                .display()
        ),
    ]);
    train(&fixed_ft, &opts(&dir.path().join("ft-fixed"), false)).unwrap();
}
