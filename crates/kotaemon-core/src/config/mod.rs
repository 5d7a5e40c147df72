//! Root configuration: TOML (or the embedded default), environment overrides, validation that
//! reports every problem with its key path. Each component's config struct lives beside the
//! component; this module only assembles them.

mod env;
pub mod secret;

use crate::api::ServerConfig;
use crate::audit::AuditConfig;
use crate::cost::{BudgetConfig, UsageConfig};
use crate::plugins::PluginsConfig;
use crate::stages::StagesConfig;
use crate::tools::ToolsConfig;
use crate::upstream::local_config::LocalConfig;
use crate::upstream::pool::PoolConfig;
use crate::upstream::UpstreamConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use secret::{Secret, SecretRef};

/// The commented default configuration: what `init` writes and what `serve` runs without a file.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub stages: StagesConfig,
    #[serde(default)]
    pub budget: BudgetConfig,
    #[serde(default)]
    pub tools: ToolsConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub queue: crate::queue::QueueConfig,
    /// Self-hosted cloud GPUs started on demand and stopped when idle (`cost::lifecycle`).
    #[serde(default)]
    pub gpu: Vec<crate::cost::lifecycle::GpuConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every problem found in a configuration, each with its key path.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration{}:\n{}", source_label(.source_name), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub source_name: Option<String>,
    pub problems: Vec<String>,
}

fn source_label(name: &Option<String>) -> String {
    name.as_ref()
        .map(|n| format!(" in {n}"))
        .unwrap_or_default()
}

impl Config {
    /// Loads `path` (or the embedded default), applies `KOTAEMON_*` overrides from the
    /// process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let source_name = path.map(|p| p.display().to_string());
        let fail = |problems: Vec<String>| ConfigError {
            source_name: source_name.clone(),
            problems,
        };
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| fail(vec![format!("cannot read file: {e}")]))?,
            None => DEFAULT_TOML.to_string(),
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| fail(vec![e.to_string()]))?;
        env::apply_overrides(&mut table, vars).map_err(fail)?;
        Self::from_table(table, source_name)
    }

    /// Parses a config from TOML text alone (no environment), e.g. what `init` wrote.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            source_name: None,
            problems: vec![e.to_string()],
        })?;
        Self::from_table(table, None)
    }

    fn from_table(table: toml::Table, source_name: Option<String>) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.clone(),
            problems,
        };
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| fail(vec![format!("{}: {}", e.path(), e.inner())]))?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Static checks of every section; constructors add what needs I/O (secrets, CA files).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        self.server.validate("server", &mut p);
        self.pool.validate("pool", &mut p);
        if self.upstreams.is_empty() && !self.local.enabled {
            p.push("upstreams: at least one upstream (or the local model) is needed".into());
        }
        self.local.validate("local", &mut p);
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            u.validate(&format!("upstreams[{i}]"), &mut p);
            if !names.insert(u.name.as_str()) {
                p.push(format!("upstreams[{i}].name: `{}` is used twice", u.name));
            }
        }
        self.stages.validate("stages", &mut p);
        self.budget.validate("budget", &mut p);
        self.plugins.validate("plugins", &mut p);
        self.audit.validate("audit", &mut p);
        self.queue.validate("queue", &mut p);
        let upstream_names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        self.usage.validate("usage", &upstream_names, &mut p);
        for client in self.budget.clients.keys() {
            let known = self.server.clients.iter().any(|c| &c.name == client)
                || client
                    .strip_prefix("key-")
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i < self.server.api_keys.len());
            if !known {
                p.push(format!(
                    "budget.clients.{client}: no client key has this name ([[server.clients]] name, or key-N for api_keys)"
                ));
            }
        }
        crate::cost::lifecycle::validate(&self.gpu, &self.upstreams, &mut p);
        if tracing_subscriber_filter_ok(&self.log.level).is_err() {
            p.push(format!(
                "log.level: `{}` is not a valid filter",
                self.log.level
            ));
        }
        p
    }
}

fn tracing_subscriber_filter_ok(level: &str) -> Result<(), ()> {
    // Accept the forms tracing's EnvFilter takes: comma-separated `target=level` or `level`.
    let levels = ["trace", "debug", "info", "warn", "error", "off"];
    for part in level.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let lvl = part.rsplit('=').next().unwrap_or(part);
        if !levels.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn env_overrides_reach_nested_keys_and_lists() {
        let vars = vec![
            (
                "KOTAEMON_SERVER__LISTEN".to_string(),
                "0.0.0.0:9999".to_string(),
            ),
            (
                "KOTAEMON_UPSTREAMS__0__BASE_URL".to_string(),
                "http://10.1.2.3:8000/v1".to_string(),
            ),
            ("KOTAEMON_POOL__MAX_ATTEMPTS".to_string(), "5".to_string()),
            // Not a config section: a secret the config refers to. Must be ignored.
            ("KOTAEMON_API_KEY".to_string(), "secret".to_string()),
        ];
        let c = Config::load_with_env(None, vars).unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.upstreams[0].base_url.as_str(), "http://10.1.2.3:8000/v1");
        assert_eq!(c.pool.max_attempts, 5);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [server]
            max_body_bytes = 0
            [pool]
            max_attempts = 0
            [[upstreams]]
            name = "a"
            base_url = "ftp://x"
            [[upstreams]]
            name = "a"
            base_url = "http://y/v1"
            weight = 0
        "#;
        let err = Config::from_toml_str(text).unwrap_err();
        let all = err.to_string();
        for needle in [
            "server.max_body_bytes",
            "pool.max_attempts",
            "upstreams[0].base_url",
            "upstreams[1].name",
            "upstreams[1].weight",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = Config::from_toml_str(
            "[server]\nlisten = 5\n[[upstreams]]\nname='a'\nbase_url='http://x/v1'",
        )
        .unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err = Config::from_toml_str("[server]\nlisen = '1.2.3.4:5'").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }
}
