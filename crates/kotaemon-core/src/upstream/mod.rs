//! Upstreams: anything that completes a chat. One OpenAI-compatible HTTP flavour
//! (`openai.rs`, vendor differences as data), a pool that balances and fails over between
//! upstreams (`pool.rs`), per-upstream breakers (`breaker.rs`), credentials (`auth.rs`) and
//! active health checks (`health.rs`). Outbound HTTP clients are only built here.

pub mod auth;
pub mod breaker;
pub mod health;
#[cfg(feature = "llama")]
pub mod local;
pub mod local_config;
pub mod local_tools;
pub mod openai;
pub mod pool;

use crate::config::SecretRef;
use crate::turn::{ChunkStream, Deadline};
use crate::wire::{ChatRequest, Completion};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One cloud upstream: an OpenAI-compatible server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name used in logs, metrics and the `x-kotaemon-upstream` header.
    pub name: String,
    /// Base URL including the API prefix, e.g. `http://10.0.0.5:8000/v1`.
    pub base_url: String,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Client model name -> this upstream's model name. Empty: names pass through.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    #[serde(default)]
    pub api_key: Option<SecretRef>,
    /// Header the key goes in: `authorization` (Bearer) or `api-key` (Azure).
    #[serde(default)]
    pub auth_header: auth::KeyHeader,
    #[serde(default)]
    pub oauth2: Option<auth::OAuth2Config>,
    /// Extra query parameters on every call (Azure's `api-version`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra non-secret headers on every call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Extra trusted root certificate(s), PEM. Verification itself cannot be turned off.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// mTLS: this device's certificate chain (PEM), presented when the upstream asks.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// mTLS: the certificate's private key (PEM), a secret reference (`file:/path` or `env:`).
    #[serde(default)]
    pub client_key: Option<SecretRef>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_ttfb_ms")]
    pub ttfb_ms: u64,
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
}

fn default_weight() -> u32 {
    1
}
fn default_connect_ms() -> u64 {
    2_000
}
fn default_ttfb_ms() -> u64 {
    60_000
}
fn default_idle_ms() -> u64 {
    30_000
}

impl UpstreamConfig {
    pub fn new(name: &str, base_url: &str) -> Self {
        UpstreamConfig {
            name: name.into(),
            base_url: base_url.into(),
            weight: 1,
            models: BTreeMap::new(),
            api_key: None,
            auth_header: auth::KeyHeader::default(),
            oauth2: None,
            query: BTreeMap::new(),
            headers: BTreeMap::new(),
            ca_file: None,
            client_cert_file: None,
            client_key: None,
            connect_timeout_ms: default_connect_ms(),
            ttfb_ms: default_ttfb_ms(),
            idle_ms: default_idle_ms(),
        }
    }

    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.push(format!(
                "{path}.name: `{}` must be non-empty and use only letters, digits, `-`, `_`, `.`",
                self.name
            ));
        }
        match reqwest::Url::parse(&self.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => p.push(format!(
                "{path}.base_url: `{}` must be an http(s) URL with a host",
                self.base_url
            )),
            Err(e) => p.push(format!(
                "{path}.base_url: `{}` is not a URL: {e}",
                self.base_url
            )),
        }
        if self.weight == 0 {
            p.push(format!("{path}.weight: must be at least 1"));
        }
        if self.api_key.is_some() && self.oauth2.is_some() {
            p.push(format!("{path}: set either api_key or oauth2, not both"));
        }
        for (key, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("ttfb_ms", self.ttfb_ms),
            ("idle_ms", self.idle_ms),
        ] {
            if value == 0 {
                p.push(format!("{path}.{key}: must be greater than 0"));
            }
        }
        for (k, v) in &self.models {
            if k.is_empty() || v.is_empty() {
                p.push(format!("{path}.models: model names must not be empty"));
            }
        }
        for (k, v) in &self.headers {
            if http::HeaderName::try_from(k.as_str()).is_err()
                || http::HeaderValue::try_from(v.as_str()).is_err()
            {
                p.push(format!("{path}.headers.{k}: not a valid HTTP header"));
            }
            if matches!(k.to_ascii_lowercase().as_str(), "authorization" | "api-key") {
                p.push(format!("{path}.headers.{k}: credentials belong in api_key or oauth2 (secret references)"));
            }
        }
        if let Some(o) = &self.oauth2 {
            o.validate(&format!("{path}.oauth2"), p);
        }
    }
}

/// When in a call an error happened. This decides what may be retried: nothing after commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing reached the upstream (connect failed): always safe to try elsewhere.
    NotSent,
    /// The request was sent but no answer was committed: retryable within budget.
    Sent,
    /// The first event was relayed: never retried.
    Committed,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamErrorKind {
    #[error("could not connect")]
    Connect,
    #[error("no first byte within the time-to-first-byte limit")]
    FirstByteTimeout,
    #[error("the stream went silent longer than the idle limit")]
    IdleTimeout,
    #[error("the turn deadline passed")]
    Deadline,
    #[error("answered HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        message: Option<String>,
    },
    #[error("the connection broke")]
    Transport,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("could not obtain credentials: {0}")]
    Credentials(String),
}

/// An upstream failure, tagged with the upstream's name and the phase it happened in.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream `{upstream}` {kind}")]
pub struct UpstreamError {
    pub upstream: Arc<str>,
    pub phase: Phase,
    pub kind: UpstreamErrorKind,
}

/// Errors inside a committed stream are upstream errors in phase `Committed`.
pub type StreamError = UpstreamError;

impl UpstreamError {
    pub fn new(upstream: &Arc<str>, phase: Phase, kind: UpstreamErrorKind) -> Self {
        UpstreamError {
            upstream: upstream.clone(),
            phase,
            kind,
        }
    }

    /// Stable code for metrics, events and API error bodies.
    pub fn code(&self) -> &'static str {
        match &self.kind {
            UpstreamErrorKind::Connect => "upstream_connect",
            UpstreamErrorKind::FirstByteTimeout => "upstream_ttfb_timeout",
            UpstreamErrorKind::IdleTimeout => "upstream_idle_timeout",
            UpstreamErrorKind::Deadline => "deadline_exceeded",
            UpstreamErrorKind::Status { status: 429, .. } => "upstream_rate_limited",
            UpstreamErrorKind::Status { status, .. } if *status >= 500 => "upstream_server_error",
            UpstreamErrorKind::Status { .. } => "upstream_rejected",
            UpstreamErrorKind::Transport => "upstream_transport",
            UpstreamErrorKind::Malformed(_) => "upstream_malformed",
            UpstreamErrorKind::Credentials(_) => "upstream_credentials",
        }
    }

    /// May another attempt (on this or another upstream) help? Never after commit; otherwise
    /// when the upstream is at fault, or asked us to come back (408, 429).
    pub fn retryable(&self) -> bool {
        self.phase != Phase::Committed
            && (self.is_upstream_fault()
                || matches!(
                    self.kind,
                    UpstreamErrorKind::Status {
                        status: 408 | 429,
                        ..
                    }
                ))
    }

    /// Does this error say the upstream is broken (counts toward its breaker)? A 429 says it
    /// is busy (it cools down instead), a 400 says the request was bad (the upstream is fine).
    /// Exhaustive on purpose: a new kind must decide here, not fall into a wildcard.
    pub fn is_upstream_fault(&self) -> bool {
        match &self.kind {
            UpstreamErrorKind::Connect
            | UpstreamErrorKind::FirstByteTimeout
            | UpstreamErrorKind::IdleTimeout
            | UpstreamErrorKind::Transport
            | UpstreamErrorKind::Malformed(_)
            | UpstreamErrorKind::Credentials(_) => true,
            UpstreamErrorKind::Deadline => false,
            UpstreamErrorKind::Status { status, .. } => matches!(status, 401 | 403 | 500..=599),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            UpstreamErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What a health probe found.
#[derive(Debug, Clone)]
pub struct Probe {
    pub latency: Duration,
    pub models: Vec<String>,
}

/// Anything that completes a chat. The cloud flavours and (later) the local model implement
/// it, so fallback is one more candidate in the pool.
#[async_trait]
pub trait Upstream: Send + Sync {
    fn name(&self) -> &Arc<str>;
    /// A whole answer. `model` is this upstream's name for the model.
    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
        deadline: Deadline,
    ) -> Result<Completion, UpstreamError>;
    /// Returns only once the upstream has committed: status OK and the first event parsed.
    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
        deadline: Deadline,
    ) -> Result<ChunkStream, UpstreamError>;
    /// Health check and `doctor`: reachability, latency, served models.
    async fn probe(&self, timeout: Duration) -> Result<Probe, UpstreamError>;
}
