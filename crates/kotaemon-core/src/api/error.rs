//! The one place errors become HTTP: status, OpenAI error body, Retry-After. Everything else
//! returns typed errors.

use crate::pipeline::TurnError;
use crate::upstream::pool::PoolError;
use crate::upstream::{UpstreamError, UpstreamErrorKind};
use crate::wire::{ErrorBody, ErrorDetail};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: invalid_request_error, authentication_error, rate_limit_error, …
    pub kind: &'static str,
    /// Stable machine-readable code.
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
    /// Send `Connection: close` (the request body was not read to its end).
    pub close_connection: bool,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            close_connection: false,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }
    pub fn overloaded(retry_after: Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "overloaded",
            "the agent is at its limit of concurrent turns; retry shortly",
        )
        .with_retry_after(retry_after)
    }
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: Some(self.code.to_string()),
            },
        }
    }

    /// A committed stream failed: the error event ending an SSE stream.
    pub fn from_stream_error(e: &UpstreamError) -> Self {
        upstream_failure(e, 1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(d) = self.retry_after {
            // Whole seconds, rounded up, at least 1: clients must not retry immediately.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

impl From<TurnError> for ApiError {
    fn from(e: TurnError) -> Self {
        match e {
            TurnError::Pool(p) => p.into(),
            TurnError::NoAnsweringStage => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "no_answering_stage",
                e.to_string(),
            ),
            TurnError::BudgetExhausted { resets_in } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
                e.to_string(),
            )
            .with_retry_after(resets_in),
            TurnError::Tool { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "tool_internal_error",
                e.to_string(),
            ),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match &e {
            PoolError::UnknownModel { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                e.to_string(),
            )
            .with_param("model"),
            PoolError::UnknownUpstream { .. } => {
                ApiError::bad_request("unknown_upstream", e.to_string())
            }
            PoolError::NoLocalModel => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_local_model",
                e.to_string(),
            ),
            PoolError::Unavailable { retry_after } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "upstream_unavailable",
                e.to_string(),
            )
            .with_retry_after(retry_after.unwrap_or(Duration::from_secs(1))),
            // No local model to stand in for a GPU that is off. Booting takes minutes.
            PoolError::Parked { code } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                code,
                e.to_string(),
            )
            .with_retry_after(Duration::from_secs(30)),
            PoolError::Failed { last, attempts } => upstream_failure(last, *attempts),
        }
    }
}

fn upstream_failure(last: &UpstreamError, attempts: u32) -> ApiError {
    let message = format!("{last} (after {attempts} attempt(s))");
    let code = last.code();
    match &last.kind {
        UpstreamErrorKind::Status {
            status: 429,
            retry_after,
            ..
        } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            code,
            message,
        )
        .with_retry_after(retry_after.unwrap_or(Duration::from_secs(1))),
        UpstreamErrorKind::Status {
            status: 401 | 403, ..
        } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            code,
            format!(
                "upstream `{}` rejected the agent's credentials (after {attempts} attempt(s))",
                last.upstream
            ),
        ),
        // The upstream judged the client's request (unknown option, context too long): relay
        // its status and its own message so the client can fix the request.
        UpstreamErrorKind::Status {
            status,
            message: upstream_message,
            ..
        } if (400..500).contains(status) && *status != 408 => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            let text = match upstream_message {
                Some(m) => format!("upstream `{}` rejected the request: {m}", last.upstream),
                None => message,
            };
            ApiError::new(status, "invalid_request_error", code, text)
        }
        UpstreamErrorKind::FirstByteTimeout
        | UpstreamErrorKind::IdleTimeout
        | UpstreamErrorKind::Deadline => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "server_error", code, message)
        }
        UpstreamErrorKind::Status { .. }
        | UpstreamErrorKind::Connect
        | UpstreamErrorKind::Transport
        | UpstreamErrorKind::Malformed(_)
        | UpstreamErrorKind::Credentials(_) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "server_error", code, message)
        }
    }
}
