//! MCP client: the tools of Model Context Protocol servers join the registry as
//! `<namespace>__<tool>`.
//!
//! Each `[[tools.mcp]]` server gets one connection task ([`spawn_connections`]): it starts the
//! server (a child process speaking MCP on stdio) or connects to it (streamable HTTP),
//! initializes, lists the tools (all pages) and registers them. While connected it pings the
//! server every `keepalive_ms` and re-lists when the server sends
//! `notifications/tools/list_changed`. When the connection is lost the server's tools leave the
//! registry and the task reconnects with capped backoff (1 s doubling to 30 s) until the agent
//! stops. Logs name the namespace only: never a URL, a header or an environment value.

mod tool;

use crate::config::SecretRef;
use crate::tools::{Tool as _, ToolRegistry};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rmcp::model::{ClientInfo, ClientRequest, Implementation, PingRequest, ServerResult};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tool::McpTool;

/// One MCP server, `[[tools.mcp]]`: either a program the agent starts and talks to over its
/// stdin/stdout (`command`), or a streamable HTTP endpoint (`url`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// Prefix of this server's tools: the model sees `<namespace>__<tool>`. 1-61 letters,
    /// digits, `_` and `-`, without `__` and not ending in `_`; unique among MCP servers.
    /// Tools whose full name breaks OpenAI's rule (`^[a-zA-Z0-9_-]{1,64}$`) are skipped with a
    /// warning.
    pub namespace: String,
    /// stdio: the program to start (looked up on `PATH`), e.g. `uvx` or `/usr/bin/node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// stdio: the program's arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio: environment variables for the program. It inherits only `PATH`, `HOME`, `USER`,
    /// `LOGNAME`, `SHELL`, `TERM`, `LANG`, `LC_ALL`, `TZ` and `TMPDIR` from the agent, so the
    /// agent's own credentials do not leak to it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: environment variables holding secrets, as references (`env:NAME` or
    /// `file:/path`), e.g. `{ GITHUB_TOKEN = "env:KOTAEMON_GITHUB_TOKEN" }`.
    #[serde(default)]
    pub secret_env: BTreeMap<String, SecretRef>,
    /// Streamable HTTP: the MCP endpoint, e.g. `http://127.0.0.1:8000/mcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Streamable HTTP: headers sent with every request, values as secret references, e.g.
    /// `{ Authorization = "file:/etc/kotaemon/mcp-token" }` (the file holds `Bearer …`).
    #[serde(default)]
    pub headers: BTreeMap<String, SecretRef>,
    /// Limit of one tool call, of a keep-alive ping and of fetching a changed tool list.
    /// (Starting the server, initializing and the first listing may take up to 30 s.)
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How often a connected server is pinged; one that does not answer within `timeout_ms`
    /// is treated as gone (its tools are removed until it is back). 0 turns pings off, then
    /// only a closed connection is noticed (stdio: the program exited).
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: u64,
    /// Tools to offer (names as the server gives them, without the namespace). Empty: all.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Tools that change the world (never retried blindly). Others are read-only unless the
    /// server annotates them with `readOnlyHint: false` or `destructiveHint: true`.
    #[serde(default)]
    pub mutating: Vec<String>,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_keepalive_ms() -> u64 {
    15_000
}

/// Environment variables a stdio server inherits from the agent (the reference MCP SDK's list
/// plus locale and temp dir).
const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LC_ALL", "TZ", "TMPDIR",
];
/// Starting (or reaching) a server, initializing and listing its tools.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing connection may take (an HTTP session is deleted on the server).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl McpServerConfig {
    /// Problems as `field: reason` (the caller adds the key path). Resolves the secret
    /// references, so a missing one fails start-up rather than every connection attempt.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if let Err(e) = check_namespace(&self.namespace) {
            p.push(format!("namespace: {e}"));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => p.push(
                "url: set either `command` (stdio) or `url` (streamable HTTP), not both".into(),
            ),
            (None, None) => p.push(
                "command: set `command` (a stdio server) or `url` (a streamable HTTP server)"
                    .into(),
            ),
            (Some(c), None) => {
                if c.trim().is_empty() {
                    p.push("command: must not be empty".into());
                }
                if !self.headers.is_empty() {
                    p.push("headers: only for HTTP servers (`url`)".into());
                }
            }
            (None, Some(u)) => {
                match reqwest::Url::parse(u) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    Ok(_) => p.push("url: must be an http(s) URL with a host".into()),
                    Err(e) => p.push(format!("url: not a URL: {e}")),
                }
                for (field, empty) in [
                    ("args", self.args.is_empty()),
                    ("env", self.env.is_empty()),
                    ("secret_env", self.secret_env.is_empty()),
                ] {
                    if !empty {
                        p.push(format!("{field}: only for stdio servers (`command`)"));
                    }
                }
            }
        }
        for name in self.env.keys().chain(self.secret_env.keys()) {
            if name.is_empty() || name.contains(['=', '\0']) {
                p.push(format!("env: `{name}` is not a valid variable name"));
            }
        }
        if let Some(dup) = self.env.keys().find(|k| self.secret_env.contains_key(*k)) {
            p.push(format!(
                "secret_env.{dup}: also set in `env`; keep one of them"
            ));
        }
        for (name, r) in &self.secret_env {
            if let Err(e) = r.resolve() {
                p.push(format!("secret_env.{name}: {e}"));
            }
        }
        if let Err(e) = header_map(&self.headers) {
            p.push(e);
        }
        if self.timeout_ms == 0 {
            p.push("timeout_ms: must be at least 1".into());
        }
        if self.allow.iter().any(|a| a.is_empty()) {
            p.push("allow: tool names must not be empty".into());
        }
        for m in &self.mutating {
            if m.is_empty() {
                p.push("mutating: tool names must not be empty".into());
            } else if !self.allow.is_empty() && !self.allow.contains(m) {
                p.push(format!(
                    "mutating: `{m}` is not in `allow`, so it is never offered"
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    fn transport_kind(&self) -> &'static str {
        if self.url.is_some() {
            "http"
        } else {
            "stdio"
        }
    }

    fn allows(&self, tool: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|a| a == tool)
    }
}

/// `<namespace>__` must be a prefix of this server's tools only: no `__` inside, no trailing
/// `_` (`a` would otherwise own the tools of `a_`), and room for a tool name.
fn check_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() || ns.len() > 61 {
        return Err(format!("`{ns}` must be 1-61 characters long"));
    }
    if !ns
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("`{ns}` may contain only a-z, A-Z, 0-9, _ and -"));
    }
    if ns.contains("__") || ns.ends_with('_') {
        return Err(format!(
            "`{ns}` must not contain `__` or end with `_` (`__` separates it from tool names)"
        ));
    }
    Ok(())
}

/// The configured headers with their secrets resolved and marked sensitive.
fn header_map(headers: &BTreeMap<String, SecretRef>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, r) in headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("headers: `{name}` is not a valid header name"))?;
        let secret = r.resolve().map_err(|e| format!("headers.{name}: {e}"))?;
        let mut value = HeaderValue::from_str(secret.expose()).map_err(|_| {
            format!("headers.{name}: the value of `{r}` is not a valid header value")
        })?;
        value.set_sensitive(true);
        map.insert(header, value);
    }
    Ok(map)
}

/// Starts one connection task per configured server (see the module docs). They end when
/// `stop` is cancelled; `tasks` tracks them (and the stderr readers of stdio servers).
/// Servers whose config is invalid, or whose namespace is already taken, are skipped with an
/// error (start-up validation normally refuses them first).
pub fn spawn_connections(
    servers: &[McpServerConfig],
    registry: Arc<ToolRegistry>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let mut namespaces = HashSet::new();
    for server in servers {
        if let Err(problems) = server.validate() {
            tracing::error!(namespace = %server.namespace, ?problems, "MCP server not started: invalid config");
            continue;
        }
        if !namespaces.insert(server.namespace.clone()) {
            tracing::error!(namespace = %server.namespace, "MCP server not started: its namespace is used by another MCP server");
            continue;
        }
        tasks.spawn(run(
            Arc::new(server.clone()),
            registry.clone(),
            stop.clone(),
            tasks.clone(),
        ));
    }
}

/// Connects, serves, and reconnects with backoff until `stop`.
async fn run(
    config: Arc<McpServerConfig>,
    registry: Arc<ToolRegistry>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let prefix = format!("{}__", config.namespace);
    let mut delay = BACKOFF_MIN;
    // Warned about the current failure streak already: later failures log at DEBUG.
    let mut warned = false;
    let mut skipped = HashSet::new();
    loop {
        let mut session = Session {
            config: &config,
            registry: &registry,
            skipped: &mut skipped,
            connected_at: None,
        };
        let outcome = session.serve(&stop, &tasks).await;
        let connected_at = session.connected_at;
        registry.unregister_prefix(&prefix);
        let Err(error) = outcome else {
            tracing::debug!(namespace = %config.namespace, "MCP connection closed");
            return;
        };
        // Transport errors can quote the URL (which may carry a token); logs name the
        // namespace instead.
        let error = match &config.url {
            Some(url) => scrub(&error, url),
            None => error,
        };
        if let Some(at) = connected_at {
            // A new streak; a connection that held for a while also resets the backoff.
            warned = false;
            if at.elapsed() >= BACKOFF_MAX {
                delay = BACKOFF_MIN;
            }
        }
        if warned {
            tracing::debug!(namespace = %config.namespace, %error, retry_in_ms = delay.as_millis() as u64, "MCP server still unavailable");
        } else {
            tracing::warn!(namespace = %config.namespace, %error, retry_in_ms = delay.as_millis() as u64, "MCP server unavailable; its tools are withdrawn until it is back");
            warned = true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// The MCP client side: tells the connection task when the server's tool list changed.
#[derive(Clone)]
struct Client {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Client {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.tools_changed.notify_one();
        std::future::ready(())
    }

    fn get_info(&self) -> ClientInfo {
        ClientInfo {
            client_info: Implementation {
                name: "kotaemon".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Implementation::default()
            },
            ..ClientInfo::default()
        }
    }
}

/// One connection to a server, from start to loss.
struct Session<'a> {
    config: &'a McpServerConfig,
    registry: &'a ToolRegistry,
    /// Tools already warned about as unusable (warned once per task, not per connection).
    skipped: &'a mut HashSet<String>,
    /// When the tools were registered (the connection was usable).
    connected_at: Option<Instant>,
}

impl Session<'_> {
    /// Runs until `stop` (Ok) or until the connection fails or is lost (Err, a reason fit for
    /// the log).
    async fn serve(&mut self, stop: &CancellationToken, tasks: &TaskTracker) -> Result<(), String> {
        let client = Client {
            tools_changed: Arc::new(Notify::new()),
        };
        let suspect = Arc::new(Notify::new());
        let setup = async {
            let running = connect(self.config, client.clone(), stop, tasks).await?;
            let count = self.register(running.peer(), &suspect).await?;
            Ok::<_, String>((running, count))
        };
        let (running, count) = tokio::select! {
            setup = tokio::time::timeout(CONNECT_TIMEOUT, setup) => setup.map_err(|_| {
                format!("not connected and listed within {}s", CONNECT_TIMEOUT.as_secs())
            })??,
            () = stop.cancelled() => return Ok(()),
        };
        let peer = running.peer().clone();
        self.connected_at = Some(Instant::now());
        tracing::info!(namespace = %self.config.namespace, transport = self.config.transport_kind(), tools = count, "MCP server connected");

        let cancel = running.cancellation_token();
        let done = running.waiting();
        tokio::pin!(done);
        let keepalive = Duration::from_millis(self.config.keepalive_ms);
        let mut next_ping = Instant::now() + keepalive;
        let (result, finished) = loop {
            let ping_due = async move {
                if keepalive.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep_until(next_ping).await
                }
            };
            tokio::select! {
                () = stop.cancelled() => break (Ok(()), false),
                quit = &mut done => break (Err(match quit {
                    Ok(reason) => format!("connection closed ({reason:?})"),
                    Err(e) => format!("connection task failed: {e}"),
                }), true),
                () = client.tools_changed.notified() => {
                    let limit = Duration::from_millis(self.config.timeout_ms);
                    match tokio::time::timeout(limit, self.register(&peer, &suspect)).await {
                        Ok(Ok(n)) => tracing::info!(namespace = %self.config.namespace, tools = n, "MCP server changed its tools"),
                        Ok(Err(e)) => break (Err(e), false),
                        Err(_) => break (Err(format!("no answer to tools/list within {}ms", limit.as_millis())), false),
                    }
                }
                () = ping_due => {
                    if let Err(e) = self.ping(&peer).await {
                        break (Err(e), false);
                    }
                    next_ping = Instant::now() + keepalive;
                }
                () = suspect.notified() => {
                    if let Err(e) = self.ping(&peer).await {
                        break (Err(e), false);
                    }
                }
            }
        };
        if !finished {
            cancel.cancel();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, done).await;
        }
        result
    }

    async fn ping(&self, peer: &Peer<RoleClient>) -> Result<(), String> {
        let limit = Duration::from_millis(self.config.timeout_ms);
        let ping = peer.send_request(ClientRequest::PingRequest(PingRequest::default()));
        match tokio::time::timeout(limit, ping).await {
            Ok(Ok(ServerResult::EmptyResult(_))) => Ok(()),
            Ok(Ok(_)) => Err("unexpected answer to ping".into()),
            Ok(Err(e)) => Err(format!("ping failed: {e}")),
            Err(_) => Err(format!("no answer to ping within {}ms", limit.as_millis())),
        }
    }

    /// Lists the server's tools and replaces this namespace's tools in the registry; returns
    /// how many were registered.
    async fn register(
        &mut self,
        peer: &Peer<RoleClient>,
        suspect: &Arc<Notify>,
    ) -> Result<usize, String> {
        let listed = peer
            .list_all_tools()
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        let config = self.config;
        let mut tools = Vec::new();
        for t in listed.iter().filter(|t| config.allows(&t.name)) {
            match McpTool::new(config, t, peer.clone(), suspect.clone()) {
                Ok(tool) => tools.push(tool),
                Err(why) => self.skip(&t.name, &why),
            }
        }
        self.registry
            .unregister_prefix(&format!("{}__", self.config.namespace));
        let mut count = 0;
        for tool in tools {
            let name = tool.spec().name.clone();
            match self.registry.register(Arc::new(tool)) {
                Ok(()) => count += 1,
                Err(why) => self.skip(&name, &why),
            }
        }
        Ok(count)
    }

    fn skip(&mut self, tool: &str, why: &str) {
        if self.skipped.insert(tool.to_string()) {
            tracing::warn!(namespace = %self.config.namespace, "MCP tool skipped: {why}");
        }
    }
}

/// Starts the server (stdio) or reaches it (HTTP) and runs the MCP initialization.
async fn connect(
    config: &McpServerConfig,
    client: Client,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<RunningService<RoleClient, Client>, String> {
    let running = if let Some(url) = &config.url {
        let http = reqwest::Client::builder()
            .default_headers(header_map(&config.headers)?)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let transport = StreamableHttpClientTransport::with_client(
            http,
            StreamableHttpClientTransportConfig::with_uri(url.as_str()),
        );
        client.serve(transport).await
    } else {
        let program = config.command.as_deref().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&config.args).env_clear().kill_on_drop(true);
        for name in INHERITED_ENV {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.envs(&config.env);
        for (name, r) in &config.secret_env {
            let secret = r.resolve().map_err(|e| format!("secret_env.{name}: {e}"))?;
            cmd.env(name, secret.expose());
        }
        let (transport, stderr) = TokioChildProcess::builder(cmd)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `{program}`: {e}"))?;
        if let Some(stderr) = stderr {
            tasks.spawn(forward_stderr(
                config.namespace.clone(),
                stderr,
                stop.clone(),
            ));
        }
        client.serve(transport).await
    };
    running.map_err(|e| e.to_string())
}

/// Removes the server's URL from an error message (a URL may carry a token), and rmcp's
/// transport type name.
fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(url, "<url>");
    if let Some(start) = out.find("Transport [") {
        if let Some(len) = out[start..].find("] ") {
            out.replace_range(start..start + len + 2, "");
        }
    }
    if let Ok(parsed) = reqwest::Url::parse(url) {
        out = out.replace(parsed.as_str(), "<url>");
    }
    out
}

/// A stdio server's stderr is its log: forwarded at DEBUG, one line at a time, until the
/// pipe closes or the agent stops (a grandchild may hold the pipe open).
async fn forward_stderr(
    namespace: String,
    stderr: tokio::process::ChildStderr,
    stop: CancellationToken,
) {
    let mut lines = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::select! {
            read = lines.read_until(b'\n', &mut line) => read,
            () = stop.cancelled() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::debug!(%namespace, "MCP server stderr: {}", text.trim_end());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<McpServerConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    fn problems(toml_text: &str) -> Vec<String> {
        parse(toml_text)
            .unwrap()
            .validate()
            .err()
            .unwrap_or_default()
    }

    #[test]
    fn stdio_and_http_servers_parse_with_defaults() {
        let c = parse(
            r#"
            namespace = "home"
            command = "uvx"
            args = ["mcp-server-home"]
            env = { LOG_LEVEL = "warning" }
            "#,
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!((c.timeout_ms, c.keepalive_ms), (10_000, 15_000));
        assert_eq!(c.transport_kind(), "stdio");
        assert!(c.allows("anything"));
        let c =
            parse("namespace = \"ha\"\nurl = \"https://ha.local/mcp\"\nallow = [\"a\"]").unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.transport_kind(), "http");
        assert!(c.allows("a") && !c.allows("b"));
        assert!(parse("namespace = \"x\"\nurl = \"http://h/\"\ntimeout = 5").is_err());
        assert!(
            parse("url = \"http://h/\"").is_err(),
            "namespace is required"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let p = problems(r#"namespace = "a.b""#);
        assert!(p.iter().any(|e| e.starts_with("namespace: ")), "{p:?}");
        assert!(p.iter().any(|e| e.starts_with("command: ")), "{p:?}");
        for bad in ["a__b", "a_", "", &"n".repeat(62)] {
            let p = problems(&format!("namespace = \"{bad}\"\nurl = \"http://h/\""));
            assert!(
                p.len() == 1 && p[0].starts_with("namespace: "),
                "{bad}: {p:?}"
            );
        }
        assert_eq!(
            problems(&format!(
                "namespace = \"{}\"\nurl = \"http://h/\"",
                "n".repeat(61)
            )),
            Vec::<String>::new()
        );
        let p = problems(
            r#"
            namespace = "x"
            command = "srv"
            url = "ftp://h/"
            timeout_ms = 0
            mutating = ["write"]
            allow = ["read"]
            "#,
        );
        assert!(
            p.iter()
                .any(|e| e.starts_with("url: ") && e.contains("not both")),
            "{p:?}"
        );
        assert!(
            p.contains(&"timeout_ms: must be at least 1".to_string()),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.starts_with("mutating: `write`")),
            "{p:?}"
        );
        let p = problems(
            r#"
            namespace = "x"
            url = "not a url"
            args = ["-v"]
            env = { A = "1" }
            "#,
        );
        assert!(p.iter().any(|e| e.starts_with("url: not a URL")), "{p:?}");
        assert!(
            p.iter().any(|e| e.starts_with("args: only for stdio")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.starts_with("env: only for stdio")),
            "{p:?}"
        );
        let p = problems(
            r#"
            namespace = "x"
            command = "srv"
            headers = { Authorization = "env:KOTAEMON_TEST_MCP_UNSET" }
            "#,
        );
        assert!(
            p.iter().any(|e| e.starts_with("headers: only for HTTP")),
            "{p:?}"
        );
    }

    #[test]
    fn secrets_are_references_and_never_printed() {
        assert!(parse(
            "namespace = \"x\"\nurl = \"http://h/\"\nheaders = { Authorization = \"Bearer sk-1\" }"
        )
        .unwrap_err()
        .contains("references"),);
        std::env::set_var("KOTAEMON_TEST_MCP_TOKEN", "Bearer canary-5e1d");
        let c = parse(
            "namespace = \"x\"\nurl = \"http://h/\"\nheaders = { Authorization = \"env:KOTAEMON_TEST_MCP_TOKEN\" }",
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        let map = header_map(&c.headers).unwrap();
        assert_eq!(map["authorization"], "Bearer canary-5e1d");
        assert!(map["authorization"].is_sensitive());
        assert!(!format!("{c:?} {map:?}").contains("canary"));
        let p = problems(
            "namespace = \"x\"\nurl = \"http://h/\"\nheaders = { Authorization = \"env:KOTAEMON_TEST_MCP_UNSET\" }",
        );
        assert!(
            p.len() == 1
                && p[0].starts_with("headers.Authorization: ")
                && p[0].contains("KOTAEMON_TEST_MCP_UNSET"),
            "{p:?}"
        );
        let p = problems(
            "namespace = \"x\"\ncommand = \"srv\"\nsecret_env = { TOKEN = \"env:KOTAEMON_TEST_MCP_UNSET\" }",
        );
        assert!(
            p.len() == 1 && p[0].starts_with("secret_env.TOKEN: "),
            "{p:?}"
        );
        let p = problems("namespace = \"x\"\nurl = \"http://h/\"\nheaders = { \"bad header\" = \"env:KOTAEMON_TEST_MCP_TOKEN\" }");
        assert!(
            p.len() == 1 && p[0].contains("not a valid header name"),
            "{p:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_without_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/mcp");
        let config = parse(&format!("namespace = \"x\"\nurl = \"{url}\"")).unwrap();
        let client = Client {
            tools_changed: Arc::new(Notify::new()),
        };
        let error = connect(
            &config,
            client,
            &CancellationToken::new(),
            &TaskTracker::new(),
        )
        .await
        .err()
        .expect("nothing listens there");
        let error = scrub(&error, &url);
        assert!(!error.contains(&port.to_string()), "{error}");
        assert!(
            error.contains("error sending request for url (<url>)") && !error.contains("Worker"),
            "{error}"
        );
    }

    #[test]
    fn urls_are_scrubbed_from_errors() {
        let url = "http://mcp.local/mcp?token=abc";
        let msg = format!("error sending request for url ({url})");
        assert_eq!(scrub(&msg, url), "error sending request for url (<url>)");
        let bare = "http://mcp.local";
        assert!(!scrub("error for url (http://mcp.local/)", bare).contains("mcp.local"));
    }
}
