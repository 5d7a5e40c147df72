//! Finding the models, loading each once per test binary.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kotaemon_embed::{EmbedConfig, Embedder};

const INSTALL: &str = "run crates/kotaemon-embed/scripts/install-models.sh";

fn model_dir(env: &str, default: &str, what: &str) -> PathBuf {
    let dir = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let path = dir.join(file);
        assert!(
            path.is_file(),
            "{what} model file {} is missing: {INSTALL} (or set {env} to a directory \
             holding config.json, tokenizer.json and model.safetensors)",
            path.display()
        );
    }
    dir
}

/// all-MiniLM-L6-v2 (English).
pub fn minilm_dir() -> PathBuf {
    model_dir(
        "KOTAEMON_TEST_MINILM_DIR",
        "/var/tmp/kotaemon-models/all-minilm-l6-v2",
        "all-MiniLM-L6-v2",
    )
}

/// The Chinese-capable model (multilingual-e5-small, 4-bit, dequantized).
pub fn zh_dir() -> PathBuf {
    model_dir(
        "KOTAEMON_TEST_ZH_EMBED_DIR",
        "/var/tmp/kotaemon-models/multilingual-e5-small-q4",
        "Chinese-capable embedding",
    )
}

fn load(dir: PathBuf) -> Arc<Embedder> {
    let cfg = EmbedConfig {
        threads: 2,
        ..EmbedConfig::new(dir)
    };
    Arc::new(Embedder::load(cfg).unwrap_or_else(|e| panic!("load failed: {e}")))
}

pub fn minilm() -> Arc<Embedder> {
    static M: OnceLock<Arc<Embedder>> = OnceLock::new();
    M.get_or_init(|| load(minilm_dir())).clone()
}

pub fn zh() -> Arc<Embedder> {
    static M: OnceLock<Arc<Embedder>> = OnceLock::new();
    M.get_or_init(|| load(zh_dir())).clone()
}

pub fn embed1(e: &Embedder, text: &str) -> Vec<f32> {
    let mut v = e.embed(&[text]).expect("embed");
    assert_eq!(v.len(), 1);
    v.remove(0)
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

pub fn assert_unit(vs: &[Vec<f32>], dim: usize) {
    for v in vs {
        assert_eq!(v.len(), dim);
        assert!(v.iter().all(|x| x.is_finite()));
        assert!((norm(v) - 1.0).abs() < 1e-4, "norm {}", norm(v));
    }
}
