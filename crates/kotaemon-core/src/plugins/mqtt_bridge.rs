//! MQTT bridge: publishes turn events, takes utterances on a command topic and publishes the
//! reply. Filled in by the MQTT slice.

use super::PluginDeps;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttBridgeConfig {
    pub enabled: bool,
}

impl MqttBridgeConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        let _ = (path, p);
    }
}

pub fn start(
    config: &MqttBridgeConfig,
    deps: PluginDeps,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let _ = (config, deps, stop, tasks);
}
