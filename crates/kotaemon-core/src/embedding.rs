//! Sentence embeddings on the device (`kotaemon-embed`, candle) behind the cache's [`Embed`]
//! trait. Built with the `embed` feature.

use crate::stages::cache::Embed;
use std::sync::Arc;

/// Loads an installed embedding model by name (or a directory path).
#[cfg(feature = "embed")]
pub fn load(reference: &str) -> Result<Arc<dyn Embed>, String> {
    let dir = crate::models::resolve(reference, &crate::models::default_models_dir())
        .map_err(|e| e.to_string())?;
    let embedder = kotaemon_embed::Embedder::load(kotaemon_embed::EmbedConfig {
        model_dir: dir,
        threads: 1,
        max_tokens: 128,
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(Candle(embedder)))
}

#[cfg(not(feature = "embed"))]
pub fn load(_reference: &str) -> Result<Arc<dyn Embed>, String> {
    Err("this build has no embedding support (cargo feature `embed`)".into())
}

#[cfg(feature = "embed")]
struct Candle(kotaemon_embed::Embedder);

#[cfg(feature = "embed")]
impl Embed for Candle {
    fn model_id(&self) -> &str {
        self.0.model_id()
    }
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        self.0
            .embed(&[text])
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| "no embedding returned".to_string())
    }
}
