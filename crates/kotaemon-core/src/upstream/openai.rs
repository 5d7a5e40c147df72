//! The OpenAI-compatible HTTP flavour: vLLM, TGI, llama.cpp server, OpenAI, Azure. Vendor
//! differences are data (key header, query, extra headers), not code paths.

use super::auth::Auth;
use super::{Phase, Probe, Upstream, UpstreamConfig, UpstreamError, UpstreamErrorKind};
use crate::config::SecretRef;
use crate::turn::{ChunkStream, Deadline};
use crate::wire::{ChatRequest, Chunk, Completion, ModelList};
use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

pub struct OpenAiUpstream {
    name: Arc<str>,
    chat_url: reqwest::Url,
    models_url: reqwest::Url,
    client: reqwest::Client,
    auth: Auth,
    headers: http::HeaderMap,
    ttfb: Duration,
    idle: Duration,
}

/// How much of an upstream's error body we read to find its message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

impl OpenAiUpstream {
    /// Builds the client; resolves secrets and reads CA files. Errors name the key path.
    pub fn new(cfg: &UpstreamConfig, path: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        cfg.validate(path, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls();
        if let Some(ca) = &cfg.ca_file {
            match std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())
                }) {
                Ok(certs) if !certs.is_empty() => {
                    for c in certs {
                        builder = builder.add_root_certificate(c);
                    }
                }
                Ok(_) => problems.push(format!(
                    "{path}.ca_file: `{}` holds no PEM certificate",
                    ca.display()
                )),
                Err(e) => problems.push(format!(
                    "{path}.ca_file: cannot use `{}`: {e}",
                    ca.display()
                )),
            }
        }
        match (&cfg.client_cert_file, &cfg.client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => match client_identity(cert, key) {
                Ok(identity) => builder = builder.identity(identity),
                Err(e) => problems.push(format!("{path}.client_cert_file: {e}")),
            },
            _ => problems.push(format!(
                "{path}: mTLS needs both client_cert_file and client_key"
            )),
        }
        let client = builder
            .build()
            .map_err(|e| vec![format!("{path}: cannot build HTTP client: {e}")])?;
        let auth = Auth::from_config(
            cfg.api_key.as_ref(),
            cfg.auth_header,
            cfg.oauth2.as_ref(),
            client.clone(),
        )
        .map_err(|e| vec![format!("{path}: {e}")]);
        let auth = match auth {
            Ok(a) => Some(a),
            Err(mut e) => {
                problems.append(&mut e);
                None
            }
        };
        let endpoint = |suffix: &str| -> Result<reqwest::Url, String> {
            let mut url =
                reqwest::Url::parse(&format!("{}/{suffix}", cfg.base_url.trim_end_matches('/')))
                    .map_err(|e| format!("{path}.base_url: {e}"))?;
            if !cfg.query.is_empty() {
                url.query_pairs_mut().extend_pairs(cfg.query.iter());
            }
            Ok(url)
        };
        let (chat_url, models_url) = match (endpoint("chat/completions"), endpoint("models")) {
            (Ok(c), Ok(m)) => (Some(c), Some(m)),
            (c, m) => {
                problems.extend(c.err().into_iter().chain(m.err()));
                (None, None)
            }
        };
        let mut headers = http::HeaderMap::new();
        for (k, v) in &cfg.headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::try_from(k.as_str()),
                http::HeaderValue::try_from(v.as_str()),
            ) {
                headers.insert(k, v);
            }
        }
        match (auth, chat_url, models_url) {
            (Some(auth), Some(chat_url), Some(models_url)) if problems.is_empty() => {
                Ok(OpenAiUpstream {
                    name: cfg.name.as_str().into(),
                    chat_url,
                    models_url,
                    client,
                    auth,
                    headers,
                    ttfb: Duration::from_millis(cfg.ttfb_ms),
                    idle: Duration::from_millis(cfg.idle_ms),
                })
            }
            _ => Err(problems),
        }
    }

    fn err(&self, phase: Phase, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError::new(&self.name, phase, kind)
    }

    /// A body that breaks off while being read is a broken connection, whatever reqwest
    /// calls it.
    fn classify_body(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            self.err(Phase::Sent, UpstreamErrorKind::IdleTimeout)
        } else {
            self.err(Phase::Sent, UpstreamErrorKind::Transport)
        }
    }

    fn classify(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_connect() {
            self.err(Phase::NotSent, UpstreamErrorKind::Connect)
        } else if e.is_timeout() {
            self.err(Phase::Sent, UpstreamErrorKind::FirstByteTimeout)
        } else if e.is_decode() {
            self.err(
                Phase::Sent,
                UpstreamErrorKind::Malformed("undecodable body".into()),
            )
        } else {
            self.err(Phase::Sent, UpstreamErrorKind::Transport)
        }
    }

    /// Sends the request and waits for the response head, within `first_byte_by`.
    async fn send(
        &self,
        url: &reqwest::Url,
        body: Option<Vec<u8>>,
        first_byte_by: Instant,
        deadline: Deadline,
    ) -> Result<reqwest::Response, UpstreamError> {
        let auth = self
            .auth
            .header()
            .await
            .map_err(|e| self.err(Phase::NotSent, UpstreamErrorKind::Credentials(e)))?;
        let mut req = match body {
            Some(body) => self
                .client
                .post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body),
            None => self.client.get(url.clone()),
        };
        req = req.headers(self.headers.clone());
        if let Some((name, value)) = auth {
            req = req.header(name, value);
        }
        let by = first_byte_by.min(deadline.0);
        let response = match timeout_at(by, req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.classify(&e)),
            Err(_) if deadline.passed() => {
                return Err(self.err(Phase::Sent, UpstreamErrorKind::Deadline))
            }
            Err(_) => return Err(self.err(Phase::Sent, UpstreamErrorKind::FirstByteTimeout)),
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == http::StatusCode::UNAUTHORIZED {
            self.auth.invalidate().await;
        }
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The upstream's own message helps the client fix a bad request (400/404/422); read
        // a bounded amount, briefly, and never let it hold the turn.
        let message = timeout_at(
            by.min(Instant::now() + Duration::from_secs(1)),
            read_limited(response, ERROR_BODY_LIMIT),
        )
        .await
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
        Err(self.err(
            Phase::Sent,
            UpstreamErrorKind::Status {
                status: status.as_u16(),
                retry_after,
                message,
            },
        ))
    }
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        out.extend_from_slice(&chunk);
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    Some(out)
}

#[async_trait]
impl Upstream for OpenAiUpstream {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
        deadline: Deadline,
    ) -> Result<Completion, UpstreamError> {
        let body = request
            .to_upstream_body(model, false)
            .map_err(|e| self.err(Phase::NotSent, UpstreamErrorKind::Malformed(e.to_string())))?;
        let ttfb_at = Instant::now() + self.ttfb;
        let response = self
            .send(&self.chat_url, Some(body), ttfb_at, deadline)
            .await?;
        // Servers send the head of a non-streamed answer when it is done, so the body follows
        // at once: a body that stalls longer than the idle limit is a broken upstream.
        let body_by = (Instant::now() + self.idle).min(deadline.0);
        let bytes = match timeout_at(body_by, response.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(self.classify_body(&e)),
            Err(_) if deadline.passed() => {
                return Err(self.err(Phase::Sent, UpstreamErrorKind::Deadline))
            }
            Err(_) => return Err(self.err(Phase::Sent, UpstreamErrorKind::IdleTimeout)),
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            self.err(
                Phase::Sent,
                UpstreamErrorKind::Malformed(format!("completion is not JSON: {e}")),
            )
        })?;
        Completion::from_body(value)
            .map_err(|e| self.err(Phase::Sent, UpstreamErrorKind::Malformed(e)))
    }

    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
        deadline: Deadline,
    ) -> Result<ChunkStream, UpstreamError> {
        let body = request
            .to_upstream_body(model, true)
            .map_err(|e| self.err(Phase::NotSent, UpstreamErrorKind::Malformed(e.to_string())))?;
        let ttfb_at = Instant::now() + self.ttfb;
        let response = self
            .send(&self.chat_url, Some(body), ttfb_at, deadline)
            .await?;
        let mut events: SseEvents = Box::pin(response.bytes_stream().eventsource());
        // The commit point: the first event arrives in time and parses.
        let first = next_chunk(
            &self.name,
            &mut events,
            ttfb_at.min(deadline.0),
            deadline,
            Phase::Sent,
            UpstreamErrorKind::FirstByteTimeout,
        )
        .await;
        let first = match first {
            SseNext::Chunk(c) => c,
            SseNext::Failed(e) => return Err(e),
            SseNext::Done | SseNext::Eof => {
                return Err(self.err(
                    Phase::Sent,
                    UpstreamErrorKind::Malformed("stream ended before the first event".into()),
                ))
            }
        };
        let saw_finish = first.finish_reason().is_some();
        let state = StreamState {
            name: self.name.clone(),
            events,
            idle: self.idle,
            deadline,
            done: false,
            saw_finish,
        };
        let rest = futures::stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            let by = (Instant::now() + s.idle).min(s.deadline.0);
            match next_chunk(
                &s.name,
                &mut s.events,
                by,
                s.deadline,
                Phase::Committed,
                UpstreamErrorKind::IdleTimeout,
            )
            .await
            {
                SseNext::Chunk(c) => {
                    s.saw_finish |= c.finish_reason().is_some();
                    Some((Ok(c), s))
                }
                SseNext::Done => None,
                // Some servers close without `[DONE]` after the finishing chunk: that is a
                // complete answer. Closing before it is a cut stream.
                SseNext::Eof if s.saw_finish => None,
                SseNext::Eof => {
                    s.done = true;
                    Some((
                        Err(UpstreamError::new(
                            &s.name,
                            Phase::Committed,
                            UpstreamErrorKind::Transport,
                        )),
                        s,
                    ))
                }
                SseNext::Failed(e) => {
                    s.done = true;
                    Some((Err(e), s))
                }
            }
        });
        Ok(futures::stream::once(async move { Ok(first) })
            .chain(rest)
            .boxed())
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, UpstreamError> {
        let started = Instant::now();
        let deadline = Deadline(started + timeout);
        let response = self
            .send(&self.models_url, None, deadline.0, deadline)
            .await?;
        let bytes = match timeout_at(deadline.0, response.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(self.classify(&e)),
            Err(_) => return Err(self.err(Phase::Sent, UpstreamErrorKind::FirstByteTimeout)),
        };
        let list: ModelList = serde_json::from_slice(&bytes).map_err(|e| {
            self.err(
                Phase::Sent,
                UpstreamErrorKind::Malformed(format!("model list: {e}")),
            )
        })?;
        Ok(Probe {
            latency: started.elapsed(),
            models: list.data.into_iter().map(|m| m.id).collect(),
        })
    }
}

type SseEvents = Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

struct StreamState {
    name: Arc<str>,
    events: SseEvents,
    idle: Duration,
    deadline: Deadline,
    done: bool,
    saw_finish: bool,
}

enum SseNext {
    Chunk(Chunk),
    /// `data: [DONE]`.
    Done,
    /// The connection ended cleanly without `[DONE]`.
    Eof,
    Failed(UpstreamError),
}

/// Reads the next chunk of a stream by `by`; comments and keep-alives are skipped.
async fn next_chunk(
    name: &Arc<str>,
    events: &mut SseEvents,
    by: Instant,
    deadline: Deadline,
    phase: Phase,
    timeout_kind: UpstreamErrorKind,
) -> SseNext {
    let err = |kind| SseNext::Failed(UpstreamError::new(name, phase, kind));
    loop {
        let event = match timeout_at(by, events.next()).await {
            Err(_) if deadline.passed() => return err(UpstreamErrorKind::Deadline),
            Err(_) => return err(timeout_kind),
            Ok(None) => return SseNext::Eof,
            Ok(Some(Err(eventsource_stream::EventStreamError::Transport(_)))) => {
                return err(UpstreamErrorKind::Transport)
            }
            Ok(Some(Err(e))) => return err(UpstreamErrorKind::Malformed(format!("bad SSE: {e}"))),
            Ok(Some(Ok(event))) => event,
        };
        let data = event.data.trim();
        if data.is_empty() {
            continue;
        }
        if data == "[DONE]" {
            return SseNext::Done;
        }
        return match serde_json::from_str::<serde_json::Value>(data)
            .map_err(|e| format!("stream chunk is not JSON: {e}"))
            .and_then(Chunk::from_body)
        {
            Ok(c) => SseNext::Chunk(c),
            Err(e) => err(UpstreamErrorKind::Malformed(e)),
        };
    }
}

/// The device's TLS client identity: certificate chain and private key, both PEM. Errors name
/// the files, never the key's content.
fn client_identity(cert: &std::path::Path, key: &SecretRef) -> Result<reqwest::Identity, String> {
    let mut pem =
        std::fs::read(cert).map_err(|e| format!("cannot read `{}`: {e}", cert.display()))?;
    let key_pem = key.resolve()?;
    pem.push(b'\n');
    pem.extend_from_slice(key_pem.expose().as_bytes());
    reqwest::Identity::from_pem(&pem).map_err(|_| {
        format!(
            "`{}` with key `{key}` is not a PEM certificate chain and private key",
            cert.display()
        )
    })
}
