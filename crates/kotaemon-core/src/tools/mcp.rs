//! MCP client: tools of Model Context Protocol servers (stdio, streamable HTTP) under a
//! namespace. Filled in by the MCP slice.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpServerConfig {
    pub namespace: String,
}

impl McpServerConfig {
    /// Problems as `field: reason` (the caller adds the key path).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        Ok(())
    }
}
