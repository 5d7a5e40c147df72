//! `mqtt` tools: `mqtt_publish` sends one message to an allowlisted topic of the home or office
//! broker (switch a light, set a thermostat).
//!
//! One connection per agent, opened on the first call and kept: a background task drives
//! rumqttc's event loop and reconnects with capped backoff (a call arriving while the broker is
//! away triggers an attempt at once). At QoS 1 a call returns once the broker acknowledged the
//! message (PUBACK), at QoS 0 once it was written. A publish is never queued for later: a light
//! switched minutes after the model was told "failed" would be worse than the failure, so a
//! call fails with the reason, within its timeout.

use super::{Effect, Tool, ToolCtx, ToolError, ToolSpec};
use crate::config::SecretRef;
use crate::mqtt_conn::{self, Backoff, Broker};
use async_trait::async_trait;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// `[tools.mqtt]`: publishing to an MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Offer `mqtt_publish` to the model.
    pub enabled: bool,
    /// Broker host name or IP address (plain TCP).
    pub host: String,
    pub port: u16,
    /// Must differ from every other client of the broker (the MQTT bridge uses `kotaemon`).
    pub client_id: String,
    /// Leave out for anonymous access.
    pub username: Option<String>,
    /// `env:NAME` or `file:PATH`; needs `username`.
    pub password: Option<SecretRef>,
    /// MQTT topic filters the model may publish to (`+` one level, `#` all below), e.g.
    /// `["office/+/set", "home/light/#"]`. Anything else is refused; enabling the tool needs at
    /// least one.
    pub allowed_topics: Vec<String>,
    /// 1: at least once, a call returns when the broker acknowledged; 0: at most once, a call
    /// returns when the message was written.
    pub qos: u8,
    /// Per call: connecting (if needed), publishing and the acknowledgement.
    pub timeout_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "kotaemon-tools".into(),
            username: None,
            password: None,
            allowed_topics: Vec::new(),
            qos: 1,
            timeout_ms: 5000,
        }
    }
}

/// Builds `mqtt_publish` when enabled; problems are `field: reason`. The connection opens on
/// the first call (this runs at start-up, possibly outside a runtime).
pub fn build(config: &MqttConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    if !config.enabled {
        return Ok(Vec::new());
    }
    let mut p = mqtt_conn::broker_problems(
        &config.host,
        config.port,
        &config.client_id,
        config.username.as_deref(),
        config.password.as_ref(),
    );
    if config.allowed_topics.is_empty() {
        p.push(
            "allowed_topics: list the topic filters the model may publish to \
             (e.g. [\"office/+/set\"]); none are allowed by default"
                .into(),
        );
    }
    for (i, f) in config.allowed_topics.iter().enumerate() {
        if let Err(e) = mqtt_conn::check_filter(f) {
            p.push(format!("allowed_topics[{i}]: {e}"));
        }
    }
    let qos = match config.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => {
            p.push("qos: must be 0 or 1".into());
            QoS::AtLeastOnce
        }
    };
    if config.timeout_ms == 0 {
        p.push("timeout_ms: must be greater than 0".into());
    }
    let broker = match Broker::resolve(
        &config.host,
        config.port,
        &config.client_id,
        config.username.as_deref(),
        config.password.as_ref(),
    ) {
        Ok(b) => Some(b),
        Err(e) => {
            p.push(e);
            None
        }
    };
    match broker {
        Some(broker) if p.is_empty() => Ok(vec![Arc::new(MqttPublish::new(config, broker, qos))]),
        _ => Err(p),
    }
}

/// How many successful calls are remembered by idempotency key.
const REMEMBERED_CALLS: usize = 64;

struct MqttPublish {
    spec: ToolSpec,
    broker: Arc<Broker>,
    filters: Vec<String>,
    qos: QoS,
    /// How long a call waits for the broker: a little less than the tool's timeout, so the
    /// model reads why, not just "timed out".
    wait: Duration,
    link: OnceLock<Link>,
    /// Idempotency keys of calls that published: a repeated call does not publish twice.
    done: Mutex<VecDeque<String>>,
}

impl MqttPublish {
    fn new(config: &MqttConfig, broker: Broker, qos: QoS) -> Self {
        let timeout = Duration::from_millis(config.timeout_ms);
        let filters = config.allowed_topics.clone();
        let spec = ToolSpec {
            name: "mqtt_publish".into(),
            description: format!(
                "Publish a message to an MQTT topic on the local broker, e.g. to switch a light \
                 or set a device (`{{\"topic\": \"office/light/set\", \"payload\": \"ON\"}}`). \
                 Allowed topics (MQTT filters, + is one level, # all below): {}.",
                filters.join(", ")
            ),
            parameters: json!({
                "type": "object",
                "properties": {
                    "topic": {"type": "string", "minLength": 1,
                              "description": "A concrete topic (no wildcards)."},
                    "payload": {"type": ["string", "object"],
                                "description": "Text, or a JSON object sent as JSON."},
                    "retain": {"type": "boolean",
                               "description": "Ask the broker to keep it as the topic's last value (default false)."}
                },
                "required": ["topic", "payload"],
                "additionalProperties": false
            }),
            effect: Effect::Mutating,
            timeout,
        };
        MqttPublish {
            spec,
            broker: Arc::new(broker),
            filters,
            qos,
            wait: timeout.mul_f64(0.9),
            link: OnceLock::new(),
            done: Mutex::new(VecDeque::new()),
        }
    }

    fn link(&self) -> &Link {
        self.link
            .get_or_init(|| Link::start(self.broker.clone(), self.qos))
    }

    fn done_before(&self, key: &str) -> bool {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.iter().any(|k| k == key)
    }

    fn remember(&self, key: &str) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if done.len() >= REMEMBERED_CALLS {
            done.pop_front();
        }
        done.push_back(key.to_string());
    }
}

/// The payload's bytes: text as is, a JSON object serialized.
fn payload_bytes(payload: &Value) -> Result<Vec<u8>, ToolError> {
    let bytes = match payload {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(_) => serde_json::to_vec(payload)
            .map_err(|e| ToolError::InvalidArguments(format!("payload: {e}")))?,
        _ => {
            return Err(ToolError::InvalidArguments(
                "payload must be a string or a JSON object".into(),
            ))
        }
    };
    if bytes.len() > mqtt_conn::MAX_PAYLOAD_BYTES {
        return Err(ToolError::InvalidArguments(format!(
            "payload is {} bytes; at most {} are sent",
            bytes.len(),
            mqtt_conn::MAX_PAYLOAD_BYTES
        )));
    }
    Ok(bytes)
}

#[async_trait]
impl Tool for MqttPublish {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, ctx: &ToolCtx) -> Result<Value, ToolError> {
        let topic = args["topic"].as_str().unwrap_or_default();
        mqtt_conn::check_topic(topic).map_err(ToolError::InvalidArguments)?;
        if !self
            .filters
            .iter()
            .any(|f| mqtt_conn::filter_matches(f, topic))
        {
            return Err(ToolError::Failed(format!(
                "topic not allowed: `{topic}` matches none of the allowed topics ({})",
                self.filters.join(", ")
            )));
        }
        let payload = payload_bytes(&args["payload"])?;
        let retain = args["retain"].as_bool().unwrap_or(false);
        if self.done_before(&ctx.idempotency_key) {
            // The same tool call again (a replayed turn): it acted once already.
            return Ok(json!({"published": true, "topic": topic, "repeated": true}));
        }
        let deadline = Instant::now() + self.wait;
        self.link()
            .publish(topic, payload, retain, deadline)
            .await
            .map_err(ToolError::Failed)?;
        self.remember(&ctx.idempotency_key);
        tracing::debug!(topic, retain, "mqtt_publish: published");
        Ok(json!({"published": true, "topic": topic}))
    }
}

/// Where the connection stands.
enum LinkState {
    /// An attempt is under way (or about to be).
    Connecting,
    Up,
    /// The last attempt failed; the driver waits out its backoff (or a caller's kick).
    Down,
}

type Waiter = oneshot::Sender<Result<(), String>>;

/// What the callers and the driver task share. The lock is never held across an await.
struct State {
    link: LinkState,
    /// Callers waiting for the next connection outcome.
    waiting_for_link: Vec<Waiter>,
    /// Publishes handed to rumqttc and not yet written, in order: rumqttc writes its requests
    /// in order, so the next `Outgoing::Publish(pkid)` belongs to the front one.
    unsent: VecDeque<Waiter>,
    /// QoS 1 publishes written and waiting for their PUBACK, by packet id.
    unacked: HashMap<u16, Waiter>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the driver out of its backoff: a caller wants a connection now.
    kick: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The kept connection: the client half, the shared state, and the driver task (stopped when
/// the tool is dropped).
struct Link {
    client: AsyncClient,
    shared: Arc<Shared>,
    broker: Arc<Broker>,
    qos: QoS,
    _stop: DropGuard,
}

impl Link {
    /// Spawns the driver on the current runtime (called from the first `call`).
    fn start(broker: Arc<Broker>, qos: QoS) -> Link {
        let (client, eventloop) = AsyncClient::new(broker.options(), 16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                link: LinkState::Connecting,
                waiting_for_link: Vec::new(),
                unsent: VecDeque::new(),
                unacked: HashMap::new(),
            }),
            kick: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(drive(
            eventloop,
            shared.clone(),
            broker.clone(),
            qos,
            stop.clone(),
        ));
        Link {
            client,
            shared,
            broker,
            qos,
            _stop: stop.drop_guard(),
        }
    }

    async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        deadline: Instant,
    ) -> Result<(), String> {
        let addr = self.broker.addr();
        let waited = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        let done = loop {
            let link_outcome = {
                let mut st = self.shared.lock();
                match &st.link {
                    LinkState::Up => {
                        self.client
                            .try_publish(topic, self.qos, retain, payload.clone())
                            .map_err(|_| {
                                format!("the connection to the MQTT broker at {addr} is busy; try again")
                            })?;
                        let (tx, rx) = oneshot::channel();
                        st.unsent.push_back(tx);
                        break rx;
                    }
                    LinkState::Connecting => {}
                    LinkState::Down => {
                        st.link = LinkState::Connecting;
                        self.shared.kick.notify_one();
                    }
                }
                let (tx, rx) = oneshot::channel();
                st.waiting_for_link.push(tx);
                rx
            };
            match tokio::time::timeout_at(deadline, link_outcome).await {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(reason))) => {
                    return Err(format!(
                        "cannot reach the MQTT broker at {addr}: {reason}; nothing was published"
                    ))
                }
                Ok(Err(_)) => return Err("the MQTT connection task has stopped".into()),
                Err(_) => {
                    return Err(format!(
                        "no connection to the MQTT broker at {addr} within {waited} ms; nothing was published"
                    ))
                }
            }
        };
        match tokio::time::timeout_at(deadline, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the MQTT connection task has stopped".into()),
            Err(_) => Err(format!(
                "the MQTT broker at {addr} did not acknowledge within {waited} ms; \
                 the message may or may not have been delivered"
            )),
        }
    }
}

/// Drives the event loop: connection outcomes and acknowledgements go to the waiting callers;
/// after a failure it waits out the backoff (or a caller's kick) and reconnects.
async fn drive(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    broker: Arc<Broker>,
    qos: QoS,
    stop: CancellationToken,
) {
    let addr = broker.addr();
    let mut backoff = Backoff::new();
    // Failures since the last connection: the first is logged at WARN, the rest at DEBUG.
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if failures > 0 {
                    tracing::info!(broker = %addr, "mqtt tool: connected to the broker again");
                } else {
                    tracing::debug!(broker = %addr, "mqtt tool: connected to the broker");
                }
                failures = 0;
                backoff.reset();
                let mut st = shared.lock();
                st.link = LinkState::Up;
                for w in st.waiting_for_link.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut st = shared.lock();
                if let Some(w) = st.unsent.pop_front() {
                    if qos == QoS::AtMostOnce {
                        let _ = w.send(Ok(()));
                    } else {
                        st.unacked.insert(pkid, w);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(w) = shared.lock().unacked.remove(&ack.pkid) {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                let reason = mqtt_conn::describe(&e);
                failures += 1;
                if failures > 1 {
                    tracing::debug!(broker = %addr, failures, "mqtt tool: broker connection failed: {reason}");
                } else if mqtt_conn::needs_operator(&e) {
                    tracing::error!(broker = %addr, "mqtt tool: {reason}; check [tools.mqtt]");
                } else {
                    tracing::warn!(broker = %addr, "mqtt tool: broker connection failed: {reason}; reconnecting");
                }
                {
                    let mut st = shared.lock();
                    // With a clean session rumqttc drops what was not acknowledged when it
                    // reconnects; drop it here too, so nothing queued now goes out later and
                    // the in-order bookkeeping starts afresh.
                    eventloop.clean();
                    eventloop.pending.clear();
                    eventloop.state.events.clear();
                    eventloop.state.collision = None;
                    let lost = format!(
                        "the connection to the MQTT broker at {addr} was lost before it acknowledged \
                         ({reason}); the message may or may not have been delivered"
                    );
                    for w in st.unsent.drain(..) {
                        let _ = w.send(Err(lost.clone()));
                    }
                    for (_, w) in st.unacked.drain() {
                        let _ = w.send(Err(lost.clone()));
                    }
                    for w in st.waiting_for_link.drain(..) {
                        let _ = w.send(Err(reason.clone()));
                    }
                    st.link = LinkState::Down;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shared.kick.notified() => {}
                }
                let mut st = shared.lock();
                if matches!(st.link, LinkState::Down) {
                    st.link = LinkState::Connecting;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MqttConfig {
        MqttConfig {
            enabled: true,
            allowed_topics: vec!["office/+/set".into()],
            ..MqttConfig::default()
        }
    }

    #[test]
    fn disabled_builds_nothing_and_enabled_needs_allowed_topics() {
        assert!(build(&MqttConfig::default()).unwrap().is_empty());
        let tools = build(&config()).unwrap();
        assert_eq!(tools[0].spec().name, "mqtt_publish");
        assert_eq!(tools[0].spec().effect, Effect::Mutating);
        assert!(tools[0].spec().description.contains("office/+/set"));

        let bad = MqttConfig {
            allowed_topics: vec![],
            qos: 2,
            timeout_ms: 0,
            ..config()
        };
        let p = build(&bad).err().unwrap();
        let fields: Vec<&str> = p.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(fields, ["allowed_topics", "qos", "timeout_ms"], "{p:?}");
        let bad_filter = MqttConfig {
            allowed_topics: vec!["office/#/set".into()],
            ..config()
        };
        assert!(build(&bad_filter).err().unwrap()[0].starts_with("allowed_topics[0]: "));
        let missing_secret = MqttConfig {
            username: Some("u".into()),
            password: Some(SecretRef::Env("KOTAEMON_TEST_MQTT_TOOL_MISSING".into())),
            ..config()
        };
        let p = build(&missing_secret).err().unwrap();
        assert!(p[0].starts_with("password: "), "{p:?}");
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let c: MqttConfig = toml::from_str(
            "enabled = true\nallowed_topics = [\"home/#\"]\nusername = \"agent\"\npassword = \"env:MQTT_PW\"\n",
        )
        .unwrap();
        assert_eq!((c.port, c.qos, c.timeout_ms), (1883, 1, 5000));
        assert_eq!(c.client_id, "kotaemon-tools");
        assert!(toml::from_str::<MqttConfig>("password = \"hunter2\"").is_err());
        assert!(toml::from_str::<MqttConfig>("topics = []").is_err());
    }

    #[test]
    fn payloads_are_text_or_json_objects() {
        assert_eq!(payload_bytes(&json!("ON")).unwrap(), b"ON");
        assert_eq!(payload_bytes(&json!("开")).unwrap(), "开".as_bytes());
        let obj = payload_bytes(&json!({"state": "ON", "brightness": 80})).unwrap();
        let back: Value = serde_json::from_slice(&obj).unwrap();
        assert_eq!(back, json!({"state": "ON", "brightness": 80}));
        assert!(payload_bytes(&json!(5)).is_err());
        let huge = "x".repeat(mqtt_conn::MAX_PAYLOAD_BYTES + 1);
        assert!(matches!(
            payload_bytes(&json!(huge)),
            Err(ToolError::InvalidArguments(_))
        ));
    }

    #[tokio::test]
    async fn topics_outside_the_allowlist_are_refused_before_connecting() {
        let tools = build(&config()).unwrap();
        let ctx = ToolCtx {
            idempotency_key: "t-1".into(),
        };
        let refused = tools[0]
            .call(json!({"topic": "office/door/open", "payload": "1"}), &ctx)
            .await;
        assert!(
            matches!(&refused, Err(ToolError::Failed(m)) if m.starts_with("topic not allowed")),
            "{refused:?}"
        );
        let wildcard = tools[0]
            .call(json!({"topic": "office/+/set", "payload": "1"}), &ctx)
            .await;
        assert!(matches!(wildcard, Err(ToolError::InvalidArguments(_))));
    }
}
