//! What a model call costs: a price table per model (USD per million tokens) and per-hour
//! prices for self-hosted GPU upstreams (whose tokens then cost nothing extra), plus a token
//! estimate for upstreams that report no usage.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `[usage]`: the ledger and the price table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Record every model call and turn in a SQLite ledger (`kotaemon usage` reads it).
    pub enabled: bool,
    /// The ledger file (default: `<data dir>/usage.db`).
    pub path: Option<PathBuf>,
    /// USD per million tokens, by the model name clients ask for; `"*"` prices every other.
    pub prices: BTreeMap<String, TokenPrice>,
    /// USD per hour of upstreams billed by the hour (a rented GPU running vLLM): their tokens
    /// are free at the margin; the hours are counted by the GPU controller.
    pub gpu_hour: BTreeMap<String, f64>,
    /// The model whose prices value a turn answered on the device ("saved"): the cloud model
    /// that would have answered it.
    pub reference_model: String,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            path: None,
            prices: BTreeMap::new(),
            gpu_hour: BTreeMap::new(),
            reference_model: "*".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrice {
    /// USD per million prompt tokens.
    pub input: f64,
    /// USD per million completion tokens.
    pub output: f64,
}

impl UsageConfig {
    pub fn validate(&self, path: &str, upstreams: &[&str], p: &mut Vec<String>) {
        for (model, price) in &self.prices {
            for (what, v) in [("input", price.input), ("output", price.output)] {
                if !v.is_finite() || v < 0.0 {
                    p.push(format!(
                        "{path}.prices.\"{model}\".{what}: must be a non-negative number"
                    ));
                }
            }
        }
        for (upstream, usd) in &self.gpu_hour {
            if !usd.is_finite() || *usd < 0.0 {
                p.push(format!(
                    "{path}.gpu_hour.\"{upstream}\": must be a non-negative number"
                ));
            }
            if !upstreams.contains(&upstream.as_str()) {
                p.push(format!(
                    "{path}.gpu_hour.\"{upstream}\": no upstream has this name"
                ));
            }
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| crate::models::default_data_dir().join("usage.db"))
    }

    fn price(&self, model: &str) -> Option<TokenPrice> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get("*"))
            .copied()
    }

    /// The cost of one call. Upstreams billed by the hour cost nothing per token.
    pub fn call_cost(&self, upstream: &str, model: &str, prompt: u64, completion: u64) -> f64 {
        if self.gpu_hour.contains_key(upstream) {
            return 0.0;
        }
        self.price(model)
            .map(|p| token_cost(p, prompt, completion))
            .unwrap_or(0.0)
    }

    /// What the reference cloud model would have charged for a turn answered on the device.
    pub fn reference_cost(&self, prompt: u64, completion: u64) -> f64 {
        self.price(&self.reference_model)
            .map(|p| token_cost(p, prompt, completion))
            .unwrap_or(0.0)
    }
}

fn token_cost(p: TokenPrice, prompt: u64, completion: u64) -> f64 {
    (prompt as f64 * p.input + completion as f64 * p.output) / 1_000_000.0
}

/// Tokens in `text` when no tokenizer is at hand: a CJK character is about one token in the
/// tokenizers of current models, other text about four characters per token. Good to ±30%
/// for budgeting; calls whose tokens were estimated are marked so in the ledger.
pub fn estimate_tokens(text: &str) -> u64 {
    let mut cjk = 0u64;
    let mut other = 0u64;
    for c in text.chars() {
        if is_cjk(c) {
            cjk += 1;
        } else {
            other += 1;
        }
    }
    cjk + other.div_ceil(4)
}

/// Prompt tokens of a request, estimated from its message texts (plus a few per message for
/// the chat template).
pub fn estimate_request_tokens(request: &crate::wire::ChatRequest) -> u64 {
    use crate::wire::MessageContent;
    request
        .messages
        .iter()
        .map(|m| {
            4 + match &m.content {
                Some(MessageContent::Text(t)) => estimate_tokens(t),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
                    .map(estimate_tokens)
                    .sum(),
                None => 0,
            }
        })
        .sum()
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // kana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // Hangul
        | 0xF900..=0xFAFF    // compatibility ideographs
        | 0xFF00..=0xFFEF    // full-width forms
        | 0x3000..=0x303F) // CJK punctuation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UsageConfig {
        let mut c = UsageConfig::default();
        c.prices.insert(
            "gpt-4o".into(),
            TokenPrice {
                input: 2.5,
                output: 10.0,
            },
        );
        c.prices.insert(
            "*".into(),
            TokenPrice {
                input: 0.5,
                output: 1.5,
            },
        );
        c.gpu_hour.insert("t4".into(), 0.53);
        c
    }

    #[test]
    fn prices_by_model_with_a_default_and_free_tokens_on_hourly_gpus() {
        let c = config();
        assert!((c.call_cost("cloud", "gpt-4o", 1_000_000, 100_000) - 3.5).abs() < 1e-9);
        assert!((c.call_cost("cloud", "other", 2_000_000, 0) - 1.0).abs() < 1e-9);
        assert_eq!(c.call_cost("t4", "gpt-4o", 1_000_000, 1_000_000), 0.0);
        assert_eq!(
            UsageConfig::default().call_cost("cloud", "gpt-4o", 1000, 1000),
            0.0
        );
        assert!((c.reference_cost(1_000_000, 0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn estimates_count_chinese_characters_and_english_words() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("帮我安排明天的会议"), 9);
        assert_eq!(estimate_tokens("abcdefgh"), 2);
        assert_eq!(estimate_tokens("会议 at 10"), 2 + 2);
    }

    #[test]
    fn bad_prices_and_unknown_gpu_upstreams_are_reported() {
        let mut c = config();
        c.prices.insert(
            "bad".into(),
            TokenPrice {
                input: -1.0,
                output: f64::NAN,
            },
        );
        let mut p = Vec::new();
        c.validate("usage", &["cloud"], &mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().any(|m| m.contains("usage.gpu_hour.\"t4\"")));
    }
}
