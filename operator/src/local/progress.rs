//! Progress of a local run, read from the leader's run directory: the rows
//! the trainer appends to `metrics.jsonl` and its `checkpoints/`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use trainyard_trainer::run_dir;

use crate::api::CheckpointRef;
use crate::plan::ProgressReport;

/// Follows one `metrics.jsonl` as it grows (and when a resumed run rewrites it).
#[derive(Debug)]
pub struct MetricsTail {
    run_dir: PathBuf,
    offset: u64,
    partial: String,
    latest: ProgressReport,
    seen: bool,
}

impl MetricsTail {
    /// Follows the run directory `run_dir`.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            offset: 0,
            partial: String::new(),
            latest: ProgressReport::default(),
            seen: false,
        }
    }

    /// Reads what was appended since the last call; `None` until the first row.
    pub fn poll(&mut self) -> Option<ProgressReport> {
        let path = self.run_dir.join(run_dir::METRICS_FILE);
        if let Ok(mut file) = std::fs::File::open(&path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < self.offset {
                // A resumed run truncated rows past its checkpoint: start over.
                self.offset = 0;
                self.partial.clear();
            }
            let mut fresh = String::new();
            if file.seek(SeekFrom::Start(self.offset)).is_ok()
                && let Ok(n) = file.read_to_string(&mut fresh)
            {
                self.offset += n as u64;
                self.partial.push_str(&fresh);
                while let Some(end) = self.partial.find('\n') {
                    let line: String = self.partial.drain(..=end).collect();
                    self.absorb(line.trim());
                }
            }
        }
        let adapter = self.run_dir.join(run_dir::ADAPTER_DIR);
        if adapter.join("adapter_model.safetensors").is_file() {
            self.latest.adapter = Some(adapter.display().to_string());
        }
        if let Some(ck) = latest_checkpoint(&self.run_dir) {
            self.latest.last_checkpoint = Some(ck);
            self.seen = true;
        }
        self.seen.then(|| self.latest.clone())
    }

    fn absorb(&mut self, line: &str) {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let step = row.get("step").and_then(|v| v.as_u64());
        match row.get("kind").and_then(|v| v.as_str()) {
            Some("train") => {
                if let Some(step) = step {
                    self.latest.step = step;
                }
                self.latest.loss = row.get("loss").and_then(|v| v.as_f64());
                self.latest.samples_per_second =
                    row.get("samples_per_sec").and_then(|v| v.as_f64());
                self.seen = true;
            }
            // A federated aggregator's round: progress counts rounds.
            Some("round") => {
                if let Some(round) = row.get("round").and_then(|v| v.as_u64()) {
                    self.latest.step = round;
                }
                self.latest.loss = row.get("loss").and_then(|v| v.as_f64());
                if let Some(m) = row.get("val_miou").and_then(|v| v.as_f64()) {
                    self.latest.metric = Some(m);
                }
                self.latest.participants = row
                    .get("participants")
                    .and_then(|v| v.as_u64())
                    .map(|n| n as u32);
                self.latest.rejected = row.get("rejected").and_then(|v| v.as_u64());
                self.latest.epsilon = row.get("epsilon").and_then(|v| v.as_f64());
                self.latest.round_seconds = row.get("seconds").and_then(|v| v.as_f64());
                self.seen = true;
            }
            Some("val") => {
                self.latest.metric = row.get("miou").and_then(|v| v.as_f64());
                if let Some(step) = step {
                    self.latest.step = self.latest.step.max(step);
                }
                self.seen = true;
            }
            _ => {}
        }
    }
}

/// The newest `checkpoints/step-NNNNNNNN.safetensors` in a run directory.
pub fn latest_checkpoint(dir: &Path) -> Option<CheckpointRef> {
    std::fs::read_dir(dir.join(run_dir::CHECKPOINTS_DIR))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((run_dir::checkpoint_step(e.file_name().to_str()?)?, e.path())))
        .max_by_key(|(step, _)| *step)
        .map(|(step, path)| CheckpointRef {
            step,
            path: path.display().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_appends_partial_lines_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut tail = MetricsTail::new(dir.path());
        assert_eq!(tail.poll(), None);
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "{{\"kind\":\"train\",\"step\":10,\"loss\":1.5,\"samples_per_sec\":80.0}}\n{{\"kind\":\"val\",\"step\":10,\"miou\":0.4").unwrap();
        let p = tail.poll().unwrap();
        assert_eq!((p.step, p.loss, p.metric), (10, Some(1.5), None));
        writeln!(f, ",\"pixel_accuracy\":0.9}}").unwrap();
        assert_eq!(tail.poll().unwrap().metric, Some(0.4));
        // A resumed run rewrites the file shorter.
        std::fs::write(&path, "{\"kind\":\"train\",\"step\":5,\"loss\":2.0}\n").unwrap();
        let p = tail.poll().unwrap();
        assert_eq!((p.step, p.loss), (5, Some(2.0)));
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        for s in [4, 12] {
            std::fs::write(
                dir.path()
                    .join(format!("checkpoints/step-{s:08}.safetensors")),
                b"",
            )
            .unwrap();
        }
        assert_eq!(tail.poll().unwrap().last_checkpoint.unwrap().step, 12);
    }

    #[test]
    fn federated_rounds_are_the_progress() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"kind\":\"round\",\"round\":3,\"loss\":0.5,\"val_miou\":0.3}\n{\"kind\":\"round\",\"round\":4,\"loss\":0.4,\"val_miou\":null}\n",
        )
        .unwrap();
        let p = MetricsTail::new(dir.path()).poll().unwrap();
        assert_eq!((p.step, p.loss, p.metric), (4, Some(0.4), Some(0.3)));
    }
}
