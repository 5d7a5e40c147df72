//! `act`: the server-side tool-calling loop, run by the innermost stage. The configured tools
//! are offered to the model; the calls it returns run on the device (in parallel, arguments
//! validated against each tool's schema, each within its timeout and the turn's deadline); the
//! results go back to the model, until it answers in text or the step limit is reached.
//!
//! Everything a model can get wrong — malformed JSON arguments, unknown tools, wrong types,
//! endless calling — goes back to it as a tool result or ends the loop with a clear answer;
//! only the device's own faults (`ToolError::Internal`) end the turn with an error.
//!
//! Streams: text the model writes is relayed as it comes (a model that says "let me check"
//! before a slow tool call is heard at once); tool-call deltas are held back and assembled;
//! the steps share one stream id and one final usage chunk. The first step runs before the
//! stream is handed out, so a cloud that is down is still an HTTP error, not a broken stream.
//!
//! Tools listed in `confirm` do not run when called: the turn answers with a pending action
//! that the user confirms or rejects (`POST /v1/kotaemon/actions/{id}`); the loop then resumes.

use crate::events::TurnEvent;
use crate::pipeline::TurnError;
use crate::stages::llm::ModelCall;
use crate::tools::{Effect, ToolError, ToolRegistry};
use crate::turn::{ChunkStream, Origin, Reply, Route, RouteHints, Turn};
use crate::upstream::pool::PoolError;
use crate::upstream::{Phase, StreamError, UpstreamError, UpstreamErrorKind};
use crate::wire::{ChatMessage, ChatRequest, Chunk, Completion, LocalAnswer, ToolCall, Usage};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActConfig {
    /// Offer the configured tools (`[tools.*]`) to the model and run the calls it makes.
    pub enabled: bool,
    /// Model calls per turn, tool steps included. The last call is offered no tools.
    pub max_steps: u32,
    /// Tools offered to the model: names, or prefixes ending in `*` (`calendar_*`,
    /// `rooms__*`). Empty: every registered tool.
    pub allow: Vec<String>,
    /// Tools that run only after the user confirms (same forms as `allow`).
    pub confirm: Vec<String>,
    /// How long a pending action waits for the user's decision.
    pub confirm_ttl_secs: u64,
}

impl Default for ActConfig {
    fn default() -> Self {
        ActConfig {
            enabled: true,
            max_steps: 6,
            allow: Vec::new(),
            confirm: Vec::new(),
            confirm_ttl_secs: 600,
        }
    }
}

fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

/// The user's answer to a pending action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Confirm,
    Reject,
}

/// A tool step waiting for the user: everything needed to resume the loop.
struct Pending {
    expires: Instant,
    pii: Option<Arc<crate::stages::pii_guard::TurnPii>>,
    request: ChatRequest,
    calls: Vec<ToolCall>,
    hints: RouteHints,
    route: Option<Route>,
    steps_done: u32,
    usage: Usage,
    model: ModelCall,
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("no pending action `{0}` (unknown, already decided, or expired)")]
    UnknownAction(String),
    #[error(transparent)]
    Turn(#[from] TurnError),
}

pub struct Act {
    config: ActConfig,
    tools: Arc<ToolRegistry>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// How a tool step ended.
enum StepOutcome {
    /// Results appended to the conversation: call the model again. Carries what the
    /// mutating calls did.
    Ran(Vec<String>),
    /// Waiting for the user: the turn answers with this text.
    Pending(String),
}

impl Act {
    pub fn new(config: &ActConfig, tools: Arc<ToolRegistry>) -> Result<Option<Self>, Vec<String>> {
        let mut p = Vec::new();
        if config.max_steps == 0 || config.max_steps > 32 {
            p.push("stages.act.max_steps: must be between 1 and 32".to_string());
        }
        if config.confirm_ttl_secs == 0 {
            p.push("stages.act.confirm_ttl_secs: must be at least 1".to_string());
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(config.enabled.then(|| Act {
            config: config.clone(),
            tools,
            pending: Mutex::new(HashMap::new()),
        }))
    }

    fn offered(&self) -> Vec<Value> {
        let allow = &self.config.allow;
        self.tools
            .offered(|name| allow.is_empty() || matches_any(allow, name))
    }

    pub fn has_tools(&self) -> bool {
        !self.offered().is_empty()
    }

    /// The request for one step: the conversation so far, with the tools (none on the last
    /// step, so the model has to answer in words).
    fn step_request(
        base: &ChatRequest,
        messages: &[ChatMessage],
        tools: Option<&Vec<Value>>,
        stream: bool,
    ) -> ChatRequest {
        let mut r = base.clone();
        r.messages = messages.to_vec();
        r.tools = tools.filter(|t| !t.is_empty()).cloned();
        if !stream {
            r.stream = Some(false);
            r.stream_options = None;
        }
        r
    }

    pub async fn run(self: &Arc<Self>, model: ModelCall, turn: Turn) -> Result<Reply, TurnError> {
        let offered = self.offered();
        if turn.request.wants_stream() {
            self.clone().run_stream(model, turn, offered).await
        } else {
            let messages = turn.request.messages.clone();
            self.run_complete(
                model,
                &turn,
                messages,
                offered,
                0,
                Usage::default(),
                Vec::new(),
            )
            .await
        }
    }

    async fn run_complete(
        &self,
        model: ModelCall,
        turn: &Turn,
        mut messages: Vec<ChatMessage>,
        offered: Vec<Value>,
        mut step: u32,
        mut usage: Usage,
        mut done: Vec<String>,
    ) -> Result<Reply, TurnError> {
        loop {
            let last = step + 1 >= self.config.max_steps;
            let request =
                Self::step_request(&turn.request, &messages, (!last).then_some(&offered), false);
            let answer = match model.answer(turn, &request).await {
                Err(e) if !done.is_empty() => {
                    // Something was already done: say so rather than fail as if nothing was.
                    let text = actions_done_text(&done, &e);
                    return Ok(Reply::Complete(
                        self.final_text(turn, text, usage).completion(),
                    ));
                }
                other => other?,
            };
            let completion = match answer {
                Reply::Complete(c) => c,
                // Not asked for; relay rather than guess.
                stream @ Reply::Stream(_) => return Ok(stream),
            };
            step += 1;
            add_usage(&mut usage, completion.usage());
            let calls: Vec<ToolCall> = completion
                .tool_calls()
                .map(|c| c.iter().map(ToolCall::from_message).collect())
                .unwrap_or_default();
            if calls.is_empty() {
                return Ok(Reply::Complete(with_usage(completion, usage)));
            }
            if last {
                return Ok(Reply::Complete(
                    self.final_text(turn, step_limit_text(self.config.max_steps), usage)
                        .completion(),
                ));
            }
            messages.push(ChatMessage::assistant_tool_calls(
                completion.content().map(str::to_string),
                &calls,
            ));
            match self
                .step(turn, &model, &mut messages, calls, step, usage)
                .await?
            {
                StepOutcome::Ran(mut did) => done.append(&mut did),
                StepOutcome::Pending(text) => {
                    return Ok(Reply::Complete(
                        self.final_text(turn, text, usage).completion(),
                    ))
                }
            }
        }
    }

    async fn run_stream(
        self: Arc<Self>,
        model: ModelCall,
        turn: Turn,
        offered: Vec<Value>,
    ) -> Result<Reply, TurnError> {
        let max_steps = self.config.max_steps;
        let mut messages = turn.request.messages.clone();
        let first = Self::step_request(
            &turn.request,
            &messages,
            (max_steps > 1).then_some(&offered),
            true,
        );
        // Step one before the stream exists: a cloud that is down is an HTTP error.
        let mut current: ChunkStream = match model.answer(&turn, &first).await? {
            Reply::Stream(s) => s,
            complete @ Reply::Complete(_) => return Ok(complete),
        };
        let stream = async_stream::stream! {
            let mut usage = Usage::default();
            let mut stream_id: Option<Value> = None;
            let mut role_sent = false;
            let mut step = 0u32;
            let mut done: Vec<String> = Vec::new();
            loop {
                let mut calls: Vec<ToolCall> = Vec::new();
                let mut text = String::new();
                let mut finish: Option<Chunk> = None;
                while let Some(item) = current.next().await {
                    let mut chunk = match item {
                        Ok(c) => c,
                        Err(e) => {
                            yield Err(e);
                            return;
                        }
                    };
                    if let Some(u) = chunk.usage() {
                        add_usage(&mut usage, Some(u));
                        if chunk.is_usage_only() {
                            continue;
                        }
                        chunk.strip_usage();
                    }
                    match &stream_id {
                        None => stream_id = chunk.body.get("id").cloned(),
                        Some(id) => {
                            if let Some(obj) = chunk.body.as_object_mut() {
                                obj.insert("id".into(), id.clone());
                            }
                        }
                    }
                    if let Some(deltas) = chunk.tool_call_deltas().cloned() {
                        ToolCall::merge_deltas(&mut calls, &deltas);
                        if let Some(d) = chunk.body.pointer_mut("/choices/0/delta").and_then(Value::as_object_mut) {
                            d.remove("tool_calls");
                        }
                    }
                    if let Some(t) = chunk.content_delta() {
                        text.push_str(t);
                    }
                    if chunk.finish_reason().is_some() {
                        // Held until we know whether this step was the last.
                        finish = Some(chunk);
                        continue;
                    }
                    if let Some(d) = chunk.body.pointer_mut("/choices/0/delta").and_then(Value::as_object_mut) {
                        if role_sent {
                            d.remove("role");
                        } else if d.contains_key("role") {
                            role_sent = true;
                        }
                        let empty_text = d.get("content").and_then(Value::as_str).is_some_and(str::is_empty);
                        if d.is_empty() || (empty_text && d.len() == 1) {
                            continue;
                        }
                    }
                    yield Ok(chunk);
                }
                step += 1;
                if calls.is_empty() {
                    if let Some(f) = finish {
                        yield Ok(f);
                    }
                    yield Ok(usage_chunk(&stream_id, usage));
                    return;
                }
                let reply_text = if step >= max_steps {
                    Some(step_limit_text(max_steps))
                } else {
                    messages.push(ChatMessage::assistant_tool_calls(Some(text), &calls));
                    match self.step(&turn, &model, &mut messages, calls, step, usage).await {
                        Ok(StepOutcome::Ran(mut did)) => {
                            done.append(&mut did);
                            None
                        }
                        Ok(StepOutcome::Pending(text)) => Some(text),
                        Err(e) => {
                            yield Err(mid_stream_error(e));
                            return;
                        }
                    }
                };
                if let Some(text) = reply_text {
                    for chunk in self.final_text(&turn, text, usage).chunks_after_role() {
                        yield Ok(with_id(chunk, &stream_id));
                    }
                    return;
                }
                let last = step + 1 >= max_steps;
                let request = Self::step_request(&turn.request, &messages, (!last).then_some(&offered), true);
                current = match model.answer(&turn, &request).await {
                    Ok(Reply::Stream(s)) => s,
                    Ok(Reply::Complete(c)) => {
                        futures::stream::iter(LocalAnswer::from_completion(&c).chunks_after_role().into_iter().map(Ok)).boxed()
                    }
                    Err(e) if !done.is_empty() => {
                        let text = actions_done_text(&done, &e);
                        for chunk in self.final_text(&turn, text, usage).chunks_after_role() {
                            yield Ok(with_id(chunk, &stream_id));
                        }
                        return;
                    }
                    Err(e) => {
                        yield Err(mid_stream_error(e));
                        return;
                    }
                };
            }
        };
        Ok(Reply::Stream(stream.boxed()))
    }

    /// Runs one step's calls (or parks them for confirmation) and appends the results.
    async fn step(
        &self,
        turn: &Turn,
        model: &ModelCall,
        messages: &mut Vec<ChatMessage>,
        calls: Vec<ToolCall>,
        steps_done: u32,
        usage: Usage,
    ) -> Result<StepOutcome, TurnError> {
        turn.ctx.annotate(|m| m.acted = true);
        let confirm = &self.config.confirm;
        let needs_confirmation: Vec<&ToolCall> = calls
            .iter()
            .filter(|c| matches_any(confirm, &c.name) && self.tools.spec(&c.name).is_some())
            .collect();
        if !needs_confirmation.is_empty() {
            let id = format!("act-{}", uuid::Uuid::new_v4().simple());
            let text = pending_text(&id, &needs_confirmation);
            for c in &needs_confirmation {
                turn.ctx.emit(TurnEvent::ToolCalled {
                    turn: turn.id().clone(),
                    tool: c.name.as_str().into(),
                    outcome: "pending_confirmation",
                    elapsed: Duration::ZERO,
                });
            }
            let mut request = turn.request.clone();
            request.messages = messages.clone();
            let pending = Pending {
                expires: Instant::now() + Duration::from_secs(self.config.confirm_ttl_secs),
                pii: turn.pii.clone(),
                request,
                calls,
                hints: turn.hints.clone(),
                route: turn.route,
                steps_done,
                usage,
                model: model.clone(),
            };
            let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            map.retain(|_, p| p.expires > now);
            map.insert(id.clone(), pending);
            turn.ctx.annotate(|m| m.pending_action = Some(id));
            return Ok(StepOutcome::Pending(text));
        }
        let done = self.run_calls(turn, messages, &calls, &[]).await?;
        Ok(StepOutcome::Ran(done))
    }

    /// Runs `calls` in parallel (they were asked for together, so they are independent) and
    /// appends one tool message per call, in order. `rejected` calls are not run. Returns what
    /// the mutating calls that succeeded did (`name: result`).
    async fn run_calls(
        &self,
        turn: &Turn,
        messages: &mut Vec<ChatMessage>,
        calls: &[ToolCall],
        rejected: &[String],
    ) -> Result<Vec<String>, TurnError> {
        let results = futures::future::join_all(calls.iter().enumerate().map(|(i, call)| {
            let rejected = rejected.contains(&call.name);
            async move {
                if rejected {
                    self.emit(turn, &call.name, "rejected", Duration::ZERO);
                    return Ok(json!({"error": "the user rejected this action; it was not done"}));
                }
                self.run_one(turn, call, i).await
            }
        }))
        .await;
        let mut done = Vec::new();
        for (call, result) in calls.iter().zip(results) {
            let result = result?;
            let mutating = self
                .tools
                .spec(&call.name)
                .is_some_and(|s| s.effect == Effect::Mutating);
            if mutating && result.get("error").is_none() {
                let text: String = result.to_string().chars().take(400).collect();
                done.push(format!("{}: {text}", call.name));
            }
            // Results go back to the model masked, like everything else.
            let content = match &turn.pii {
                Some(pii) => pii.mask(&result.to_string()),
                None => result.to_string(),
            };
            messages.push(ChatMessage::tool_result(&call.id, content));
        }
        Ok(done)
    }

    fn emit(&self, turn: &Turn, name: &str, outcome: &'static str, elapsed: Duration) {
        turn.ctx.emit(TurnEvent::ToolCalled {
            turn: turn.id().clone(),
            tool: self.tools.label(name),
            outcome,
            elapsed,
        });
    }

    /// One call; its result is JSON for the model. Only internal faults are errors.
    async fn run_one(
        &self,
        turn: &Turn,
        call: &ToolCall,
        index: usize,
    ) -> Result<Value, TurnError> {
        let started = Instant::now();
        // The model wrote pseudonyms; the tool gets the real values (on the device).
        let arguments = match &turn.pii {
            Some(pii) => pii.restore(&call.arguments),
            None => call.arguments.clone(),
        };
        let args = if arguments.trim().is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_str::<Value>(&arguments)
        };
        let args = match args {
            Ok(v) => v,
            Err(e) => {
                self.emit(turn, &call.name, "invalid_arguments", started.elapsed());
                return Ok(
                    json!({"error": format!("arguments are not valid JSON ({e}); call the tool again with a JSON object")}),
                );
            }
        };
        let allowed = self.config.allow.is_empty() || matches_any(&self.config.allow, &call.name);
        if !allowed || self.tools.spec(&call.name).is_none() {
            self.emit(turn, &call.name, "invalid_arguments", started.elapsed());
            let names: Vec<String> = self
                .tools
                .names()
                .into_iter()
                .filter(|n| self.config.allow.is_empty() || matches_any(&self.config.allow, n))
                .collect();
            return Ok(
                json!({"error": format!("there is no tool named `{}`; available: {}", call.name, names.join(", "))}),
            );
        }
        let key = if call.id.is_empty() {
            format!("{}-{index}", turn.id())
        } else {
            format!("{}-{}", turn.id(), call.id)
        };
        // What the model wrote (pseudonyms) is what the audit log keeps.
        let audited = serde_json::from_str::<Value>(&call.arguments).unwrap_or(json!({}));
        let result = self
            .tools
            .call_for_turn(turn, &call.name, args, audited, key)
            .await;
        match result {
            Ok(v) => Ok(v),
            Err(ToolError::Internal(message)) => {
                tracing::error!(turn = %turn.id(), tool = %call.name, "tool failed internally: {message}");
                Err(TurnError::Tool {
                    tool: call.name.clone(),
                    message,
                })
            }
            Err(e) => Ok(json!({"error": e.to_string()})),
        }
    }

    fn final_text(&self, turn: &Turn, text: String, usage: Usage) -> LocalAnswer {
        LocalAnswer::new("act", &turn.request.model, text, usage)
    }

    /// Continues a turn parked for confirmation: runs (or refuses) the held calls and calls
    /// the model again; the answer is a complete (non-streamed) reply.
    pub async fn resume(
        &self,
        id: &str,
        decision: Decision,
        bus: crate::events::EventBus,
        timeout: Duration,
    ) -> Result<(Reply, crate::turn::TurnCtx), ActError> {
        let pending = {
            let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            map.retain(|_, p| p.expires > now);
            map.remove(id)
        };
        let Some(p) = pending else {
            return Err(ActError::UnknownAction(id.to_string()));
        };
        let mut turn = Turn::new(bus, Origin::Api, p.request, timeout);
        turn.hints = p.hints;
        turn.route = p.route;
        turn.pii = p.pii;
        turn.request.stream = Some(false);
        turn.request.stream_options = None;
        turn.ctx.annotate(|m| m.acted = true);
        let rejected: Vec<String> = match decision {
            Decision::Confirm => Vec::new(),
            Decision::Reject => p
                .calls
                .iter()
                .filter(|c| matches_any(&self.config.confirm, &c.name))
                .map(|c| c.name.clone())
                .collect(),
        };
        let mut messages = turn.request.messages.clone();
        let done = self
            .run_calls(&turn, &mut messages, &p.calls, &rejected)
            .await?;
        let offered = self.offered();
        let mut reply = self
            .run_complete(
                p.model,
                &turn,
                messages,
                offered,
                p.steps_done,
                p.usage,
                done,
            )
            .await?;
        // The guard stage is not on this path: put the real values back here.
        if let (Some(pii), Reply::Complete(c)) = (&turn.pii, &mut reply) {
            pii.restore_json(&mut c.body);
        }
        Ok((reply, turn.ctx.clone()))
    }
}

fn add_usage(total: &mut Usage, u: Option<Usage>) {
    if let Some(u) = u {
        total.prompt_tokens += u.prompt_tokens;
        total.completion_tokens += u.completion_tokens;
        total.total_tokens += u.prompt_tokens + u.completion_tokens;
    }
}

/// The final completion reports the whole loop's usage.
fn with_usage(mut c: Completion, usage: Usage) -> Completion {
    if let Some(obj) = c.body.as_object_mut() {
        obj.insert("usage".into(), json!(usage));
    }
    c
}

fn usage_chunk(id: &Option<Value>, usage: Usage) -> Chunk {
    Chunk {
        body: json!({"id": id.clone().unwrap_or(Value::Null), "object": "chat.completion.chunk",
                     "choices": [], "usage": usage}),
    }
}

fn with_id(mut chunk: Chunk, id: &Option<Value>) -> Chunk {
    if let (Some(id), Some(obj)) = (id, chunk.body.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    chunk
}

/// The model failed after tools had acted: the user learns what was done, so nothing done is
/// left without a record.
fn actions_done_text(done: &[String], error: &TurnError) -> String {
    tracing::warn!("the model failed after tools acted; answering with what was done: {error}");
    format!(
        "The assistant could not finish its answer, but these actions were done: {} / 助手未能完成回答，但以下操作已经执行：{}",
        done.join("; "),
        done.join("；")
    )
}

fn step_limit_text(max_steps: u32) -> String {
    format!(
        "I could not finish this request: the model was still calling tools after {max_steps} steps, so I stopped. 抱歉，这个请求在 {max_steps} 步内没有完成，已停止。"
    )
}

fn pending_text(id: &str, calls: &[&ToolCall]) -> String {
    let list: Vec<String> = calls
        .iter()
        .map(|c| format!("{}({})", c.name, c.arguments))
        .collect();
    format!(
        "This needs your confirmation before I do it: {}. Confirm or reject action {id}. 需要您确认后才会执行（操作编号 {id}）。",
        list.join("; ")
    )
}

/// A failure after the stream was committed ends it with an error event.
fn mid_stream_error(e: TurnError) -> StreamError {
    match e {
        TurnError::Pool(PoolError::Failed { mut last, .. }) => {
            last.phase = Phase::Committed;
            last
        }
        other => UpstreamError::new(
            &Arc::from("tool-loop"),
            Phase::Committed,
            UpstreamErrorKind::Status {
                status: 503,
                retry_after: None,
                message: Some(other.to_string()),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_patterns_take_names_and_prefixes() {
        let p = vec!["calendar_*".to_string(), "mqtt_publish".to_string()];
        assert!(matches_any(&p, "calendar_create_event"));
        assert!(matches_any(&p, "mqtt_publish"));
        assert!(!matches_any(&p, "mqtt_publish2"));
        assert!(!matches_any(&p, "contacts_lookup"));
    }

    #[test]
    fn streamed_tool_call_pieces_assemble_into_calls() {
        let mut calls = Vec::new();
        ToolCall::merge_deltas(
            &mut calls,
            &[json!({"index": 0, "id": "c1", "function": {"name": "add", "arguments": "{\"a\""}})],
        );
        ToolCall::merge_deltas(
            &mut calls,
            &[
                json!({"index": 0, "function": {"arguments": ": 1}"}}),
                json!({"index": 1, "id": "c2", "function": {"name": "sub", "arguments": "{}"}}),
            ],
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"a\": 1}");
        assert_eq!(calls[1].name, "sub");
        // A wild index is clamped, not allocated.
        ToolCall::merge_deltas(&mut calls, &[json!({"index": 1_000_000_000u64})]);
        assert!(calls.len() <= 64);
    }
}
