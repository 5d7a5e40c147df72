//! What a cached answer is keyed by. The namespace holds everything besides the last user
//! message that changes an answer — model, system prompts, earlier turns, tools, response
//! format, sampling options, the end user and the client key — so different personas, users
//! or conversations never share entries. Within a namespace the exact key is the normalized
//! last user message; the semantic layer compares its embedding.

use crate::turn::Turn;
use crate::wire::{MessageContent, Role};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Request fields that change the answer, besides the messages.
const ANSWER_SHAPING: &[&str] = &[
    "tool_choice",
    "response_format",
    "user",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "reasoning_effort",
];

/// Why a turn is not looked up or stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The client brought tools: answers may be tool calls, which are actions, not text.
    Tools,
    /// The conversation carries tool results.
    ToolMessages,
    /// The client asked for randomness (temperature > 0, n > 1) and sampled caching is off.
    Sampled,
    /// The last message is not a plain-text user message.
    NotText,
}

impl Skip {
    pub fn code(self) -> &'static str {
        match self {
            Skip::Tools => "skipped-tools",
            Skip::ToolMessages => "skipped-tool-messages",
            Skip::Sampled => "skipped-sampled",
            Skip::NotText => "skipped-not-text",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub namespace: String,
    /// The last user message as asked (for embedding and the precision guard).
    pub prompt: String,
    /// The normalized prompt (exact layer).
    pub normalized: String,
    pub exact: String,
}

fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Lowercase, single spaces, no trailing punctuation: "What time is it?" == "what time is it".
pub fn normalize(text: &str) -> String {
    let lowered = text.to_lowercase();
    let collapsed = lowered.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_end_matches(|c: char| "?？!！.。,，~～ ".contains(c))
        .to_string()
}

pub fn key_for(turn: &Turn, client: Option<&str>, include_sampled: bool) -> Result<CacheKey, Skip> {
    let request = &turn.request;
    if request.tools.is_some() {
        return Err(Skip::Tools);
    }
    if request.messages.iter().any(|m| {
        matches!(m.role, Role::Tool | Role::Function) || m.extra.contains_key("tool_calls")
    }) {
        return Err(Skip::ToolMessages);
    }
    let sampled = request
        .extra
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t > 0.0)
        || request
            .extra
            .get("n")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1);
    if sampled && !include_sampled {
        return Err(Skip::Sampled);
    }
    let (last, earlier) = request.messages.split_last().ok_or(Skip::NotText)?;
    let prompt = match (&last.role, &last.content) {
        (Role::User, Some(MessageContent::Text(t))) if !t.trim().is_empty() => t.clone(),
        _ => return Err(Skip::NotText),
    };
    let shaping: serde_json::Map<String, Value> = ANSWER_SHAPING
        .iter()
        .filter_map(|k| request.extra.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let namespace = sha(&json!({
        "model": request.model,
        "earlier": earlier,
        "shaping": shaping,
        "client": client,
    })
    .to_string());
    let normalized = normalize(&prompt);
    let exact = sha(&format!("{namespace}\n{normalized}"));
    Ok(CacheKey {
        namespace,
        prompt,
        normalized,
        exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventBus;
    use crate::turn::Origin;
    use crate::wire::ChatRequest;

    fn turn(body: Value) -> Turn {
        Turn::new(
            EventBus::new(16),
            Origin::Api,
            serde_json::from_value::<ChatRequest>(body).unwrap(),
            std::time::Duration::from_secs(5),
        )
    }

    fn key(body: Value) -> Result<CacheKey, Skip> {
        key_for(&turn(body), None, false)
    }

    #[test]
    fn normalization_ignores_case_spaces_and_trailing_punctuation() {
        assert_eq!(normalize("  What   time is it?? "), "what time is it");
        assert_eq!(normalize("现在几点？"), "现在几点");
        assert_ne!(normalize("Is it 10?"), normalize("Is it 11?"));
    }

    #[test]
    fn everything_that_changes_the_answer_changes_the_namespace() {
        let base = json!({"model": "m", "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello?"}]});
        let k = key(base.clone()).unwrap();
        let variants = [
            json!({"model": "m", "messages": [{"role": "system", "content": "You are a lawyer."}, {"role": "user", "content": "Hello?"}]}),
            json!({"model": "m2", "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello?"}]}),
            json!({"model": "m", "user": "alice", "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello?"}]}),
            json!({"model": "m", "response_format": {"type": "json_object"}, "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello?"}]}),
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello?"}]}),
        ];
        for v in variants {
            assert_ne!(key(v.clone()).unwrap().namespace, k.namespace, "{v}");
        }
        assert_ne!(
            key_for(&turn(base.clone()), Some("key#1"), false)
                .unwrap()
                .namespace,
            k.namespace,
            "client keys are isolated"
        );
        let same = json!({"model": "m", "stream": true, "messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hello"}]});
        assert_eq!(
            key(same).unwrap().exact,
            k.exact,
            "streaming and case do not change the answer"
        );
    }

    #[test]
    fn tools_tool_results_and_sampling_are_not_cached() {
        let tools = json!({"model": "m", "tools": [{"type": "function"}], "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(key(tools), Err(Skip::Tools));
        let tool_msg = json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42", "tool_call_id": "c"}]});
        assert_eq!(key(tool_msg), Err(Skip::ToolMessages));
        let sampled = json!({"model": "m", "temperature": 0.8, "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(key(sampled.clone()), Err(Skip::Sampled));
        assert!(key_for(&turn(sampled), None, true).is_ok());
        let greedy =
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "x"}]});
        assert!(key(greedy).is_ok());
    }
}
