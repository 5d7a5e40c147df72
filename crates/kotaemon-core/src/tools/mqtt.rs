//! `mqtt` tools. Filled in by the mqtt slice.

use super::Tool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
}

pub fn build(config: &MqttConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    let _ = config;
    Ok(Vec::new())
}
