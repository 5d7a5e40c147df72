//! MCP client against the reference Python SDK (FastMCP, `tests/data/mcp_server.py`), over
//! stdio and streamable HTTP: tools appear under their namespace, calls map both ways, and a
//! server that goes away takes its tools with it until it is back.

use kotaemon_core::tools::{self, mcp, Effect, ToolCtx, ToolError, ToolRegistry, ToolsConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The venv's python with the `mcp` package (`$KOTAEMON_VENV`, else `<repo>/.venv`).
fn python() -> String {
    let venv = std::env::var_os("KOTAEMON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "the MCP tests need the Python venv with the `mcp` package at {}: run ./scripts/test \
         (it creates it) or set KOTAEMON_VENV",
        venv.display()
    );
    python.to_string_lossy().into_owned()
}

fn server_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/mcp_server.py")
        .to_string_lossy()
        .into_owned()
}

/// A TOML string literal.
fn lit(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

/// A registry with the MCP connections of `toml_text` (a `[tools]` table), as the app runs them.
struct Connections {
    registry: Arc<ToolRegistry>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Connections {
    fn start(toml_text: &str) -> Connections {
        let config: ToolsConfig =
            toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n---\n{toml_text}"));
        let registry = tools::build(&config).unwrap_or_else(|p| panic!("{p:?}"));
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        mcp::spawn_connections(&config.mcp, registry.clone(), stop.clone(), &tasks);
        Connections {
            registry,
            stop,
            tasks,
        }
    }

    async fn call(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        let ctx = ToolCtx {
            idempotency_key: "turn-1:call-1".into(),
        };
        self.registry
            .call(name, args, &ctx, Duration::from_secs(30))
            .await
    }

    fn has(&self, name: &str) -> bool {
        self.registry.names().iter().any(|n| n == name)
    }

    /// Stops the connections; every task ends and the namespace's tools are gone.
    async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(15), self.tasks.wait())
            .await
            .expect("MCP connection tasks end when stopped");
        assert_eq!(self.registry.names(), Vec::<String>::new());
    }
}

/// Polls `cond` every 50 ms for up to `secs`: Python servers start slowly on a busy machine,
/// and reconnects wait out the client's backoff (1 s, 2 s, …).
async fn until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened within {secs}s: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_server_tools_are_namespaced_called_and_restarted() {
    let c = Connections::start(&format!(
        "[[mcp]]\nnamespace = \"office\"\ncommand = {}\nargs = [{}, \"stdio\"]\ntimeout_ms = 5000\n",
        lit(&python()),
        lit(&server_script()),
    ));
    until("office tools registered", 30, || c.has("office__add")).await;
    let names = c.registry.names();
    for tool in [
        "add",
        "room_status",
        "fail",
        "switch_light",
        "enable_extra",
        "hidden",
    ] {
        assert!(names.contains(&format!("office__{tool}")), "{names:?}");
    }
    assert!(
        !names.iter().any(|n| n.contains("weather")),
        "`get.weather` is not a valid function name and must be skipped: {names:?}"
    );

    let add = c.registry.spec("office__add").unwrap();
    assert_eq!(add.effect, Effect::ReadOnly);
    assert_eq!(add.timeout, Duration::from_millis(5000));
    assert_eq!(add.description, "Adds two integers.");
    assert_eq!(add.openai_tool()["function"]["name"], "office__add");
    // readOnlyHint: false on the server.
    let light = c.registry.spec("office__switch_light").unwrap();
    assert_eq!(light.effect, Effect::Mutating);

    assert_eq!(
        c.call("office__add", json!({"a": 2, "b": 40}))
            .await
            .unwrap(),
        json!({"result": 42})
    );
    assert_eq!(
        c.call("office__room_status", json!({"room": "三楼会议室"}))
            .await
            .unwrap(),
        json!({"result": "三楼会议室: occupied until 15:00"})
    );
    let failed = c.call("office__fail", json!({"reason": "not today"})).await;
    assert!(
        matches!(&failed, Err(ToolError::Failed(m)) if m.contains("refused: not today")),
        "{failed:?}"
    );
    // Bad arguments are refused by the schema the server published, before any call.
    let wrong = c.call("office__add", json!({"a": "two", "b": 3})).await;
    assert!(
        matches!(&wrong, Err(ToolError::InvalidArguments(m)) if m.contains("/a")),
        "{wrong:?}"
    );
    let missing = c.call("office__add", json!({"a": 1})).await;
    assert!(
        matches!(&missing, Err(ToolError::InvalidArguments(m)) if m.contains("\"b\"")),
        "{missing:?}"
    );

    // notifications/tools/list_changed: the list is fetched again.
    assert_eq!(
        c.call("office__enable_extra", json!({})).await.unwrap(),
        json!({"result": "enabled"})
    );
    until("office__extra registered after list_changed", 10, || {
        c.has("office__extra")
    })
    .await;
    assert_eq!(
        c.call("office__extra", json!({})).await.unwrap(),
        json!({"result": "extra"})
    );

    // The process dies: its tools go, the client starts it again, they come back.
    let crashed = c.call("office__crash", json!({})).await;
    assert!(
        matches!(&crashed, Err(ToolError::Failed(m)) if m.contains("not reachable")),
        "{crashed:?}"
    );
    until("office tools withdrawn after the crash", 10, || {
        !c.has("office__add")
    })
    .await;
    until("office tools back after the restart", 30, || {
        c.has("office__add")
    })
    .await;
    assert_eq!(
        c.call("office__add", json!({"a": 1, "b": 1}))
            .await
            .unwrap(),
        json!({"result": 2})
    );
    c.shutdown().await;
}

/// The HTTP test server, killed when dropped.
struct HttpServer(tokio::process::Child);

impl HttpServer {
    async fn start(port: u16) -> HttpServer {
        let child = tokio::process::Command::new(python())
            .args([server_script(), "http".into(), port.to_string()])
            .kill_on_drop(true)
            .spawn()
            .expect("start the MCP test server");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the MCP test server did not listen on port {port} within 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        HttpServer(child)
    }

    async fn kill(mut self) {
        self.0.kill().await.unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_is_called_with_secret_headers_and_rejoins_after_restart() {
    std::env::set_var("KOTAEMON_TEST_MCP_HTTP_TOKEN", "Bearer it-token-7c1e");
    let port = free_port();
    let server = HttpServer::start(port).await;
    let c = Connections::start(&format!(
        r#"
        [[mcp]]
        namespace = "web"
        url = "http://127.0.0.1:{port}/mcp"
        headers = {{ Authorization = "env:KOTAEMON_TEST_MCP_HTTP_TOKEN" }}
        timeout_ms = 2000
        keepalive_ms = 200
        allow = ["add", "room_status", "header", "switch_light"]
        mutating = ["add"]
        "#
    ));
    until("web tools registered", 30, || c.has("web__add")).await;
    let mut names = c.registry.names();
    names.sort();
    assert_eq!(
        names,
        [
            "web__add",
            "web__header",
            "web__room_status",
            "web__switch_light"
        ],
        "only the allowed tools are offered"
    );
    // The config marks `add` mutating although the server says it is read-only.
    assert_eq!(
        c.registry.spec("web__add").unwrap().effect,
        Effect::Mutating
    );

    assert_eq!(
        c.call("web__add", json!({"a": 20, "b": 22})).await.unwrap(),
        json!({"result": 42})
    );
    assert_eq!(
        c.call("web__room_status", json!({"room": "三楼会议室"}))
            .await
            .unwrap(),
        json!({"result": "三楼会议室: occupied until 15:00"})
    );
    assert_eq!(
        c.call("web__header", json!({"name": "authorization"}))
            .await
            .unwrap(),
        json!({"result": "Bearer it-token-7c1e"})
    );

    // The server dies: the keep-alive notices and the tools are withdrawn.
    server.kill().await;
    until("web tools withdrawn after the server died", 15, || {
        !c.has("web__add")
    })
    .await;
    // It comes back on the same port: the client reconnects and registers them again.
    let server = HttpServer::start(port).await;
    until("web tools back after the restart", 40, || c.has("web__add")).await;
    assert_eq!(
        c.call("web__add", json!({"a": 1, "b": 2})).await.unwrap(),
        json!({"result": 3})
    );
    c.shutdown().await;
    server.kill().await;
}
