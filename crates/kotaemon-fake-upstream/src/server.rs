//! The server: shared state, the [`FakeUpstream`] handle, the accept loop, the per-connection
//! keep-alive loop and routing of the non-chat endpoints.

use crate::script::{error_body, Script};
use crate::wire::{self, Request};
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Most recorded requests kept (oldest dropped first).
pub const MAX_RECORDED: usize = 1000;
const DEFAULT_MODEL: &str = "fake-model";

/// A chat-completions request as received (recorded before any fault is applied).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Lowercased names, in arrival order.
    pub headers: Vec<(String, String)>,
    /// `Null` if the body was empty or not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// `{method, path, headers: {name: value}, body}`; repeated headers are joined with ", ".
    pub fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            match headers.get_mut(name) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(value);
                }
                _ => {
                    headers.insert(name.clone(), Value::String(value.clone()));
                }
            }
        }
        json!({"method": self.method, "path": self.path, "headers": headers, "body": self.body})
    }
}

pub(crate) struct State {
    queue: VecDeque<Script>,
    default: Script,
    recorded: VecDeque<RecordedRequest>,
    recording: bool,
    chat_count: usize,
    pub(crate) models: Vec<String>,
    pub(crate) models_status: u16,
}

impl Default for State {
    fn default() -> Self {
        State {
            queue: VecDeque::new(),
            default: Script::default(),
            recorded: VecDeque::new(),
            recording: true,
            chat_count: 0,
            models: vec![DEFAULT_MODEL.to_string()],
            models_status: 200,
        }
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    open: AtomicUsize,
    next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts and (if enabled) records one chat request, then pops its script.
    pub(crate) fn record_chat(&self, req: &Request, body: &Value) {
        let mut st = self.state();
        st.chat_count += 1;
        if st.recording {
            if st.recorded.len() >= MAX_RECORDED {
                st.recorded.pop_front();
            }
            st.recorded.push_back(RecordedRequest {
                method: req.method.clone(),
                path: req.path.clone(),
                headers: req.headers.clone(),
                body: body.clone(),
            });
        }
    }

    pub(crate) fn next_script(&self) -> Script {
        let mut st = self.state();
        match st.queue.pop_front() {
            Some(s) => s,
            None => st.default.clone(),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Handle to a running fake upstream. Dropping it shuts the server down.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl FakeUpstream {
    /// Serves on `listener` (accept loop spawned on the current runtime).
    pub async fn start(listener: TcpListener) -> FakeUpstream {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        });
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), rx));
        FakeUpstream {
            addr,
            shared,
            shutdown,
        }
    }

    /// Serves on 127.0.0.1 with an ephemeral port.
    pub async fn bind_loopback() -> std::io::Result<FakeUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(FakeUpstream::start(listener).await)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a script for the next chat-completions request (FIFO).
    pub fn push(&self, script: Script) {
        self.shared.state().queue.push_back(script);
    }

    /// Script used when the queue is empty.
    pub fn set_default(&self, script: Script) {
        self.shared.state().default = script;
    }

    /// Recorded chat-completions requests (at most the last [`MAX_RECORDED`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().recorded.iter().cloned().collect()
    }

    /// Chat-completions requests received so far (counted even when recording is off).
    pub fn chat_request_count(&self) -> usize {
        self.shared.state().chat_count
    }

    /// Turns request recording on or off (on by default).
    pub fn set_recording(&self, on: bool) {
        self.shared.state().recording = on;
    }

    /// Model ids listed by `GET /v1/models` (default `["fake-model"]`).
    pub fn set_models(&self, ids: Vec<String>) {
        self.shared.state().models = ids;
    }

    /// Status of `GET /v1/models` (default 200; anything else answers an error body).
    pub fn set_models_status(&self, status: u16) {
        self.shared.state().models_status = status;
    }

    /// TCP connections currently open on the server side.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every connection. Idempotent.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut rx: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = rx.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let guard = ConnGuard::new(shared.clone());
                let rx = rx.clone();
                tokio::spawn(run_conn(guard, stream, rx));
            }
            // Out of file descriptors and the like: back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Counts an open connection for as long as it lives.
struct ConnGuard(Arc<Shared>);

impl ConnGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        ConnGuard(shared)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run_conn(guard: ConnGuard, stream: TcpStream, mut rx: watch::Receiver<bool>) {
    let shared = guard.0.clone();
    tokio::select! {
        _ = serve_conn(&shared, stream) => {}
        _ = rx.wait_for(|stop| *stop) => {}
    }
    // The stream (owned by the finished or dropped future) is closed before the count drops.
    drop(guard);
}

/// What to do with the connection after a response.
pub(crate) enum Flow {
    KeepAlive,
    Close,
}

async fn serve_conn(shared: &Shared, mut stream: TcpStream) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        let req = match wire::read_request(&mut stream, &mut buf).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                if let Some(status) = e.status {
                    let body = error_body(&e.message, "invalid_request_error", Value::Null);
                    let resp = wire::response(status, "application/json", &body, &[], true);
                    let _ = stream.write_all(&resp).await;
                }
                return;
            }
        };
        let close = req.close;
        match route(shared, &mut stream, req, close).await {
            Ok(Flow::KeepAlive) if !close => {}
            _ => return,
        }
    }
}

/// Writes one complete response in a single write.
pub(crate) async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<Flow> {
    let resp = wire::response(status, content_type, body, &[], close);
    stream.write_all(&resp).await?;
    Ok(Flow::KeepAlive)
}

pub(crate) async fn respond_json(
    stream: &mut TcpStream,
    status: u16,
    body: &Value,
    close: bool,
) -> std::io::Result<Flow> {
    respond(
        stream,
        status,
        "application/json",
        body.to_string().as_bytes(),
        close,
    )
    .await
}

pub(crate) async fn respond_error(
    stream: &mut TcpStream,
    status: u16,
    message: &str,
    close: bool,
) -> std::io::Result<Flow> {
    let body = error_body(message, "invalid_request_error", Value::Null);
    respond(stream, status, "application/json", &body, close).await
}

/// Holds the socket without writing: returns when the client closes it (or on any error).
/// Server shutdown ends it through the connection's select.
pub(crate) async fn hold(stream: &mut TcpStream) -> Flow {
    let mut scratch = [0u8; 4096];
    while let Ok(n) = stream.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
    Flow::Close
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsConfig {
    ids: Option<Vec<String>>,
    status: Option<u16>,
}

async fn route(
    shared: &Shared,
    stream: &mut TcpStream,
    req: Request,
    close: bool,
) -> std::io::Result<Flow> {
    match (req.method.as_str(), req.route()) {
        ("POST", "/v1/chat/completions") => crate::chat::handle(shared, stream, req, close).await,
        ("GET", "/v1/models") => {
            let (status, ids) = {
                let st = shared.state();
                (st.models_status, st.models.clone())
            };
            if status == 200 {
                let data: Vec<Value> = ids
                    .iter()
                    .map(
                        |id| json!({"id": id, "object": "model", "created": 0, "owned_by": "fake"}),
                    )
                    .collect();
                respond_json(stream, 200, &json!({"object": "list", "data": data}), close).await
            } else {
                let body = crate::script::upstream_error_body(status);
                respond(stream, status, "application/json", &body, close).await
            }
        }
        ("GET", "/health") => respond(stream, 200, "text/plain", b"ok", close).await,
        ("POST", "/_fake/script") | ("POST", "/_fake/default") => {
            match serde_json::from_slice::<Script>(&req.body) {
                Ok(script) => {
                    let mut st = shared.state();
                    if req.route() == "/_fake/script" {
                        st.queue.push_back(script);
                    } else {
                        st.default = script;
                    }
                }
                Err(e) => return respond_error(stream, 400, &e.to_string(), close).await,
            }
            respond_json(stream, 200, &json!({"ok": true}), close).await
        }
        ("POST", "/_fake/models") => {
            match serde_json::from_slice::<ModelsConfig>(&req.body) {
                Ok(cfg) => {
                    let mut st = shared.state();
                    if let Some(ids) = cfg.ids {
                        st.models = ids;
                    }
                    if let Some(status) = cfg.status {
                        st.models_status = status;
                    }
                }
                Err(e) => return respond_error(stream, 400, &e.to_string(), close).await,
            }
            respond_json(stream, 200, &json!({"ok": true}), close).await
        }
        ("GET", "/_fake/requests") => {
            let list: Vec<Value> = shared
                .state()
                .recorded
                .iter()
                .map(RecordedRequest::to_json)
                .collect();
            respond_json(stream, 200, &Value::Array(list), close).await
        }
        ("POST", "/_fake/reset") => {
            *shared.state() = State::default();
            respond_json(stream, 200, &json!({"ok": true}), close).await
        }
        (method, path) => {
            let msg = format!("no route for {method} {path}");
            respond_error(stream, 404, &msg, close).await
        }
    }
}
