//! Plugins: what lives on the event bus and can start turns — the MQTT bridge, webhook sinks
//! and in-process components. Started by `App::start_background`, stopped with the app.

pub mod mqtt_bridge;

use crate::events::EventBus;
use crate::pipeline::Pipeline;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub mqtt_bridge: mqtt_bridge::MqttBridgeConfig,
}

impl PluginsConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        self.mqtt_bridge.validate(&format!("{path}.mqtt_bridge"), p);
    }
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
}
