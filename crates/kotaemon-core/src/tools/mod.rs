//! Actions the agent runs on the device: the `Tool` trait, the registry the tool loop and the
//! rules draw from, and one module per tool family (calendar, contacts, http, mqtt, mcp).
//!
//! The cloud model decides *what* to do (an OpenAI `tool_calls` entry); the device *does* it
//! with its own credentials. A tool family is one module with a config struct, a constructor
//! that validates, and one `Tool` impl per function it offers.

pub mod calendar;
pub mod contacts;
pub mod http;
pub mod mcp;
pub mod mqtt;

use crate::audit::AuditEntry;
use crate::events::TurnEvent;
use crate::turn::Turn;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Does calling the tool change the world? Mutating calls are never retried blindly and carry
/// an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    ReadOnly,
    Mutating,
}

/// What the model sees of a tool, and how the loop treats it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    /// `^[a-zA-Z0-9_-]{1,64}$` (OpenAI's rule for function names); families prefix their
    /// tools (`calendar_create_event`, MCP servers `<namespace>__<tool>`).
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
    pub effect: Effect,
    pub timeout: Duration,
}

impl ToolSpec {
    /// The OpenAI `tools[]` entry offered to the model.
    pub fn openai_tool(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters,
        }})
    }
}

/// Per-call context.
#[derive(Debug, Clone)]
pub struct ToolCtx {
    /// Stable for one tool call (turn id + call id): a mutating tool uses it so that a repeated
    /// call cannot act twice (e.g. as the UID of a calendar event).
    pub idempotency_key: String,
}

/// Why a call failed. Everything but `Internal` goes back to the model as the tool result,
/// so it can correct itself; `Internal` is the device's own fault and ends the turn.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The action could not be done as asked (conflict, not found, refused by the remote).
    #[error("{0}")]
    Failed(String),
    #[error("the tool did not answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ToolError {
    /// The outcome label of events and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ToolError::InvalidArguments(_) => "invalid_arguments",
            ToolError::Failed(_) => "failed",
            ToolError::Timeout(_) => "timeout",
            ToolError::Internal(_) => "internal",
        }
    }
}

#[async_trait]
pub trait Tool: Send + Sync {
    fn spec(&self) -> &ToolSpec;
    /// `args` has been validated against `spec().parameters`. The result is JSON the model
    /// reads (keep it small and without secrets).
    async fn call(&self, args: Value, ctx: &ToolCtx) -> Result<Value, ToolError>;
}

/// Every tool family's config, `[tools.*]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    pub calendar: calendar::CalendarConfig,
    pub contacts: contacts::ContactsConfig,
    /// Named, templated HTTP requests (webhooks, DingTalk/Feishu, Exchange…).
    pub http: Vec<http::HttpToolConfig>,
    pub mqtt: mqtt::MqttConfig,
    /// MCP servers whose tools join the registry under `<namespace>__`.
    pub mcp: Vec<mcp::McpServerConfig>,
}

/// A registered tool with its compiled argument schema.
struct Entry {
    tool: Arc<dyn Tool>,
    validator: jsonschema::Validator,
}

/// The tools the agent can run, by name. Built at start-up from config; MCP servers add
/// theirs when they connect (and remove them when they go away), hence the lock.
#[derive(Default)]
pub struct ToolRegistry {
    tools: RwLock<BTreeMap<String, Arc<Entry>>>,
}

/// A tool's name breaks OpenAI's rule, is taken, or its schema does not compile.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tool name `{name}` must be 1-64 characters of a-z, A-Z, 0-9, _ and -"
        ))
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool; its name must be valid and unused, its schema must compile.
    pub fn register(&self, tool: Arc<dyn Tool>) -> Result<(), String> {
        let spec = tool.spec();
        check_name(&spec.name)?;
        let validator = jsonschema::validator_for(&spec.parameters)
            .map_err(|e| format!("tool `{}`: invalid parameters schema: {e}", spec.name))?;
        let mut tools = self.tools.write().unwrap_or_else(|e| e.into_inner());
        if tools.contains_key(&spec.name) {
            return Err(format!("tool `{}` is defined twice", spec.name));
        }
        tools.insert(spec.name.clone(), Arc::new(Entry { tool, validator }));
        Ok(())
    }

    /// Removes every tool whose name starts with `prefix` (an MCP server went away).
    pub fn unregister_prefix(&self, prefix: &str) {
        let mut tools = self.tools.write().unwrap_or_else(|e| e.into_inner());
        tools.retain(|name, _| !name.starts_with(prefix));
    }

    pub fn names(&self) -> Vec<String> {
        let tools = self.tools.read().unwrap_or_else(|e| e.into_inner());
        tools.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn spec(&self, name: &str) -> Option<ToolSpec> {
        let tools = self.tools.read().unwrap_or_else(|e| e.into_inner());
        tools.get(name).map(|e| e.tool.spec().clone())
    }

    /// The OpenAI `tools` array for the names `allowed` admits.
    pub fn offered(&self, allowed: impl Fn(&str) -> bool) -> Vec<Value> {
        let tools = self.tools.read().unwrap_or_else(|e| e.into_inner());
        tools
            .values()
            .filter(|e| allowed(&e.tool.spec().name))
            .map(|e| e.tool.spec().openai_tool())
            .collect()
    }

    /// Validates `args` against the tool's schema and runs it within its timeout (or
    /// `deadline_left`, whichever is shorter).
    pub async fn call(
        &self,
        name: &str,
        args: Value,
        ctx: &ToolCtx,
        deadline_left: Duration,
    ) -> Result<Value, ToolError> {
        let entry = {
            let tools = self.tools.read().unwrap_or_else(|e| e.into_inner());
            tools.get(name).cloned()
        };
        let Some(entry) = entry else {
            return Err(ToolError::InvalidArguments(format!(
                "there is no tool named `{name}`"
            )));
        };
        let problems: Vec<String> = entry
            .validator
            .iter_errors(&args)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(ToolError::InvalidArguments(problems.join("; ")));
        }
        let limit = entry.tool.spec().timeout.min(deadline_left);
        match tokio::time::timeout(limit, entry.tool.call(args, ctx)).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::Timeout(limit)),
        }
    }
}

impl ToolRegistry {
    /// The tool's name for events and metric labels: a name the model made up is "unknown",
    /// so labels stay bounded.
    pub fn label(&self, name: &str) -> Arc<str> {
        if self.spec(name).is_some() {
            name.into()
        } else {
            "unknown".into()
        }
    }

    /// Runs a tool on behalf of a turn: the call, its `ToolCalled` event and its audit record.
    /// `args` are the real values the tool needs; `audited_args` are what the log keeps: the
    /// arguments as the model (or rule) wrote them, with pseudonyms.
    pub async fn call_for_turn(
        &self,
        turn: &Turn,
        name: &str,
        args: Value,
        audited_args: Value,
        idempotency_key: String,
    ) -> Result<Value, ToolError> {
        let started = tokio::time::Instant::now();
        let ctx = ToolCtx { idempotency_key };
        let result = self.call(name, args, &ctx, turn.deadline.remaining()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        let elapsed = started.elapsed();
        let tool = self.label(name);
        turn.ctx.emit(TurnEvent::ToolCalled {
            turn: turn.id().clone(),
            tool: tool.clone(),
            outcome,
            elapsed,
        });
        turn.ctx
            .bus
            .audit()
            .record(AuditEntry::ToolCall {
                turn: turn.id().to_string(),
                tool: tool.to_string(),
                arguments: audited_args,
                outcome: outcome.to_string(),
                elapsed_ms: elapsed.as_millis() as u64,
            })
            .await;
        result
    }
}

/// Builds the configured tool families into one registry; every problem is reported with its
/// key path. MCP servers connect later (`mcp::spawn_connections`).
pub fn build(config: &ToolsConfig) -> Result<Arc<ToolRegistry>, Vec<String>> {
    let registry = Arc::new(ToolRegistry::new());
    let mut problems = Vec::new();
    let mut add = |path: String, built: Result<Vec<Arc<dyn Tool>>, Vec<String>>| match built {
        Ok(tools) => {
            for t in tools {
                if let Err(e) = registry.register(t) {
                    problems.push(format!("{path}: {e}"));
                }
            }
        }
        Err(p) => problems.extend(p.into_iter().map(|e| format!("{path}.{e}"))),
    };
    add("tools.calendar".into(), calendar::build(&config.calendar));
    add("tools.contacts".into(), contacts::build(&config.contacts));
    for (i, h) in config.http.iter().enumerate() {
        add(format!("tools.http[{i}]"), http::build(h));
    }
    add("tools.mqtt".into(), mqtt::build(&config.mqtt));
    let mut namespaces = std::collections::HashSet::new();
    for (i, m) in config.mcp.iter().enumerate() {
        if let Err(p) = m.validate() {
            problems.extend(p.into_iter().map(|e| format!("tools.mcp[{i}].{e}")));
        }
        if !namespaces.insert(m.namespace.as_str()) {
            problems.push(format!(
                "tools.mcp[{i}].namespace: `{}` is used twice",
                m.namespace
            ));
        }
    }
    if problems.is_empty() {
        Ok(registry)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(ToolSpec);

    #[async_trait]
    impl Tool for Echo {
        fn spec(&self) -> &ToolSpec {
            &self.0
        }
        async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
            if args["wait_ms"].as_u64().is_some() {
                tokio::time::sleep(Duration::from_millis(args["wait_ms"].as_u64().unwrap_or(0)))
                    .await;
            }
            Ok(args)
        }
    }

    fn echo(name: &str) -> Arc<dyn Tool> {
        Arc::new(Echo(ToolSpec {
            name: name.into(),
            description: "echo".into(),
            parameters: json!({"type": "object", "properties": {
                "text": {"type": "string"}, "wait_ms": {"type": "integer"}},
                "required": ["text"], "additionalProperties": false}),
            effect: Effect::ReadOnly,
            timeout: Duration::from_millis(100),
        }))
    }

    fn ctx() -> ToolCtx {
        ToolCtx {
            idempotency_key: "t-1".into(),
        }
    }

    #[test]
    fn names_must_follow_openai_rules_and_be_unique() {
        let r = ToolRegistry::new();
        assert!(r.register(echo("say_hi")).is_ok());
        assert!(r.register(echo("say_hi")).unwrap_err().contains("twice"));
        assert!(r.register(echo("say.hi")).is_err());
        assert!(r.register(echo("")).is_err());
        assert_eq!(r.names(), vec!["say_hi"]);
        assert_eq!(r.offered(|_| true)[0]["function"]["name"], "say_hi");
        assert!(r.offered(|n| n != "say_hi").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn arguments_are_validated_and_calls_time_out() {
        let r = ToolRegistry::new();
        r.register(echo("echo")).unwrap();
        let long = Duration::from_secs(60);
        let ok = r.call("echo", json!({"text": "hi"}), &ctx(), long).await;
        assert_eq!(ok.unwrap()["text"], "hi");
        let wrong = r.call("echo", json!({"text": 5}), &ctx(), long).await;
        assert!(
            matches!(&wrong, Err(ToolError::InvalidArguments(m)) if m.contains("/text")),
            "{wrong:?}"
        );
        let extra = r
            .call("echo", json!({"text": "a", "x": 1}), &ctx(), long)
            .await;
        assert!(matches!(extra, Err(ToolError::InvalidArguments(_))));
        let unknown = r.call("nope", json!({}), &ctx(), long).await;
        assert!(matches!(unknown, Err(ToolError::InvalidArguments(m)) if m.contains("no tool")));
        let slow = r
            .call("echo", json!({"text": "a", "wait_ms": 500}), &ctx(), long)
            .await;
        assert!(matches!(slow, Err(ToolError::Timeout(d)) if d == Duration::from_millis(100)));
        // The turn's deadline is shorter than the tool's own timeout: the deadline wins.
        let short = r
            .call(
                "echo",
                json!({"text": "a", "wait_ms": 500}),
                &ctx(),
                Duration::from_millis(30),
            )
            .await;
        assert!(matches!(short, Err(ToolError::Timeout(d)) if d == Duration::from_millis(30)));
    }
}
