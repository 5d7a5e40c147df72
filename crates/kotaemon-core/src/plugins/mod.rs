//! Plugins: what lives on the event bus and can start turns — the MQTT bridge, webhook sinks
//! and in-process components. Started by `App::start_background`, stopped with the app.

pub mod mqtt_bridge;
pub mod webhook;

use crate::api::error::ApiError;
use crate::events::{EventBus, TurnEvent, TurnOutcome};
use crate::pipeline::Pipeline;
use crate::turn::{Origin, Reply, Turn};
use crate::wire::ChatRequest;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub mqtt_bridge: mqtt_bridge::MqttBridgeConfig,
    /// Turn events POSTed as JSON to HTTP endpoints.
    pub webhooks: Vec<webhook::WebhookConfig>,
}

impl PluginsConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        self.mqtt_bridge.validate(&format!("{path}.mqtt_bridge"), p);
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(&format!("{path}.webhooks[{i}]"), p);
        }
    }
}

/// The in-process building block — our counterpart of kotaemon's `BaseComponent`: a typed
/// input, a typed output, an async `run` that may ask the agent. Components that take bus
/// events (`Input = Arc<TurnEvent>`, `Output = ()`) are driven by
/// [`spawn_event_component`]; see `crates/kotaemon-core/examples/slow_turn_alarm.rs`.
#[async_trait]
pub trait Component: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// For logs.
    fn name(&self) -> &'static str;
    async fn run(&self, input: Self::Input, agent: &AgentHandle) -> Self::Output;
}

/// What a component can do with the agent: ask it something, as a whole turn through the
/// pipeline (rules, cache, router, model, tools).
#[derive(Clone)]
pub struct AgentHandle {
    deps: PluginDeps,
}

impl AgentHandle {
    pub fn new(deps: PluginDeps) -> Self {
        AgentHandle { deps }
    }

    /// Runs `text` as a user turn (origin `plugin`) and returns the answer's text, or the
    /// error a client would have received.
    pub async fn ask(&self, model: &str, text: &str) -> Result<String, ApiError> {
        let request = ChatRequest::utterance(model, text);
        let turn = Turn::new(
            self.deps.bus.clone(),
            Origin::Plugin,
            request,
            self.deps.turn_timeout,
        );
        let ctx = turn.ctx.clone();
        let result = self.deps.pipeline.run(turn).await;
        let (outcome, answer) = match result {
            Ok(Reply::Complete(c)) => (TurnOutcome::Ok, Ok(c.content().unwrap_or("").to_string())),
            Ok(Reply::Stream(_)) => (
                TurnOutcome::Ok,
                Ok(String::new()), // not asked for: stream was false
            ),
            Err(e) => {
                let api = ApiError::from(e);
                let outcome = TurnOutcome::Failed {
                    status: api.status.as_u16(),
                    code: api.code,
                };
                (outcome, Err(api))
            }
        };
        ctx.emit(TurnEvent::TurnFinished {
            turn: ctx.id.clone(),
            outcome,
            elapsed: ctx.started.elapsed(),
            stream: false,
        });
        answer
    }
}

/// Drives a component with every bus event, on the app's tasks, until `stop`. A component
/// slower than the bus loses the oldest events (counted in `kotaemon_events_dropped_total`);
/// turns never wait for it.
pub fn spawn_event_component<C>(
    component: Arc<C>,
    deps: &PluginDeps,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) where
    C: Component<Input = Arc<TurnEvent>, Output = ()>,
{
    let mut events = deps.bus.subscribe();
    let agent = AgentHandle::new(deps.clone());
    let stop = stop.clone();
    tasks.spawn(async move {
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = events.next() => e,
            };
            let Some(event) = event else { return };
            component.run(event, &agent).await;
        }
    });
}

/// What a plugin may use: run turns through the pipeline, watch the bus.
#[derive(Clone)]
pub struct PluginDeps {
    pub pipeline: Pipeline,
    pub bus: EventBus,
    pub turn_timeout: Duration,
}

/// Starts every enabled plugin on `tasks`; each stops when `stop` is cancelled.
pub fn start(
    config: &PluginsConfig,
    deps: &PluginDeps,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    if config.mqtt_bridge.enabled {
        mqtt_bridge::start(&config.mqtt_bridge, deps.clone(), stop.clone(), tasks);
    }
    for w in &config.webhooks {
        match webhook::Webhook::new(w) {
            Ok(hook) => spawn_event_component(Arc::new(hook), deps, stop, tasks),
            Err(e) => tracing::error!("webhook not started: {e}"),
        }
    }
}
