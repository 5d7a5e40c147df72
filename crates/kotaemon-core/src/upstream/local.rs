//! The on-device model (GGUF through llama.cpp, `kotaemon-llama`) as one more upstream: the
//! router sends simple turns here, the llm stage falls back here when the cloud cannot answer,
//! and clients can ask for it by name. Built behind the `llama` feature.

use super::local_tools;
use super::{Phase, Probe, Upstream, UpstreamError, UpstreamErrorKind};
use crate::turn::{ChunkStream, Deadline};
use crate::wire::{ChatRequest, Completion, LocalAnswer, MessageContent, Role, Usage};
use async_trait::async_trait;
use futures::StreamExt;
use kotaemon_llama::{
    ChatTurn, EngineConfig, FinishReason, GenEvent, GenReceiver, GenStats, GenerateParams,
    LlamaError, LocalEngine,
};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout_at;

use super::local_config::LocalConfig;

pub struct LocalUpstream {
    name: Arc<str>,
    engine: LocalEngine,
    max_tokens: u32,
}

impl LocalUpstream {
    /// Loads the model once (blocking, ~0.5 s for Gemma 270M). Errors say what to do.
    pub fn load(config: &LocalConfig, model_path: &Path) -> Result<Self, String> {
        let mut cfg = EngineConfig::new(model_path);
        cfg.n_ctx = config.n_ctx;
        cfg.n_threads = config.threads;
        cfg.max_queue = config.max_queue;
        let engine = LocalEngine::load(cfg).map_err(|e| e.to_string())?;
        let info = engine.info();
        crate::events::metrics::local_model_loaded(info.load_time, info.size_bytes);
        tracing::info!(model = %info.name, n_ctx = info.n_ctx, load_ms = info.load_time.as_millis() as u64, "local model loaded");
        Ok(LocalUpstream {
            name: config.name.as_str().into(),
            engine,
            max_tokens: config.max_tokens,
        })
    }

    fn err(&self, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new(&self.name, Phase::Sent, kind)
    }

    fn map_err(&self, e: LlamaError) -> UpstreamError {
        match e {
            LlamaError::QueueFull => self.err(UpstreamErrorKind::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(1)),
                message: Some("the local model's queue is full".into()),
            }),
            LlamaError::ContextTooLong { prompt_tokens, n_ctx } => self.err(UpstreamErrorKind::Status {
                status: 400,
                retry_after: None,
                message: Some(format!("the prompt has {prompt_tokens} tokens; the local model's context holds {n_ctx}")),
            }),
            // Bad sampling options, a prompt the template cannot render: the request's fault.
            other if other.is_request_error() => self.err(UpstreamErrorKind::Status {
                status: 400,
                retry_after: None,
                message: Some(other.to_string()),
            }),
            other => self.err(UpstreamErrorKind::Malformed(format!("local model: {other}"))),
        }
    }

    fn start(&self, request: &ChatRequest) -> Result<GenReceiver, UpstreamError> {
        crate::events::metrics::local_queue_depth(self.engine.queue_len());
        self.engine
            .generate(turns(request), params(request, self.max_tokens))
            .map_err(|e| self.map_err(e))
    }
}

/// Text of a message: a string, or the text parts of a list.
fn text_of(content: &Option<MessageContent>) -> String {
    match content {
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        None => String::new(),
    }
}

fn turns(request: &ChatRequest) -> Vec<ChatTurn> {
    let mut turns: Vec<ChatTurn> = request
        .messages
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::System | Role::Developer => "system",
                Role::Assistant => "assistant",
                Role::User | Role::Tool | Role::Function => "user",
            };
            ChatTurn::new(role, local_tools::message_text(m, text_of(&m.content)))
        })
        .collect();
    // Offered tools are described in the (one) system message chat templates allow.
    if let Some(tools) = local_tools::instructions(request) {
        match turns.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{tools}", first.content)
            }
            _ => turns.insert(0, ChatTurn::new("system", tools)),
        }
    }
    turns
}

fn params(request: &ChatRequest, max_tokens: u32) -> GenerateParams {
    let num = |k: &str| request.extra.get(k).and_then(Value::as_f64);
    let asked = num("max_completion_tokens")
        .or_else(|| num("max_tokens"))
        .map(|n| n.clamp(1.0, u32::MAX as f64) as u32);
    let stop = match request.extra.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    GenerateParams {
        max_tokens: asked.map_or(max_tokens, |a| a.min(max_tokens)),
        temperature: num("temperature").unwrap_or(0.7) as f32,
        top_p: num("top_p").unwrap_or(0.95) as f32,
        stop,
        seed: num("seed").map_or(0, |s| s as u32),
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::StopSequence => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(stats: &GenStats) -> Usage {
    let (p, c) = (stats.prompt_tokens as u64, stats.completion_tokens as u64);
    Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: p + c,
    }
}

#[async_trait]
impl Upstream for LocalUpstream {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        _model: &str,
        deadline: Deadline,
    ) -> Result<Completion, UpstreamError> {
        Ok(self.answer(request, deadline).await?.completion())
    }

    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
        deadline: Deadline,
    ) -> Result<ChunkStream, UpstreamError> {
        if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            // Whether the answer is a call is known only at its end: generate, then stream.
            let answer = self.answer(request, deadline).await?;
            let text = answer.text.clone();
            let pieces: Vec<&str> = if answer.tool_calls.is_empty() {
                vec![text.as_str()]
            } else {
                Vec::new()
            };
            let chunks = answer.chunks(&pieces);
            return Ok(futures::stream::iter(chunks.into_iter().map(Ok)).boxed());
        }
        self.stream_pieces(request, model, deadline).await
    }

    async fn probe(&self, _timeout: Duration) -> Result<Probe, UpstreamError> {
        Ok(Probe {
            latency: Duration::ZERO,
            models: vec![self.name.to_string()],
        })
    }
}

impl LocalUpstream {
    /// A whole answer; with tools offered, an answer that is a call becomes one.
    async fn answer(
        &self,
        request: &ChatRequest,
        deadline: Deadline,
    ) -> Result<LocalAnswer, UpstreamError> {
        let mut rx = self.start(request)?;
        let mut text = String::new();
        loop {
            match timeout_at(deadline.0, rx.recv()).await {
                Err(_) => return Err(self.err(UpstreamErrorKind::Deadline)),
                Ok(None) => return Err(self.err(UpstreamErrorKind::Transport)),
                Ok(Some(Err(e))) => return Err(self.map_err(e)),
                Ok(Some(Ok(GenEvent::Piece(p)))) => text.push_str(&p),
                Ok(Some(Ok(GenEvent::Done(stats)))) => {
                    crate::events::metrics::local_generation(&stats);
                    let call = local_tools::parse_call(&text, request, request.messages.len());
                    let mut answer = LocalAnswer::new("local", &request.model, text, usage(&stats));
                    answer.finish_reason = finish_reason(stats.finish).into();
                    if let Some(call) = call {
                        answer.tool_calls = vec![call];
                        answer.finish_reason = "tool_calls".into();
                    }
                    return Ok(answer);
                }
            }
        }
    }

    async fn stream_pieces(
        &self,
        request: &ChatRequest,
        _model: &str,
        deadline: Deadline,
    ) -> Result<ChunkStream, UpstreamError> {
        let mut rx = self.start(request)?;
        // Commit at the first event: a piece (or an empty answer's end).
        let first = match timeout_at(deadline.0, rx.recv()).await {
            Err(_) => return Err(self.err(UpstreamErrorKind::Deadline)),
            Ok(None) => return Err(self.err(UpstreamErrorKind::Transport)),
            Ok(Some(Err(e))) => return Err(self.map_err(e)),
            Ok(Some(Ok(event))) => event,
        };
        let shape = LocalAnswer::new("local", &request.model, String::new(), Usage::default());
        let name = self.name.clone();
        // Role chunk, then one chunk per piece, then finish and usage: the upstream's shapes.
        let head = shape.chunks(&[]).into_iter().next().map(Ok);
        let state = (rx, Some(first), shape, name, deadline, false);
        let rest = futures::stream::unfold(
            state,
            |(mut rx, pending, mut shape, name, deadline, done)| async move {
                if done {
                    return None;
                }
                let event = match pending {
                    Some(e) => Ok(Some(Ok(e))),
                    None => timeout_at(deadline.0, rx.recv()).await,
                };
                let err = |kind| UpstreamError::new(&name, Phase::Committed, kind);
                let (items, done) = match event {
                    Err(_) => (vec![Err(err(UpstreamErrorKind::Deadline))], true),
                    Ok(None) => (vec![Err(err(UpstreamErrorKind::Transport))], true),
                    Ok(Some(Err(e))) => (
                        vec![Err(err(UpstreamErrorKind::Malformed(format!(
                            "local model: {e}"
                        ))))],
                        true,
                    ),
                    Ok(Some(Ok(GenEvent::Piece(p)))) => (
                        shape
                            .chunks(&[p.as_str()])
                            .into_iter()
                            .skip(1)
                            .take(1)
                            .map(Ok)
                            .collect(),
                        false,
                    ),
                    Ok(Some(Ok(GenEvent::Done(stats)))) => {
                        crate::events::metrics::local_generation(&stats);
                        shape.finish_reason = finish_reason(stats.finish).into();
                        shape.usage = usage(&stats);
                        (
                            shape.chunks(&[]).into_iter().skip(1).map(Ok).collect(),
                            true,
                        )
                    }
                };
                Some((
                    futures::stream::iter(items),
                    (rx, None, shape, name, deadline, done),
                ))
            },
        )
        .flatten();
        Ok(futures::stream::iter(head).chain(rest).boxed())
    }
}
