//! Who may call the API. Client keys come from `server.api_keys` (every scope, no limit) or
//! named `[[server.clients]]` with scopes and a rate limit. Keys are compared in constant time
//! against every configured key; refusals are logged (with the peer, never the key), counted and
//! written to the audit log.

use super::error::ApiError;
use super::ApiState;
use crate::audit::AuditEntry;
use crate::config::{Secret, SecretRef};
use crate::events::metrics as m;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

/// What a key may do. `chat`: completions, models, action decisions. `metrics`: `/metrics`.
/// `admin`: the audit log and other operator routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Chat,
    Metrics,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Chat => "chat",
            Scope::Metrics => "metrics",
            Scope::Admin => "admin",
        }
    }
    fn all() -> Vec<Scope> {
        vec![Scope::Chat, Scope::Metrics, Scope::Admin]
    }
}

/// A named client: `[[server.clients]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Shown in logs, metrics and usage reports instead of the key.
    pub name: String,
    pub key: SecretRef,
    #[serde(default = "Scope::all")]
    pub scopes: Vec<Scope>,
    /// Sustained request rate; 0 = no limit.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Requests allowed at once before the rate applies (default: one minute's worth).
    #[serde(default)]
    pub burst: u32,
}

impl ClientConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            p.push(format!(
                "{path}.name: `{}` must be 1-64 characters of letters, digits, `-`, `_` or `.`",
                self.name
            ));
        }
        if self.scopes.is_empty() {
            p.push(format!(
                "{path}.scopes: give at least one of chat, metrics, admin"
            ));
        }
        if self.burst > 0 && self.requests_per_minute == 0 {
            p.push(format!(
                "{path}.burst: needs requests_per_minute (a burst without a rate means nothing)"
            ));
        }
    }
}

struct Client {
    name: Arc<str>,
    secret: Secret,
    scopes: Vec<Scope>,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// The authenticated caller, put in the request's extensions.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub name: Arc<str>,
}

/// Every configured client, keys resolved. Empty = the API is open (loopback by default).
#[derive(Default)]
pub struct Clients {
    list: Vec<Client>,
}

impl Clients {
    /// Resolves every key; problems carry their key paths.
    pub fn build(api_keys: &[SecretRef], clients: &[ClientConfig]) -> Result<Clients, Vec<String>> {
        let mut problems = Vec::new();
        let mut list = Vec::new();
        for (i, k) in api_keys.iter().enumerate() {
            match k.resolve() {
                Ok(secret) => list.push(Client {
                    name: format!("key-{i}").into(),
                    secret,
                    scopes: Scope::all(),
                    limiter: None,
                }),
                Err(e) => problems.push(format!("server.api_keys[{i}]: {e}")),
            }
        }
        for (i, c) in clients.iter().enumerate() {
            let path = format!("server.clients[{i}]");
            c.validate(&path, &mut problems);
            if list.iter().any(|other| *other.name == c.name) {
                problems.push(format!("{path}.name: `{}` is used twice", c.name));
            }
            let limiter = NonZeroU32::new(c.requests_per_minute).map(|rate| {
                let burst = NonZeroU32::new(c.burst).unwrap_or(rate);
                RateLimiter::direct(Quota::per_minute(rate).allow_burst(burst))
            });
            match c.key.resolve() {
                Ok(secret) => list.push(Client {
                    name: c.name.as_str().into(),
                    secret,
                    scopes: c.scopes.clone(),
                    limiter,
                }),
                Err(e) => problems.push(format!("{path}.key: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(Clients { list })
        } else {
            Err(problems)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Compares against every key, without short-circuit, so timing says nothing about which
    /// (or whether a prefix) matched.
    fn identify(&self, presented: &[u8]) -> Option<&Client> {
        self.list.iter().fold(None, |found, c| {
            if c.secret.matches(presented) {
                Some(c)
            } else {
                found
            }
        })
    }
}

/// Why a request was refused (the `reason` label and audit field).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Missing,
    Invalid,
    Scope,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Scope => "scope",
        }
    }
}

/// Middleware for routes that need `scope`.
pub async fn require(
    State((state, scope)): State<(ApiState, Scope)>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.clients.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let checked = match presented.map(|key| state.clients.identify(key.as_bytes())) {
        None => Err(Refusal::Missing),
        Some(None) => Err(Refusal::Invalid),
        Some(Some(c)) if !c.scopes.contains(&scope) => Err(Refusal::Scope),
        Some(Some(c)) => Ok(c),
    };
    let client = match checked {
        Ok(client) => client,
        Err(refusal) => {
            // Owned copies: the body is not Sync, so no reference to the request may cross an await.
            let (route, peer) = route_and_peer(&request);
            refuse(&state, route, peer, refusal).await;
            return match refusal {
                Refusal::Missing => {
                    ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
                }
                Refusal::Invalid => ApiError::unauthorized("invalid API key"),
                Refusal::Scope => ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "permission_error",
                    "insufficient_scope",
                    format!("this key lacks the `{}` scope", scope.as_str()),
                ),
            }
            .into_response();
        }
    };
    if let Some(limiter) = &client.limiter {
        if let Err(not_until) = limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            m::rate_limited(&client.name);
            tracing::debug!(client = %client.name, "rate limit reached");
            return ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!(
                    "rate limit of client `{}` reached; retry after the Retry-After seconds",
                    client.name
                ),
            )
            .with_retry_after(wait)
            .into_response();
        }
    }
    request.extensions_mut().insert(ClientIdentity {
        name: client.name.clone(),
    });
    next.run(request).await
}

fn route_and_peer(request: &Request) -> (String, Option<String>) {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    (route, peer)
}

async fn refuse(state: &ApiState, route: String, peer: Option<String>, refusal: Refusal) {
    m::auth_refused(refusal.as_str());
    tracing::warn!(
        reason = refusal.as_str(),
        route,
        peer = peer.as_deref().unwrap_or("unknown"),
        "API request refused"
    );
    state
        .bus
        .audit()
        .record(AuditEntry::AuthRefused {
            reason: refusal.as_str().to_string(),
            route,
            peer,
        })
        .await;
}
