//! What the fake upstream answers: the [`Script`] type, and the pure (I/O free) pieces that turn a
//! script plus a request into response bytes: answer text, chunking, usage, JSON bodies.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Answer text used when a script has neither `text` nor `echo`.
pub const DEFAULT_TEXT: &str = "Hello from the fake upstream.";

/// How the fake upstream answers one chat-completions request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Script {
    /// HTTP status. Non-200 answers carry an OpenAI-style JSON error body.
    pub status: u16,
    /// Adds a `Retry-After: N` header (meant for 429/503).
    pub retry_after_s: Option<u64>,
    /// Wait this long after reading the request before writing any byte.
    pub headers_delay_ms: u64,
    /// Stream: delay before the first content chunk (headers and the role chunk go out at once).
    /// Non-stream: the response is written after `ttft_ms + (chunks - 1) * inter_chunk_ms`.
    pub ttft_ms: u64,
    /// Delay between content chunks.
    pub inter_chunk_ms: u64,
    /// Answer text; `None` means [`DEFAULT_TEXT`]. Ignored when `echo` is set.
    pub text: Option<String>,
    /// Answer with the content of the last `user` message.
    pub echo: bool,
    /// When non-empty the answer is these tool calls (`finish_reason` `tool_calls`).
    pub tool_calls: Vec<ScriptToolCall>,
    /// `usage.prompt_tokens`; default: chars of all string message contents / 4, at least 1.
    pub prompt_tokens: Option<u32>,
    /// Report no usage at all (as some self-hosted servers do), streamed or not.
    pub omit_usage: bool,
    /// Byte-level misbehaviour.
    pub fault: Option<Fault>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            status: 200,
            retry_after_s: None,
            headers_delay_ms: 0,
            ttft_ms: 0,
            inter_chunk_ms: 0,
            text: None,
            echo: false,
            tool_calls: Vec::new(),
            prompt_tokens: None,
            omit_usage: false,
            fault: None,
        }
    }
}

/// One tool call of a scripted answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptToolCall {
    pub name: String,
    /// Raw JSON string, sent verbatim as `function.arguments`.
    pub arguments: String,
}

/// Byte-level faults. "Content chunks" are the stream events after the role chunk and before
/// the finish chunk (text pieces, or tool-call deltas: three per call).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Fault {
    /// Read the request, then close with a TCP RST without writing anything.
    ResetBeforeHeaders,
    /// Stream: headers + `chunks` content chunks, then RST. Non-stream: headers (full
    /// Content-Length) + the first half of the body, then RST.
    ResetAfterChunks { chunks: usize },
    /// Like `ResetAfterChunks`, but the socket is then held open and never written again.
    StallAfterChunks { chunks: usize },
    /// Non-stream: a truncated JSON body. Stream: a truncated JSON event after the first content
    /// chunk, then the stream goes on normally.
    MalformedJson,
    /// Stream: an event with invalid UTF-8 after the first content chunk, then the stream goes
    /// on normally. Non-stream: same as `MalformedJson`.
    MalformedSse,
}

/// Non-stream body written by the malformed faults.
pub const MALFORMED_JSON_BODY: &[u8] = br#"{"id":"chatcmpl-broken","choices":[{"message":"#;
/// Stream event written by `MalformedJson`.
pub const MALFORMED_JSON_EVENT: &[u8] = b"data: {\"id\":\"chatcmpl-broken\",\"choices\":[{\n\n";
/// Stream event written by `MalformedSse`.
pub const MALFORMED_SSE_EVENT: &[u8] = b"data: \xff\xfe\xfd\n\n";

/// The answer of one request, resolved from a script and the request body.
#[derive(Clone, Debug)]
pub enum Answer {
    Text(String),
    ToolCalls(Vec<ScriptToolCall>),
}

impl Answer {
    pub fn resolve(script: &Script, body: &Value) -> Answer {
        if !script.tool_calls.is_empty() {
            return Answer::ToolCalls(script.tool_calls.clone());
        }
        if script.echo {
            return Answer::Text(last_user_text(body).unwrap_or_default());
        }
        Answer::Text(
            script
                .text
                .clone()
                .unwrap_or_else(|| DEFAULT_TEXT.to_string()),
        )
    }

    /// Number of streamed content chunks (also the timing unit of non-stream answers).
    pub fn stream_chunks(&self) -> usize {
        match self {
            Answer::Text(text) => split_pieces(text).len(),
            Answer::ToolCalls(calls) => calls.len() * 3,
        }
    }

    /// `usage.completion_tokens`.
    pub fn completion_tokens(&self) -> u32 {
        let n = match self {
            Answer::Text(text) => split_pieces(text).len(),
            Answer::ToolCalls(calls) => calls.len() * 5,
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub fn finish_reason(&self) -> &'static str {
        match self {
            Answer::Text(_) => "stop",
            Answer::ToolCalls(_) => "tool_calls",
        }
    }
}

/// Text of a message `content`: a string, or the concatenated `text` parts of an array.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

fn last_user_text(body: &Value) -> Option<String> {
    body.get("messages")?
        .as_array()?
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(content_text)
}

/// `usage.prompt_tokens`: the script's value, else chars of string contents / 4, at least 1.
pub fn prompt_tokens(script: &Script, body: &Value) -> u32 {
    if let Some(p) = script.prompt_tokens {
        return p;
    }
    let chars: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(|s| s.chars().count())
                .sum()
        })
        .unwrap_or(0);
    u32::try_from(chars / 4).unwrap_or(u32::MAX).max(1)
}

/// CJK-like characters that are written without spaces; each becomes its own piece.
fn is_wide(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF      // Hangul Jamo
        | 0x2E80..=0x303F    // CJK radicals, symbols and punctuation
        | 0x3040..=0x30FF    // Hiragana, Katakana
        | 0x3100..=0x31FF    // Bopomofo, Hangul compatibility, Katakana ext
        | 0x3400..=0x4DBF    // CJK ext A
        | 0x4E00..=0x9FFF    // CJK unified
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility
        | 0xFF00..=0xFFEF    // half/fullwidth forms
        | 0x20000..=0x3FFFF) // CJK ext B..
}

/// Splits text into stream pieces at word boundaries, keeping the leading whitespace
/// ("Hello from" -> ["Hello", " from"]); CJK characters become one piece each.
/// The pieces always concatenate back to `text`.
pub fn split_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0usize;
    let mut prev: Option<char> = None;
    let mut only_ws = true; // the current piece holds only whitespace so far
    for (i, c) in text.char_indices() {
        if let Some(p) = prev {
            let boundary = if is_wide(c) {
                !only_ws
            } else if c.is_whitespace() {
                !p.is_whitespace()
            } else {
                is_wide(p)
            };
            if boundary {
                pieces.push(&text[start..i]);
                start = i;
                only_ws = true;
            }
        }
        only_ws &= c.is_whitespace();
        prev = Some(c);
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// Splits tool-call arguments into two pieces at a char boundary (either may be empty).
pub fn split_arguments(args: &str) -> (&str, &str) {
    let mut mid = args.len() / 2;
    while !args.is_char_boundary(mid) {
        mid += 1;
    }
    args.split_at(mid)
}

/// OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: Value) -> Vec<u8> {
    let v = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    v.to_string().into_bytes()
}

/// Error body of a scripted non-200 status.
pub fn upstream_error_body(status: u16) -> Vec<u8> {
    error_body(
        &format!("fake upstream error {status}"),
        "upstream_error",
        Value::String(status.to_string()),
    )
}

/// Identity of one completion, shared by all its chunks.
pub struct Completion<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

pub fn usage_json(prompt: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": u64::from(prompt) + u64::from(completion),
    })
}

fn tool_call_json(i: usize, call: &ScriptToolCall) -> Value {
    json!({
        "id": format!("call_{i}"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

impl Completion<'_> {
    /// Non-stream `chat.completion` body.
    pub fn body(&self, answer: &Answer, prompt: u32, with_usage: bool) -> Vec<u8> {
        let message = match answer {
            Answer::Text(text) => json!({"role": "assistant", "content": text}),
            Answer::ToolCalls(calls) => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": calls.iter().enumerate().map(|(i, c)| tool_call_json(i, c)).collect::<Vec<_>>(),
            }),
        };
        let mut body = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason()}],
        });
        if with_usage {
            body["usage"] = usage_json(prompt, answer.completion_tokens());
        }
        body.to_string().into_bytes()
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> Vec<u8> {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
        .to_string()
        .into_bytes()
    }

    /// First stream event: the assistant role.
    pub fn role_chunk(&self) -> Vec<u8> {
        self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)
    }

    /// The content chunks (JSON payloads, without the `data: ` framing).
    pub fn content_chunks(&self, answer: &Answer) -> Vec<Vec<u8>> {
        match answer {
            Answer::Text(text) => split_pieces(text)
                .into_iter()
                .map(|p| self.chunk(json!({"content": p}), Value::Null))
                .collect(),
            Answer::ToolCalls(calls) => {
                let mut out = Vec::with_capacity(calls.len() * 3);
                for (i, call) in calls.iter().enumerate() {
                    let head = json!({"tool_calls": [{
                        "index": i,
                        "id": format!("call_{i}"),
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }]});
                    out.push(self.chunk(head, Value::Null));
                    let (a, b) = split_arguments(&call.arguments);
                    for piece in [a, b] {
                        let d =
                            json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]});
                        out.push(self.chunk(d, Value::Null));
                    }
                }
                out
            }
        }
    }

    /// Last choice event: empty delta with the finish reason.
    pub fn finish_chunk(&self, answer: &Answer) -> Vec<u8> {
        self.chunk(json!({}), Value::from(answer.finish_reason()))
    }

    /// Usage event (`stream_options.include_usage`).
    pub fn usage_chunk(&self, answer: &Answer, prompt: u32) -> Vec<u8> {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(prompt, answer.completion_tokens()),
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_keeps_leading_space() {
        assert_eq!(
            split_pieces("Hello from the fake upstream."),
            vec!["Hello", " from", " the", " fake", " upstream."]
        );
        assert_eq!(split_pieces(""), Vec::<&str>::new());
        assert_eq!(split_pieces(" a  b "), vec![" a", "  b", " "]);
    }

    #[test]
    fn split_cjk_per_char() {
        assert_eq!(split_pieces("你好世界"), vec!["你", "好", "世", "界"]);
        assert_eq!(
            split_pieces("Hi 你好, ok"),
            vec!["Hi", " 你", "好", ",", " ok"]
        );
    }

    #[test]
    fn split_roundtrips() {
        for s in [
            "a b c",
            "  lead",
            "trail  ",
            "日本語 text ここ",
            "\n\nx\ty",
            "é ü ß",
        ] {
            assert_eq!(split_pieces(s).concat(), s);
        }
    }

    #[test]
    fn split_arguments_char_boundary() {
        let (a, b) = split_arguments("{\"q\":\"日本\"}");
        assert_eq!(format!("{a}{b}"), "{\"q\":\"日本\"}");
        assert_eq!(split_arguments(""), ("", ""));
    }

    #[test]
    fn script_defaults_and_strictness() {
        let s: Script = serde_json::from_str("{}").unwrap();
        assert_eq!(s.status, 200);
        assert!(serde_json::from_str::<Script>(r#"{"bogus":1}"#).is_err());
        let s: Script =
            serde_json::from_str(r#"{"fault":{"kind":"stall_after_chunks","chunks":2}}"#).unwrap();
        assert!(matches!(
            s.fault,
            Some(Fault::StallAfterChunks { chunks: 2 })
        ));
        let s: Script =
            serde_json::from_str(r#"{"fault":{"kind":"reset_before_headers"}}"#).unwrap();
        assert!(matches!(s.fault, Some(Fault::ResetBeforeHeaders)));
    }

    #[test]
    fn prompt_tokens_default() {
        let body = json!({"messages": [{"role": "user", "content": "12345678"}, {"role": "user", "content": [1]}]});
        assert_eq!(prompt_tokens(&Script::default(), &body), 2);
        assert_eq!(prompt_tokens(&Script::default(), &json!({})), 1);
    }

    #[test]
    fn echo_uses_last_user_message() {
        let body = json!({"messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "second"},
            {"role": "system", "content": "y"},
        ]});
        let script = Script {
            echo: true,
            ..Script::default()
        };
        match Answer::resolve(&script, &body) {
            Answer::Text(t) => assert_eq!(t, "second"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
