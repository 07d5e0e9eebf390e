//! Training checkpoints: model tensors, optimiser state, step, data position
//! and RNG seed in one safetensors file, written atomically, the last K kept.
//!
//! See [`Checkpoint`] for the contents and [`CheckpointDir`] for the on-disk
//! policy (`checkpoints/step-00000300.safetensors`).
//!
//! Tensor names: `model.<module path>` for every parameter and buffer (the
//! PyTorch names, e.g. `model.encoder.0.convs.0.bn.running_mean`) and
//! `optim.<slot>` for flat optimiser buffers over the trainable parameters in
//! layout order. Metadata holds the step, the data position, the optimiser kind
//! and step count, the noise seed and the full trainer config (JSON).
//!
//! RNG state: every random draw after initialisation (input noise) comes from a
//! generator seeded by `(train.seed, step)`, so the seed and the step are the
//! whole RNG state and resuming replays the same draws.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::TrainerConfig;
use crate::tensorfile::{self, NamedTensor, TensorFileError};

/// Version tag written into every checkpoint.
pub const FORMAT: &str = "trainyard-checkpoint/1";

/// A checkpoint that cannot be written, found or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    File(#[from] TensorFileError),
    /// The checkpoint directory could not be listed.
    #[error(transparent)]
    List(#[from] crate::run_dir::RunDirError),
    /// The checkpoint directory could not be created.
    #[error("failed to {action} checkpoint directory {path}: {source}")]
    Dir {
        /// What was attempted.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is a safetensors file but not one of ours, or is incomplete.
    #[error("{path} is not a usable trainyard checkpoint: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// Every checkpoint of a run failed to load.
    #[error(
        "no checkpoint in {dir} can be used: {}; restore one from a backup, or start afresh in another directory",
        reasons.join("; ")
    )]
    NoneUsable {
        /// The directory.
        dir: PathBuf,
        /// Each file and why it failed, newest first.
        reasons: Vec<String>,
    },
}

/// A checkpoint that failed to load and was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it was.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// What resuming found: the newest checkpoint that loads, and the newer
/// ones that did not.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// Its file.
    pub path: PathBuf,
    /// Its contents.
    pub checkpoint: Checkpoint,
    /// Newer checkpoints that failed to load, newest first.
    pub skipped: Vec<Skipped>,
}

/// The digest that travels with a checkpoint's tensors: SHA-256 over each
/// tensor's name, shape and little-endian values, in name order. safetensors
/// itself checks only the layout, so a flipped bit in a value would
/// otherwise resume silently.
fn digest(tensors: &[(&str, &NamedTensor)]) -> String {
    use sha2::Digest as _;
    let mut sorted: Vec<&(&str, &NamedTensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = sha2::Sha256::new();
    for (name, t) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        for v in &t.values {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Optimiser steps completed.
    pub step: u64,
    /// Training samples consumed from the global sample stream.
    pub data_position: u64,
    /// Model tensors by module path (parameters and buffers).
    pub model: Vec<(String, NamedTensor)>,
    /// Optimiser kind (`sgd`, `adamw`).
    pub optimizer: String,
    /// Optimiser step counter.
    pub optimizer_step: u64,
    /// Optimiser buffers by slot name.
    pub optimizer_state: Vec<(String, Vec<f32>)>,
    /// The config the run was started with.
    pub config: TrainerConfig,
}

fn invalid(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let mut tensors: Vec<(String, NamedTensor)> = self
            .model
            .iter()
            .map(|(name, t)| (format!("model.{name}"), t.clone()))
            .collect();
        for (slot, values) in &self.optimizer_state {
            tensors.push((
                format!("optim.{slot}"),
                NamedTensor {
                    shape: vec![values.len()],
                    values: values.clone(),
                },
            ));
        }
        let config = serde_json::to_string(&self.config).expect("configs serialise to JSON");
        let named: Vec<(&str, &NamedTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let metadata = HashMap::from([
            ("format".to_owned(), FORMAT.to_owned()),
            ("digest".to_owned(), digest(&named)),
            ("step".to_owned(), self.step.to_string()),
            ("data_position".to_owned(), self.data_position.to_string()),
            ("optimizer".to_owned(), self.optimizer.clone()),
            ("optimizer_step".to_owned(), self.optimizer_step.to_string()),
            ("rng_seed".to_owned(), self.config.train.seed.to_string()),
            ("config".to_owned(), config),
        ]);
        Ok(tensorfile::write_atomic(path, &tensors, metadata)?)
    }

    /// Reads and checks a checkpoint.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let file = tensorfile::read(path)?;
        let meta = |key: &str| {
            file.metadata
                .get(key)
                .ok_or_else(|| invalid(path, format!("metadata `{key}` is missing")))
        };
        let format = meta("format")?;
        if format != FORMAT {
            return Err(invalid(
                path,
                format!("format is `{format}`, this trainer reads `{FORMAT}`"),
            ));
        }
        let number = |key: &str| -> Result<u64, CheckpointError> {
            meta(key)?
                .parse()
                .map_err(|_| invalid(path, format!("metadata `{key}` is not a number")))
        };
        // Checkpoints written before digests existed load unverified.
        if let Some(expected) = file.metadata.get("digest") {
            let named: Vec<(&str, &NamedTensor)> =
                file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            if &digest(&named) != expected {
                return Err(invalid(
                    path,
                    "its tensors do not match the digest written with them (corrupted on disk?)",
                ));
            }
        }
        let config: TrainerConfig = serde_json::from_str(meta("config")?)
            .map_err(|e| invalid(path, format!("embedded config does not parse: {e}")))?;
        let mut model = Vec::new();
        let mut optimizer_state = Vec::new();
        for (name, t) in file.tensors.iter() {
            if let Some(n) = name.strip_prefix("model.") {
                model.push((n.to_owned(), t.clone()));
            } else if let Some(n) = name.strip_prefix("optim.") {
                optimizer_state.push((n.to_owned(), t.values.clone()));
            } else {
                return Err(invalid(path, format!("unexpected tensor `{name}`")));
            }
        }
        model.sort_by(|a, b| a.0.cmp(&b.0));
        optimizer_state.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            step: number("step")?,
            data_position: number("data_position")?,
            optimizer: meta("optimizer")?.clone(),
            optimizer_step: number("optimizer_step")?,
            model,
            optimizer_state,
            config,
        })
    }

    /// The model tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.model.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// The `checkpoints/` directory of a run: naming, discovery and retention.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    /// The directory (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the checkpoint for `step`.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(crate::run_dir::checkpoint_file_name(step))
    }

    /// Complete checkpoints, oldest first ([`crate::run_dir::checkpoints_in`]).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        Ok(crate::run_dir::checkpoints_in(&self.dir)?)
    }

    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// The newest checkpoint that loads and verifies. Newer ones that do not
    /// (truncated, corrupted, not ours) are logged, renamed to
    /// `<name>.skipped` (kept for a look, never tried again) and reported.
    /// `None` for a directory without checkpoints; an error only when there
    /// are some and none loads.
    pub fn load_newest(&self) -> Result<Option<Resumable>, CheckpointError> {
        let all = self.list()?;
        if all.is_empty() {
            return Ok(None);
        }
        let mut skipped = Vec::new();
        for (_, path) in all.into_iter().rev() {
            match Checkpoint::load(&path) {
                Ok(checkpoint) => {
                    return Ok(Some(Resumable {
                        path,
                        checkpoint,
                        skipped,
                    }));
                }
                Err(e @ (CheckpointError::File(_) | CheckpointError::Invalid { .. })) => {
                    let reason = e.to_string();
                    tracing::warn!(path = %path.display(), %reason, "skipping a checkpoint that does not load; trying an older one");
                    let aside = path.with_extension("safetensors.skipped");
                    if let Err(e) = std::fs::rename(&path, &aside) {
                        tracing::warn!(path = %path.display(), error = %e, "could not set the checkpoint aside");
                    }
                    skipped.push(Skipped { path, reason });
                }
                Err(e) => return Err(e),
            }
        }
        Err(CheckpointError::NoneUsable {
            dir: self.dir.clone(),
            reasons: skipped
                .into_iter()
                .map(|s| format!("{}: {}", s.path.display(), s.reason))
                .collect(),
        })
    }

    /// Saves `checkpoint` and deletes all but the newest `keep_last`.
    pub fn save(
        &self,
        checkpoint: &Checkpoint,
        keep_last: usize,
    ) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| CheckpointError::Dir {
            action: "create",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.path_for(checkpoint.step);
        checkpoint.save(&path)?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!(path = %old.display(), error = %e, "failed to delete an old checkpoint");
            }
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(step: u64) -> Checkpoint {
        Checkpoint {
            step,
            data_position: step * 4,
            model: vec![(
                "head.weight".into(),
                NamedTensor {
                    shape: vec![2, 1],
                    values: vec![1.0, -1.0],
                },
            )],
            optimizer: "adamw".into(),
            optimizer_step: step,
            optimizer_state: vec![("exp_avg".into(), vec![0.5, 0.25])],
            config: TrainerConfig::default(),
        }
    }

    #[test]
    fn save_load_round_trip_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(dir.path().join("checkpoints"));
        assert_eq!(cd.latest().unwrap(), None);
        for step in [3, 6, 9, 12] {
            cd.save(&checkpoint(step), 2).unwrap();
        }
        let steps: Vec<u64> = cd.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![9, 12]);
        let latest = cd.latest().unwrap().unwrap();
        assert_eq!(Checkpoint::load(&latest).unwrap(), checkpoint(12));
    }

    /// A flipped bit in a value, a truncated file: each newest checkpoint that
    /// does not load is set aside and the next older one resumes; only when
    /// none loads is it an error, naming every file.
    #[test]
    fn resume_falls_back_past_corrupt_and_truncated_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(dir.path());
        for step in [3, 6, 9] {
            cd.save(&checkpoint(step), 3).unwrap();
        }
        // Flip one bit of the last tensor byte of step 9: safetensors still parses it.
        let mut bytes = std::fs::read(cd.path_for(9)).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        std::fs::write(cd.path_for(9), &bytes).unwrap();
        assert!(
            tensorfile::read(&cd.path_for(9)).is_ok(),
            "only the digest notices"
        );
        // Truncate step 6.
        let bytes = std::fs::read(cd.path_for(6)).unwrap();
        std::fs::write(cd.path_for(6), &bytes[..bytes.len() / 2]).unwrap();
        let found = cd.load_newest().unwrap().unwrap();
        assert_eq!(found.checkpoint, checkpoint(3));
        let skipped: Vec<&Path> = found.skipped.iter().map(|s| s.path.as_path()).collect();
        assert_eq!(
            skipped,
            [cd.path_for(9).as_path(), cd.path_for(6).as_path()]
        );
        assert!(
            found.skipped[0].reason.contains("digest"),
            "{:?}",
            found.skipped
        );
        // Set aside, not tried again; the usable one is now the latest.
        assert_eq!(cd.latest().unwrap(), Some(cd.path_for(3)));
        assert!(
            dir.path()
                .join("step-00000009.safetensors.skipped")
                .exists()
        );
        std::fs::write(cd.path_for(3), b"not a checkpoint").unwrap();
        let e = cd.load_newest().unwrap_err();
        assert!(matches!(e, CheckpointError::NoneUsable { .. }), "{e}");
        assert!(e.to_string().contains("step-00000003"), "{e}");
        assert!(
            CheckpointDir::new(dir.path().join("empty"))
                .load_newest()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn interrupted_writes_are_never_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(dir.path());
        cd.save(&checkpoint(3), 3).unwrap();
        // What a kill during a write leaves behind.
        std::fs::write(
            dir.path().join(".step-00000006.safetensors.tmp-1"),
            b"partial",
        )
        .unwrap();
        assert_eq!(cd.latest().unwrap().unwrap(), cd.path_for(3));
    }

    #[test]
    fn foreign_safetensors_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let t = NamedTensor {
            shape: vec![1],
            values: vec![0.0],
        };
        tensorfile::write_atomic(&path, &[("w".into(), t)], HashMap::new()).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains("x.safetensors") && e.contains("format"), "{e}");
    }
}
