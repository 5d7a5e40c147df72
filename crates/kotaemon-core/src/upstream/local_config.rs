//! `[local]`: the on-device model's configuration (kept apart from `local.rs` so configs
//! parse the same whether or not the `llama` feature is built).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub enabled: bool,
    /// The model name clients use to ask for it, and its name in metrics.
    pub name: String,
    /// An installed model's name (`kotaemon models list`) or a path to a GGUF file.
    pub model: String,
    /// Where installed models live (default: $KOTAEMON_MODELS_DIR or
    /// ~/.local/share/kotaemon/models).
    pub models_dir: Option<PathBuf>,
    /// CPU threads for generation; 0 = all cores.
    pub threads: u32,
    /// Context length in tokens (prompt + answer); longer prompts are refused with 400.
    pub n_ctx: u32,
    /// Answer length cap (a request may ask for less).
    pub max_tokens: u32,
    /// Turns waiting for the model; beyond this the local model answers 429.
    pub max_queue: usize,
    /// Fail start-up if the model cannot be loaded. Otherwise the error is logged and the
    /// agent serves from the cloud only.
    pub required: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            enabled: false,
            name: "local".into(),
            model: "gemma3-270m".into(),
            models_dir: None,
            threads: 0,
            n_ctx: 2048,
            max_tokens: 256,
            max_queue: 16,
            required: false,
        }
    }
}

impl LocalConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.name.trim().is_empty() {
            p.push(format!("{path}.name: must not be empty"));
        }
        if self.enabled && self.model.trim().is_empty() {
            p.push(format!(
                "{path}.model: must name an installed model or a GGUF file"
            ));
        }
        if self.n_ctx != 0 && self.n_ctx < 256 {
            p.push(format!(
                "{path}.n_ctx: must be at least 256 (or 0 for the model's own)"
            ));
        }
        if self.max_tokens == 0 {
            p.push(format!("{path}.max_tokens: must be at least 1"));
        }
        if self.max_queue == 0 {
            p.push(format!("{path}.max_queue: must be at least 1"));
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(crate::models::default_models_dir)
    }
}
