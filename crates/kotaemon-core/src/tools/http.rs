//! `http` tools: one named, templated HTTP request per `[[tools.http]]` entry — webhooks,
//! DingTalk/Feishu bots, an Exchange or ticketing API. The model fills the parameters; the
//! device adds the credentials (secret references) and only talks to allowlisted hosts, so a
//! parameter can never redirect a request (or a key) elsewhere.

use super::{Effect, Tool, ToolCtx, ToolError, ToolSpec};
use crate::config::{Secret, SecretRef};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpToolConfig {
    /// The tool's name for the model (`feishu_notify`).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// GET, POST, PUT, PATCH or DELETE.
    pub method: String,
    /// URL template: `{param}` slots are filled from the arguments, percent-encoded.
    pub url: String,
    /// Hosts the request may go to; empty means the URL template's own host.
    pub allowed_hosts: Vec<String>,
    /// JSON Schema of the arguments.
    pub parameters: Value,
    /// Non-secret headers (values take slots).
    pub headers: BTreeMap<String, String>,
    /// Headers holding credentials: `env:NAME` or `file:/path` references.
    pub secret_headers: BTreeMap<String, SecretRef>,
    /// JSON body template: a string that is exactly `{param}` becomes the argument's JSON
    /// value; other strings have their slots filled. None: no body.
    pub body: Option<Value>,
    pub timeout_ms: u64,
    /// Longer responses are cut (the model gets the start).
    pub max_response_bytes: usize,
}

impl Default for HttpToolConfig {
    fn default() -> Self {
        HttpToolConfig {
            name: String::new(),
            description: String::new(),
            method: "POST".into(),
            url: String::new(),
            allowed_hosts: Vec::new(),
            parameters: json!({"type": "object"}),
            headers: BTreeMap::new(),
            secret_headers: BTreeMap::new(),
            body: None,
            timeout_ms: 5_000,
            max_response_bytes: 16 * 1024,
        }
    }
}

struct HttpTool {
    spec: ToolSpec,
    method: reqwest::Method,
    url: String,
    allowed_hosts: Vec<String>,
    headers: BTreeMap<String, String>,
    secret_headers: Vec<(String, Secret)>,
    body: Option<Value>,
    max_response_bytes: usize,
    client: reqwest::Client,
}

fn fill(template: &str, args: &Map<String, Value>, encode: bool) -> String {
    let mut out = template.to_string();
    for (k, v) in args {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let text = if encode { url_encode(&text) } else { text };
        out = out.replace(&format!("{{{k}}}"), &text);
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn fill_json(template: &Value, args: &Map<String, Value>) -> Value {
    match template {
        Value::String(s) => {
            let whole = s
                .strip_prefix('{')
                .and_then(|r| r.strip_suffix('}'))
                .filter(|k| args.contains_key(*k));
            match whole {
                Some(k) => args[k].clone(),
                None => Value::String(fill(s, args, false)),
            }
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| fill_json(v, args)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), fill_json(v, args)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[async_trait]
impl Tool for HttpTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let empty = Map::new();
        let args = args.as_object().unwrap_or(&empty);
        let url = fill(&self.url, args, true);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| ToolError::InvalidArguments(format!("the URL is not valid: {e}")))?;
        let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
        if !self.allowed_hosts.iter().any(|h| h == &host) {
            return Err(ToolError::Failed(format!(
                "host `{host}` is not allowed for this tool"
            )));
        }
        let mut request = self.client.request(self.method.clone(), parsed);
        for (k, v) in &self.headers {
            request = request.header(k, fill(v, args, false));
        }
        for (k, secret) in &self.secret_headers {
            request = request.header(k, secret.expose());
        }
        if let Some(body) = &self.body {
            request = request.json(&fill_json(body, args));
        }
        // Errors are described by kind only: reqwest's messages can carry the URL.
        let mut response = request.send().await.map_err(|e| {
            ToolError::Failed(if e.is_timeout() {
                "the request timed out".to_string()
            } else if e.is_connect() {
                format!("could not connect to {host}")
            } else {
                format!("the request to {host} failed")
            })
        })?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            bytes.extend_from_slice(&chunk);
            if bytes.len() >= self.max_response_bytes {
                bytes.truncate(self.max_response_bytes);
                break;
            }
        }
        let body = serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if !(200..300).contains(&status) {
            return Err(ToolError::Failed(format!(
                "{host} answered HTTP {status}: {}",
                body.to_string().chars().take(300).collect::<String>()
            )));
        }
        Ok(json!({"status": status, "body": body}))
    }
}

pub fn build(config: &HttpToolConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    let mut p = Vec::new();
    let method = match config.method.to_ascii_uppercase().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE") => {
            reqwest::Method::from_bytes(m.as_bytes()).ok()
        }
        _ => {
            p.push(format!(
                "method: `{}` must be GET, POST, PUT, PATCH or DELETE",
                config.method
            ));
            None
        }
    };
    // The template's own host, with slots replaced by a placeholder.
    let template_host = reqwest::Url::parse(&config.url.replace(['{', '}'], "x"))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    if template_host.is_none() {
        p.push(format!("url: `{}` must be an http(s) URL", config.url));
    }
    let mut allowed: Vec<String> = config
        .allowed_hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if allowed.is_empty() {
        allowed.extend(template_host.clone());
    }
    let mut secret_headers = Vec::new();
    for (k, r) in &config.secret_headers {
        match r.resolve() {
            Ok(s) => secret_headers.push((k.clone(), s)),
            Err(e) => p.push(format!("secret_headers.{k}: {e}")),
        }
    }
    for k in config.headers.keys().chain(config.secret_headers.keys()) {
        if http::HeaderName::try_from(k.as_str()).is_err() {
            p.push(format!("headers.{k}: not a valid header name"));
        }
    }
    if config.timeout_ms == 0 {
        p.push("timeout_ms: must be greater than 0".into());
    }
    let timeout = Duration::from_millis(config.timeout_ms);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(3)))
        // A redirect could leave the allowlist.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| vec![format!("cannot build an HTTP client: {e}")])?;
    let (Some(method), true) = (method, p.is_empty()) else {
        return Err(p);
    };
    let effect = if method == reqwest::Method::GET {
        Effect::ReadOnly
    } else {
        Effect::Mutating
    };
    Ok(vec![Arc::new(HttpTool {
        spec: ToolSpec {
            name: config.name.clone(),
            description: config.description.clone(),
            parameters: config.parameters.clone(),
            effect,
            timeout,
        },
        method,
        url: config.url.clone(),
        allowed_hosts: allowed,
        headers: config.headers.clone(),
        secret_headers,
        body: config.body.clone(),
        max_response_bytes: config.max_response_bytes.max(256),
        client,
    })])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_encoded_in_urls_and_typed_in_bodies() {
        let args = json!({"room": "三楼 A/B", "count": 3})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(
            fill("http://h/rooms/{room}?n={count}", &args, true),
            "http://h/rooms/%E4%B8%89%E6%A5%BC%20A%2FB?n=3"
        );
        let body = fill_json(&json!({"n": "{count}", "text": "room {room}"}), &args);
        assert_eq!(body, json!({"n": 3, "text": "room 三楼 A/B"}));
    }

    #[test]
    fn bad_config_is_reported_field_by_field() {
        let cfg = HttpToolConfig {
            name: "x".into(),
            method: "FETCH".into(),
            url: "ftp://nowhere".into(),
            secret_headers: [(
                "authorization".to_string(),
                SecretRef::Env("KOTAEMON_NOPE_UNSET".into()),
            )]
            .into(),
            ..Default::default()
        };
        let p = build(&cfg).err().unwrap();
        assert!(p.iter().any(|e| e.starts_with("method:")), "{p:?}");
        assert!(p.iter().any(|e| e.starts_with("url:")), "{p:?}");
        assert!(
            p.iter()
                .any(|e| e.starts_with("secret_headers.authorization:")),
            "{p:?}"
        );
    }
}
