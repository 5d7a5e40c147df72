//! `http` tools: templated requests to allowlisted hosts. Filled in by the http slice.

use super::Tool;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpToolConfig {
    pub name: String,
}

pub fn build(config: &HttpToolConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    let _ = config;
    Ok(Vec::new())
}
