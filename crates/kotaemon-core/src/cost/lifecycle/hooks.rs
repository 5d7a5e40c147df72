//! Start and stop hooks: a command run directly (no shell unless the user writes
//! `["sh", "-c", …]`) or an HTTP request with secret headers, behind the [`Hook`] trait so the
//! controller's tests use an in-memory one. What a hook prints or answers is never logged —
//! cloud CLIs echo tokens and instance metadata — only its exit or HTTP status.

use crate::config::SecretRef;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// `{ command = ["prog", "arg"], timeout_secs = 120 }` or
/// `{ url = "https://…", method = "POST", headers = { authorization = "env:VAR" } }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Program and arguments, run without a shell. Non-zero exit = failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Or: an HTTP request (e.g. the cloud provider's start/stop API). Non-2xx = failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default = "default_method")]
    pub method: String,
    /// Request headers; values are secret references (`env:NAME` or `file:/path`).
    #[serde(default)]
    pub headers: BTreeMap<String, SecretRef>,
    /// The command is killed, or the request abandoned, after this long.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_method() -> String {
    "POST".into()
}

fn default_timeout_secs() -> u64 {
    120
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

impl HookConfig {
    pub fn command(argv: &[&str]) -> Self {
        HookConfig {
            command: argv.iter().map(|s| s.to_string()).collect(),
            url: None,
            method: default_method(),
            headers: BTreeMap::new(),
            timeout_secs: default_timeout_secs(),
        }
    }

    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        match (&self.url, self.command.is_empty()) {
            (Some(_), false) => p.push(format!("{path}: set either command or url, not both")),
            (None, true) => p.push(format!(
                "{path}: needs command = [\"program\", \"arg\", …] or url = \"https://…\""
            )),
            (None, false) => {
                if self.command[0].trim().is_empty() {
                    p.push(format!("{path}.command: the program name is empty"));
                }
                if !self.headers.is_empty() {
                    p.push(format!("{path}.headers: only for url hooks"));
                }
            }
            (Some(url), true) => {
                match reqwest::Url::parse(url) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.host().is_some()
                            && u.password().is_none() => {}
                    _ => p.push(format!(
                        "{path}.url: must be an http(s) URL without credentials (put them in headers as secret references)"
                    )),
                }
                if !METHODS.contains(&self.method.as_str()) {
                    p.push(format!(
                        "{path}.method: `{}` is not one of {}",
                        self.method,
                        METHODS.join(", ")
                    ));
                }
                for k in self.headers.keys() {
                    if http::HeaderName::try_from(k.as_str()).is_err() {
                        p.push(format!("{path}.headers.{k}: not a valid header name"));
                    }
                }
            }
        }
        if self.timeout_secs == 0 {
            p.push(format!("{path}.timeout_secs: must be greater than 0"));
        }
    }
}

/// Why a hook failed. Texts carry exit statuses, HTTP statuses and program names — never the
/// hook's output, its arguments, URLs or header values.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("did not finish within {0} s")]
    Timeout(u64),
    #[error("{0}")]
    Exit(std::process::ExitStatus),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("request failed: {0}")]
    Request(String),
}

impl HookError {
    /// Stable code for logs and the CLI.
    pub fn code(&self) -> &'static str {
        match self {
            HookError::Spawn { .. } => "hook_spawn",
            HookError::Timeout(_) => "hook_timeout",
            HookError::Exit(_) => "hook_exit",
            HookError::Status(_) => "hook_status",
            HookError::Request(_) => "hook_request",
        }
    }
}

/// Starts or stops the instance. Returns once the provider accepted (or refused) the request;
/// readiness is the controller's business.
#[async_trait]
pub trait Hook: Send + Sync {
    async fn run(&self) -> Result<(), HookError>;
}

/// Builds the hook a config describes, resolving its secrets now (at start-up, not when the
/// GPU is first needed).
pub fn build(config: &HookConfig, path: &str) -> Result<Arc<dyn Hook>, Vec<String>> {
    let mut p = Vec::new();
    config.validate(path, &mut p);
    if !p.is_empty() {
        return Err(p);
    }
    let timeout = Duration::from_secs(config.timeout_secs);
    let Some(url) = &config.url else {
        return Ok(Arc::new(CommandHook {
            argv: config.command.clone(),
            timeout,
        }));
    };
    let mut headers = http::HeaderMap::new();
    for (k, r) in &config.headers {
        let Ok(name) = http::HeaderName::try_from(k.as_str()) else {
            continue; // reported by validate
        };
        match r.resolve() {
            Ok(secret) => match http::HeaderValue::from_str(secret.expose()) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    headers.insert(name, v);
                }
                Err(_) => p.push(format!(
                    "{path}.headers.{k}: the secret `{r}` is not a valid header value"
                )),
            },
            Err(e) => p.push(format!("{path}.headers.{k}: {e}")),
        }
    }
    let method = reqwest::Method::from_bytes(config.method.as_bytes())
        .map_err(|_| vec![format!("{path}.method: not an HTTP method")])?;
    // Its own client: hook timeouts are not an upstream's, and a redirect must not carry the
    // provider credentials to another host.
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| vec![format!("{path}: cannot build an HTTP client: {e}")])?;
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Arc::new(HttpHook {
        client,
        method,
        url: url.clone(),
        headers,
    }))
}

pub struct CommandHook {
    argv: Vec<String>,
    timeout: Duration,
}

#[async_trait]
impl Hook for CommandHook {
    async fn run(&self) -> Result<(), HookError> {
        let program = &self.argv[0];
        // Output goes nowhere: it may hold secrets, and a pipe nobody reads would block a
        // command that starts something in the background.
        let mut child = tokio::process::Command::new(program)
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HookError::Spawn {
                program: program.clone(),
                source,
            })?;
        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(HookError::Exit(status)),
            Ok(Err(source)) => Err(HookError::Spawn {
                program: program.clone(),
                source,
            }),
            Err(_) => {
                let _ = child.kill().await;
                Err(HookError::Timeout(self.timeout.as_secs()))
            }
        }
    }
}

pub struct HttpHook {
    client: reqwest::Client,
    method: reqwest::Method,
    url: String,
    headers: http::HeaderMap,
}

#[async_trait]
impl Hook for HttpHook {
    async fn run(&self) -> Result<(), HookError> {
        let sent = self
            .client
            .request(self.method.clone(), &self.url)
            .headers(self.headers.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(HookError::Status(r.status().as_u16())),
            Err(e) if e.is_timeout() => Err(HookError::Request("timed out".into())),
            Err(e) => {
                // The causes say what went wrong (refused, DNS, TLS); the URL is left out.
                let e = e.without_url();
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                Err(HookError::Request(text))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_report_their_exit_status() {
        let ok = build(&HookConfig::command(&["true"]), "gpu[0].start").unwrap();
        ok.run().await.unwrap();
        let fails = build(
            &HookConfig::command(&["sh", "-c", "echo sk-secret; exit 3"]),
            "x",
        )
        .unwrap();
        let e = fails.run().await.unwrap_err();
        assert_eq!(e.code(), "hook_exit");
        assert!(
            e.to_string().contains('3') && !e.to_string().contains("sk-secret"),
            "{e}"
        );
        let missing = build(&HookConfig::command(&["/nonexistent/kotaemon-hook"]), "x").unwrap();
        assert_eq!(missing.run().await.unwrap_err().code(), "hook_spawn");
    }

    /// Paused clock: the timeout fires as soon as nothing else can run, without waiting.
    #[tokio::test(start_paused = true)]
    async fn a_command_past_its_timeout_is_killed() {
        let mut slow = HookConfig::command(&["sleep", "30"]);
        slow.timeout_secs = 5;
        let started = tokio::time::Instant::now();
        let e = build(&slow, "x").unwrap().run().await.unwrap_err();
        assert_eq!(e.code(), "hook_timeout");
        assert_eq!(e.to_string(), "did not finish within 5 s");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(5));
    }

    #[tokio::test]
    async fn http_hooks_send_secret_headers_and_report_status_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for status in ["204 No Content", "500 Internal Server Error"] {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let head =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                sock.write_all(head.as_bytes()).await.unwrap();
            }
            seen
        });
        std::env::set_var("KOTAEMON_TEST_GPU_HOOK_TOKEN", "Bearer gpu-canary-99");
        let config = HookConfig {
            command: Vec::new(),
            url: Some(format!("http://{addr}/instances/i-1/start")),
            method: "POST".into(),
            headers: [(
                "authorization".to_string(),
                SecretRef::Env("KOTAEMON_TEST_GPU_HOOK_TOKEN".into()),
            )]
            .into(),
            timeout_secs: 5,
        };
        let hook = build(&config, "gpu[0].start").unwrap();
        hook.run().await.unwrap();
        let e = hook.run().await.unwrap_err();
        assert_eq!(e.code(), "hook_status");
        assert_eq!(e.to_string(), "answered HTTP 500");
        let seen = server.await.unwrap();
        assert!(
            seen[0].starts_with("POST /instances/i-1/start "),
            "{}",
            seen[0]
        );
        assert!(seen[0]
            .to_ascii_lowercase()
            .contains("authorization: bearer gpu-canary-99"));
        // The server is gone: a transport error, told without the URL or the credentials.
        let e = hook.run().await.unwrap_err();
        assert_eq!(e.code(), "hook_request");
        let told = e.to_string();
        assert!(
            !told.contains("instances/i-1") && !told.contains("canary"),
            "{told}"
        );

        let mut missing = config.clone();
        missing.headers = [(
            "authorization".to_string(),
            SecretRef::Env("KOTAEMON_TEST_GPU_HOOK_MISSING".into()),
        )]
        .into();
        let problems = build(&missing, "gpu[0].start").err().unwrap().join("\n");
        assert!(
            problems.contains("gpu[0].start.headers.authorization"),
            "{problems}"
        );
    }

    #[test]
    fn a_hook_is_a_command_or_a_url() {
        let mut p = Vec::new();
        let mut both = HookConfig::command(&["true"]);
        both.url = Some("https://api.example.com/start".into());
        both.validate("gpu[0].start", &mut p);
        let mut neither = HookConfig::command(&[]);
        neither.timeout_secs = 0;
        neither.validate("gpu[0].stop", &mut p);
        let mut creds = HookConfig::command(&[]);
        creds.url = Some("https://user:pw@api.example.com/start".into());
        creds.method = "FETCH".into();
        creds.validate("gpu[1].start", &mut p);
        let all = p.join("\n");
        for needle in [
            "gpu[0].start: set either command or url",
            "gpu[0].stop: needs command",
            "gpu[0].stop.timeout_secs",
            "gpu[1].start.url: must be an http(s) URL without credentials",
            "gpu[1].start.method",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(!all.contains("pw"), "{all}");
    }
}
