//! `pii_guard`, the first and last stage: names, phones, ID and card numbers, emails,
//! addresses and credentials are replaced on the device before anything goes further in, and
//! the real values are put back on the way out — in answers, in streamed chunks (a pseudonym
//! split across chunks is held back just long enough), and in tool-call arguments before a tool
//! runs; tool results are masked again before they go back to the model.
//!
//! Modes: `pseudonymize` (default, reversible), `redact` (irreversible), `block` (turns with
//! the listed entity kinds never leave the device: they are answered by the local model, or
//! refused), `off`. The guard fails closed: if it cannot mask, the turn does not go out.

pub mod recognize;
pub mod vault;

use crate::events::TurnEvent;
use crate::pipeline::{Next, Stage, TurnError};
use crate::tools::contacts::{self, ContactsConfig};
use crate::turn::{Reply, Route, Turn};
use crate::wire::{ChatMessage, MessageContent};
use futures::StreamExt;
use recognize::Recognizers;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use vault::{Replace, StreamRestorer, Vault};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Pseudonymize,
    Redact,
    Block,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiiGuardConfig {
    pub mode: Mode,
    /// `block` mode: entity kinds that keep a turn on the device (person, email, phone,
    /// id_number, bank_card, ip, credential, custom). Other kinds are pseudonymized.
    pub block: Vec<String>,
    /// Extra recognizers: `{ label = "employee", pattern = "EMP-\\d{5}" }`.
    pub custom: Vec<CustomPattern>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    pub label: String,
    pub pattern: String,
}

impl Default for PiiGuardConfig {
    fn default() -> Self {
        PiiGuardConfig {
            mode: Mode::Pseudonymize,
            block: vec!["id_number".into(), "bank_card".into(), "credential".into()],
            custom: Vec::new(),
        }
    }
}

const KINDS: &[&str] = &[
    "person",
    "email",
    "phone",
    "id_number",
    "bank_card",
    "ip",
    "credential",
    "custom",
];

pub struct PiiGuard {
    mode: Mode,
    block: Vec<String>,
    recognizers: Arc<Recognizers>,
}

impl PiiGuard {
    /// Names come from the contacts directory (`[tools.contacts]`), even when its tool is off.
    pub fn new(
        config: &PiiGuardConfig,
        contacts: &ContactsConfig,
    ) -> Result<Option<Self>, Vec<String>> {
        let mut p = Vec::new();
        for (i, k) in config.block.iter().enumerate() {
            if !KINDS.contains(&k.as_str()) {
                p.push(format!(
                    "stages.pii_guard.block[{i}]: `{k}` is not one of {KINDS:?}"
                ));
            }
        }
        for (i, c) in config.custom.iter().enumerate() {
            if c.label.is_empty()
                || !c
                    .label
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                p.push(format!(
                    "stages.pii_guard.custom[{i}].label: letters, digits and _ only"
                ));
            }
        }
        let directory = if contacts.path.is_some() || !contacts.entries.is_empty() {
            match contacts::directory(contacts) {
                Ok(d) => d,
                Err(e) => {
                    p.push(format!("tools.contacts.{e}"));
                    Default::default()
                }
            }
        } else {
            Default::default()
        };
        let custom: Vec<(String, String)> = config
            .custom
            .iter()
            .map(|c| (c.label.clone(), c.pattern.clone()))
            .collect();
        let recognizers = Recognizers::new(&directory, &custom)
            .map_err(|e| vec![format!("stages.pii_guard.{e}")]);
        let recognizers = match recognizers {
            Ok(r) => Some(r),
            Err(mut e) => {
                p.append(&mut e);
                None
            }
        };
        if !p.is_empty() {
            return Err(p);
        }
        Ok(match (config.mode, recognizers) {
            (Mode::Off, _) | (_, None) => None,
            (mode, Some(r)) => Some(PiiGuard {
                mode,
                block: config.block.clone(),
                recognizers: Arc::new(r),
            }),
        })
    }

    fn mask_message(&self, vault: &Vault, m: &mut ChatMessage) {
        match &mut m.content {
            Some(MessageContent::Text(t)) => *t = vault.mask(&self.recognizers, t),
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    if let Some(Value::String(t)) = part.get_mut("text") {
                        *t = vault.mask(&self.recognizers, t);
                    }
                }
            }
            None => {}
        }
        // Earlier tool calls' arguments in the conversation.
        if let Some(Value::Array(calls)) = m.extra.get_mut("tool_calls") {
            for c in calls {
                if let Some(Value::String(a)) = c.pointer_mut("/function/arguments") {
                    *a = vault.mask(&self.recognizers, a);
                }
            }
        }
    }
}

/// What the tool loop needs to keep real values on the device: restore arguments before a
/// tool runs, mask results before they go back to the model.
pub struct TurnPii {
    vault: Arc<Vault>,
    recognizers: Arc<Recognizers>,
}

impl TurnPii {
    pub fn restore(&self, text: &str) -> String {
        self.vault.restore(text)
    }
    pub fn mask(&self, text: &str) -> String {
        self.vault.mask(&self.recognizers, text)
    }
    pub fn restore_json(&self, value: &mut Value) {
        restore_json(&self.vault, value)
    }
}

/// Restores every string a client sees in a JSON answer (content and tool-call arguments).
fn restore_json(vault: &Vault, v: &mut Value) {
    match v {
        Value::String(s) => {
            if s.contains('<') {
                *s = vault.restore(s);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| restore_json(vault, x)),
        Value::Object(o) => o.values_mut().for_each(|x| restore_json(vault, x)),
        _ => {}
    }
}

#[async_trait::async_trait]
impl Stage for PiiGuard {
    fn name(&self) -> &'static str {
        "pii_guard"
    }

    async fn handle(&self, mut turn: Turn, next: Next<'_>) -> Result<Reply, TurnError> {
        let replace = if self.mode == Mode::Redact {
            Replace::Redact
        } else {
            Replace::Pseudonym
        };
        let vault = Arc::new(Vault::new(replace));
        for m in &mut turn.request.messages {
            self.mask_message(&vault, m);
        }
        let found = vault.found();
        let mut counts: Vec<(&'static str, u32)> = Vec::new();
        for e in &found {
            let kind = KINDS
                .iter()
                .find(|k| **k == e.kind())
                .copied()
                .unwrap_or("custom");
            match counts.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((kind, 1)),
            }
        }
        for (kind, count) in &counts {
            turn.ctx.emit(TurnEvent::PiiMasked {
                turn: turn.id().clone(),
                entity: kind,
                count: *count,
            });
        }
        let blocked = self.mode == Mode::Block
            && counts
                .iter()
                .any(|(k, _)| self.block.iter().any(|b| b == k));
        let decision = if blocked {
            // Never uploaded: the local model answers (or the llm stage refuses: no model).
            turn.hints.route = Some(Route::Local);
            "blocked_local"
        } else if found.is_empty() {
            "clean"
        } else {
            "masked"
        };
        turn.ctx.emit(TurnEvent::StageDecided {
            turn: turn.id().clone(),
            stage: self.name(),
            decision,
        });
        turn.pii = Some(Arc::new(TurnPii {
            vault: vault.clone(),
            recognizers: self.recognizers.clone(),
        }));
        let reply = next.run(turn).await?;
        Ok(match reply {
            Reply::Complete(mut c) => {
                restore_json(&vault, &mut c.body);
                Reply::Complete(c)
            }
            Reply::Stream(stream) => Reply::Stream(restore_stream(vault, stream)),
        })
    }
}

/// Restores a stream: text deltas and (client-side) tool-call argument deltas each through a
/// restorer that holds back a split pseudonym; what is held at the finish is flushed first.
fn restore_stream(vault: Arc<Vault>, stream: crate::turn::ChunkStream) -> crate::turn::ChunkStream {
    let mut text = StreamRestorer::default();
    let mut args: std::collections::BTreeMap<u64, StreamRestorer> = Default::default();
    let mut last_id: Option<Value> = None;
    stream
        .flat_map(move |item| {
            let items: Vec<_> = match item {
                Ok(mut chunk) => {
                    if let Some(id) = chunk.body.get("id") {
                        last_id = Some(id.clone());
                    }
                    if let Some(Value::String(t)) = chunk.body.pointer_mut("/choices/0/delta/content") {
                        *t = text.push(&vault, t);
                    }
                    if let Some(Value::Array(calls)) = chunk.body.pointer_mut("/choices/0/delta/tool_calls") {
                        for c in calls {
                            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                            if let Some(Value::String(a)) = c.pointer_mut("/function/arguments") {
                                *a = args.entry(index).or_default().push(&vault, a);
                            }
                        }
                    }
                    let mut out = Vec::new();
                    if chunk.finish_reason().is_some() || chunk.is_usage_only() {
                        let rest = text.finish(&vault);
                        let mut delta = serde_json::Map::new();
                        if !rest.is_empty() {
                            delta.insert("content".into(), Value::String(rest));
                        }
                        let calls: Vec<Value> = std::mem::take(&mut args)
                            .into_iter()
                            .filter_map(|(i, mut r)| {
                                let a = r.finish(&vault);
                                (!a.is_empty()).then(|| serde_json::json!({"index": i, "function": {"arguments": a}}))
                            })
                            .collect();
                        if !calls.is_empty() {
                            delta.insert("tool_calls".into(), Value::Array(calls));
                        }
                        if !delta.is_empty() {
                            out.push(Ok(crate::wire::Chunk {
                                body: serde_json::json!({"id": last_id.clone().unwrap_or(Value::Null),
                                    "object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": null}]}),
                            }));
                        }
                    }
                    out.push(Ok(chunk));
                    out
                }
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(items)
        })
        .boxed()
}
