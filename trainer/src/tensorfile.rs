//! Named f32 tensors on disk as safetensors, written atomically.
//!
//! See [`write_atomic`] (atomic as [`crate::run_dir::write_atomic`] is: a
//! crash or a full disk leaves the old file or the new one, never a truncated
//! one) and [`read`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// An f32 tensor with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f32>,
}

/// A safetensors file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorFileError {
    /// An I/O error (disk full, permissions, missing file).
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing the file failed ([`crate::run_dir::write_atomic`]).
    #[error(transparent)]
    Write(#[from] crate::run_dir::RunDirError),
    /// The bytes are not a valid safetensors file.
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tensor is not f32.
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected F32")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TensorFileError {
    let path = path.to_owned();
    move |source| TensorFileError::Io {
        action,
        path,
        source,
    }
}

/// Serialises named tensors and string metadata into safetensors bytes.
pub fn to_bytes(tensors: &[(String, NamedTensor)], metadata: HashMap<String, String>) -> Vec<u8> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = raw.iter().map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .expect("shape matches the byte count by construction");
        (name.as_str(), view)
    });
    safetensors::serialize(views, Some(metadata))
        .expect("f32 tensors with consistent shapes always serialise")
}

/// Writes named tensors and metadata to `path` atomically.
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, NamedTensor)],
    metadata: HashMap<String, String>,
) -> Result<(), TensorFileError> {
    Ok(crate::run_dir::write_atomic(
        path,
        &to_bytes(tensors, metadata),
    )?)
}

/// The contents of a safetensors file.
#[derive(Debug, Clone, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: HashMap<String, NamedTensor>,
    /// The `__metadata__` string map.
    pub metadata: HashMap<String, String>,
}

/// Little-endian f32 values of raw tensor bytes (safetensors' layout).
pub fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads every tensor (all must be f32) and the metadata of `path`.
pub fn read(path: &Path) -> Result<TensorFile, TensorFileError> {
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    parse(path, &bytes)
}

/// Parses safetensors bytes; `path` only names the source in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<TensorFile, TensorFileError> {
    let format = |e: safetensors::SafeTensorError| TensorFileError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(format)?;
    let st = SafeTensors::deserialize(bytes).map_err(format)?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TensorFileError::Dtype {
                path: path.to_owned(),
                name,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let values = le_f32(view.data());
        tensors.insert(
            name,
            NamedTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(TensorFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = NamedTensor {
            shape: vec![2, 3],
            values: (0..6).map(|i| i as f32 * 0.5).collect(),
        };
        let meta = HashMap::from([("step".to_owned(), "7".to_owned())]);
        write_atomic(&path, &[("a.weight".into(), t.clone())], meta).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.tensors["a.weight"], t);
        assert_eq!(back.metadata["step"], "7");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }
}
