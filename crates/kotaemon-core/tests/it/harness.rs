//! Starts agents and fake upstreams on port 0 and talks to them like a client would.

use kotaemon_core::{App, Config};
use kotaemon_fake_upstream::FakeUpstream;
use serde_json::{json, Value};
use std::time::Duration;

pub struct Agent {
    pub url: String,
    pub bus: kotaemon_core::events::EventBus,
    pub pool: std::sync::Arc<kotaemon_core::upstream::pool::Pool>,
    /// Where this agent's audit log goes (a temporary directory unless the TOML sets one).
    pub audit_dir: std::path::PathBuf,
    _audit_tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Agent {
    /// `extra_toml` is appended after the upstream sections (so it may add `[pool]`, etc.),
    /// `server_toml` goes into `[server]`.
    pub async fn start(
        upstreams: &[(&str, &FakeUpstream)],
        server_toml: &str,
        extra_toml: &str,
    ) -> Agent {
        let mut toml = format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_toml}\n");
        toml.push_str(extra_toml);
        toml.push('\n');
        for (name, fake) in upstreams {
            toml.push_str(&format!("[[upstreams]]\nname = \"{name}\"\nbase_url = \"{}\"\nconnect_timeout_ms = 500\nttfb_ms = 400\nidle_ms = 400\n", fake.base_url()));
        }
        Self::start_toml(&toml).await
    }

    pub async fn start_toml(toml: &str) -> Agent {
        // Tests keep their audit logs to themselves.
        let audit_tmp = (!toml.contains("[audit]")).then(|| tempfile::tempdir().unwrap());
        let toml = match &audit_tmp {
            Some(d) => format!("{toml}\n[audit]\ndir = {:?}\n", d.path()),
            None => toml.to_string(),
        };
        // …and their usage ledgers and job queues.
        let scratch = audit_tmp
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_else(std::env::temp_dir);
        let mut toml = toml;
        for section in ["queue", "usage"] {
            if !toml.contains(&format!("[{section}]")) {
                let db = scratch.join(format!("{section}-{}.db", uuid_like()));
                toml = format!("{toml}\n[{section}]\npath = {db:?}\n");
            }
        }
        let config = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n---\n{toml}"));
        let audit_dir = config.audit.dir();
        let app = App::build_with_upstreams(config, Vec::new(), Some(7))
            .unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (bus, pool) = (app.bus.clone(), app.pool.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        Agent {
            url,
            bus,
            pool,
            audit_dir,
            _audit_tmp: audit_tmp,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    pub fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.url)
    }

    pub async fn chat(&self, body: Value) -> Reply {
        send(client().post(self.chat_url()).json(&body)).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(client().get(format!("{}{path}", self.url))).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// A response read to the end: status, headers, body, and the SSE events if it streamed.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub elapsed: Duration,
}

pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    let started = std::time::Instant::now();
    // A hang is a failure: the client-side limit is far beyond any configured deadline.
    let response = tokio::time::timeout(Duration::from_secs(20), req.send())
        .await
        .expect("request hung")
        .expect("request failed");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(20), response.text())
        .await
        .expect("body hung")
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Content deltas of a streamed answer, joined.
    pub fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect()
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Asserts an OpenAI-style error body with this status.
    pub fn assert_error(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "body: {}", self.body);
        let v = self.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "no message: {}",
            self.body
        );
        assert!(v["error"]["type"].is_string(), "no type: {}", self.body);
        self
    }
}

pub fn ask(stream: bool) -> Value {
    json!({"model": "fake-model", "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

/// Polls `cond` every 20 ms for up to 5 s: waiting for a condition, never asserting a time.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

pub async fn metrics_text(agent: &Agent) -> String {
    agent.get("/metrics").await.body
}

/// The value of one sample line `name{labels} value`, where every `label="value"` pair given
/// must be present.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Every record in an audit directory (all series), as JSON.
pub fn audit_records(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// A name unique in this test process.
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
