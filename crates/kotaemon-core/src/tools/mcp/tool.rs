//! One MCP server tool as a registry [`Tool`]: how its name, effect and schema are mapped, and
//! how a `tools/call` result becomes the JSON the model reads.

use super::McpServerConfig;
use crate::tools::{Effect, Tool, ToolCtx, ToolError, ToolSpec};
use async_trait::async_trait;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, CancelledNotificationParam,
    ClientRequest, ErrorCode, RawContent, RequestId, ResourceContents, ServerResult,
};
use rmcp::service::PeerRequestOptions;
use rmcp::{Peer, RoleClient, ServiceError};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The registry name of MCP tool `tool` on the server with `namespace`, if it follows
/// OpenAI's rule for function names (`^[a-zA-Z0-9_-]{1,64}$`).
pub(super) fn registry_name(namespace: &str, tool: &str) -> Result<String, String> {
    let name = format!("{namespace}__{tool}");
    if tool.is_empty() {
        return Err("the server offers a tool without a name".into());
    }
    if let Some(c) = tool
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "tool `{tool}`: `{c}` is not allowed in a function name (a-z, A-Z, 0-9, _ and -)"
        ));
    }
    if name.len() > 64 {
        return Err(format!(
            "tool `{tool}`: `{name}` is longer than 64 characters (a shorter namespace helps)"
        ));
    }
    Ok(name)
}

/// Mutating if the config says so; otherwise what the server's annotations say
/// (`readOnlyHint: false` or `destructiveHint: true`); otherwise read-only.
pub(super) fn effect(config: &McpServerConfig, tool: &rmcp::model::Tool) -> Effect {
    if config.mutating.iter().any(|m| m == tool.name.as_ref()) {
        return Effect::Mutating;
    }
    match &tool.annotations {
        Some(a) if a.read_only_hint == Some(true) => Effect::ReadOnly,
        Some(a) if a.read_only_hint == Some(false) || a.destructive_hint == Some(true) => {
            Effect::Mutating
        }
        _ => Effect::ReadOnly,
    }
}

/// A tool of a connected MCP server. It holds the connection's peer: once the connection is
/// gone, calls fail until the connection task has replaced (or removed) the tool.
pub(super) struct McpTool {
    spec: ToolSpec,
    /// The tool's name on the server.
    remote: String,
    namespace: Arc<str>,
    peer: Peer<RoleClient>,
    /// Tells the connection task that the transport failed, so it checks now rather than at
    /// the next keep-alive.
    suspect: Arc<Notify>,
}

impl McpTool {
    /// `None` (with the reason) if the tool cannot be offered to the model.
    pub(super) fn new(
        config: &McpServerConfig,
        tool: &rmcp::model::Tool,
        peer: Peer<RoleClient>,
        suspect: Arc<Notify>,
    ) -> Result<McpTool, String> {
        let name = registry_name(&config.namespace, &tool.name)?;
        let description = match (&tool.description, &tool.title) {
            (Some(d), _) if !d.trim().is_empty() => d.to_string(),
            (_, Some(t)) => t.clone(),
            _ => String::new(),
        };
        Ok(McpTool {
            spec: ToolSpec {
                name,
                description,
                parameters: Value::Object((*tool.input_schema).clone()),
                effect: effect(config, tool),
                timeout: Duration::from_millis(config.timeout_ms),
            },
            remote: tool.name.to_string(),
            namespace: config.namespace.as_str().into(),
            peer,
            suspect,
        })
    }

    fn service_error(&self, e: ServiceError) -> ToolError {
        match e {
            ServiceError::McpError(d) if d.code == ErrorCode::INVALID_PARAMS => {
                ToolError::InvalidArguments(d.message.into_owned())
            }
            ServiceError::McpError(d) => ToolError::Failed(d.message.into_owned()),
            ServiceError::TransportSend(_) | ServiceError::TransportClosed => {
                self.suspect.notify_one();
                ToolError::Failed(format!(
                    "the MCP server `{}` is not reachable",
                    self.namespace
                ))
            }
            ServiceError::Timeout { timeout } => ToolError::Timeout(timeout),
            ServiceError::Cancelled { .. } => ToolError::Failed("the call was cancelled".into()),
            ServiceError::UnexpectedResponse => ToolError::Failed(format!(
                "the MCP server `{}` sent an unexpected response",
                self.namespace
            )),
            // The enum is non-exhaustive; whatever comes later is the server's or the link's.
            other => ToolError::Failed(format!("MCP server `{}`: {other}", self.namespace)),
        }
    }
}

/// Sends `notifications/cancelled` for a request whose caller stopped waiting (the registry's
/// timeout or the turn's deadline dropped the call), so the server can stop working on it.
struct CancelOnDrop(Option<(Peer<RoleClient>, RequestId)>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some((peer, request_id)) = self.0.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let params = CancelledNotificationParam {
                    request_id,
                    reason: Some("the caller stopped waiting".into()),
                };
                let _ = peer.notify_cancelled(params).await;
            });
        }
    }
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let arguments = match args {
            Value::Object(map) => Some(map),
            Value::Null => None,
            _ => {
                return Err(ToolError::InvalidArguments(
                    "arguments must be a JSON object".into(),
                ))
            }
        };
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(CallToolRequestParams {
            meta: None,
            name: self.remote.clone().into(),
            arguments,
            task: None,
        }));
        let handle = self
            .peer
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .map_err(|e| self.service_error(e))?;
        let mut guard = CancelOnDrop(Some((self.peer.clone(), handle.id.clone())));
        let response = handle.await_response().await;
        guard.0 = None;
        match response {
            Ok(ServerResult::CallToolResult(result)) => result_json(result),
            Ok(_) => Err(self.service_error(ServiceError::UnexpectedResponse)),
            Err(e) => Err(self.service_error(e)),
        }
    }
}

/// The JSON the model reads from a `tools/call` result: `structuredContent` when the server
/// sent it, else the text parts joined by newlines (non-text parts are named, not inlined).
/// `isError: true` becomes [`ToolError::Failed`] with the text.
pub(super) fn result_json(result: CallToolResult) -> Result<Value, ToolError> {
    let parts: Vec<String> = result
        .content
        .into_iter()
        .map(|c| match c.raw {
            RawContent::Text(t) => t.text,
            RawContent::Image(i) => format!("[image ({}) omitted]", i.mime_type),
            RawContent::Audio(a) => format!("[audio ({}) omitted]", a.mime_type),
            RawContent::Resource(r) => match r.resource {
                ResourceContents::TextResourceContents { text, .. } => text,
                ResourceContents::BlobResourceContents { uri, .. } => {
                    format!("[binary resource {uri} omitted]")
                }
            },
            RawContent::ResourceLink(r) => format!("[resource {}]", r.uri),
        })
        .collect();
    let text = parts.join("\n");
    if result.is_error == Some(true) {
        return Err(ToolError::Failed(if text.trim().is_empty() {
            "the MCP tool reported an error".into()
        } else {
            text
        }));
    }
    Ok(match result.structured_content {
        Some(v) => v,
        None => Value::String(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(mutating: &[&str]) -> McpServerConfig {
        let mut c: McpServerConfig =
            toml::from_str("namespace = \"home\"\nurl = \"http://127.0.0.1:1/mcp\"").unwrap();
        c.mutating = mutating.iter().map(|s| s.to_string()).collect();
        c
    }

    fn mcp_tool(v: Value) -> rmcp::model::Tool {
        serde_json::from_value(v).unwrap()
    }

    fn result(v: Value) -> CallToolResult {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn names_are_namespaced_and_follow_openai_rules() {
        assert_eq!(registry_name("home", "add").unwrap(), "home__add");
        assert_eq!(
            registry_name("h-1", "room_status").unwrap(),
            "h-1__room_status"
        );
        assert!(registry_name("home", "get.weather")
            .unwrap_err()
            .contains("`.`"));
        assert!(registry_name("home", "会议室").is_err());
        assert!(registry_name("home", "").is_err());
        let longest = "x".repeat(64 - "home__".len());
        assert_eq!(registry_name("home", &longest).unwrap().len(), 64);
        let too_long = format!("{longest}x");
        assert!(registry_name("home", &too_long).unwrap_err().contains("64"));
    }

    #[test]
    fn effect_comes_from_config_then_annotations() {
        let plain = mcp_tool(json!({"name": "a", "inputSchema": {"type": "object"}}));
        assert_eq!(effect(&config(&[]), &plain), Effect::ReadOnly);
        assert_eq!(effect(&config(&["a"]), &plain), Effect::Mutating);
        let annotated = |a: Value| {
            mcp_tool(json!({"name": "a", "inputSchema": {"type": "object"}, "annotations": a}))
        };
        let c = config(&[]);
        assert_eq!(
            effect(&c, &annotated(json!({"readOnlyHint": true}))),
            Effect::ReadOnly
        );
        assert_eq!(
            effect(&c, &annotated(json!({"readOnlyHint": false}))),
            Effect::Mutating
        );
        assert_eq!(
            effect(&c, &annotated(json!({"destructiveHint": true}))),
            Effect::Mutating
        );
        // A read-only tool cannot be destructive (the spec ignores the hint then).
        assert_eq!(
            effect(
                &c,
                &annotated(json!({"readOnlyHint": true, "destructiveHint": true}))
            ),
            Effect::ReadOnly
        );
        assert_eq!(
            effect(&c, &annotated(json!({"title": "Add"}))),
            Effect::ReadOnly
        );
        // The config outranks the server's annotations.
        assert_eq!(
            effect(&config(&["a"]), &annotated(json!({"readOnlyHint": true}))),
            Effect::Mutating
        );
    }

    #[test]
    fn text_parts_are_joined_and_structured_content_wins() {
        let r = result(json!({"content": [
            {"type": "text", "text": "三楼会议室"},
            {"type": "text", "text": "free"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///a.txt", "text": "inline"}},
        ]}));
        assert_eq!(
            result_json(r).unwrap(),
            json!("三楼会议室\nfree\n[image (image/png) omitted]\ninline")
        );
        let r = result(json!({"content": [{"type": "text", "text": "5"}],
            "structuredContent": {"result": 5}, "isError": false}));
        assert_eq!(result_json(r).unwrap(), json!({"result": 5}));
        let r = result(json!({"structuredContent": {"ok": true}}));
        assert_eq!(result_json(r).unwrap(), json!({"ok": true}));
    }

    #[test]
    fn errors_reported_by_the_tool_are_failures_with_its_text() {
        let r = result(
            json!({"content": [{"type": "text", "text": "room not found"}],
            "isError": true}),
        );
        assert!(matches!(result_json(r), Err(ToolError::Failed(m)) if m == "room not found"));
        let r = result(json!({"content": [], "structuredContent": {}, "isError": true}));
        assert!(matches!(result_json(r), Err(ToolError::Failed(m)) if m.contains("error")));
    }
}
