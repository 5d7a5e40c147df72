//! Webhook sink: turn events (the same compact JSON as on MQTT — codes and timings, never user
//! text) POSTed to an HTTP endpoint, e.g. an alerting or logging service. Delivery is best
//! effort: a slow or failing endpoint loses events (logged), it never slows a turn.

use super::{AgentHandle, Component};
use crate::config::{Secret, SecretRef};
use crate::events::json::event_json;
use crate::events::TurnEvent;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub url: String,
    /// Event kinds to send (`turn_finished`, `degraded`, `breaker_changed`, `tool_called`…);
    /// empty: every event.
    pub kinds: Vec<String>,
    /// Credentials for the endpoint: `env:`/`file:` references.
    pub secret_headers: BTreeMap<String, SecretRef>,
    pub timeout_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            kinds: vec![
                "turn_finished".into(),
                "degraded".into(),
                "breaker_changed".into(),
                "tool_called".into(),
            ],
            secret_headers: BTreeMap::new(),
            timeout_ms: 2_000,
        }
    }
}

impl WebhookConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.password().is_none() => {}
            _ => p.push(format!(
                "{path}.url: must be an http(s) URL without credentials"
            )),
        }
        if self.timeout_ms == 0 {
            p.push(format!("{path}.timeout_ms: must be greater than 0"));
        }
        for k in self.secret_headers.keys() {
            if http::HeaderName::try_from(k.as_str()).is_err() {
                p.push(format!(
                    "{path}.secret_headers.{k}: not a valid header name"
                ));
            }
        }
    }
}

pub struct Webhook {
    url: String,
    kinds: Vec<String>,
    headers: Vec<(String, Secret)>,
    client: reqwest::Client,
    failures: AtomicU64,
}

impl Webhook {
    pub fn new(config: &WebhookConfig) -> Result<Self, String> {
        let mut headers = Vec::new();
        for (k, r) in &config.secret_headers {
            headers.push((
                k.clone(),
                r.resolve()
                    .map_err(|e| format!("secret_headers.{k}: {e}"))?,
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Webhook {
            url: config.url.clone(),
            kinds: config.kinds.clone(),
            headers,
            client,
            failures: AtomicU64::new(0),
        })
    }
}

#[async_trait]
impl Component for Webhook {
    type Input = Arc<TurnEvent>;
    type Output = ();

    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn run(&self, event: Arc<TurnEvent>, _agent: &AgentHandle) {
        let body = event_json(&event);
        let kind = body["kind"].as_str().unwrap_or("");
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind) {
            return;
        }
        let mut request = self.client.post(&self.url).json(&body);
        for (k, v) in &self.headers {
            request = request.header(k, v.expose());
        }
        let ok = matches!(request.send().await, Ok(r) if r.status().is_success());
        if ok {
            self.failures.store(0, Ordering::Relaxed);
        } else if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
            // Once per failure streak: the endpoint is down, not every event is news.
            tracing::warn!("webhook delivery failing; events are being dropped until it recovers");
        }
    }
}
