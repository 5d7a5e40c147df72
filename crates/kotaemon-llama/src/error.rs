//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong loading the local model or running a job on it.
///
/// Each variant has a stable [`code`](LlamaError::code) for metrics and API error bodies.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The model file does not exist (or is not a regular file).
    #[error("model file not found: {0} (install it or fix the model path)")]
    ModelNotFound(PathBuf),
    /// The file exists but does not start with the GGUF magic bytes.
    #[error("not a GGUF model file (bad magic bytes): {0}")]
    NotGguf(PathBuf),
    /// llama.cpp could not load the model or create its context.
    #[error("failed to load local model: {0}")]
    Load(String),
    /// The chat could not be rendered into a prompt (bad role, NUL byte, template failure).
    #[error("chat template error: {0}")]
    Template(String),
    /// The prompt leaves no room for even one generated token.
    #[error("prompt has {prompt_tokens} tokens but the context holds {n_ctx} (one more is needed for the answer)")]
    ContextTooLong {
        /// Tokens in the rendered prompt.
        prompt_tokens: u32,
        /// Context size of the engine.
        n_ctx: u32,
    },
    /// `max_queue` jobs are already waiting.
    #[error("local model queue is full (max_queue jobs already waiting); try again later")]
    QueueFull,
    /// The worker thread has stopped (engine dropped, or it died).
    #[error("local model engine has stopped")]
    EngineStopped,
    /// llama.cpp failed while evaluating tokens.
    #[error("local model decode failed: {0}")]
    Decode(String),
    /// Generation parameters are out of range.
    #[error("invalid generation parameters: {0}")]
    InvalidParams(String),
}

impl LlamaError {
    /// A stable, machine-readable code for this error (bounded set, usable as a metric label).
    pub fn code(&self) -> &'static str {
        match self {
            LlamaError::ModelNotFound(_) => "model_not_found",
            LlamaError::NotGguf(_) => "not_gguf",
            LlamaError::Load(_) => "load_failed",
            LlamaError::Template(_) => "template_error",
            LlamaError::ContextTooLong { .. } => "context_too_long",
            LlamaError::QueueFull => "queue_full",
            LlamaError::EngineStopped => "engine_stopped",
            LlamaError::Decode(_) => "decode_failed",
            LlamaError::InvalidParams(_) => "invalid_params",
        }
    }

    /// True when the request itself is at fault (retrying it unchanged cannot help).
    pub fn is_request_error(&self) -> bool {
        match self {
            LlamaError::Template(_)
            | LlamaError::ContextTooLong { .. }
            | LlamaError::InvalidParams(_) => true,
            LlamaError::ModelNotFound(_)
            | LlamaError::NotGguf(_)
            | LlamaError::Load(_)
            | LlamaError::QueueFull
            | LlamaError::EngineStopped
            | LlamaError::Decode(_) => false,
        }
    }
}
