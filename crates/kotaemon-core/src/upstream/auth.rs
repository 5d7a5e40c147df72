//! Upstream credentials: a static key (Bearer or Azure's `api-key` header) or an OAuth2
//! client-credentials token, cached and refreshed before it expires.

use crate::config::{Secret, SecretRef};
use oauth2::basic::BasicClient;
use oauth2::{ClientId, ClientSecret, EndpointNotSet, EndpointSet, Scope, TokenResponse, TokenUrl};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI, vLLM, TGI, llama.cpp server).
    #[default]
    #[serde(rename = "authorization")]
    Authorization,
    /// `api-key: <key>` (Azure OpenAI).
    #[serde(rename = "api-key")]
    ApiKey,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretRef,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Refresh this long before the token expires.
    #[serde(default = "default_refresh_margin_ms")]
    pub refresh_margin_ms: u64,
}

fn default_refresh_margin_ms() -> u64 {
    60_000
}

impl OAuth2Config {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if TokenUrl::new(self.token_url.clone()).is_err() {
            p.push(format!(
                "{path}.token_url: `{}` is not a URL",
                self.token_url
            ));
        }
        if self.client_id.is_empty() {
            p.push(format!("{path}.client_id: must not be empty"));
        }
    }
}

type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

pub enum Auth {
    None,
    Key { header: KeyHeader, key: Secret },
    OAuth2(Box<OAuth2Source>),
}

pub struct OAuth2Source {
    client: TokenClient,
    http: reqwest::Client,
    scopes: Vec<String>,
    margin: Duration,
    cached: Mutex<Option<(Secret, Instant)>>,
}

/// Lifetime assumed when a token endpoint does not say (`expires_in` is optional in RFC 6749).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

impl Auth {
    pub fn from_config(
        api_key: Option<&SecretRef>,
        header: KeyHeader,
        oauth2: Option<&OAuth2Config>,
        http: reqwest::Client,
    ) -> Result<Auth, String> {
        if let Some(r) = api_key {
            return Ok(Auth::Key {
                header,
                key: r.resolve()?,
            });
        }
        let Some(o) = oauth2 else {
            return Ok(Auth::None);
        };
        let secret = o.client_secret.resolve()?;
        let token_url =
            TokenUrl::new(o.token_url.clone()).map_err(|e| format!("oauth2.token_url: {e}"))?;
        let client = BasicClient::new(ClientId::new(o.client_id.clone()))
            .set_client_secret(ClientSecret::new(secret.expose().to_string()))
            .set_token_uri(token_url);
        Ok(Auth::OAuth2(Box::new(OAuth2Source {
            client,
            http,
            scopes: o.scopes.clone(),
            margin: Duration::from_millis(o.refresh_margin_ms),
            cached: Mutex::new(None),
        })))
    }

    /// The header to send, or `None`. Errors name the cause, never a token.
    pub async fn header(&self) -> Result<Option<(http::HeaderName, http::HeaderValue)>, String> {
        let (name, value) = match self {
            Auth::None => return Ok(None),
            Auth::Key {
                header: KeyHeader::Authorization,
                key,
            } => (
                http::header::AUTHORIZATION,
                format!("Bearer {}", key.expose()),
            ),
            Auth::Key {
                header: KeyHeader::ApiKey,
                key,
            } => (
                http::HeaderName::from_static("api-key"),
                key.expose().to_string(),
            ),
            Auth::OAuth2(source) => (
                http::header::AUTHORIZATION,
                format!("Bearer {}", source.token().await?.expose()),
            ),
        };
        let mut value = http::HeaderValue::try_from(value)
            .map_err(|_| "credential contains characters not allowed in a header".to_string())?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }

    /// Drop a cached token the upstream rejected (401), so the next call fetches a new one.
    pub async fn invalidate(&self) {
        if let Auth::OAuth2(source) = self {
            *source.cached.lock().await = None;
        }
    }
}

impl OAuth2Source {
    async fn token(&self) -> Result<Secret, String> {
        // One lock: concurrent turns wait for a single refresh instead of stampeding the IdP.
        let mut cached = self.cached.lock().await;
        if let Some((token, refresh_at)) = cached.as_ref() {
            if Instant::now() < *refresh_at {
                return Ok(token.clone());
            }
        }
        let response = self
            .client
            .exchange_client_credentials()
            .add_scopes(self.scopes.iter().cloned().map(Scope::new))
            .request_async(&self.http)
            .await
            .map_err(|e| format!("token request failed: {}", describe_token_error(&e)))?;
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh `margin` early, but never later than at 80% of a short lifetime.
        let early = self.margin.min(lifetime / 5 * 4);
        let refresh_at = Instant::now() + lifetime.saturating_sub(early).max(lifetime / 5);
        let token = Secret::from_token(response.access_token().secret().clone());
        *cached = Some((token.clone(), refresh_at));
        Ok(token)
    }
}

fn describe_token_error<RE: std::error::Error + 'static>(
    e: &oauth2::RequestTokenError<
        RE,
        oauth2::StandardErrorResponse<oauth2::basic::BasicErrorResponseType>,
    >,
) -> String {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => {
            format!("token endpoint refused: {}", r.error())
        }
        oauth2::RequestTokenError::Request(_) => "token endpoint unreachable".into(),
        oauth2::RequestTokenError::Parse(_, _) => {
            "token endpoint answer was not a token response".into()
        }
        oauth2::RequestTokenError::Other(m) => m.clone(),
    }
}
