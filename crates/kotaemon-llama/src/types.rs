//! The public data types: configuration, parameters, events, statistics.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::LlamaError;

/// Largest context used when `n_ctx` is 0 (the model's training context can be far larger).
pub const AUTO_N_CTX_CAP: u32 = 8192;
/// Default `n_batch`.
pub const DEFAULT_N_BATCH: u32 = 512;
/// Default `max_queue`.
pub const DEFAULT_MAX_QUEUE: usize = 16;

/// How to load the local model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Path of the GGUF file.
    pub model_path: PathBuf,
    /// Context size in tokens (prompt + answer). 0 = the model's training context, capped at
    /// [`AUTO_N_CTX_CAP`]. llama.cpp may round it up; [`ModelInfo::n_ctx`] is the real size.
    pub n_ctx: u32,
    /// Threads for prompt and generation. 0 = the number of available cores.
    pub n_threads: u32,
    /// Tokens per prompt-evaluation batch. 0 = [`DEFAULT_N_BATCH`].
    pub n_batch: u32,
    /// Jobs allowed to wait behind the running one. 0 = [`DEFAULT_MAX_QUEUE`].
    pub max_queue: usize,
}

impl EngineConfig {
    /// Defaults for everything but the path.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            n_ctx: 0,
            n_threads: 0,
            n_batch: DEFAULT_N_BATCH,
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }
}

/// One chat message. `role` is one of [`ROLES`]: `system`, `user`, `assistant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Sampling and stopping for one job.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate (finish `Length` when reached).
    pub max_tokens: u32,
    /// 0 = greedy (deterministic); otherwise softmax temperature. Must be finite and >= 0.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it. Ignored when greedy.
    pub top_p: f32,
    /// Generation ends at the first of these strings; the stop string is not emitted.
    pub stop: Vec<String>,
    /// Sampler seed (same seed + same prompt + same params = same answer). Ignored when greedy.
    pub seed: u32,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            stop: Vec::new(),
            seed: 0,
        }
    }
}

impl GenerateParams {
    pub(crate) fn validate(&self) -> Result<(), LlamaError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(LlamaError::InvalidParams(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(LlamaError::InvalidParams(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// What was loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `general.name` from the GGUF metadata, or the file stem.
    pub name: String,
    /// Context the model was trained with.
    pub n_ctx_train: u32,
    /// Context of this engine (prompt + answer).
    pub n_ctx: u32,
    pub n_params: u64,
    /// Size of the GGUF file on disk.
    pub size_bytes: u64,
    /// `render_chat` uses the model's own chat format (from the GGUF metadata, or llama.cpp's
    /// built-in template recognised from the vocabulary's turn tokens). When false it uses the
    /// plain fallback format (see [`LocalEngine::render_chat`]).
    pub has_chat_template: bool,
    /// Where the chat format comes from.
    pub chat_template: ChatTemplateSource,
    /// Wall time of [`LocalEngine::load`] (model and context).
    pub load_time: Duration,
}

/// Where [`LocalEngine::render_chat`]'s format comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplateSource {
    /// `tokenizer.chat_template` in the GGUF metadata.
    Gguf,
    /// The GGUF has no (usable) template, but its vocabulary has this family's turn tokens, so
    /// llama.cpp's built-in template of that name is used (`gemma`, `chatml`, `llama3`).
    Builtin(&'static str),
    /// The plain `Role: content` format.
    Fallback,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// A stop string appeared (it is not part of the output).
    StopSequence,
}

/// Counts and timings of one job; tokens/s = `completion_tokens / generation_time`.
#[derive(Debug, Clone)]
pub struct GenStats {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish: FinishReason,
    /// From `generate` to the worker starting the job.
    pub queue_wait: Duration,
    /// Prompt evaluation.
    pub prompt_time: Duration,
    /// From the end of prompt evaluation to the last token.
    pub generation_time: Duration,
}

/// One event of a job's stream: zero or more pieces, then `Done` (or an `Err` instead).
#[derive(Debug)]
pub enum GenEvent {
    /// Valid UTF-8 text, never empty, never containing (part of) a matched stop string.
    Piece(String),
    Done(GenStats),
}

/// Receiver of one job's events.
pub type GenReceiver = mpsc::Receiver<Result<GenEvent, LlamaError>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert!(GenerateParams::default().validate().is_ok());
        let bad_t = GenerateParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(matches!(
            bad_t.validate(),
            Err(LlamaError::InvalidParams(_))
        ));
        let bad_p = GenerateParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad_p.validate().is_err());
    }
}
