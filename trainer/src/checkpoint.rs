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
    /// The checkpoint directory could not be listed or created.
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
        let metadata = HashMap::from([
            ("format".to_owned(), FORMAT.to_owned()),
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

    /// Complete checkpoints, oldest first. Temporary files of interrupted
    /// writes never match the pattern, so they are never picked up.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let read = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CheckpointError::Dir {
                    action: "list",
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for entry in read.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(step) = crate::run_dir::checkpoint_step(name) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        Ok(self.list()?.pop().map(|(_, p)| p))
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
