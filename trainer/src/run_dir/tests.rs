use super::*;
use crate::config::EvalNoise;

fn train_row(step: u64, loss: f64) -> Row {
    Row::Train(TrainRow {
        step,
        loss,
        lr: 0.1,
        grad_norm: 1.5,
        samples_per_sec: 100.0,
        noisy_samples: 0,
    })
}

fn val_row(step: u64) -> Row {
    Row::Val(ValRow {
        step,
        report: EvalReport {
            samples: 8,
            scores: SegmentationScores {
                pixel_accuracy: 0.9,
                miou: 0.5,
                iou: vec![Some(0.75), None, Some(0.25)],
            },
            boundary_f1: Some(0.625),
            panoptic: Some(PanopticScores {
                pq: 0.25,
                sq: 0.5,
                rq: 0.5,
            }),
            noise: Some(EvalNoise {
                input_sigma: 0.1,
                weight_sigma: 0.05,
                seed: 3,
            }),
        },
        task_weights: Some(LearnedWeights {
            segmentation: 0.75,
            boundary: 2.5,
        }),
    })
}

#[test]
fn names_round_trip() {
    assert_eq!(checkpoint_file_name(300), "step-00000300.safetensors");
    assert_eq!(checkpoint_step(&checkpoint_file_name(12345)), Some(12345));
    assert_eq!(checkpoint_step("step-12.safetensors.tmp"), None);
    assert_eq!(checkpoint_step(CONFIG_FILE), None);
}

#[test]
fn a_fresh_run_is_refused_where_a_run_left_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let dir = RunDir::open(&root, false).unwrap();
    assert!(root.is_dir());
    std::fs::create_dir_all(dir.checkpoints_dir()).unwrap();
    // An interrupted write is not a checkpoint.
    std::fs::write(
        dir.checkpoints_dir()
            .join(".step-00000004.safetensors.tmp-1"),
        b"x",
    )
    .unwrap();
    RunDir::open(&root, false).unwrap();
    std::fs::write(dir.checkpoints_dir().join(checkpoint_file_name(4)), b"x").unwrap();
    let e = RunDir::open(&root, false).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{} already holds checkpoints of a run; pass --resume to continue it, or choose another --out",
            dir.checkpoints_dir().display()
        )
    );
    let resumed = RunDir::open(&root, true).unwrap();
    assert_eq!(
        resumed.checkpoints().unwrap(),
        [(4, dir.checkpoints_dir().join(checkpoint_file_name(4)))]
    );
}

#[test]
fn rows_read_back_as_written_in_the_format_they_always_had() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::open(tmp.path(), false).unwrap();
    let round = Row::Round(RoundRow {
        round: 3,
        sampled: 4,
        participants: 3,
        dropped: 1,
        rejected: 0,
        loss: Some(0.5),
        val_miou: None,
        seconds: 1.0,
        aggregate_seconds: 0.25,
        checkpoint_seconds: 0.125,
        epsilon: None,
        clip_norm: None,
    });
    let written = [train_row(1, 2.0), val_row(1), round];
    let mut log = dir.log(None).unwrap();
    for row in &written {
        log.write(row).unwrap();
    }
    log.flush().unwrap();
    assert_eq!(dir.rows().unwrap(), written);

    // The keys readers of earlier versions looked up stay where they were.
    let text = std::fs::read_to_string(dir.metrics_file()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["kind"], "train");
    assert_eq!(lines[0]["step"], 1);
    assert_eq!(lines[0]["loss"], 2.0);
    assert_eq!(lines[1]["kind"], "val");
    assert_eq!(lines[1]["miou"], 0.5);
    assert_eq!(lines[1]["iou"][1], serde_json::Value::Null);
    assert_eq!(lines[1]["panoptic"]["pq"], 0.25);
    assert_eq!(lines[2]["kind"], "round");
    assert_eq!(lines[2]["round"], 3);
}

#[test]
fn resuming_drops_the_rows_past_the_checkpoint_and_a_torn_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::open(tmp.path(), false).unwrap();
    let mut log = dir.log(None).unwrap();
    for step in 1..=6 {
        log.write(&train_row(step, step as f64)).unwrap();
    }
    log.write(&val_row(4)).unwrap();
    log.flush().unwrap();
    drop(log);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.metrics_file())
        .unwrap();
    file.write_all(br#"{"kind":"train","step":7,"lo"#).unwrap();

    let mut log = dir.log(Some(4)).unwrap();
    assert_eq!(log.last_loss(), Some(4.0));
    log.write(&train_row(5, 50.0)).unwrap();
    log.flush().unwrap();
    let positions: Vec<(u64, bool)> = dir
        .rows()
        .unwrap()
        .iter()
        .map(|r| (r.position(), matches!(r, Row::Val(_))))
        .collect();
    assert_eq!(
        positions,
        [
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (4, true),
            (5, false)
        ]
    );

    // A fresh run starts the log empty.
    let log = dir.log(None).unwrap();
    assert_eq!(log.last_loss(), None);
    assert_eq!(dir.rows().unwrap(), []);
}

#[test]
fn a_row_that_is_not_one_names_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::at(tmp.path());
    std::fs::write(dir.metrics_file(), "{\"kind\":\"train\"}\n").unwrap();
    let e = dir.rows().unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:1: not a metrics row: missing field `step`",
            dir.metrics_file().display()
        )),
        "{e}"
    );
}

#[test]
fn a_failed_write_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("missing-dir").join("t.json");
    let e = write_atomic(&path, b"x").unwrap_err().to_string();
    assert!(e.starts_with("failed to create"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
