//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong loading a model or embedding text.
///
/// Messages name the file involved, so an operator can act on them without
/// reading code. No variant carries input text (it may be personal data).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory or one of its required files does not exist.
    #[error(
        "embedding model file not found: {0} (a model directory needs config.json, \
         tokenizer.json and model.safetensors or pytorch_model.bin)"
    )]
    MissingFile(PathBuf),
    /// A model file exists but cannot be used: unreadable, truncated, wrong
    /// shapes, unsupported architecture or settings.
    #[error("unusable embedding model: {0}")]
    BadModel(String),
    /// The tokenizer rejected an input.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// The forward pass failed (tensor error, thread pool failure).
    #[error("embedding computation failed: {0}")]
    Compute(String),
}

impl EmbedError {
    /// A stable, machine-readable code for logs and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            EmbedError::MissingFile(_) => "embed_missing_file",
            EmbedError::BadModel(_) => "embed_bad_model",
            EmbedError::Tokenize(_) => "embed_tokenize",
            EmbedError::Compute(_) => "embed_compute",
        }
    }
}
