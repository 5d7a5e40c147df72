//! Active health checks: every upstream's model list is fetched on an interval. Failing checks
//! take an upstream out of first choice (the pool still tries it if nothing else is left);
//! the model list feeds `GET /v1/models` for pass-through upstreams.

use super::pool::Pool;
use crate::events::{EventBus, TurnEvent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub enabled: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            interval_ms: 10_000,
            timeout_ms: 2_000,
            unhealthy_after: 2,
        }
    }
}

impl HealthConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.interval_ms == 0 || self.timeout_ms == 0 {
            p.push(format!(
                "{path}: interval_ms and timeout_ms must be greater than 0"
            ));
        }
        if self.unhealthy_after == 0 {
            p.push(format!("{path}.unhealthy_after: must be at least 1"));
        }
    }
}

/// Runs until `stop` is cancelled. One task checks every member in turn, so a Pi with ten
/// upstreams does not grow ten timers.
pub async fn run(pool: Arc<Pool>, bus: EventBus, stop: CancellationToken) {
    let cfg = pool.config().health.clone();
    if !cfg.enabled {
        return;
    }
    let mut failures = vec![0u32; pool.members().len()];
    let mut ticker = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let checks = pool
            .members()
            .iter()
            .map(|m| m.upstream.probe(Duration::from_millis(cfg.timeout_ms)));
        let results = tokio::select! {
            _ = stop.cancelled() => return,
            r = futures::future::join_all(checks) => r,
        };
        for ((member, result), fails) in pool.members().iter().zip(results).zip(failures.iter_mut())
        {
            // A parked GPU is off on purpose; its lifecycle controller owns its readiness.
            if member.is_parked() {
                *fails = 0;
                continue;
            }
            let healthy = match result {
                Ok(probe) => {
                    *fails = 0;
                    member.set_discovered_models(probe.models);
                    true
                }
                Err(e) => {
                    *fails += 1;
                    tracing::debug!(upstream = %member.name(), code = e.code(), "health check failed");
                    *fails < cfg.unhealthy_after
                }
            };
            if member.set_healthy(healthy) {
                if healthy {
                    tracing::info!(upstream = %member.name(), "upstream healthy again");
                } else {
                    tracing::warn!(upstream = %member.name(), "upstream failed its health checks");
                }
                bus.emit(TurnEvent::HealthChanged {
                    upstream: member.name().clone(),
                    healthy,
                });
            }
        }
    }
}
