//! Tokenizer loading, with a compact Unigram model for big multilingual vocabularies.
//!
//! `tokenizers`' own Unigram model keeps a byte trie with a hash map per node;
//! for XLM-R's 250 002 pieces that is ≈ 330 MB resident, more than the model
//! weights. [`CompactUnigram`] holds the same vocabulary in one hash map
//! (≈ 30 MB) and runs the same Viterbi search (same candidate order, same
//! strict-greater tie rule, same unknown-token penalty and fusing), so the ids
//! are identical; the integration tests check that against `tokenizers` on
//! English, Chinese and mixed text. Normalizer, pre-tokenizer, post-processor,
//! truncation and added tokens are `tokenizers`' own, read from the same
//! `tokenizer.json`. Other model types (WordPiece, BPE, ...) load unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{Encoding, Model, Token, Tokenizer, TokenizerImpl, TruncationParams};

/// sentencepiece's penalty for an unknown character, below the lowest piece score.
const UNK_PENALTY: f64 = 10.0;

/// A Unigram (sentencepiece) model in one hash map. See the module docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawUnigram")]
pub struct CompactUnigram {
    pieces: Vec<Box<str>>,
    scores: Vec<f64>,
    ids: HashMap<Box<str>, u32>,
    unk_id: u32,
    unk_score: f64,
    max_piece_bytes: usize,
}

#[derive(Deserialize)]
struct RawUnigram {
    #[serde(rename = "type")]
    kind: Option<String>,
    unk_id: Option<usize>,
    vocab: Vec<(String, f64)>,
    #[serde(default)]
    byte_fallback: bool,
}

impl TryFrom<RawUnigram> for CompactUnigram {
    type Error = String;

    fn try_from(raw: RawUnigram) -> Result<Self, String> {
        if raw.kind.as_deref() != Some("Unigram") {
            return Err("not a Unigram model".into());
        }
        if raw.byte_fallback {
            return Err(
                "byte_fallback Unigram models are not supported by the compact model".into(),
            );
        }
        let unk = raw.unk_id.ok_or("Unigram model without unk_id")?;
        if unk >= raw.vocab.len() {
            return Err(format!(
                "unk_id {unk} outside a vocabulary of {}",
                raw.vocab.len()
            ));
        }
        let n = u32::try_from(raw.vocab.len()).map_err(|_| "vocabulary too large")?;
        let mut pieces = Vec::with_capacity(n as usize);
        let mut scores = Vec::with_capacity(n as usize);
        let mut ids = HashMap::with_capacity(n as usize);
        let mut min_score = f64::INFINITY;
        let mut max_piece_bytes = 1;
        for (id, (piece, score)) in (0u32..).zip(raw.vocab) {
            min_score = min_score.min(score);
            max_piece_bytes = max_piece_bytes.max(piece.len());
            let piece: Box<str> = piece.into_boxed_str();
            // Like `tokenizers`, a duplicated piece maps to its last id.
            ids.insert(piece.clone(), id);
            pieces.push(piece);
            scores.push(score);
        }
        Ok(CompactUnigram {
            pieces,
            scores,
            ids,
            unk_id: unk as u32,
            unk_score: min_score - UNK_PENALTY,
            max_piece_bytes,
        })
    }
}

#[derive(Clone, Copy)]
struct Best {
    id: u32,
    score: f64,
    start: Option<usize>,
}

impl CompactUnigram {
    /// The best segmentation of `s` as pieces (unknown runs fused).
    fn segment<'s>(&self, s: &'s str) -> Vec<&'s str> {
        let size = s.len();
        let mut best = vec![
            Best {
                id: 0,
                score: 0.0,
                start: None
            };
            size + 1
        ];
        let mut pos = 0;
        while pos < size {
            let here = best[pos].score;
            let Some(first) = s[pos..].chars().next() else {
                break;
            };
            let mblen = first.len_utf8();
            let mut has_single = false;
            let limit = size.min(pos + self.max_piece_bytes);
            // Ends in increasing order: the same order as a trie's prefix search.
            for end in (pos + 1..=limit).filter(|&e| s.is_char_boundary(e)) {
                let Some(&id) = self.ids.get(&s[pos..end]) else {
                    continue;
                };
                let cand = self.scores[id as usize] + here;
                let node = &mut best[end];
                if node.start.is_none() || cand > node.score {
                    *node = Best {
                        id,
                        score: cand,
                        start: Some(pos),
                    };
                }
                if end - pos == mblen {
                    has_single = true;
                }
            }
            if !has_single {
                let cand = self.unk_score + here;
                let node = &mut best[pos + mblen];
                if node.start.is_none() || cand > node.score {
                    *node = Best {
                        id: self.unk_id,
                        score: cand,
                        start: Some(pos),
                    };
                }
            }
            pos += mblen;
        }
        let mut out: Vec<&str> = Vec::new();
        let mut end = size;
        let mut unk_from: Option<usize> = None; // fused unknown run [start, unk_end)
        let mut unk_end = 0;
        while end > 0 {
            let node = best[end];
            let start = node.start.unwrap_or(0);
            if node.id == self.unk_id {
                if unk_from.is_none() {
                    unk_end = end;
                }
                unk_from = Some(start);
            } else {
                if let Some(from) = unk_from.take() {
                    out.push(&s[from..unk_end]);
                }
                out.push(&s[start..end]);
            }
            end = start;
        }
        if let Some(from) = unk_from {
            out.push(&s[from..unk_end]);
        }
        out.reverse();
        out
    }
}

impl Model for CompactUnigram {
    type Trainer = tokenizers::models::unigram::UnigramTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        let mut offset = 0;
        let mut tokens = Vec::new();
        for piece in self.segment(sequence) {
            let id = self.ids.get(piece).copied().unwrap_or(self.unk_id);
            tokens.push(Token::new(
                id,
                piece.to_string(),
                (offset, offset + piece.len()),
            ));
            offset += piece.len();
        }
        Ok(tokens)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.pieces.get(id as usize).map(|p| p.to_string())
    }

    fn get_vocab(&self) -> std::collections::HashMap<String, u32> {
        self.ids.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("CompactUnigram is read-only".into())
    }

    fn get_trainer(&self) -> Self::Trainer {
        Self::Trainer::default()
    }
}

type CompactTokenizer = TokenizerImpl<
    CompactUnigram,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A loaded tokenizer: `tokenizers`' own, or the same pipeline around a
/// [`CompactUnigram`].
pub enum Tok {
    Standard(Box<Tokenizer>),
    Compact(Box<CompactTokenizer>),
}

#[derive(Deserialize)]
struct Probe {
    model: ProbeModel,
}

#[derive(Deserialize)]
struct ProbeModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
}

impl Tok {
    /// Reads `tokenizer.json`; Unigram models get the compact model.
    pub fn from_file(path: &Path) -> Result<Tok, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let probe: Probe = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        if probe.model.kind.as_deref() == Some("Unigram") && !probe.model.byte_fallback {
            let t: CompactTokenizer = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            Ok(Tok::Compact(Box::new(t)))
        } else {
            let t = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| e.to_string())?;
            Ok(Tok::Standard(Box::new(t)))
        }
    }

    /// `tokenizers`' own loader, whatever the model type (tests compare the two).
    #[cfg(test)]
    pub fn standard_from_file(path: &Path) -> Result<Tok, String> {
        let t = Tokenizer::from_file(path).map_err(|e| e.to_string())?;
        Ok(Tok::Standard(Box::new(t)))
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tok::Standard(t) => t.get_vocab_size(true),
            Tok::Compact(t) => t.get_vocab_size(true),
        }
    }

    /// Truncate to `max_len` tokens (special tokens included); no padding.
    pub fn set_limits(&mut self, max_len: usize) -> Result<(), String> {
        let trunc = Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        });
        match self {
            Tok::Standard(t) => {
                t.with_truncation(trunc).map_err(|e| e.to_string())?;
                t.with_padding(None);
            }
            Tok::Compact(t) => {
                t.with_truncation(trunc).map_err(|e| e.to_string())?;
                t.with_padding(None);
            }
        }
        Ok(())
    }

    /// Token ids of `text` with the model's special tokens.
    pub fn encode(&self, text: String) -> Result<Vec<u32>, String> {
        let enc: Encoding = match self {
            Tok::Standard(t) => t.encode(text, true),
            Tok::Compact(t) => t.encode(text, true),
        }
        .map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn is_compact(&self) -> bool {
        matches!(self, Tok::Compact(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Chinese-capable model's tokenizer (XLM-R Unigram), as the tests find it.
    fn zh_tokenizer_json() -> PathBuf {
        let dir = std::env::var_os("KOTAEMON_TEST_ZH_EMBED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/kotaemon-models/multilingual-e5-small-q4"));
        let path = dir.join("tokenizer.json");
        assert!(
            path.is_file(),
            "{} is missing: run crates/kotaemon-embed/scripts/install-models.sh \
             (or set KOTAEMON_TEST_ZH_EMBED_DIR to a multilingual-e5-small directory)",
            path.display()
        );
        path
    }

    #[test]
    fn compact_unigram_matches_tokenizers_unigram() {
        let path = zh_tokenizer_json();
        let mut compact = Tok::from_file(&path).expect("compact");
        assert!(compact.is_compact());
        let mut standard = Tok::standard_from_file(&path).expect("standard");
        assert_eq!(compact.vocab_size(), standard.vocab_size());
        for t in [&mut compact, &mut standard] {
            t.set_limits(512).expect("limits");
        }
        let pairs = include_str!("../tests/data/pairs.tsv");
        let mut corpus: Vec<String> = pairs
            .lines()
            .skip(1)
            .flat_map(|l| {
                l.split('\t')
                    .skip(3)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        corpus.extend(
            [
                "",
                " ",
                "   leading and   inner   spaces   ",
                "query: 明天上午10点开会",
                "Ünïcödé àccents, ﬁ ligature, ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３",
                "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧",
                "罕见字：龘靐齉爩 𠀀𪚥 (rare and astral CJK)",
                "日本語のテキストと한국어 텍스트",
                "Ελληνικά, русский, العربية, हिन्दी",
                "tabs\tand\nnewlines\r\n",
                "<s> literal special tokens </s> <unk> <pad>",
                "a".repeat(600).as_str(),
                "数字123和English混在一起，还有标点！？。",
                "\u{0}\u{1f}control\u{7f}chars",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        // Deterministic pseudo-random mixes of scripts, digits, spaces and punctuation.
        let pool: Vec<char> = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年\
            abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ,.!?;:'\"-()[]{}\
            。，！？；：“”、《》～￥αβγдждابتअआカタナひらがな한국😀🎉\u{00e9}\u{0301}\u{200d}\u{3000}"
            .chars()
            .collect();
        let mut seed: u64 = 0x5eed;
        for _ in 0..300 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1 + (seed >> 58) as usize;
            let mut text = String::new();
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push(pool[(seed >> 33) as usize % pool.len()]);
            }
            corpus.push(text);
        }
        for text in &corpus {
            let a = compact.encode(text.clone()).expect("compact encode");
            let b = standard.encode(text.clone()).expect("standard encode");
            assert_eq!(a, b, "token ids differ for {text:?}");
        }
    }
}
