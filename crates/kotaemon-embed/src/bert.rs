//! The BERT encoder: candle-transformers' layers, with our own embedding
//! layer so the word-embedding table can stay in the half precision it is
//! stored in.
//!
//! Why: in multilingual models the word table dominates memory (XLM-R's
//! 250 037 x 384 floats are 384 MB in f32, more than the 12 layers together).
//! Kept as f16 it is half that; rows are widened to f32 after the lookup, so
//! the arithmetic stays f32. Every other tensor is loaded as f32.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Module, VarBuilder};
use candle_transformers::models::bert::{BertEncoder, Config};

/// Token ids in, one hidden vector per token out.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    encoder: BertEncoder,
}

/// Storage dtype of the word table to keep (f16/bf16 stay half; all else f32).
pub fn word_table_dtype(stored: safetensors::Dtype) -> DType {
    match stored {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// Name prefix under which the checkpoint keeps the encoder ("" or "bert.").
pub fn prefix(vb: &VarBuilder, config: &Config) -> String {
    let word = "embeddings.word_embeddings.weight";
    if vb.contains_tensor(word) {
        return String::new();
    }
    if vb.contains_tensor(&format!("bert.{word}")) {
        return "bert.".into();
    }
    match &config.model_type {
        Some(t) if vb.contains_tensor(&format!("{t}.{word}")) => format!("{t}."),
        _ => String::new(),
    }
}

impl Bert {
    /// `vb` is rooted at the encoder (prefix already applied); `word_dtype`
    /// is the dtype the word table is kept in.
    pub fn load(vb: VarBuilder, config: &Config, word_dtype: DType) -> Result<Self> {
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        let word_table = emb.pp("word_embeddings").get_with_hints_dtype(
            (config.vocab_size, h),
            "weight",
            Default::default(),
            word_dtype,
        )?;
        let word = Embedding::new(word_table, h);
        let position = candle_nn::embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embeddings"),
        )?;
        let token_type =
            candle_nn::embedding(config.type_vocab_size, h, emb.pp("token_type_embeddings"))?;
        let layer_norm = candle_nn::layer_norm(h, config.layer_norm_eps, emb.pp("LayerNorm"))?;
        let encoder = BertEncoder::load(vb.pp("encoder"), config)?;
        Ok(Bert {
            word,
            position,
            token_type,
            layer_norm,
            encoder,
        })
    }

    /// `ids`, `mask`: (batch, seq) u32, mask 1 = real token. Returns
    /// (batch, seq, hidden) f32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, device: &Device) -> Result<Tensor> {
        let (_b, seq) = ids.dims2()?;
        let words = self.word.forward(ids)?.to_dtype(DType::F32)?;
        let types = self.token_type.forward(&ids.zeros_like()?)?;
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let positions = self.position.forward(&positions)?;
        let x = (words + types)?.broadcast_add(&positions)?;
        let x = self.layer_norm.forward(&x)?;
        // Additive mask, (batch, 1, 1, seq): 0 where attended, f32::MIN on padding.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let additive = ((m.ones_like()? - &m)? * f64::from(f32::MIN))?;
        self.encoder.forward(&x, &additive)
    }
}
