//! Loading a BERT-family sentence-embedding model and running it on the CPU.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::bert::{self, Bert};
use crate::model_dir::{ModelDir, Pooling, WeightsFile};
use crate::tokenize::Tok;
use crate::{EmbedConfig, EmbedError};

/// Texts per forward pass. Inputs are sorted by token count first, so a
/// batch pads to a similar length; 32 is where throughput stops improving
/// on two cores (see the crate docs).
const BATCH: usize = 32;

/// A loaded sentence-embedding model. Load once, share through an `Arc`:
/// `embed` takes `&self` and may be called from many threads at once.
pub struct Embedder {
    model: Bert,
    tokenizer: Tok,
    pool: rayon::ThreadPool,
    threads: usize,
    device: Device,
    dim: usize,
    model_id: String,
    pooling: Pooling,
    prefix: String,
    max_tokens: usize,
    pad_id: u32,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("model_id", &self.model_id)
            .field("dim", &self.dim)
            .field("threads", &self.threads)
            .field("max_tokens", &self.max_tokens)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, what: impl std::fmt::Display) -> EmbedError {
    EmbedError::BadModel(format!("{}: {what}", path.display()))
}

fn compute(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Compute(e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the weights and returns the model plus the sha256 of the weights file.
fn load_weights(
    weights: &WeightsFile,
    md: &ModelDir,
    device: &Device,
) -> Result<(Bert, String), EmbedError> {
    match weights {
        WeightsFile::Safetensors(path) => {
            let file = File::open(path).map_err(|e| bad(path, e))?;
            // SAFETY: the map is read-only and dropped before `load` returns (the
            // tensors are copied out of it). The file must not be truncated while
            // a model loads, which is the usual contract for model files.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(path, e))?;
            let digest = hex(&Sha256::digest(&map[..]));
            let (_, meta) =
                safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| bad(path, e))?;
            let vb = VarBuilder::from_slice_safetensors(&map[..], DType::F32, device)
                .map_err(|e| bad(path, e))?;
            let prefix = bert::prefix(&vb, &md.bert);
            let word_dtype = meta
                .info(&format!("{prefix}embeddings.word_embeddings.weight"))
                .map_or(DType::F32, |info| bert::word_table_dtype(info.dtype));
            let vb = if prefix.is_empty() {
                vb
            } else {
                vb.pp(prefix.trim_end_matches('.'))
            };
            let model = Bert::load(vb, &md.bert, word_dtype).map_err(|e| bad(path, e))?;
            Ok((model, digest))
        }
        WeightsFile::Pickle(path) => {
            let mut file = File::open(path).map_err(|e| bad(path, e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(|e| bad(path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let digest = hex(&hasher.finalize());
            let vb = VarBuilder::from_pth(path, DType::F32, device).map_err(|e| bad(path, e))?;
            let prefix = bert::prefix(&vb, &md.bert);
            let vb = if prefix.is_empty() {
                vb
            } else {
                vb.pp(prefix.trim_end_matches('.'))
            };
            let model = Bert::load(vb, &md.bert, DType::F32).map_err(|e| bad(path, e))?;
            Ok((model, digest))
        }
    }
}

impl Embedder {
    /// Loads `config.json`, `tokenizer.json` and the weights from `cfg.model_dir`.
    ///
    /// Every check happens here, so a bad model fails start-up, not the first
    /// request: missing files, unsupported architecture, a tokenizer whose ids
    /// exceed the embedding table, truncated or mis-shaped weights.
    pub fn load(cfg: EmbedConfig) -> Result<Embedder, EmbedError> {
        let started = std::time::Instant::now();
        let md = ModelDir::open(&cfg.model_dir)?;
        let device = Device::Cpu;

        let mut tokenizer =
            Tok::from_file(&md.tokenizer_path).map_err(|e| bad(&md.tokenizer_path, e))?;
        let vocab = tokenizer.vocab_size();
        if vocab > md.bert.vocab_size {
            return Err(bad(
                &md.tokenizer_path,
                format!(
                    "tokenizer has {vocab} tokens but config.json vocab_size is {}",
                    md.bert.vocab_size
                ),
            ));
        }
        // Inputs longer than the position table would fail the forward pass.
        let max_tokens = cfg.max_tokens.min(md.bert.max_position_embeddings);
        if max_tokens < 2 {
            return Err(EmbedError::BadModel(format!(
                "max_tokens must be at least 2 (got {}, model allows {})",
                cfg.max_tokens, md.bert.max_position_embeddings
            )));
        }
        tokenizer
            .set_limits(max_tokens)
            .map_err(|e| bad(&md.tokenizer_path, e))?;
        let pad_id = u32::try_from(md.bert.pad_token_id)
            .ok()
            .filter(|&id| (id as usize) < md.bert.vocab_size)
            .ok_or_else(|| {
                EmbedError::BadModel(format!(
                    "{}: pad_token_id {} is outside the vocabulary",
                    md.dir.join("config.json").display(),
                    md.bert.pad_token_id
                ))
            })?;

        let (model, digest) = load_weights(&md.weights, &md, &device)?;
        let model_id = format!("{}-{}", md.name(), &digest[..12]);

        let threads = match cfg.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("embed-pool-{i}"))
            .build()
            .map_err(compute)?;

        let embedder = Embedder {
            model,
            tokenizer,
            pool,
            threads,
            device,
            dim: md.bert.hidden_size,
            model_id,
            pooling: md.pooling,
            prefix: md.prefix.clone(),
            max_tokens,
            pad_id,
        };
        tracing::info!(
            model_id = %embedder.model_id,
            dim = embedder.dim,
            threads,
            max_tokens,
            compact_tokenizer = embedder.tokenizer.is_compact(),
            load_ms = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        Ok(embedder)
    }

    /// Length of every embedding this model returns.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Directory name plus the first 12 hex digits of the weights' sha256:
    /// embeddings from different models (or re-trained weights) never compare.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Threads this embedder's matrix multiplications run on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Token limit after clamping to the model's position table.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds each text: pooled over its tokens (mean over the attention mask
    /// unless the model directory asks for CLS) and L2-normalised, so the dot
    /// product of two results is their cosine. Texts longer than `max_tokens`
    /// are truncated. The output has one vector per input, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let mut encodings = Vec::with_capacity(texts.len());
        for text in texts {
            let input = if self.prefix.is_empty() {
                (*text).to_string()
            } else {
                format!("{}{}", self.prefix, text)
            };
            let ids = self.tokenizer.encode(input).map_err(EmbedError::Tokenize)?;
            encodings.push(ids);
        }

        // Longest first, so each batch pads little; results go back in input order.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| encodings[i].as_slice()).collect();
            let vectors = self.pool.install(|| self.forward(&batch))?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// One padded batch through the encoder and the pooling.
    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let b = batch.len();
        let seq = batch.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(b * seq);
        let mut mask = Vec::with_capacity(b * seq);
        for row in batch {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.pad_id, seq - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, seq - row.len()));
        }
        let ids = Tensor::from_vec(ids, (b, seq), &self.device).map_err(compute)?;
        let mask = Tensor::from_vec(mask, (b, seq), &self.device).map_err(compute)?;
        let hidden = self
            .model
            .forward(&ids, &mask, &self.device)
            .map_err(compute)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.i((.., 0)).map_err(compute)?,
            Pooling::Mean => {
                let m = mask
                    .to_dtype(DType::F32)
                    .and_then(|m| m.unsqueeze(2))
                    .map_err(compute)?;
                let sum = hidden
                    .broadcast_mul(&m)
                    .and_then(|x| x.sum(1))
                    .map_err(compute)?;
                let count = m
                    .sum(1)
                    .and_then(|c| c.clamp(1e-9, f32::MAX))
                    .map_err(compute)?;
                sum.broadcast_div(&count).map_err(compute)?
            }
        };
        let mut rows: Vec<Vec<f32>> = pooled.to_vec2().map_err(compute)?;
        for row in &mut rows {
            normalize(row);
        }
        Ok(rows)
    }
}

/// Scales `v` to unit length; an all-zero vector stays zero.
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        for x in v.iter_mut() {
            *x /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_makes_unit_length_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut z = vec![0.0, 0.0];
        normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn embedder_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Embedder>();
    }
}
