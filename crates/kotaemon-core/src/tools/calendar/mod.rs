//! `calendar` tools: CalDAV (RFC 4791). Filled in by the calendar slice.

use super::Tool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalendarConfig {
    pub enabled: bool,
}

pub fn build(config: &CalendarConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    let _ = config;
    Ok(Vec::new())
}
