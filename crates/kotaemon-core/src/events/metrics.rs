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
pub const CACHE_LOOKUPS: &str = "kotaemon_cache_lookups_total";
pub const CACHE_SIMILARITY: &str = "kotaemon_cache_hit_similarity";
pub const CACHE_LOOKUP_TIME: &str = "kotaemon_cache_lookup_seconds";
pub const CACHE_GUARD: &str = "kotaemon_cache_guard_refusals_total";
pub const LOCAL_LOAD: &str = "kotaemon_local_model_load_seconds";
pub const LOCAL_SIZE: &str = "kotaemon_local_model_size_bytes";
pub const LOCAL_TPS: &str = "kotaemon_local_tokens_per_second";
pub const LOCAL_QUEUE: &str = "kotaemon_local_queue_depth";
pub const LOCAL_QUEUE_WAIT: &str = "kotaemon_local_queue_wait_seconds";
pub const ROUTE_DECISIONS: &str = "kotaemon_route_decisions_total";
pub const DEGRADED: &str = "kotaemon_degraded_turns_total";
pub const TOOL_CALLS: &str = "kotaemon_tool_calls_total";
pub const PII_MASKED: &str = "kotaemon_pii_masked_total";
pub const TOOL_DURATION: &str = "kotaemon_tool_duration_seconds";
pub const AUDIT_RECORDS: &str = "kotaemon_audit_records_total";
pub const AUDIT_WRITE_FAILURES: &str = "kotaemon_audit_write_failures_total";
pub const AUTH_REFUSALS: &str = "kotaemon_auth_refusals_total";
pub const RATE_LIMITED: &str = "kotaemon_rate_limited_total";
pub const BUDGET_THRESHOLDS: &str = "kotaemon_budget_thresholds_total";
pub const JOBS_FINISHED: &str = "kotaemon_jobs_finished_total";
pub const COST: &str = "kotaemon_cloud_cost_microusd_total";
pub const SAVED: &str = "kotaemon_cloud_cost_saved_microusd_total";
pub const BUDGET_SPENT: &str = "kotaemon_budget_spent_usd";
pub const TURNS_ANSWERED: &str = "kotaemon_turns_answered_total";
pub const GPU_STATE: &str = "kotaemon_gpu_state";
pub const GPU_TRANSITIONS: &str = "kotaemon_gpu_transitions_total";
pub const GPU_RUNNING: &str = "kotaemon_gpu_running_seconds_total";

/// Histogram buckets: overhead is microseconds, turns are up to minutes.
pub const SIMILARITY_BUCKETS: &[f64] = &[
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0,
];
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
    describe_counter!(
        CACHE_LOOKUPS,
        "Cache lookups, by outcome (hit-exact, hit-semantic, miss, miss-guarded, skipped-…)."
    );
    describe_histogram!(
        CACHE_SIMILARITY,
        "Cosine similarity of semantic cache hits."
    );
    describe_histogram!(
        CACHE_LOOKUP_TIME,
        Unit::Seconds,
        "Cache lookup time (embedding included), by result."
    );
    describe_counter!(
        CACHE_GUARD,
        "Semantic near-misses the precision guard refused, by reason."
    );
    describe_gauge!(
        LOCAL_LOAD,
        Unit::Seconds,
        "Time the local model took to load."
    );
    describe_gauge!(LOCAL_SIZE, Unit::Bytes, "Size of the local model file.");
    describe_histogram!(
        LOCAL_TPS,
        "Local model speed per turn, by phase (prompt, generation)."
    );
    describe_gauge!(
        LOCAL_QUEUE,
        "Turns waiting for the local model when the last one was queued."
    );
    describe_histogram!(
        LOCAL_QUEUE_WAIT,
        Unit::Seconds,
        "Time turns waited for the local model."
    );
    describe_counter!(ROUTE_DECISIONS, "Router decisions, by route and reason.");
    describe_counter!(
        DEGRADED,
        "Turns the local model answered because the cloud could not, by reason."
    );
    describe_counter!(
        TOOL_CALLS,
        "Tool calls the model asked for, by tool (registered name or `unknown`) and outcome."
    );
    describe_histogram!(TOOL_DURATION, Unit::Seconds, "Tool call time, by tool.");
    describe_counter!(
        PII_MASKED,
        "Personal values the guard replaced before anything left the device, by entity kind."
    );
    describe_counter!(AUDIT_RECORDS, "Records written to the audit log, by kind.");
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        "Audit records that could not be written (disk full, permissions)."
    );
    describe_counter!(
        AUTH_REFUSALS,
        "API requests refused for their credentials, by reason (missing, invalid, scope)."
    );
    describe_counter!(
        JOBS_FINISHED,
        "Queued jobs finished, by status (completed, failed)."
    );
    describe_counter!(
        BUDGET_THRESHOLDS,
        "Budget limits crossed, by scope (global or client), period and level (soft, hard)."
    );
    describe_counter!(
        COST,
        "Estimated cloud cost in micro-USD from the price table, by upstream and model."
    );
    describe_counter!(
        SAVED,
        "Estimated cloud cost (micro-USD) avoided by turns answered on the device, by who answered."
    );
    describe_gauge!(
        BUDGET_SPENT,
        "Cloud spending in USD of the current period, by scope and period."
    );
    describe_counter!(
        TURNS_ANSWERED,
        "Finished turns by who answered: rules, cache, local, cloud (or none)."
    );
    describe_counter!(
        RATE_LIMITED,
        "API requests refused by a client key's rate limit, by client name."
    );
    describe_gauge!(
        GPU_STATE,
        "Cloud GPU lifecycle state per upstream: 0 stopped, 1 starting, 2 ready, 3 stopping, 4 preempted."
    );
    describe_counter!(
        GPU_TRANSITIONS,
        "Cloud GPU lifecycle transitions, by upstream and new state."
    );
    describe_counter!(
        GPU_RUNNING,
        Unit::Seconds,
        "Whole seconds a cloud GPU spent starting, ready or stopping (billed time), by upstream."
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
        TurnEvent::PiiMasked { entity, count, .. } => {
            counter!(PII_MASKED, "entity" => *entity).increment(u64::from(*count))
        }
        TurnEvent::ToolCalled {
            tool,
            outcome,
            elapsed,
            ..
        } => {
            counter!(TOOL_CALLS, "tool" => tool.to_string(), "outcome" => *outcome).increment(1);
            histogram!(TOOL_DURATION, "tool" => tool.to_string()).record(elapsed.as_secs_f64());
        }
        TurnEvent::CacheLookup {
            outcome,
            similarity,
            ..
        } => {
            counter!(CACHE_LOOKUPS, "outcome" => *outcome).increment(1);
            if let Some(s) = similarity {
                histogram!(CACHE_SIMILARITY).record(*s as f64);
            }
        }
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
        TurnEvent::JobFinished { status, .. } => {
            counter!(JOBS_FINISHED, "status" => *status).increment(1);
        }
        TurnEvent::BudgetThreshold {
            scope,
            period,
            hard,
            ..
        } => {
            let level = if *hard { "hard" } else { "soft" };
            counter!(BUDGET_THRESHOLDS, "scope" => scope.to_string(), "period" => *period, "level" => level)
                .increment(1);
        }
        TurnEvent::GpuState { upstream, to, .. } => {
            if let Some(state) = crate::cost::lifecycle::GpuState::from_code(to) {
                gauge!(GPU_STATE, "upstream" => upstream.to_string()).set(state.gauge_value());
            }
            counter!(GPU_TRANSITIONS, "upstream" => upstream.to_string(), "to" => *to).increment(1);
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

pub fn local_model_loaded(load: std::time::Duration, size_bytes: u64) {
    gauge!(LOCAL_LOAD).set(load.as_secs_f64());
    gauge!(LOCAL_SIZE).set(size_bytes as f64);
}

pub fn local_queue_depth(depth: usize) {
    gauge!(LOCAL_QUEUE).set(depth as f64);
}

#[cfg(feature = "llama")]
pub fn local_generation(stats: &kotaemon_llama::GenStats) {
    let rate = |tokens: u32, d: std::time::Duration| {
        (d.as_secs_f64() > 0.0).then(|| tokens as f64 / d.as_secs_f64())
    };
    if let Some(r) = rate(stats.prompt_tokens, stats.prompt_time) {
        histogram!(LOCAL_TPS, "phase" => "prompt").record(r);
    }
    if let Some(r) = rate(stats.completion_tokens, stats.generation_time) {
        histogram!(LOCAL_TPS, "phase" => "generation").record(r);
    }
    histogram!(LOCAL_QUEUE_WAIT).record(stats.queue_wait.as_secs_f64());
}

pub fn cache_lookup_time(result: &'static str, d: std::time::Duration) {
    histogram!(CACHE_LOOKUP_TIME, "result" => result).record(d.as_secs_f64());
}

/// Cost counters count micro-dollars: the metrics facade's counters are integers, and a
/// float counter would have to be a gauge (which Prometheus would not treat as monotonic).
pub fn cloud_cost(upstream: &str, model: &str, usd: f64) {
    counter!(COST, "upstream" => upstream.to_string(), "model" => model.to_string())
        .increment(micro(usd));
}

pub fn cloud_cost_saved(answered_by: &'static str, usd: f64) {
    counter!(SAVED, "by" => answered_by).increment(micro(usd));
}

pub fn turn_answered(by: &'static str) {
    counter!(TURNS_ANSWERED, "by" => by).increment(1);
}

pub fn budget_spent(scope: &str, period: &'static str, usd: f64) {
    gauge!(BUDGET_SPENT, "scope" => scope.to_string(), "period" => period).set(usd);
}

fn micro(usd: f64) -> u64 {
    (usd.max(0.0) * 1_000_000.0).round() as u64
}

pub fn audit_record(kind: &'static str) {
    counter!(AUDIT_RECORDS, "kind" => kind).increment(1);
}

pub fn audit_write_failed() {
    counter!(AUDIT_WRITE_FAILURES).increment(1);
}

pub fn auth_refused(reason: &'static str) {
    counter!(AUTH_REFUSALS, "reason" => reason).increment(1);
}

pub fn rate_limited(client: &str) {
    counter!(RATE_LIMITED, "client" => client.to_string()).increment(1);
}

pub fn cache_guard_refusal(reason: &'static str) {
    counter!(CACHE_GUARD, "reason" => reason).increment(1);
}

/// Exports a cloud GPU's series from the start (its state, and zero running seconds).
pub fn gpu_registered(upstream: &str, state_value: f64) {
    gauge!(GPU_STATE, "upstream" => upstream.to_string()).set(state_value);
    counter!(GPU_RUNNING, "upstream" => upstream.to_string()).increment(0);
}

/// Whole seconds a cloud GPU ran since the last report.
pub fn gpu_running_seconds(upstream: &str, secs: u64) {
    counter!(GPU_RUNNING, "upstream" => upstream.to_string()).increment(secs);
}
