//! A turn: one unit of work through the pipeline. Sources (API, CLI, voice, MQTT) make turns,
//! the pipeline makes a [`Reply`], sinks render it (JSON, SSE, terminal, speech).

use crate::events::{EventBus, TurnEvent};
use crate::upstream::StreamError;
use crate::wire::{ChatRequest, Chunk, Completion};
use futures::stream::BoxStream;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// Unique per turn; returned to the client in the `x-kotaemon-turn-id` header.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TurnId(Arc<str>);

impl TurnId {
    pub fn new() -> Self {
        TurnId(uuid::Uuid::new_v4().simple().to_string().into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TurnId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TurnId({})", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Api,
    Cli,
    /// An utterance published on the MQTT command topic.
    Mqtt,
    /// An in-process plugin.
    Plugin,
    /// A job of the durable queue.
    Queue,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Cli => "cli",
            Origin::Mqtt => "mqtt",
            Origin::Plugin => "plugin",
            Origin::Queue => "queue",
        }
    }
}

/// An absolute point in time every await of the turn respects. `tokio::time::Instant`, so
/// tests on a paused clock control it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn after(d: std::time::Duration) -> Self {
        Deadline(Instant::now() + d)
    }
    pub fn remaining(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now())
    }
    pub fn passed(&self) -> bool {
        self.remaining().is_zero()
    }
}

/// Stamps the turn id on every event.
#[derive(Clone)]
pub struct TurnCtx {
    pub id: TurnId,
    pub bus: EventBus,
    pub started: Instant,
    /// Time spent waiting for the upstream that answered (whole call, or to commit for
    /// streams): the rest of the turn's time is the gateway's overhead.
    upstream_wait_ns: Arc<AtomicU64>,
    meta: Arc<std::sync::Mutex<TurnMeta>>,
    /// Writes the turn's ledger row when the last clone of the context is gone — whichever
    /// way the turn ended (API, stream, CLI, MQTT, client gone), exactly once.
    _ledger_row: Arc<LedgerRow>,
}

struct LedgerRow {
    id: TurnId,
    bus: EventBus,
    origin: Origin,
    prompt_estimate: u64,
    meta: Arc<std::sync::Mutex<TurnMeta>>,
}

impl Drop for LedgerRow {
    fn drop(&mut self) {
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let answered_by = meta.answered_by.unwrap_or("none");
        let ledger = self.bus.ledger();
        let saved = match answered_by {
            "rules" | "cache" | "local" => {
                let (prompt, completion) = meta.local_tokens;
                // Rules and cache hits have no usage: the request itself is the prompt.
                let prompt = if prompt == 0 {
                    self.prompt_estimate
                } else {
                    prompt
                };
                ledger.pricing().reference_cost(prompt, completion)
            }
            _ => 0.0,
        };
        crate::events::metrics::turn_answered(answered_by);
        if saved > 0.0 {
            crate::events::metrics::cloud_cost_saved(answered_by, saved);
        }
        ledger.record_turn(crate::cost::ledger::TurnRow {
            turn: self.id.to_string(),
            origin: self.origin.as_str(),
            client: meta.client.unwrap_or_default(),
            answered_by,
            degraded: meta.degraded,
            saved_usd: saved,
        });
    }
}

impl TurnCtx {
    pub fn new(bus: EventBus) -> Self {
        Self::for_request(bus, Origin::Api, 0)
    }

    fn for_request(bus: EventBus, origin: Origin, prompt_estimate: u64) -> Self {
        let id = TurnId::new();
        let meta: Arc<std::sync::Mutex<TurnMeta>> = Arc::default();
        TurnCtx {
            id: id.clone(),
            bus: bus.clone(),
            started: Instant::now(),
            upstream_wait_ns: Arc::new(AtomicU64::new(0)),
            meta: meta.clone(),
            _ledger_row: Arc::new(LedgerRow {
                id,
                bus,
                origin,
                prompt_estimate,
                meta,
            }),
        }
    }

    /// A rule or cache hit answered: who, and what the answer would have cost in tokens.
    pub fn answered_on_device(&self, by: &'static str, answer: &str) {
        let tokens = crate::cost::pricing::estimate_tokens(answer);
        self.annotate(|m| {
            m.answered_by = Some(by);
            m.local_tokens = (0, tokens);
        });
    }
    pub fn emit(&self, event: TurnEvent) {
        self.bus.emit(event);
    }
    pub fn add_upstream_wait(&self, d: std::time::Duration) {
        self.upstream_wait_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    /// Records a stage's decision for the response headers.
    pub fn annotate(&self, f: impl FnOnce(&mut TurnMeta)) {
        f(&mut self.meta.lock().unwrap_or_else(|p| p.into_inner()));
    }
    pub fn meta(&self) -> TurnMeta {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn upstream_wait(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.upstream_wait_ns.load(Ordering::Relaxed))
    }
}

/// What the turn's stages decided, for the response headers and the CLI: which stage
/// answered, the route and why, cache outcome, degraded service. Codes, never user text.
#[derive(Debug, Clone, Default)]
pub struct TurnMeta {
    /// "rules", "cache", "local" or "cloud".
    pub answered_by: Option<&'static str>,
    /// Route and reason code from the router.
    pub route: Option<(&'static str, &'static str)>,
    /// Cache outcome ("hit-exact", "hit-semantic", "miss", "bypass", "skipped").
    pub cache: Option<&'static str>,
    pub cache_similarity: Option<f32>,
    /// The cloud was wanted but could not answer; the local model did.
    pub degraded: bool,
    /// Why (the `Degraded` event's reason code, e.g. `cloud_starting`), for the header.
    pub degraded_reason: Option<&'static str>,
    /// Server-side tools ran: the answer depends on the world, not just the question, so it
    /// is never cached.
    pub acted: bool,
    /// A tool call waits for the user's confirmation (its action id).
    pub pending_action: Option<String>,
    /// The client key's name (for the ledger and per-client budgets).
    pub client: Option<String>,
    /// Tokens of an answer made on the device: the local model's usage, or an estimate of a
    /// rule's or cache hit's answer — what the cloud would have been paid for.
    pub local_tokens: (u64, u64),
}

/// Where a turn's model call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Cloud,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Cloud => "cloud",
        }
    }
}

/// Routing requests from the client: `x-kotaemon-upstream` pins an upstream,
/// `x-kotaemon-route` forces local or cloud.
#[derive(Debug, Clone, Default)]
pub struct RouteHints {
    pub upstream: Option<String>,
    pub route: Option<Route>,
    /// `x-kotaemon-cache: bypass | refresh`.
    pub cache: Option<crate::stages::cache::Directive>,
    /// Which client key authenticated the turn ("key#N"), so clients never share cache
    /// entries. `None` when the API is open.
    pub client: Option<String>,
    /// Work that can wait: never answered by the local model (fallback or spent budget); a
    /// cloud that is away is an error, so the caller can queue the turn.
    pub deferrable: bool,
    /// Queued jobs run no device tools: a job may run twice after a crash.
    pub no_device_tools: bool,
}

pub struct Turn {
    pub ctx: TurnCtx,
    pub origin: Origin,
    pub request: ChatRequest,
    pub deadline: Deadline,
    pub hints: RouteHints,
    /// Set by the router; `None` (no router) means cloud, or local if the model names it.
    pub route: Option<Route>,
    /// Set by the PII guard: the turn's pseudonym mapping, for the tool loop.
    pub pii: Option<Arc<crate::stages::pii_guard::TurnPii>>,
}

impl Turn {
    pub fn new(
        bus: EventBus,
        origin: Origin,
        request: ChatRequest,
        timeout: std::time::Duration,
    ) -> Self {
        let prompt_estimate = crate::cost::pricing::estimate_request_tokens(&request);
        let ctx = TurnCtx::for_request(bus, origin, prompt_estimate);
        ctx.emit(TurnEvent::TurnStarted {
            turn: ctx.id.clone(),
            origin,
            stream: request.wants_stream(),
        });
        Turn {
            ctx,
            origin,
            request,
            deadline: Deadline::after(timeout),
            hints: RouteHints::default(),
            route: None,
            pii: None,
        }
    }
    pub fn id(&self) -> &TurnId {
        &self.ctx.id
    }
}

/// A committed stream of chunks. An `Err` item ends it: it happened after the commit point,
/// so it is never retried; sinks turn it into an explicit error event, not a silent end.
pub type ChunkStream = BoxStream<'static, Result<Chunk, StreamError>>;

pub enum Reply {
    Complete(Completion),
    Stream(ChunkStream),
}
