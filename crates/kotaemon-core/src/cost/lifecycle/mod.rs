//! The cloud-GPU lifecycle: a self-hosted upstream (vLLM/TGI on a rented GPU, paid by the
//! hour) is started when a turn wants it and stopped when nobody has for `idle_secs`, within
//! an optional schedule. One [`Controller`] per `[[gpu]]` entry runs a small state machine on
//! tokio's clock:
//!
//! ```text
//! Stopped --demand | warm window--> Starting --probe ok--> Ready --idle | schedule--> Stopping --> Stopped
//!            Starting --hook failed--> Stopped      Starting --ready timeout | schedule--> Stopping
//!            Ready --breaker open | probes failing--> Preempted --restart--> Starting
//!                                                             --wait--> (demand) Starting
//! ```
//!
//! The pool sees only the member's *parked* flag (set while not Ready): a parked member is no
//! candidate, and wanting it wakes the controller through the member's `demand`. A turn that
//! finds every cloud candidate parked fails over to the local model with reason
//! `cloud_starting` (or `cloud_stopped` outside the schedule).

mod controller;
pub mod hooks;
pub mod schedule;

pub use controller::{Controller, GpuState, WallClock};
pub use hooks::{Hook, HookConfig, HookError};
pub use schedule::{Schedule, ScheduleConfig, WindowConfig};

use crate::events::EventBus;
use crate::upstream::pool::Pool;
use crate::upstream::UpstreamConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;

/// One `[[gpu]]` entry: the instance behind a configured upstream, and how to start and stop it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Name of the `[[upstreams]]` entry this instance serves.
    pub upstream: String,
    pub start: HookConfig,
    pub stop: HookConfig,
    /// Stop after this long without a call (and none in flight).
    #[serde(default = "default_idle_secs")]
    pub idle_secs: u64,
    /// From the start hook until the upstream answers its probe; past it the start is given
    /// up and the stop hook runs.
    #[serde(default = "default_ready_timeout_secs")]
    pub ready_timeout_secs: u64,
    /// Probe interval while starting (readiness) and while ready (preemption).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// When the GPU may run; none = any time, on demand.
    #[serde(default)]
    pub schedule: Option<ScheduleConfig>,
    /// A spot instance vanished while ready: start it again, or wait for the next call.
    #[serde(default)]
    pub on_preempt: OnPreempt,
    /// The state assumed at start-up: `probe` asks the upstream once.
    #[serde(default)]
    pub initially: Initially,
}

fn default_idle_secs() -> u64 {
    900
}
fn default_ready_timeout_secs() -> u64 {
    600
}
fn default_poll_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPreempt {
    #[default]
    Restart,
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initially {
    Stopped,
    Running,
    #[default]
    Probe,
}

impl GpuConfig {
    /// A config with the documented defaults (tests and embedders).
    pub fn new(upstream: &str, start: HookConfig, stop: HookConfig) -> Self {
        GpuConfig {
            upstream: upstream.into(),
            start,
            stop,
            idle_secs: default_idle_secs(),
            ready_timeout_secs: default_ready_timeout_secs(),
            poll_ms: default_poll_ms(),
            schedule: None,
            on_preempt: OnPreempt::default(),
            initially: Initially::default(),
        }
    }

    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_secs)
    }
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_secs)
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    fn validate(&self, path: &str, p: &mut Vec<String>) {
        for (key, value) in [
            ("idle_secs", self.idle_secs),
            ("ready_timeout_secs", self.ready_timeout_secs),
            ("poll_ms", self.poll_ms),
        ] {
            if value == 0 {
                p.push(format!("{path}.{key}: must be greater than 0"));
            }
        }
        self.start.validate(&format!("{path}.start"), p);
        self.stop.validate(&format!("{path}.stop"), p);
        if let Some(s) = &self.schedule {
            if let Err(mut e) = Schedule::new(s, &format!("{path}.schedule")) {
                p.append(&mut e);
            }
        }
    }
}

/// Static checks of every `[[gpu]]` entry against the configured upstreams.
pub fn validate(gpus: &[GpuConfig], upstreams: &[UpstreamConfig], p: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for (i, g) in gpus.iter().enumerate() {
        let path = format!("gpu[{i}]");
        if !upstreams.iter().any(|u| u.name == g.upstream) {
            p.push(format!(
                "{path}.upstream: no [[upstreams]] entry is named `{}`",
                g.upstream
            ));
        } else if !seen.insert(g.upstream.as_str()) {
            p.push(format!(
                "{path}.upstream: `{}` already has a [[gpu]] entry",
                g.upstream
            ));
        }
        g.validate(&path, p);
    }
}

/// Builds one controller per entry (hooks and their secrets resolved now). Entries naming an
/// unknown upstream are skipped here: [`validate`] reports them.
pub fn build(
    gpus: &[GpuConfig],
    pool: &Pool,
    bus: &EventBus,
) -> Result<Vec<Controller>, Vec<String>> {
    let mut p = Vec::new();
    let mut out = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        let path = format!("gpu[{i}]");
        let Some(member) = pool
            .members()
            .iter()
            .find(|m| !m.is_local && m.name().as_ref() == g.upstream)
        else {
            continue;
        };
        let start = hooks::build(&g.start, &format!("{path}.start"));
        let stop = hooks::build(&g.stop, &format!("{path}.stop"));
        let schedule = g
            .schedule
            .as_ref()
            .map(|s| Schedule::new(s, &format!("{path}.schedule")))
            .transpose();
        match (start, stop, schedule) {
            (Ok(start), Ok(stop), Ok(schedule)) => out.push(Controller::new(
                g,
                member.clone(),
                start,
                stop,
                schedule,
                bus.clone(),
            )),
            (start, stop, schedule) => {
                for mut e in [start.err(), stop.err(), schedule.err()]
                    .into_iter()
                    .flatten()
                {
                    p.append(&mut e);
                }
            }
        }
    }
    if p.is_empty() {
        Ok(out)
    } else {
        Err(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_entries_are_checked_with_their_paths() {
        let text = r#"
            [[upstreams]]
            name = "t4"
            base_url = "http://10.0.0.5:8000/v1"
            [[gpu]]
            upstream = "t4"
            start = { command = ["sh", "-c", "start-it"] }
            stop = { url = "https://api.example.com/stop", headers = { authorization = "env:GPU_TOKEN" } }
            idle_secs = 0
            schedule = { timezone = "Nowhere/City", windows = [{ days = "mon-fri", from = "08:00", to = "20:00" }] }
            [[gpu]]
            upstream = "a100"
            start = { command = [] }
            stop = { command = ["true"] }
            [[gpu]]
            upstream = "t4"
            start = { command = ["true"] }
            stop = { command = ["true"] }
        "#;
        let all = crate::Config::from_toml_str(text).unwrap_err().to_string();
        for needle in [
            "gpu[0].idle_secs",
            "gpu[0].schedule.timezone",
            "gpu[1].upstream: no [[upstreams]] entry is named `a100`",
            "gpu[1].start: needs command",
            "gpu[2].upstream: `t4` already has a [[gpu]] entry",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        let ok = text
            .replace("idle_secs = 0", "idle_secs = 60")
            .replace("Nowhere/City", "Asia/Shanghai");
        let ok = &ok[..ok.find("[[gpu]]\n            upstream = \"a100\"").unwrap()];
        let config = crate::Config::from_toml_str(ok).unwrap();
        let g = &config.gpu[0];
        assert_eq!(
            (g.ready_timeout_secs, g.poll_ms, g.on_preempt, g.initially),
            (600, 2000, OnPreempt::Restart, Initially::Probe)
        );
        assert_eq!(g.stop.method, "POST");
    }

    #[test]
    fn the_commented_default_example_parses_and_validates() {
        // default.toml carries a commented [[gpu]] example: uncommented, it must be valid.
        let default = crate::config::DEFAULT_TOML;
        let start = default
            .find("# [[gpu]]")
            .expect("default.toml has a commented [[gpu]] example");
        let example: String = default[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            // `# # …` lines are comments inside the example.
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!(
            "[[upstreams]]\nname = \"cloud\"\nbase_url = \"http://127.0.0.1:8000/v1\"\n{example}"
        );
        let config =
            crate::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        assert_eq!(config.gpu.len(), 1);
        assert!(config.gpu[0].schedule.is_some());
    }
}
