//! MQTT bridge: home automation talks to the agent over the broker it already has.
//!
//! Topics, under `topic_prefix` (default `kotaemon`):
//! - `<prefix>/command` (in): an utterance, as plain UTF-8 text or as JSON
//!   `{"text": "...", "id": "correlation id", "reply_to": "optional/topic"}`. Each runs as its own
//!   turn (origin `mqtt`), up to `max_concurrent_turns` at once. Retained commands are ignored:
//!   a stale "turn on the heating" must not run again at every reconnect.
//! - `<prefix>/reply` (out, QoS 1), or the command's `reply_to`:
//!   `{"id": ..., "turn": "...", "answered_by": "cloud", "text": "..."}`, or
//!   `{"id": ..., "turn"?: "...", "error": {"code": "...", "message": "..."}}`. `id` is the
//!   command's (a string or number), `null` for plain text.
//! - `<prefix>/events` (out, QoS 0): one compact JSON object per bus event ([`event_json`]):
//!   kind, turn id, codes, timings — never user text.
//! - `<prefix>/status` (out, retained): `online` once connected; `offline` on shutdown, or
//!   from the broker as our Last Will when the connection dies.
//!
//! The connection reconnects with capped backoff (clean session: subscriptions are renewed and
//! `online` announced at every connect).

use super::PluginDeps;
use crate::api::error::ApiError;
use crate::config::SecretRef;
use crate::events::json::event_json;
use crate::events::{Subscription, TurnEvent, TurnOutcome};
use crate::mqtt_conn::{self, Backoff, Broker};
use crate::turn::{Origin, Reply, Turn, TurnCtx};
use crate::wire::ChatRequest;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// `[plugins.mqtt_bridge]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttBridgeConfig {
    pub enabled: bool,
    /// Broker host name or IP address (plain TCP).
    pub host: String,
    pub port: u16,
    /// Must differ from every other client of the broker (the `mqtt_publish` tool uses
    /// `kotaemon-tools`).
    pub client_id: String,
    /// Leave out for anonymous access.
    pub username: Option<String>,
    /// `env:NAME` or `file:PATH`; needs `username`.
    pub password: Option<SecretRef>,
    /// Topics are `<topic_prefix>/command`, `/reply`, `/events` and `/status`.
    pub topic_prefix: String,
    /// Model name of the chat requests made from utterances (the upstreams' model maps, or
    /// pass-through, decide what it means).
    pub model: String,
    /// Publish every bus event on `<topic_prefix>/events` (QoS 0).
    pub publish_events: bool,
    /// Utterances run at once; one more gets an `overloaded` error reply.
    pub max_concurrent_turns: usize,
    /// MQTT topic filters a command's `reply_to` may name, besides `<topic_prefix>/#`.
    pub reply_topics: Vec<String>,
}

impl Default for MqttBridgeConfig {
    fn default() -> Self {
        MqttBridgeConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "kotaemon".into(),
            username: None,
            password: None,
            topic_prefix: "kotaemon".into(),
            model: "kotaemon".into(),
            publish_events: true,
            max_concurrent_turns: 4,
            reply_topics: Vec::new(),
        }
    }
}

impl MqttBridgeConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        let problems = mqtt_conn::broker_problems(
            &self.host,
            self.port,
            &self.client_id,
            self.username.as_deref(),
            self.password.as_ref(),
        );
        p.extend(problems.into_iter().map(|e| format!("{path}.{e}")));
        let prefix = &self.topic_prefix;
        if let Err(e) = mqtt_conn::check_topic(prefix) {
            p.push(format!("{path}.topic_prefix: {e}"));
        } else if prefix.ends_with('/') || prefix.starts_with('$') {
            p.push(format!(
                "{path}.topic_prefix: `{prefix}` must not end with `/` or start with `$`"
            ));
        }
        if self.model.trim().is_empty() {
            p.push(format!("{path}.model: must not be empty"));
        }
        if self.max_concurrent_turns == 0 {
            p.push(format!("{path}.max_concurrent_turns: must be at least 1"));
        }
        for (i, f) in self.reply_topics.iter().enumerate() {
            if let Err(e) = mqtt_conn::check_filter(f) {
                p.push(format!("{path}.reply_topics[{i}]: {e}"));
            }
        }
    }
}

/// The bridge's topics.
#[derive(Debug, Clone)]
struct Topics {
    command: String,
    reply: String,
    events: String,
    status: String,
    /// `<prefix>/#`, where replies may always go.
    own: String,
}

impl Topics {
    fn new(prefix: &str) -> Self {
        Topics {
            command: format!("{prefix}/command"),
            reply: format!("{prefix}/reply"),
            events: format!("{prefix}/events"),
            status: format!("{prefix}/status"),
            own: format!("{prefix}/#"),
        }
    }
}

/// Starts the bridge on `tasks`; it stops (announcing `offline`) when `stop` is cancelled.
pub fn start(
    config: &MqttBridgeConfig,
    deps: PluginDeps,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let broker = match Broker::resolve(
        &config.host,
        config.port,
        &config.client_id,
        config.username.as_deref(),
        config.password.as_ref(),
    ) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("MQTT bridge not started: plugins.mqtt_bridge.{e}");
            return;
        }
    };
    let topics = Topics::new(&config.topic_prefix);
    let mut options = broker.options();
    options.set_last_will(LastWill::new(
        topics.status.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (client, eventloop) = AsyncClient::new(options, 256);
    let connected = Arc::new(AtomicBool::new(false));
    if config.publish_events {
        // Subscribed now, so no event after start-up is missed.
        tasks.spawn(publish_events(
            deps.bus.subscribe(),
            client.clone(),
            topics.events.clone(),
            connected.clone(),
            stop.clone(),
        ));
    }
    let bridge = Arc::new(Bridge {
        client,
        topics,
        reply_filters: config.reply_topics.clone(),
        model: config.model.clone(),
        deps,
        slots: Arc::new(Semaphore::new(config.max_concurrent_turns.max(1))),
        stop: stop.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(drive(bridge, eventloop, broker.addr(), connected, stop));
}

struct Bridge {
    client: AsyncClient,
    topics: Topics,
    reply_filters: Vec<String>,
    model: String,
    deps: PluginDeps,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Drives the connection: subscribes and announces `online` at every connect, hands commands
/// to turns, reconnects with backoff; on stop announces `offline` and disconnects.
async fn drive(
    bridge: Arc<Bridge>,
    mut eventloop: EventLoop,
    addr: String,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    let topics = &bridge.topics;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                if failures > 0 {
                    tracing::info!(broker = %addr, "MQTT bridge connected again");
                } else {
                    tracing::info!(broker = %addr, topics = %topics.own, "MQTT bridge connected");
                }
                failures = 0;
                // Sent in this order: the subscription is in place before `online` is seen.
                let subscribed = bridge
                    .client
                    .try_subscribe(topics.command.clone(), QoS::AtLeastOnce);
                let announced = bridge.client.try_publish(
                    topics.status.clone(),
                    QoS::AtLeastOnce,
                    true,
                    "online",
                );
                if subscribed.is_err() || announced.is_err() {
                    tracing::warn!("MQTT bridge: request queue full at connect");
                }
                connected.store(true, Ordering::Release);
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.command => {
                if p.retain {
                    tracing::warn!(
                        topic = %p.topic,
                        "MQTT bridge: ignored a retained command (publish commands without retain)"
                    );
                } else {
                    bridge.on_command(&p.payload);
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::Release);
                failures += 1;
                let reason = mqtt_conn::describe(&e);
                if failures > 1 {
                    tracing::debug!(broker = %addr, failures, "MQTT bridge: broker connection failed: {reason}");
                } else if mqtt_conn::needs_operator(&e) {
                    tracing::error!(broker = %addr, "MQTT bridge: {reason}; check [plugins.mqtt_bridge]");
                } else {
                    tracing::warn!(broker = %addr, "MQTT bridge: broker connection failed: {reason}; reconnecting");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    if connected.swap(false, Ordering::AcqRel) {
        // A clean goodbye: the broker sends no Last Will then, so say `offline` ourselves.
        let _ = bridge
            .client
            .try_publish(topics.status.clone(), QoS::AtLeastOnce, true, "offline");
        let _ = bridge.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        tracing::info!(broker = %addr, "MQTT bridge disconnected");
    }
}

/// Forwards bus events while connected (QoS 0; a full queue drops, a turn never waits).
async fn publish_events(
    mut events: Subscription,
    client: AsyncClient,
    topic: String,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        let Some(event) = event else { return };
        if connected.load(Ordering::Acquire) {
            let body = event_json(&event).to_string();
            let _ = client.try_publish(topic.clone(), QoS::AtMostOnce, false, body);
        }
    }
}

impl Bridge {
    /// Called by the driver for each command: never blocks it.
    fn on_command(self: &Arc<Self>, payload: &[u8]) {
        let command = match parse_command(payload) {
            Ok(c) => c,
            Err(bad) => {
                tracing::debug!(code = bad.code, "MQTT bridge: bad command");
                self.send(
                    &self.topics.reply,
                    error_reply(&bad.id, None, bad.code, &bad.message),
                );
                return;
            }
        };
        let reply_to = match &command.reply_to {
            None => self.topics.reply.clone(),
            Some(t) => match check_reply_to(&self.topics, &self.reply_filters, t) {
                Ok(()) => t.clone(),
                Err(message) => {
                    self.send(
                        &self.topics.reply,
                        error_reply(&command.id, None, "reply_to_not_allowed", &message),
                    );
                    return;
                }
            },
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.send(
                &reply_to,
                error_reply(
                    &command.id,
                    None,
                    "overloaded",
                    "the agent is at its limit of concurrent MQTT turns; retry shortly",
                ),
            );
            return;
        };
        let bridge = self.clone();
        self.tasks.spawn(async move {
            let reply = bridge.run_turn(command.text, &command.id).await;
            if let Some(reply) = reply {
                bridge.send(&reply_to, reply);
            }
            drop(slot);
        });
    }

    /// Runs one utterance as a turn; `None` when the agent is shutting down.
    async fn run_turn(&self, text: String, id: &Value) -> Option<Value> {
        let request = ChatRequest::utterance(&self.model, text);
        let turn = Turn::new(
            self.deps.bus.clone(),
            Origin::Mqtt,
            request,
            self.deps.turn_timeout,
        );
        let ctx = turn.ctx.clone();
        let deadline = turn.deadline;
        let span = tracing::info_span!("turn", id = %ctx.id, origin = "mqtt");
        let work = async {
            match self.deps.pipeline.run(turn).await {
                Ok(Reply::Complete(c)) => Ok(c.content().unwrap_or_default().to_string()),
                Ok(Reply::Stream(mut chunks)) => {
                    // Asked for no stream, but a stage may stream anyway: read it to its end.
                    let mut text = String::new();
                    loop {
                        match tokio::time::timeout_at(deadline.0, chunks.next()).await {
                            Ok(Some(Ok(chunk))) => {
                                text.push_str(chunk.content_delta().unwrap_or_default())
                            }
                            Ok(Some(Err(e))) => {
                                break Err(Failure::Aborted(e.code(), e.to_string()))
                            }
                            Ok(None) => break Ok(text),
                            Err(_) => {
                                break Err(Failure::Aborted(
                                    "timeout",
                                    "the answer did not end within the turn's deadline".into(),
                                ))
                            }
                        }
                    }
                }
                Err(e) => Err(Failure::Refused(ApiError::from(e))),
            }
        }
        .instrument(span);
        let result = tokio::select! {
            r = work => r,
            _ = self.stop.cancelled() => {
                finish(&ctx, TurnOutcome::ClientGone);
                return None;
            }
        };
        let turn_id = ctx.id.as_str().to_string();
        Some(match result {
            Ok(text) => {
                ctx.emit(TurnEvent::Overhead {
                    turn: ctx.id.clone(),
                    overhead: ctx.started.elapsed().saturating_sub(ctx.upstream_wait()),
                });
                finish(&ctx, TurnOutcome::Ok);
                let mut reply = Map::new();
                reply.insert("id".into(), id.clone());
                reply.insert("turn".into(), turn_id.into());
                if let Some(by) = ctx.meta().answered_by {
                    reply.insert("answered_by".into(), by.into());
                }
                reply.insert("text".into(), text.into());
                Value::Object(reply)
            }
            Err(Failure::Refused(api)) => {
                if api.status.is_server_error() {
                    tracing::warn!(turn = %ctx.id, code = api.code, "MQTT turn failed");
                }
                finish(
                    &ctx,
                    TurnOutcome::Failed {
                        status: api.status.as_u16(),
                        code: api.code,
                    },
                );
                error_reply(id, Some(&turn_id), api.code, &api.message)
            }
            Err(Failure::Aborted(code, message)) => {
                tracing::warn!(turn = %ctx.id, code, "MQTT turn: the answer broke off");
                finish(&ctx, TurnOutcome::StreamAborted { code });
                error_reply(id, Some(&turn_id), code, &message)
            }
        })
    }

    /// Publishes a reply (QoS 1). Never waits: a full queue (broker away for long) drops it.
    fn send(&self, topic: &str, body: Value) {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let bytes = if bytes.len() > mqtt_conn::MAX_PAYLOAD_BYTES {
            let id = body.get("id").cloned().unwrap_or(Value::Null);
            let turn = body.get("turn").and_then(Value::as_str);
            let too_big = error_reply(
                &id,
                turn,
                "reply_too_large",
                "the answer is larger than an MQTT message may be here",
            );
            serde_json::to_vec(&too_big).unwrap_or_default()
        } else {
            bytes
        };
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, bytes)
            .is_err()
        {
            tracing::warn!(
                topic,
                "MQTT bridge: reply dropped (the request queue is full)"
            );
        }
    }
}

/// A command's `reply_to`: a topic under the prefix (but not the bridge's own command, events
/// or status topic) or matching one of `reply_topics`.
fn check_reply_to(topics: &Topics, filters: &[String], topic: &str) -> Result<(), String> {
    mqtt_conn::check_topic(topic).map_err(|e| format!("reply_to: {e}"))?;
    if [&topics.command, &topics.events, &topics.status]
        .iter()
        .any(|own| own.as_str() == topic)
    {
        return Err(format!(
            "reply_to `{topic}` is one of the bridge's own topics"
        ));
    }
    let allowed = std::iter::once(&topics.own)
        .chain(filters)
        .any(|f| mqtt_conn::filter_matches(f, topic));
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "reply_to `{topic}` is not allowed: replies go under {} or to \
             plugins.mqtt_bridge.reply_topics",
            topics.own
        ))
    }
}

/// Why a turn gave no text.
enum Failure {
    /// The pipeline refused or failed (status and code as the API would report them).
    Refused(ApiError),
    /// A stream broke after it started.
    Aborted(&'static str, String),
}

/// The handler's `TurnFinished`, exactly once per turn.
fn finish(ctx: &TurnCtx, outcome: TurnOutcome) {
    ctx.emit(TurnEvent::TurnFinished {
        turn: ctx.id.clone(),
        outcome,
        elapsed: ctx.started.elapsed(),
        stream: false,
    });
}

fn error_reply(id: &Value, turn: Option<&str>, code: &str, message: &str) -> Value {
    let mut reply = Map::new();
    reply.insert("id".into(), id.clone());
    if let Some(turn) = turn {
        reply.insert("turn".into(), turn.into());
    }
    reply.insert("error".into(), json!({"code": code, "message": message}));
    Value::Object(reply)
}

/// An utterance taken from the command topic.
#[derive(Debug, PartialEq)]
struct Command {
    text: String,
    /// The sender's correlation id (string or number), `null` if none.
    id: Value,
    reply_to: Option<String>,
}

/// A command that cannot run; `id` is the sender's if it could be read.
#[derive(Debug, PartialEq)]
struct BadCommand {
    id: Value,
    code: &'static str,
    message: String,
}

/// Plain text, or a JSON object (a payload starting with `{`) with `text`, `id`, `reply_to`.
fn parse_command(payload: &[u8]) -> Result<Command, BadCommand> {
    let bad = |id: &Value, code, message: &str| BadCommand {
        id: id.clone(),
        code,
        message: message.to_string(),
    };
    let none = Value::Null;
    let text = std::str::from_utf8(payload)
        .map_err(|_| bad(&none, "invalid_payload", "the command is not UTF-8 text"))?
        .trim();
    if text.is_empty() {
        return Err(bad(&none, "empty_command", "the command is empty"));
    }
    if !text.starts_with('{') {
        return Ok(Command {
            text: text.to_string(),
            id: Value::Null,
            reply_to: None,
        });
    }
    let object: Map<String, Value> = serde_json::from_str(text).map_err(|e| {
        bad(
            &none,
            "invalid_json",
            &format!("the command starts with `{{` but is not a JSON object: {e}"),
        )
    })?;
    let id = match object.get("id") {
        None | Some(Value::Null) => Value::Null,
        Some(v @ (Value::String(_) | Value::Number(_))) => v.clone(),
        Some(_) => {
            return Err(bad(
                &none,
                "invalid_command",
                "`id` must be a string or a number",
            ))
        }
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !["text", "id", "reply_to"].contains(&k.as_str()))
    {
        return Err(bad(
            &id,
            "invalid_command",
            &format!("unknown field `{unknown}`; a command has `text`, `id` and `reply_to`"),
        ));
    }
    let text = match object.get("text") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.trim().to_string(),
        Some(Value::String(_)) => return Err(bad(&id, "empty_command", "`text` is empty")),
        _ => return Err(bad(&id, "invalid_command", "`text` (a string) is required")),
    };
    let reply_to = match object.get("reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => {
            return Err(bad(
                &id,
                "invalid_command",
                "`reply_to` must be a topic name (a string)",
            ))
        }
    };
    Ok(Command { text, id, reply_to })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::BreakerState;
    use crate::turn::{Route, TurnId};

    fn cmd(text: &str, id: Value, reply_to: Option<&str>) -> Command {
        Command {
            text: text.into(),
            id,
            reply_to: reply_to.map(str::to_string),
        }
    }

    #[test]
    fn commands_are_plain_text_or_json_objects() {
        assert_eq!(
            parse_command("  turn on the light \n".as_bytes()),
            Ok(cmd("turn on the light", Value::Null, None))
        );
        assert_eq!(
            parse_command("打开会议室的灯".as_bytes()),
            Ok(cmd("打开会议室的灯", Value::Null, None))
        );
        assert_eq!(
            parse_command(br#"{"text": "hello", "id": "c-1", "reply_to": "kotaemon/r/1"}"#),
            Ok(cmd("hello", json!("c-1"), Some("kotaemon/r/1")))
        );
        assert_eq!(
            parse_command(br#"{"text": "hi", "id": 42}"#),
            Ok(cmd("hi", json!(42), None))
        );
        // A JSON string or number is text like any other.
        assert_eq!(
            parse_command(br#""quoted""#),
            Ok(cmd("\"quoted\"", Value::Null, None))
        );
    }

    #[test]
    fn bad_commands_say_why_and_keep_the_id_when_they_can() {
        let code = |p: &[u8]| parse_command(p).unwrap_err();
        assert_eq!(code(b"\xff\xfe on").code, "invalid_payload");
        assert_eq!(code(b"  \n").code, "empty_command");
        assert_eq!(code(b"").code, "empty_command");
        let broken = code(br#"{"text": "hi", "id": "x""#);
        assert_eq!((broken.code, broken.id), ("invalid_json", Value::Null));
        assert_eq!(code(br#"{"id": "b-1"}"#).id, json!("b-1"));
        assert_eq!(code(br#"{"id": "b-1"}"#).code, "invalid_command");
        assert_eq!(code(br#"{"id": "b-2", "text": 5}"#).code, "invalid_command");
        assert_eq!(
            code(br#"{"id": "b-3", "text": "  "}"#).code,
            "empty_command"
        );
        let typo = code(br#"{"id": "b-4", "txt": "hi"}"#);
        assert!(typo.message.contains("`txt`"), "{}", typo.message);
        assert_eq!(typo.id, json!("b-4"));
        assert_eq!(code(br#"{"id": ["x"], "text": "hi"}"#).id, Value::Null);
        assert_eq!(
            code(br#"{"text": "hi", "reply_to": 1}"#).code,
            "invalid_command"
        );
        // Only a payload starting with `{` is JSON; anything else is an utterance.
        assert_eq!(parse_command(b"[1, 2]").unwrap().text, "[1, 2]");
    }

    #[test]
    fn events_become_compact_json_with_codes_and_timings() {
        let turn = TurnId::new();
        let t = turn.as_str();
        let started = event_json(&TurnEvent::TurnStarted {
            turn: turn.clone(),
            origin: Origin::Mqtt,
            stream: false,
        });
        assert_eq!(
            started,
            json!({"kind": "turn_started", "turn": t, "origin": "mqtt", "stream": false})
        );
        let finished = event_json(&TurnEvent::TurnFinished {
            turn: turn.clone(),
            outcome: TurnOutcome::Failed {
                status: 502,
                code: "upstream_error",
            },
            elapsed: Duration::from_micros(12_345),
            stream: false,
        });
        assert_eq!(finished["outcome"], "upstream_error");
        assert_eq!(finished["status"], 502);
        assert_eq!(finished["elapsed_ms"], 12.345);
        let up = event_json(&TurnEvent::UpstreamFinished {
            turn: turn.clone(),
            upstream: "cloud".into(),
            outcome: "ok",
            elapsed: Duration::from_millis(40),
            ttft: None,
        });
        assert_eq!(up["upstream"], "cloud");
        assert_eq!(up["elapsed_ms"], 40.0);
        assert!(up["ttft_ms"].is_null());
        let routed = event_json(&TurnEvent::Routed {
            turn: turn.clone(),
            route: Route::Local,
            reason: "short",
        });
        assert_eq!(routed["route"], "local");
        let breaker = event_json(&TurnEvent::BreakerChanged {
            upstream: "cloud".into(),
            from: BreakerState::Closed,
            to: BreakerState::Open,
        });
        assert_eq!(
            breaker,
            json!({"kind": "breaker_changed", "upstream": "cloud", "from": "closed", "to": "open"})
        );
        assert!(breaker.get("turn").is_none());
        let rule = event_json(&TurnEvent::RuleMatched {
            turn,
            intent: "greeting".into(),
        });
        assert_eq!(rule["intent"], "greeting");
    }

    #[test]
    fn config_is_checked_only_when_enabled() {
        let mut p = Vec::new();
        let off = MqttBridgeConfig {
            port: 0,
            ..MqttBridgeConfig::default()
        };
        off.validate("plugins.mqtt_bridge", &mut p);
        assert!(p.is_empty());
        let bad = MqttBridgeConfig {
            enabled: true,
            port: 0,
            topic_prefix: "kotaemon/#".into(),
            model: " ".into(),
            max_concurrent_turns: 0,
            reply_topics: vec!["a/#/b".into()],
            ..MqttBridgeConfig::default()
        };
        bad.validate("plugins.mqtt_bridge", &mut p);
        let keys: Vec<&str> = p.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "plugins.mqtt_bridge.port",
                "plugins.mqtt_bridge.topic_prefix",
                "plugins.mqtt_bridge.model",
                "plugins.mqtt_bridge.max_concurrent_turns",
                "plugins.mqtt_bridge.reply_topics[0]"
            ],
            "{p:?}"
        );
        let mut p = Vec::new();
        let trailing = MqttBridgeConfig {
            enabled: true,
            topic_prefix: "home/agent/".into(),
            ..MqttBridgeConfig::default()
        };
        trailing.validate("b", &mut p);
        assert_eq!(p.len(), 1, "{p:?}");
        let defaults: MqttBridgeConfig = toml::from_str("enabled = true\nport = 1884\n").unwrap();
        assert_eq!(defaults.client_id, "kotaemon");
        assert_eq!(defaults.topic_prefix, "kotaemon");
        assert_eq!(defaults.model, "kotaemon");
        assert!(defaults.publish_events);
        let mut p = Vec::new();
        defaults.validate("b", &mut p);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn replies_go_under_the_prefix_or_to_configured_topics() {
        let t = Topics::new("kotaemon");
        let filters = vec!["satellites/+/reply".to_string()];
        assert!(check_reply_to(&t, &filters, "kotaemon/reply/kitchen").is_ok());
        assert!(check_reply_to(&t, &filters, "satellites/kitchen/reply").is_ok());
        for refused in [
            "office/light/set",
            "satellites/kitchen/state",
            "kotaemon/command",
            "kotaemon/status",
            "kotaemon/events",
            "kotaemon/+",
            "",
        ] {
            assert!(check_reply_to(&t, &filters, refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn topics_hang_under_the_prefix() {
        let t = Topics::new("home/agent");
        assert_eq!(t.command, "home/agent/command");
        assert_eq!(t.reply, "home/agent/reply");
        assert_eq!(t.events, "home/agent/events");
        assert_eq!(t.status, "home/agent/status");
        assert!(mqtt_conn::filter_matches(
            &t.own,
            "home/agent/reply/kitchen"
        ));
    }
}
