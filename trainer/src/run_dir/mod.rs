//! The run directory: its layout, how a run opens it (fresh, resumed or
//! refused) and the files in it. The trainer and the aggregator write it;
//! `trainyard local`'s tests and the benchmarks read it through the same
//! types ([`Row`]).
//!
//! ```text
//! <run>/config.json        the effective config
//! <run>/metrics.jsonl      one Row per line
//! <run>/checkpoints/       step-00000040.safetensors, …
//! <run>/adapter/           a fine-tuning run's adapter (Hugging Face PEFT)
//! <run>/summary.json       written last, when the run completes
//! ```

pub mod rows;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use rows::{
    EvalReport, LearnedWeights, PanopticScores, RoundRow, Row, SegmentationScores, TrainRow, ValRow,
};

/// The effective config of the run.
pub const CONFIG_FILE: &str = "config.json";
/// What a completed run reports.
pub const SUMMARY_FILE: &str = "summary.json";
/// One JSON [`Row`] per logged step, validation and round.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Where checkpoints live.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The adapter a fine-tuning run writes (Hugging Face PEFT format).
pub const ADAPTER_DIR: &str = "adapter";

/// A run directory that cannot be opened, written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunDirError {
    /// A fresh run was asked for where a run already left checkpoints.
    #[error(
        "{path} already holds checkpoints of a run; pass --resume to continue it, or choose another --out"
    )]
    Exists {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// An I/O error (disk full, permissions, missing directory).
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of `metrics.jsonl` is not a row.
    #[error("{path}:{line}: not a metrics row: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What the parser said.
        message: String,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError {
    let path = path.to_owned();
    move |source| RunDirError::Io {
        action,
        path,
        source,
    }
}

/// A run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The directory at `root`, to read, or to name paths in (ranks that do
    /// not write). Touches nothing.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Opens `root` to write a run into, creating it. A fresh run
    /// (`resume == false`) is refused where checkpoints exist: continuing
    /// someone's run, or silently overwriting it, must be asked for.
    pub fn open(root: impl Into<PathBuf>, resume: bool) -> Result<Self, RunDirError> {
        let dir = Self::at(root);
        std::fs::create_dir_all(&dir.root).map_err(io("create", &dir.root))?;
        if !resume && !dir.checkpoints()?.is_empty() {
            return Err(RunDirError::Exists {
                path: dir.checkpoints_dir(),
            });
        }
        Ok(dir)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `checkpoints/`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }

    /// `adapter/`.
    pub fn adapter_dir(&self) -> PathBuf {
        self.root.join(ADAPTER_DIR)
    }

    /// `metrics.jsonl`.
    pub fn metrics_file(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// `summary.json`.
    pub fn summary_file(&self) -> PathBuf {
        self.root.join(SUMMARY_FILE)
    }

    /// `config.json`.
    pub fn config_file(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// The complete checkpoints, oldest first, by step.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>, RunDirError> {
        checkpoints_in(&self.checkpoints_dir())
    }

    /// Writes the effective config (atomically).
    pub fn write_config(&self, config: &impl Serialize) -> Result<(), RunDirError> {
        write_json(&self.config_file(), config)
    }

    /// Writes the summary of a completed run (atomically).
    pub fn write_summary(&self, summary: &impl Serialize) -> Result<(), RunDirError> {
        write_json(&self.summary_file(), summary)
    }

    /// Opens `metrics.jsonl` for appending. A fresh run (`resumed_at`
    /// `None`) starts it empty; a resumed one first drops the rows past the
    /// step or round it restarts from, which it is about to write again, and
    /// a torn last line a crash left.
    pub fn log(&self, resumed_at: Option<u64>) -> Result<MetricsLog, RunDirError> {
        MetricsLog::open(&self.metrics_file(), resumed_at)
    }

    /// Every row of `metrics.jsonl`, in order.
    pub fn rows(&self) -> Result<Vec<Row>, RunDirError> {
        let path = self.metrics_file();
        let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
        text.lines()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|e| RunDirError::Row {
                    path: path.clone(),
                    line: i + 1,
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

/// The complete checkpoints in `dir`, oldest first. Temporary files of
/// interrupted writes never match the name pattern, so they never count.
pub fn checkpoints_in(dir: &Path) -> Result<Vec<(u64, PathBuf)>, RunDirError> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io("list", dir)(source)),
    };
    let mut out: Vec<(u64, PathBuf)> = read
        .flatten()
        .filter_map(|entry| {
            let step = checkpoint_step(entry.file_name().to_str()?)?;
            Some((step, entry.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), RunDirError> {
    let json = serde_json::to_vec_pretty(value).expect("run files serialise");
    write_atomic(path, &json)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsynced, renamed over the target, then the directory fsynced.
/// A crash or a full disk leaves the old file or the new one, never a
/// truncated one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
        // Persist the rename itself.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Appends rows to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    last_loss: Option<f64>,
}

impl MetricsLog {
    fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self, RunDirError> {
        let mut last_loss = None;
        match resumed_at {
            Some(at) if path.exists() => {
                let (kept, loss) = rows_through(path, at)?;
                last_loss = loss;
                write_atomic(path, kept.as_bytes())?;
            }
            Some(_) => {}
            None => {
                std::fs::File::create(path).map_err(io("create", path))?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(io("open", path))?;
        Ok(Self {
            path: path.to_owned(),
            file: std::io::BufWriter::new(file),
            last_loss,
        })
    }

    /// Loss of the last step or round kept from before a resume: what a
    /// resumed run that was already complete reports.
    pub fn last_loss(&self) -> Option<f64> {
        self.last_loss
    }

    /// Appends `row` (buffered; see [`flush`](Self::flush)).
    pub fn write(&mut self, row: &Row) -> Result<(), RunDirError> {
        let line = serde_json::to_string(row).expect("rows serialise");
        writeln!(self.file, "{line}").map_err(io("write", &self.path))
    }

    /// Makes the rows written so far durable in the file (called with every
    /// checkpoint, so the log covers what the checkpoint covers).
    pub fn flush(&mut self) -> Result<(), RunDirError> {
        self.file.flush().map_err(io("write", &self.path))
    }
}

/// The lines of `path` whose step or round is at most `at`, and the loss of
/// the last of them that has one. Read by position alone, not as a [`Row`],
/// so that a row an older trainer wrote, or one whose float was not finite
/// (written as `null`), is kept as it is; a line that is not JSON (torn by a
/// crash) is dropped.
fn rows_through(path: &Path, at: u64) -> Result<(String, Option<f64>), RunDirError> {
    #[derive(serde::Deserialize)]
    struct Position {
        step: Option<u64>,
        round: Option<u64>,
        loss: Option<f64>,
    }
    let f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut kept = String::new();
    let mut last_loss = None;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(io("read", path))?;
        let Ok(row) = serde_json::from_str::<Position>(&line) else {
            continue;
        };
        if row.step.or(row.round).is_some_and(|p| p <= at) {
            last_loss = row.loss.or(last_loss);
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    Ok((kept, last_loss))
}

/// File name of the checkpoint of `step` (zero-padded, so names sort by step).
pub fn checkpoint_file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// The step of a checkpoint file name, or `None` for any other file.
pub fn checkpoint_step(file_name: &str) -> Option<u64> {
    file_name
        .strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
