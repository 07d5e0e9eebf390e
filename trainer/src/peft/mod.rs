//! Parameter-efficient fine-tuning: LoRA adapters on a SegNet's
//! convolutions, in Hugging Face PEFT's semantics and on-disk format.
//!
//! [`lora::attach`] adds adapters to the modules a [`config::LoraConfig`]
//! targets (A Kaiming-uniform, B zero, so the adapted model starts equal to
//! the base), [`lora::merge`] folds them into the base weights, and
//! [`adapter::save`]/[`adapter::load`] read and write PEFT's
//! `adapter_config.json` + `adapter_model.safetensors`.

pub mod adapter;
pub mod base;
pub mod config;
pub mod lora;

#[cfg(test)]
mod tests;

/// Why an adapter cannot be built, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// The configuration asks for something unsupported.
    #[error(transparent)]
    Config(#[from] config::ConfigProblem),
    /// Targets, modules or tensors do not fit the model.
    #[error("{0}")]
    Mismatch(String),
    /// Files.
    #[error("{0}")]
    Io(String),
    /// The safetensors file.
    #[error(transparent)]
    File(#[from] crate::tensorfile::TensorFileError),
    /// Writing the adapter's files.
    #[error(transparent)]
    Write(#[from] crate::run_dir::RunDirError),
}
