//! `contacts` tools. Filled in by the contacts slice.

use super::Tool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContactsConfig {
    pub enabled: bool,
}

pub fn build(config: &ContactsConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    let _ = config;
    Ok(Vec::new())
}
