//! OpenAI chat-completions JSON shapes, spoken both to terminals (`api/`) and to
//! OpenAI-compatible upstreams (`upstream/openai.rs`). This is the only module that knows
//! field names of the wire format; everything else goes through these types.
//!
//! Requests are parsed into typed fields where Kotaemon needs them and keep every other field
//! in `extra`, so options we do not know (`logprobs`, `seed`, vendor extensions…) reach the
//! upstream untouched. Responses stay JSON values with typed accessors: we relay what the
//! upstream said, including `tool_calls` and fields newer than this code.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Client-side tools: passed through untouched; the client runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(MessageContent::Text(text.into())),
            extra: Map::new(),
        }
    }
}

/// A message's content: a plain string or a list of typed parts (text, image_url, …).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

impl ChatRequest {
    /// One user utterance, answered whole (plugins, the MQTT bridge).
    pub fn utterance(model: &str, text: impl Into<String>) -> Self {
        ChatRequest {
            model: model.to_string(),
            messages: vec![ChatMessage::text(Role::User, text)],
            stream: Some(false),
            stream_options: None,
            tools: None,
            extra: Map::new(),
        }
    }

    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn client_wants_usage_in_stream(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// Checks the schema rules serde cannot express. The error names the field.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let invalid = |param: String, message: String| Err(InvalidField { param, message });
        if self.model.trim().is_empty() {
            return invalid("model".into(), "`model` must not be empty".into());
        }
        if self.messages.is_empty() {
            return invalid(
                "messages".into(),
                "`messages` must contain at least one message".into(),
            );
        }
        if let Some(tools) = &self.tools {
            if let Some(i) = tools.iter().position(|t| !t.is_object()) {
                return invalid(
                    format!("tools[{i}]"),
                    format!("`tools[{i}]` must be an object"),
                );
            }
        }
        if self.stream_options.is_some() && !self.wants_stream() {
            return invalid(
                "stream_options".into(),
                "`stream_options` is only allowed when `stream` is true".into(),
            );
        }
        Ok(())
    }

    /// The body sent upstream: the same request with the upstream's model name. Streams always
    /// ask for usage (we account tokens); the API strips it again if the client did not ask.
    pub fn to_upstream_body(
        &self,
        model: &str,
        stream: bool,
    ) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct Outgoing<'a> {
            model: &'a str,
            messages: &'a [ChatMessage],
            stream: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            stream_options: Option<StreamOptions>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tools: Option<&'a Vec<Value>>,
            #[serde(flatten)]
            extra: &'a Map<String, Value>,
        }
        let stream_options = stream.then(|| {
            let mut o = self.stream_options.clone().unwrap_or_default();
            o.include_usage = Some(true);
            o
        });
        serde_json::to_vec(&Outgoing {
            model,
            messages: &self.messages,
            stream,
            stream_options,
            tools: self.tools.as_ref(),
            extra: &self.extra,
        })
    }

    /// The functions offered in `tools`: name, description, JSON Schema of the arguments.
    pub fn offered_functions(&self) -> Vec<(String, String, Value)> {
        self.tools
            .iter()
            .flatten()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some((
                    f.get("name")?.as_str()?.to_string(),
                    f.get("description")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    f.get("parameters").cloned().unwrap_or(Value::Null),
                ))
            })
            .collect()
    }

    /// The last user message's text, wherever the conversation is (rules and the router look
    /// at it on every turn, follow-ups included).
    pub fn last_user_text(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .and_then(|m| match &m.content {
                Some(MessageContent::Text(t)) => Some(t.as_str()),
                _ => None,
            })
    }

    /// Rough prompt size in characters, for accounting and routing signals.
    pub fn prompt_chars(&self) -> usize {
        self.messages
            .iter()
            .map(|m| match &m.content {
                Some(MessageContent::Text(t)) => t.chars().count(),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .map(|t| t.chars().count())
                    .sum(),
                None => 0,
            })
            .sum()
    }
}

/// A request field that breaks a rule: `param` is its path, as in OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub param: String,
    pub message: String,
}

/// Token counts as reported by an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

fn usage_of(body: &Value) -> Option<Usage> {
    body.get("usage")
        .filter(|u| !u.is_null())
        .and_then(|u| serde_json::from_value(u.clone()).ok())
}

/// A complete, non-streamed chat completion, relayed as the upstream sent it.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Value,
}

/// Seconds since the Unix epoch, for `created`.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A text answer made on the device (rules, cache, local model), in the same shapes an
/// upstream would send, so every sink renders it the same way.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    pub id: String,
    pub model: String,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// Tool calls made on the device's side (the local model's): when set, the answer is
    /// these calls (`finish_reason: tool_calls`).
    pub tool_calls: Vec<ToolCall>,
}

impl LocalAnswer {
    pub fn new(id_prefix: &str, model: &str, text: String, usage: Usage) -> Self {
        LocalAnswer {
            id: format!("chatcmpl-{id_prefix}-{}", uuid::Uuid::new_v4().simple()),
            model: model.to_string(),
            text,
            finish_reason: "stop".into(),
            usage,
            tool_calls: Vec::new(),
        }
    }

    pub fn completion(&self) -> Completion {
        let message = if self.tool_calls.is_empty() {
            serde_json::json!({"role": "assistant", "content": self.text})
        } else {
            serde_json::json!({"role": "assistant", "content": null,
                               "tool_calls": self.tool_calls_json(false)})
        };
        Completion {
            body: serde_json::json!({
                "id": self.id, "object": "chat.completion", "created": unix_now(), "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
                "usage": self.usage,
            }),
        }
    }

    fn tool_calls_json(&self, indexed: bool) -> Vec<Value> {
        self.tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = serde_json::json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}});
                if indexed {
                    v["index"] = i.into();
                }
                v
            })
            .collect()
    }

    /// A complete upstream answer's text, to be streamed on (a step of the tool loop).
    pub fn from_completion(c: &Completion) -> Self {
        LocalAnswer {
            id: c
                .body
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or("chatcmpl")
                .to_string(),
            model: c
                .body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            text: c.content().unwrap_or("").to_string(),
            finish_reason: c.finish_reason().unwrap_or("stop").to_string(),
            usage: c.usage().unwrap_or_default(),
            tool_calls: Vec::new(),
        }
    }

    /// The answer's chunks without the opening role chunk: for a stream already under way.
    pub fn chunks_after_role(&self) -> Vec<Chunk> {
        let mut chunks = self.chunks(&[self.text.as_str()]);
        chunks.remove(0);
        chunks
    }

    /// The answer as a stream: role, the text in pieces, finish, usage — like an upstream
    /// asked for `include_usage`.
    pub fn chunks(&self, pieces: &[&str]) -> Vec<Chunk> {
        let created = unix_now();
        let chunk = |delta: Value, finish: Value| Chunk {
            body: serde_json::json!({
                "id": self.id, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }),
        };
        let mut out = vec![chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        out.extend(
            pieces
                .iter()
                .map(|p| chunk(serde_json::json!({"content": p}), Value::Null)),
        );
        if !self.tool_calls.is_empty() {
            out.push(chunk(
                serde_json::json!({"tool_calls": self.tool_calls_json(true)}),
                Value::Null,
            ));
        }
        out.push(chunk(
            serde_json::json!({}),
            Value::String(self.finish_reason.clone()),
        ));
        out.push(Chunk {
            body: serde_json::json!({
                "id": self.id, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [], "usage": self.usage,
            }),
        });
        out
    }
}

impl Completion {
    /// Checks the minimal shape every OpenAI-compatible answer has; anything else is an
    /// upstream fault, not something to hand to a client as success.
    pub fn from_body(body: Value) -> Result<Self, String> {
        match body.get("choices") {
            Some(Value::Array(_)) => Ok(Completion { body }),
            _ => Err("completion has no `choices` array".into()),
        }
    }
    pub fn usage(&self) -> Option<Usage> {
        usage_of(&self.body)
    }
    pub fn finish_reason(&self) -> Option<&str> {
        self.body
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
    }
    pub fn content(&self) -> Option<&str> {
        self.body
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
    }
    /// The assistant's `tool_calls`, when it asked for any.
    pub fn tool_calls(&self) -> Option<&Vec<Value>> {
        self.body
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
    }
}

impl ChatMessage {
    /// The assistant's turn that asked for tools, as it goes back into the conversation.
    pub fn assistant_tool_calls(text: Option<String>, calls: &[ToolCall]) -> Self {
        let mut extra = Map::new();
        extra.insert(
            "tool_calls".into(),
            Value::Array(
                calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect(),
            ),
        );
        ChatMessage {
            role: Role::Assistant,
            content: text.filter(|t| !t.is_empty()).map(MessageContent::Text),
            extra,
        }
    }

    /// The tool calls an assistant message carries (the conversation so far of a tool loop).
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        self.extra
            .get("tool_calls")
            .and_then(Value::as_array)
            .map(|calls| calls.iter().map(ToolCall::from_message).collect())
            .unwrap_or_default()
    }

    /// A tool's result for the model.
    pub fn tool_result(call_id: &str, content: String) -> Self {
        let mut extra = Map::new();
        extra.insert("tool_call_id".into(), Value::String(call_id.to_string()));
        ChatMessage {
            role: Role::Tool,
            content: Some(MessageContent::Text(content)),
            extra,
        }
    }
}

/// One tool call the model asked for; `arguments` is the raw JSON text it wrote (possibly
/// malformed: the tool loop reports that back to the model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// From a complete message's `tool_calls[]` entry.
    pub fn from_message(v: &Value) -> ToolCall {
        let s = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        ToolCall {
            id: s("/id"),
            name: s("/function/name"),
            arguments: s("/function/arguments"),
        }
    }

    /// Merges streamed `delta.tool_calls[]` pieces (by `index`) into whole calls.
    pub fn merge_deltas(calls: &mut Vec<ToolCall>, deltas: &[Value]) {
        for d in deltas {
            let index = d.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            // A model that numbers its calls wildly must not make us allocate wildly.
            let index = index.min(63);
            if calls.len() <= index {
                calls.resize(index + 1, ToolCall::default());
            }
            let call = &mut calls[index];
            if let Some(id) = d.get("id").and_then(Value::as_str) {
                call.id = id.to_string();
            }
            if let Some(name) = d.pointer("/function/name").and_then(Value::as_str) {
                call.name.push_str(name);
            }
            if let Some(args) = d.pointer("/function/arguments").and_then(Value::as_str) {
                call.arguments.push_str(args);
            }
        }
    }
}

/// One `chat.completion.chunk` of a stream.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub body: Value,
}

impl Chunk {
    pub fn from_body(body: Value) -> Result<Self, String> {
        if !body.is_object() {
            return Err("stream chunk is not a JSON object".into());
        }
        Ok(Chunk { body })
    }
    pub fn usage(&self) -> Option<Usage> {
        usage_of(&self.body)
    }
    /// The trailing chunk that `stream_options.include_usage` adds: usage and no choices.
    pub fn is_usage_only(&self) -> bool {
        self.body
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.is_empty())
            && self.usage().is_some()
    }
    pub fn strip_usage(&mut self) {
        if let Some(obj) = self.body.as_object_mut() {
            obj.remove("usage");
        }
    }
    /// Streamed pieces of tool calls in this chunk.
    pub fn tool_call_deltas(&self) -> Option<&Vec<Value>> {
        self.body
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
    }
    pub fn content_delta(&self) -> Option<&str> {
        self.body
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
    }
    pub fn finish_reason(&self) -> Option<&str> {
        self.body
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(message: impl Into<String>, kind: &str, code: &str) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: None,
                code: Some(code.to_string()),
            },
        }
    }
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    #[serde(default = "model_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
}

fn model_object() -> String {
    "model".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_request_fields_survive_a_round_trip() {
        let raw = json!({
            "model": "m", "messages": [{"role": "user", "content": "hi", "name": "bob"}],
            "seed": 7, "logprobs": true, "vendor_x": {"a": 1},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        });
        let req: ChatRequest = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&req).unwrap(), raw);
    }

    #[test]
    fn upstream_body_maps_model_and_asks_for_usage() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "client-name", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "seed": 1
        }))
        .unwrap();
        let body: Value =
            serde_json::from_slice(&req.to_upstream_body("Qwen/Qwen2.5", true).unwrap()).unwrap();
        assert_eq!(body["model"], "Qwen/Qwen2.5");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["seed"], 1);
        let body: Value =
            serde_json::from_slice(&req.to_upstream_body("x", false).unwrap()).unwrap();
        assert_eq!(body["stream"], false);
        assert!(body.get("stream_options").is_none());
    }

    #[test]
    fn local_answers_have_upstream_shapes() {
        let a = LocalAnswer::new("rules", "m", "你好!".into(), Usage::default());
        let c = a.completion();
        assert_eq!(c.content(), Some("你好!"));
        assert_eq!(c.finish_reason(), Some("stop"));
        let chunks = a.chunks(&["你", "好!"]);
        let text: String = chunks.iter().filter_map(Chunk::content_delta).collect();
        assert_eq!(text, "你好!");
        assert!(chunks.last().unwrap().is_usage_only());
        assert_eq!(chunks[chunks.len() - 2].finish_reason(), Some("stop"));
    }

    #[test]
    fn validation_names_the_field() {
        let req: ChatRequest =
            serde_json::from_value(json!({"model": "m", "messages": []})).unwrap();
        assert_eq!(req.validate().unwrap_err().param, "messages");
        let bad = serde_json::from_value::<ChatRequest>(
            json!({"model": "m", "messages": [{"role": "robot"}]}),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn usage_only_chunk_is_recognised() {
        let c = Chunk::from_body(json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})).unwrap();
        assert!(c.is_usage_only());
        assert_eq!(c.usage().unwrap().completion_tokens, 4);
        let c = Chunk::from_body(json!({"choices": [{"delta": {"content": "x"}}]})).unwrap();
        assert!(!c.is_usage_only());
        assert_eq!(c.content_delta(), Some("x"));
    }
}
