//! Bus events as compact JSON for plugins (MQTT bridge, webhooks): `kind` plus ids, names
//! from config, codes and timings in milliseconds — never user text.

use super::{TurnEvent, TurnOutcome};
use serde_json::{json, Value};

/// One bus event as the compact JSON published on MQTT and posted to webhooks: `kind` plus ids, names
/// from config, codes and timings (milliseconds). Events carry no user text, so neither does
/// this. Exhaustive on purpose: a new event kind must be given its JSON here.
pub fn event_json(event: &TurnEvent) -> Value {
    match event {
        TurnEvent::TurnStarted {
            turn,
            origin,
            stream,
        } => json!({"kind": "turn_started", "turn": turn.as_str(), "origin": origin.as_str(),
                    "stream": stream}),
        TurnEvent::StageDecided {
            turn,
            stage,
            decision,
        } => json!({"kind": "stage_decided", "turn": turn.as_str(), "stage": stage,
                    "decision": decision}),
        TurnEvent::Routed {
            turn,
            route,
            reason,
        } => json!({"kind": "routed", "turn": turn.as_str(), "route": route.as_str(),
                    "reason": reason}),
        TurnEvent::Degraded { turn, reason } => {
            json!({"kind": "degraded", "turn": turn.as_str(), "reason": reason})
        }
        TurnEvent::CacheLookup {
            turn,
            outcome,
            similarity,
        } => json!({"kind": "cache_lookup", "turn": turn.as_str(), "outcome": outcome,
                    "similarity": similarity}),
        TurnEvent::RuleMatched { turn, intent } => {
            json!({"kind": "rule_matched", "turn": turn.as_str(), "intent": &**intent})
        }
        TurnEvent::UpstreamAttempt {
            turn,
            upstream,
            attempt,
        } => json!({"kind": "upstream_attempt", "turn": turn.as_str(), "upstream": &**upstream,
                    "attempt": attempt}),
        TurnEvent::UpstreamFinished {
            turn,
            upstream,
            outcome,
            elapsed,
            ttft,
        } => json!({"kind": "upstream_finished", "turn": turn.as_str(), "upstream": &**upstream,
                    "outcome": outcome, "elapsed_ms": ms(*elapsed), "ttft_ms": ttft.map(ms)}),
        TurnEvent::Retry {
            turn,
            upstream,
            reason,
        } => json!({"kind": "retry", "turn": turn.as_str(), "upstream": &**upstream,
                    "reason": reason}),
        TurnEvent::RetryBudgetExhausted { turn } => {
            json!({"kind": "retry_budget_exhausted", "turn": turn.as_str()})
        }
        TurnEvent::PiiMasked {
            turn,
            entity,
            count,
        } => json!({"kind": "pii_masked", "turn": turn.as_str(), "entity": entity, "count": count}),
        TurnEvent::ToolCalled {
            turn,
            tool,
            outcome,
            elapsed,
        } => json!({"kind": "tool_called", "turn": turn.as_str(), "tool": &**tool,
                    "outcome": outcome, "elapsed_ms": ms(*elapsed)}),
        TurnEvent::TokensUsed {
            turn,
            upstream,
            model,
            prompt,
            completion,
        } => json!({"kind": "tokens_used", "turn": turn.as_str(), "upstream": &**upstream,
                    "model": &**model, "prompt": prompt, "completion": completion}),
        TurnEvent::BreakerChanged { upstream, from, to } => {
            json!({"kind": "breaker_changed", "upstream": &**upstream, "from": from.as_str(),
                   "to": to.as_str()})
        }
        TurnEvent::HealthChanged { upstream, healthy } => {
            json!({"kind": "health_changed", "upstream": &**upstream, "healthy": healthy})
        }
        TurnEvent::Overhead { turn, overhead } => {
            json!({"kind": "overhead", "turn": turn.as_str(), "overhead_ms": ms(*overhead)})
        }
        TurnEvent::TurnFinished {
            turn,
            outcome,
            elapsed,
            stream,
        } => {
            let status = match outcome {
                TurnOutcome::Failed { status, .. } => Some(*status),
                TurnOutcome::Ok | TurnOutcome::StreamAborted { .. } | TurnOutcome::ClientGone => {
                    None
                }
            };
            let code = match outcome {
                TurnOutcome::StreamAborted { code } => Some(*code),
                TurnOutcome::Ok | TurnOutcome::Failed { .. } | TurnOutcome::ClientGone => None,
            };
            json!({"kind": "turn_finished", "turn": turn.as_str(), "outcome": outcome.label(),
                   "status": status, "code": code, "elapsed_ms": ms(*elapsed), "stream": stream})
        }
        TurnEvent::JobFinished {
            job,
            status,
            attempts,
        } => {
            json!({"kind": "job_finished", "job": job.as_ref(), "status": status, "attempts": attempts})
        }
        TurnEvent::BudgetThreshold {
            scope,
            period,
            hard,
            spent_usd,
            limit_usd,
        } => json!({"kind": "budget_threshold", "scope": scope.as_ref(), "period": period,
                    "hard": hard, "spent_usd": spent_usd, "limit_usd": limit_usd}),
        TurnEvent::GpuState {
            upstream,
            from,
            to,
            reason,
        } => json!({"kind": "gpu_state", "upstream": &**upstream, "from": from, "to": to,
                    "reason": reason}),
    }
}

/// Milliseconds with microsecond resolution.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
