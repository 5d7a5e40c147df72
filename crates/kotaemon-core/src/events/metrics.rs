//! Maps events to Prometheus metrics. Labels are bounded: upstream and model names come from
//! config, codes from enums; never URLs, prompts or turn ids.

use super::{BreakerState, TurnEvent};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub const HTTP_REQUESTS: &str = "kotaemon_http_requests_total";
pub const TURNS: &str = "kotaemon_turns_total";
pub const TURN_DURATION: &str = "kotaemon_turn_duration_seconds";
pub const UPSTREAM_REQUESTS: &str = "kotaemon_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "kotaemon_upstream_duration_seconds";
pub const TTFT: &str = "kotaemon_time_to_first_token_seconds";
pub const TOKENS: &str = "kotaemon_tokens_total";
pub const BREAKER_STATE: &str = "kotaemon_breaker_state";
pub const BREAKER_TRANSITIONS: &str = "kotaemon_breaker_transitions_total";
pub const UPSTREAM_HEALTHY: &str = "kotaemon_upstream_healthy";
pub const RETRIES: &str = "kotaemon_retries_total";
pub const RETRY_BUDGET_EXHAUSTED: &str = "kotaemon_retry_budget_exhausted_total";
pub const ACTIVE_STREAMS: &str = "kotaemon_active_streams";
pub const OVERHEAD: &str = "kotaemon_gateway_overhead_seconds";
pub const STAGE_DECISIONS: &str = "kotaemon_stage_decisions_total";
pub const EVENTS_DROPPED: &str = "kotaemon_events_dropped_total";
pub const RULE_MATCHES: &str = "kotaemon_rule_matches_total";
pub const ROUTE_DECISIONS: &str = "kotaemon_route_decisions_total";
pub const DEGRADED: &str = "kotaemon_degraded_turns_total";

/// Histogram buckets: overhead is microseconds, turns are up to minutes.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
];
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests served, by route and status.");
    describe_counter!(TURNS, "Turns finished, by outcome.");
    describe_histogram!(
        TURN_DURATION,
        Unit::Seconds,
        "Whole-turn latency, request to last byte."
    );
    describe_counter!(
        UPSTREAM_REQUESTS,
        "Upstream calls, by upstream and outcome."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Upstream call latency, by upstream."
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Streams: time to the upstream's first event, by upstream."
    );
    describe_counter!(
        TOKENS,
        "Tokens reported by upstreams, by upstream, model and direction."
    );
    describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker state changes, by upstream and new state."
    );
    describe_gauge!(
        UPSTREAM_HEALTHY,
        "Active health check result per upstream: 1 healthy, 0 not."
    );
    describe_counter!(
        RETRIES,
        "Retries of an upstream call before anything was streamed, by reason."
    );
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries skipped because the retry budget was spent."
    );
    describe_gauge!(
        ACTIVE_STREAMS,
        "Streamed answers currently open to clients."
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "Gateway time not spent waiting for the upstream (to first byte for streams)."
    );
    describe_counter!(
        STAGE_DECISIONS,
        "Decisions of pipeline stages, by stage and decision."
    );
    describe_counter!(EVENTS_DROPPED, "Events a slow subscriber missed.");
    describe_counter!(RULE_MATCHES, "Turns answered by a local rule, by intent.");
    describe_counter!(ROUTE_DECISIONS, "Router decisions, by route and reason.");
    describe_counter!(
        DEGRADED,
        "Turns the local model answered because the cloud could not, by reason."
    );
}

pub fn record(event: &TurnEvent) {
    match event {
        TurnEvent::TurnStarted { .. } => {}
        TurnEvent::StageDecided {
            stage, decision, ..
        } => counter!(STAGE_DECISIONS, "stage" => *stage, "decision" => *decision).increment(1),
        TurnEvent::UpstreamAttempt { .. } => {}
        TurnEvent::Routed { route, reason, .. } => {
            counter!(ROUTE_DECISIONS, "route" => route.as_str(), "reason" => *reason).increment(1)
        }
        TurnEvent::Degraded { reason, .. } => counter!(DEGRADED, "reason" => *reason).increment(1),
        TurnEvent::RuleMatched { intent, .. } => {
            counter!(RULE_MATCHES, "intent" => intent.to_string()).increment(1)
        }
        TurnEvent::UpstreamFinished {
            upstream,
            outcome,
            elapsed,
            ttft,
            ..
        } => {
            let up = upstream.to_string();
            counter!(UPSTREAM_REQUESTS, "upstream" => up.clone(), "outcome" => *outcome)
                .increment(1);
            histogram!(UPSTREAM_DURATION, "upstream" => up.clone()).record(elapsed.as_secs_f64());
            if let Some(t) = ttft {
                histogram!(TTFT, "upstream" => up).record(t.as_secs_f64());
            }
        }
        TurnEvent::Retry {
            upstream, reason, ..
        } => {
            counter!(RETRIES, "upstream" => upstream.to_string(), "reason" => *reason).increment(1)
        }
        TurnEvent::RetryBudgetExhausted { .. } => counter!(RETRY_BUDGET_EXHAUSTED).increment(1),
        TurnEvent::TokensUsed {
            upstream,
            model,
            prompt,
            completion,
            ..
        } => {
            let (up, model) = (upstream.to_string(), model.to_string());
            counter!(TOKENS, "upstream" => up.clone(), "model" => model.clone(), "direction" => "in").increment(*prompt);
            counter!(TOKENS, "upstream" => up, "model" => model, "direction" => "out")
                .increment(*completion);
        }
        TurnEvent::BreakerChanged { upstream, to, .. } => {
            gauge!(BREAKER_STATE, "upstream" => upstream.to_string()).set(breaker_value(*to));
            counter!(BREAKER_TRANSITIONS, "upstream" => upstream.to_string(), "to" => to.as_str())
                .increment(1);
        }
        TurnEvent::HealthChanged { upstream, healthy } => {
            gauge!(UPSTREAM_HEALTHY, "upstream" => upstream.to_string()).set(if *healthy {
                1.0
            } else {
                0.0
            })
        }
        TurnEvent::Overhead { overhead, .. } => histogram!(OVERHEAD).record(overhead.as_secs_f64()),
        TurnEvent::TurnFinished {
            outcome,
            elapsed,
            stream,
            ..
        } => {
            let mode = if *stream { "stream" } else { "complete" };
            counter!(TURNS, "outcome" => outcome.label(), "mode" => mode).increment(1);
            histogram!(TURN_DURATION, "mode" => mode).record(elapsed.as_secs_f64());
        }
    }
}

pub fn breaker_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

pub fn events_dropped(n: u64) {
    counter!(EVENTS_DROPPED).increment(n);
}

pub fn http_request(route: &'static str, status: u16) {
    counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// A gauge that goes up while this guard lives: load counters that cannot leak on early
/// return or cancellation.
pub struct ActiveStreamGuard(());

impl ActiveStreamGuard {
    pub fn new() -> Self {
        gauge!(ACTIVE_STREAMS).increment(1.0);
        ActiveStreamGuard(())
    }
}

impl Default for ActiveStreamGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ActiveStreamGuard {
    fn drop(&mut self) {
        gauge!(ACTIVE_STREAMS).decrement(1.0);
    }
}
