//! Secrets are references in config (`env:NAME` or `file:PATH`) and a [`Secret`] in memory.
//! Neither type prints its value: `Debug` and `Display` show only where it came from.

use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;

/// Where a secret lives. Literal secrets in the config file are refused: config files get
/// copied, pasted into issues and committed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
}

impl TryFrom<String> for SecretRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() {
                return Err("secret reference `env:` needs a variable name".into());
            }
            Ok(SecretRef::Env(name.to_string()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("secret reference `file:` needs a path".into());
            }
            Ok(SecretRef::File(path.into()))
        } else {
            Err(
                "secrets must be references: `env:VARIABLE` or `file:/path/to/secret` \
                 (literal secrets in the config file are not accepted)"
                    .into(),
            )
        }
    }
}

impl From<SecretRef> for String {
    fn from(r: SecretRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl SecretRef {
    /// Reads the secret. The error names the reference, never the value.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            SecretRef::Env(name) => std::env::var(name)
                .map_err(|_| format!("environment variable `{name}` is not set"))?,
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret file `{}`: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        };
        if value.is_empty() {
            return Err(format!("secret `{self}` is empty"));
        }
        Ok(Secret {
            value,
            source: self.to_string(),
        })
    }
}

/// A resolved secret. Only [`Secret::expose`] reveals it, at the one place it is sent.
#[derive(Clone)]
pub struct Secret {
    value: String,
    source: String,
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
    /// Constant-time comparison, so response timing does not leak key prefixes.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.value.as_bytes().ct_eq(candidate).into()
    }
    /// Wraps a credential obtained at run time (an OAuth2 access token).
    pub fn from_token(value: String) -> Self {
        Secret {
            value,
            source: "oauth2 token".into(),
        }
    }
    #[cfg(test)]
    pub fn for_test(value: &str) -> Self {
        Secret {
            value: value.into(),
            source: "test".into(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}: ***)", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_secrets_are_refused_and_values_never_print() {
        assert!(SecretRef::try_from("sk-live-123".to_string()).is_err());
        std::env::set_var("KOTAEMON_TEST_SECRET_CANARY", "canary-7f3a");
        let s = SecretRef::try_from("env:KOTAEMON_TEST_SECRET_CANARY".to_string())
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(s.expose(), "canary-7f3a");
        assert!(!format!("{s:?}").contains("canary"));
        assert!(s.matches(b"canary-7f3a"));
        assert!(!s.matches(b"canary-7f3b"));
        assert!(!s.matches(b"canary"));
        let missing = SecretRef::Env("KOTAEMON_TEST_SECRET_MISSING".into())
            .resolve()
            .unwrap_err();
        assert!(missing.contains("KOTAEMON_TEST_SECRET_MISSING"));
    }
}
