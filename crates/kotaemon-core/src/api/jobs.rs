//! `/v1/jobs`: the durable queue over HTTP (scope `chat`). `POST` stores a job and answers 202
//! once it is on disk; `GET /v1/jobs/{id}` tells its state and result; `GET /v1/jobs` lists.
//! Chat completions with `"priority": "batch"` are queued the same way, and with
//! `"priority": "deferrable"` when the cloud is away (store and forward).

use super::auth::ClientIdentity;
use super::error::ApiError;
use super::{parse_chat_request, ApiState};
use crate::queue::{Job, JobQueue, QueueError};
use crate::wire::ChatRequest;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use std::sync::Arc;

pub const JOB_HEADER: &str = "x-kotaemon-job-id";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// How a chat request asks to be treated (`"priority"`, a Kotaemon extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Now,
    /// Queue it; the answer is fetched later.
    Batch,
    /// Answer now if the cloud can; otherwise queue it instead of a local answer.
    Deferrable,
}

/// Takes `priority` out of the request (it is ours, not the upstream's).
pub fn take_priority(request: &mut ChatRequest) -> Result<Priority, ApiError> {
    match request.extra.remove("priority") {
        None => Ok(Priority::Now),
        Some(v) => match v.as_str() {
            Some("batch") => Ok(Priority::Batch),
            Some("deferrable") => Ok(Priority::Deferrable),
            Some("now") => Ok(Priority::Now),
            _ => Err(ApiError::bad_request(
                "invalid_priority",
                "priority must be `now`, `batch` or `deferrable`",
            )
            .with_param("priority")),
        },
    }
}

fn queue_of(state: &ApiState) -> Result<&Arc<JobQueue>, ApiError> {
    state.queue.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "queue_disabled",
            "the job queue is disabled ([queue] enabled = false)",
        )
    })
}

fn queue_error(e: QueueError) -> ApiError {
    tracing::error!("{e}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "queue_unavailable",
        "the job could not be stored; it was not accepted",
    )
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(IDEMPOTENCY_HEADER) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 200 => Ok(Some(k.trim().to_string())),
            _ => Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-200 visible characters",
            )),
        },
    }
}

fn job_response(job: Job, created: bool) -> Response {
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let id = HeaderValue::from_str(&job.id).ok();
    let mut response = (status, axum::Json(job)).into_response();
    if let Some(id) = id {
        response.headers_mut().insert(JOB_HEADER, id);
    }
    response
}

/// Stores `request` as a job: 202 with the job (200 with the existing one for a repeated
/// idempotency key).
pub async fn enqueue(
    state: &ApiState,
    request: ChatRequest,
    headers: &HeaderMap,
    client: Option<String>,
) -> Response {
    let result = async {
        let queue = queue_of(state)?;
        let key = idempotency_key(headers)?;
        queue
            .submit(request, key, client)
            .await
            .map_err(queue_error)
    }
    .await;
    match result {
        Ok((job, created)) => job_response(job, created),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/jobs` with a chat completion request as the body.
pub async fn submit(
    State(state): State<ApiState>,
    client: Option<Extension<ClientIdentity>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut request = match parse_chat_request(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    request.extra.remove("priority");
    enqueue(
        &state,
        request,
        &headers,
        client.map(|c| c.0.name.to_string()),
    )
    .await
}

pub async fn get(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let result = async {
        let queue = queue_of(&state)?;
        queue
            .get(id)
            .await
            .map_err(queue_error)?
            .ok_or_else(|| ApiError::not_found("no such job"))
    }
    .await;
    match result {
        Ok(job) => axum::Json(job).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let result = async {
        let Ok(Query(query)) = query else {
            return Err(ApiError::bad_request(
                "invalid_query",
                "query parameters: `status` and `limit` (1-1000)",
            ));
        };
        let limit = super::list_limit(query.limit)?;
        let queue = queue_of(&state)?;
        let jobs = queue.list(query.status, limit).await.map_err(queue_error)?;
        Ok(serde_json::json!({"object": "list", "data": jobs}))
    }
    .await;
    match result {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}
