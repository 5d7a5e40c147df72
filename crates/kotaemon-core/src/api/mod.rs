//! The HTTP API for terminals: OpenAI-compatible chat completions (JSON and SSE), models,
//! health, readiness, metrics and the OpenAPI document.

pub mod auth;
pub mod error;
pub mod jobs;
pub mod sse;

use crate::config::SecretRef;
use crate::events::metrics as m;
use crate::events::{EventBus, TurnEvent, TurnOutcome};
use crate::pipeline::Pipeline;
use crate::stages::act::{Act, ActError, Decision};
use crate::stages::cache::Directive;
use crate::turn::{Origin, Reply, Route, Turn, TurnMeta};
use crate::upstream::pool::Pool;
use crate::wire::{ChatRequest, ModelEntry, ModelList};
use auth::{ClientIdentity, Scope};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub const TURN_ID_HEADER: &str = "x-kotaemon-turn-id";
pub const ANSWERED_BY_HEADER: &str = "x-kotaemon-answered-by";
pub const ROUTE_HEADER: &str = "x-kotaemon-route";
pub const CACHE_HEADER: &str = "x-kotaemon-cache";
pub const CACHE_SIMILARITY_HEADER: &str = "x-kotaemon-cache-similarity";
pub const DEGRADED_HEADER: &str = "x-kotaemon-degraded";
pub const PENDING_ACTION_HEADER: &str = "x-kotaemon-pending-action";
/// Clients may pin a turn to one upstream by name.
pub const UPSTREAM_HEADER: &str = "x-kotaemon-upstream";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Keys with every scope and no rate limit (see [`auth`]).
    pub api_keys: Vec<SecretRef>,
    /// Named keys with scopes and rate limits.
    pub clients: Vec<auth::ClientConfig>,
    pub metrics_public: bool,
    pub max_body_bytes: usize,
    pub max_concurrent_turns: usize,
    pub turn_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            clients: Vec::new(),
            metrics_public: false,
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrent_turns: 256,
            turn_timeout_ms: 300_000,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.max_body_bytes < 1024 {
            p.push(format!("{path}.max_body_bytes: must be at least 1024"));
        }
        if self.max_concurrent_turns == 0 {
            p.push(format!("{path}.max_concurrent_turns: must be at least 1"));
        }
        if self.turn_timeout_ms == 0 {
            p.push(format!("{path}.turn_timeout_ms: must be greater than 0"));
        }
    }
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub pipeline: Pipeline,
    pub pool: Arc<Pool>,
    pub bus: EventBus,
    pub clients: Arc<auth::Clients>,
    pub metrics: PrometheusHandle,
    pub turn_timeout: Duration,
    pub turn_slots: Arc<Semaphore>,
    /// The tool loop, for pending actions (None: no tools).
    pub act: Option<Arc<Act>>,
    /// The durable job queue (None: disabled).
    pub queue: Option<Arc<crate::queue::JobQueue>>,
}

pub fn router(state: ApiState, config: &ServerConfig) -> Router {
    let guarded = |routes: Router<ApiState>, scope: Scope| {
        routes.route_layer(middleware::from_fn_with_state(
            (state.clone(), scope),
            auth::require,
        ))
    };
    let chat = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/kotaemon/actions/{id}", post(decide_action))
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get));
    let admin = Router::new().route("/v1/kotaemon/audit", get(audit_records));
    let mut open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi));
    let mut protected = guarded(chat, Scope::Chat).merge(guarded(admin, Scope::Admin));
    let metrics_route = Router::new().route("/metrics", get(metrics));
    if config.metrics_public {
        open = open.merge(metrics_route);
    } else {
        protected = protected.merge(guarded(metrics_route, Scope::Metrics));
    }
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

async fn count_requests(request: Request, next: Next) -> Response {
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/v1/chat/completions") => "/v1/chat/completions",
        Some("/v1/models") => "/v1/models",
        Some("/v1/kotaemon/actions/{id}") => "/v1/kotaemon/actions",
        Some("/v1/kotaemon/audit") => "/v1/kotaemon/audit",
        Some("/v1/jobs") => "/v1/jobs",
        Some("/v1/jobs/{id}") => "/v1/jobs/{id}",
        Some("/healthz") => "/healthz",
        Some("/readyz") => "/readyz",
        Some("/metrics") => "/metrics",
        Some("/openapi.json") => "/openapi.json",
        _ => "other",
    };
    let response = next.run(request).await;
    m::http_request(route, response.status().as_u16());
    response
}

pub(crate) fn parse_chat_request(
    body: Result<Bytes, BytesRejection>,
) -> Result<ChatRequest, ApiError> {
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            let mut e = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                "request body is larger than the configured server.max_body_bytes",
            );
            // The rest of the body is never read, so the connection cannot be reused: say so,
            // or a keep-alive client sends its next request into a closed socket.
            e.close_connection = true;
            e
        }
        _ => ApiError::bad_request(
            "unreadable_body",
            format!("could not read the request body: {rejection}"),
        ),
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let request: ChatRequest = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return ApiError::bad_request(
                    "invalid_json",
                    format!("request body is not valid JSON: {inner}"),
                );
            }
            let param = field_path(&path, &inner.to_string());
            let message = match &param {
                Some(p) => format!("{p}: {inner}"),
                None => format!("request body: {inner}"),
            };
            let error = ApiError::bad_request("invalid_request", message);
            match param {
                Some(p) => error.with_param(p),
                None => error,
            }
        })
        // Trailing bytes after the document (`{...} x`, `{...}{...}`) are not a valid body.
        .and_then(|r| {
            de.end().map(|_| r).map_err(|e| {
                ApiError::bad_request(
                    "invalid_json",
                    format!("request body is not valid JSON: {e}"),
                )
            })
        })?;
    request
        .validate()
        .map_err(|f| ApiError::bad_request("invalid_request", f.message).with_param(f.param))?;
    Ok(request)
}

/// The field a deserialization error is about: serde_path_to_error's path ("." at the top),
/// extended by the field serde names in "missing field `x`".
fn field_path(path: &str, message: &str) -> Option<String> {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (path, missing) {
        (".", None) => None,
        (".", Some(field)) => Some(field.to_string()),
        (p, None) => Some(p.to_string()),
        (p, Some(field)) => Some(format!("{p}.{field}")),
    }
}

async fn chat_completions(
    State(state): State<ApiState>,
    client: Option<axum::Extension<ClientIdentity>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut request = match parse_chat_request(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let priority = match jobs::take_priority(&mut request) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let client_name = client.as_ref().map(|c| c.0.name.to_string());
    if priority == jobs::Priority::Batch {
        return jobs::enqueue(&state, request, &headers, client_name).await;
    }
    // Store and forward: kept to be queued if the cloud turns out to be away.
    let deferred = (priority == jobs::Priority::Deferrable).then(|| request.clone());
    let Ok(slot) = state.turn_slots.clone().try_acquire_owned() else {
        return ApiError::overloaded(Duration::from_secs(1)).into_response();
    };
    let stream = request.wants_stream();
    let include_usage = request.client_wants_usage_in_stream();
    let mut turn = Turn::new(state.bus.clone(), Origin::Api, request, state.turn_timeout);
    turn.hints.route = match headers.get(ROUTE_HEADER).map(|v| v.to_str().unwrap_or("")) {
        None => None,
        Some("local") => Some(Route::Local),
        Some("cloud") => Some(Route::Cloud),
        Some(_) => {
            return ApiError::bad_request(
                "invalid_route",
                "x-kotaemon-route must be `local` or `cloud`",
            )
            .into_response()
        }
    };
    turn.hints.client = client_name.clone();
    turn.hints.deferrable = deferred.is_some();
    let for_ledger = client_name.clone();
    turn.ctx.annotate(|m| m.client = for_ledger);
    turn.hints.cache = match headers.get(CACHE_HEADER).map(|v| v.to_str().unwrap_or("")) {
        None => None,
        Some("bypass") => Some(Directive::Bypass),
        Some("refresh") => Some(Directive::Refresh),
        Some(_) => {
            return ApiError::bad_request(
                "invalid_cache_directive",
                "x-kotaemon-cache must be `bypass` or `refresh`",
            )
            .into_response()
        }
    };
    turn.hints.upstream = headers
        .get(UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ctx = turn.ctx.clone();
    let turn_id = HeaderValue::from_str(ctx.id.as_str()).ok();
    // One span per turn: every log line of the turn carries its id (also the response header).
    let span = tracing::info_span!("turn", id = %ctx.id, stream);
    let finished = |outcome: TurnOutcome| {
        ctx.emit(TurnEvent::TurnFinished {
            turn: ctx.id.clone(),
            outcome,
            elapsed: ctx.started.elapsed(),
            stream,
        })
    };
    let mut response = match state.pipeline.run(turn).instrument(span).await {
        Ok(Reply::Complete(completion)) => {
            let body = serde_json::to_vec(&completion.body).unwrap_or_default();
            ctx.emit(TurnEvent::Overhead {
                turn: ctx.id.clone(),
                overhead: ctx.started.elapsed().saturating_sub(ctx.upstream_wait()),
            });
            finished(TurnOutcome::Ok);
            drop(slot);
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response()
        }
        Ok(Reply::Stream(chunks)) => {
            let sse = sse::encode(
                chunks,
                include_usage,
                sse::StreamTurn::new(ctx.clone(), Some(slot)),
            );
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(sse))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Err(e) if deferred.is_some() && e.is_cloud_away() => {
            // Accepted as a job: the turn itself ends well.
            finished(TurnOutcome::Ok);
            drop(slot);
            let request = deferred.unwrap_or_else(|| ChatRequest::utterance("", ""));
            jobs::enqueue(&state, request, &headers, client_name).await
        }
        Err(e) => {
            let api = ApiError::from(e);
            if api.status.is_server_error() {
                tracing::warn!(turn = %ctx.id, status = api.status.as_u16(), code = api.code, "turn failed");
            } else {
                tracing::debug!(turn = %ctx.id, status = api.status.as_u16(), code = api.code, "turn refused");
            }
            finished(TurnOutcome::Failed {
                status: api.status.as_u16(),
                code: api.code,
            });
            api.into_response()
        }
    };
    if let Some(id) = turn_id {
        response.headers_mut().insert(TURN_ID_HEADER, id);
    }
    meta_headers(&ctx.meta(), response.headers_mut());
    response
}

/// What the stages decided, as response headers (codes only, never user text).
fn meta_headers(meta: &TurnMeta, headers: &mut HeaderMap) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    if let Some(by) = meta.answered_by {
        put(ANSWERED_BY_HEADER, by.to_string());
    }
    if let Some((route, reason)) = meta.route {
        put(ROUTE_HEADER, format!("{route}; reason={reason}"));
    }
    if let Some(cache) = meta.cache {
        put(CACHE_HEADER, cache.to_string());
    }
    if let Some(sim) = meta.cache_similarity {
        put(CACHE_SIMILARITY_HEADER, format!("{sim:.4}"));
    }
    if meta.degraded {
        // Like the route header: `true; reason=cloud_starting`.
        let value = match meta.degraded_reason {
            Some(reason) => format!("true; reason={reason}"),
            None => "true".to_string(),
        };
        put(DEGRADED_HEADER, value);
    }
    if let Some(id) = &meta.pending_action {
        put(PENDING_ACTION_HEADER, id.clone());
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionDecision {
    decision: Decision,
}

/// `POST /v1/kotaemon/actions/{id}` `{"decision": "confirm" | "reject"}`: resumes a turn whose
/// tool calls wait for the user; answers with the turn's completion.
async fn decide_action(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(act) = state.act.clone() else {
        return ApiError::not_found("no tools are configured, so there are no actions")
            .into_response();
    };
    let decision: ActionDecision = match body
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            return ApiError::bad_request(
                "invalid_decision",
                format!("body must be {{\"decision\": \"confirm\" | \"reject\"}}: {e}"),
            )
            .with_param("decision")
            .into_response()
        }
    };
    match act
        .resume(
            &id,
            decision.decision,
            state.bus.clone(),
            state.turn_timeout,
        )
        .await
    {
        Ok((Reply::Complete(c), ctx)) => {
            ctx.emit(TurnEvent::TurnFinished {
                turn: ctx.id.clone(),
                outcome: TurnOutcome::Ok,
                elapsed: ctx.started.elapsed(),
                stream: false,
            });
            let mut response = axum::Json(c.body).into_response();
            if let Ok(v) = HeaderValue::from_str(ctx.id.as_str()) {
                response.headers_mut().insert(TURN_ID_HEADER, v);
            }
            meta_headers(&ctx.meta(), response.headers_mut());
            response
        }
        Ok((Reply::Stream(_), _)) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "unexpected_stream",
            "a resumed action answered with a stream",
        )
        .into_response(),
        Err(ActError::UnknownAction(_)) => ApiError::not_found(format!(
            "no pending action `{id}` (unknown, already decided, or expired)"
        ))
        .into_response(),
        Err(ActError::Turn(e)) => ApiError::from(e).into_response(),
    }
}

async fn list_models(State(state): State<ApiState>) -> Response {
    let data = state
        .pool
        .models()
        .into_iter()
        .map(|(id, upstream)| ModelEntry {
            id,
            object: "model".into(),
            created: 0,
            owned_by: upstream.to_string(),
        })
        .collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    turn: Option<String>,
    limit: Option<usize>,
}

/// The `limit` of a listing route: 100 unless given, 1 to 1000.
pub(crate) fn list_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(
            ApiError::bad_request("invalid_query", "limit: must be between 1 and 1000")
                .with_param("limit"),
        )
    }
}

/// `GET /v1/kotaemon/audit?turn=&limit=`: this agent's newest audit records (admin scope).
async fn audit_records(
    State(state): State<ApiState>,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(query)) = query else {
        return ApiError::bad_request(
            "invalid_query",
            "query parameters: `turn` (a turn id) and `limit` (1-1000)",
        )
        .into_response();
    };
    let limit = match list_limit(query.limit) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let audit = state.bus.audit().clone();
    if !audit.is_enabled() {
        return ApiError::not_found("the audit log is disabled ([audit] enabled = false)")
            .into_response();
    }
    let records =
        tokio::task::spawn_blocking(move || audit.recent(query.turn.as_deref(), limit)).await;
    match records {
        Ok(Ok(data)) => {
            axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Ok(Err(e)) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "audit_unreadable",
            format!("could not read the audit log: {e}"),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "audit_unreadable",
            "reading the audit log failed",
        )
        .into_response(),
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let upstreams: Vec<_> = state
        .pool
        .members()
        .iter()
        .map(|mb| {
            serde_json::json!({
                "name": mb.name().as_ref(),
                "healthy": mb.is_healthy(),
                "breaker": mb.breaker.state().as_str(),
                "in_flight": mb.inflight(),
            })
        })
        .collect();
    let ready = state.pool.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "upstreams": upstreams})),
    )
        .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3 description of this API, kept beside the routes it describes.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
        .into_response()
}
