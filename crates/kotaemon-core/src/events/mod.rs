//! The typed event bus. Emitting an event updates metrics and the log synchronously, then fans
//! it out on a bounded broadcast channel to subscribers (plugins, MQTT, the panel). A slow
//! subscriber loses events and counts the loss; a turn never waits for a subscriber.
//!
//! Events carry ids, names from config, counts, timings and codes — never user text or secrets.

pub mod json;
pub mod metrics;

use crate::audit::AuditLog;
use crate::cost::Ledger;
use crate::turn::{Origin, Route, TurnId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Breaker states, in the order of their gauge values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Debug, Clone)]
pub enum TurnEvent {
    TurnStarted {
        turn: TurnId,
        origin: Origin,
        stream: bool,
    },
    /// A stage took a decision (answered, passed, changed the request).
    StageDecided {
        turn: TurnId,
        stage: &'static str,
        decision: &'static str,
    },
    /// The router chose where the model call goes, and why.
    Routed {
        turn: TurnId,
        route: Route,
        reason: &'static str,
    },
    /// The cloud could not answer before its first byte; the local model did.
    Degraded {
        turn: TurnId,
        reason: &'static str,
    },
    /// The cache was consulted: `outcome` is hit-exact, hit-semantic, miss, miss-guarded,
    /// bypass, refresh, timeout, error or skipped-….
    CacheLookup {
        turn: TurnId,
        outcome: &'static str,
        similarity: Option<f32>,
    },
    /// A local rule answered the turn.
    RuleMatched {
        turn: TurnId,
        intent: Arc<str>,
    },
    UpstreamAttempt {
        turn: TurnId,
        upstream: Arc<str>,
        attempt: u32,
    },
    /// One upstream call ended: `outcome` is "ok" or an error code.
    UpstreamFinished {
        turn: TurnId,
        upstream: Arc<str>,
        outcome: &'static str,
        elapsed: Duration,
        /// Streams only: time until the upstream committed (first event).
        ttft: Option<Duration>,
    },
    Retry {
        turn: TurnId,
        upstream: Arc<str>,
        reason: &'static str,
    },
    /// A retry was wanted but the retry budget was spent.
    RetryBudgetExhausted {
        turn: TurnId,
    },
    /// The tool loop ran (or refused to run) a tool the model asked for. `tool` is a
    /// registered name or "unknown"; `outcome` is ok, invalid_arguments, failed, timeout,
    /// internal, pending_confirmation or rejected.
    ToolCalled {
        turn: TurnId,
        tool: Arc<str>,
        outcome: &'static str,
        elapsed: Duration,
    },
    /// The PII guard replaced `count` values of one kind (never the values themselves).
    PiiMasked {
        turn: TurnId,
        entity: &'static str,
        count: u32,
    },
    TokensUsed {
        turn: TurnId,
        upstream: Arc<str>,
        model: Arc<str>,
        prompt: u64,
        completion: u64,
    },
    BreakerChanged {
        upstream: Arc<str>,
        from: BreakerState,
        to: BreakerState,
    },
    HealthChanged {
        upstream: Arc<str>,
        healthy: bool,
    },
    /// Gateway time not spent waiting for the upstream (to the first byte for streams).
    Overhead {
        turn: TurnId,
        overhead: Duration,
    },
    TurnFinished {
        turn: TurnId,
        outcome: TurnOutcome,
        elapsed: Duration,
        stream: bool,
    },
    /// A queued job finished: `status` is "completed" or "failed". Plugins (the MQTT bridge,
    /// webhooks) turn this into a notification; the job id is the receiver's idempotency key.
    JobFinished {
        job: Arc<str>,
        status: &'static str,
        attempts: u32,
    },
    /// Cloud spending crossed the soft limit (`hard: false`) or the hard limit of a budget.
    /// `scope` is "global" or a client name from config; `period` "day" or "month".
    BudgetThreshold {
        scope: Arc<str>,
        period: &'static str,
        hard: bool,
        spent_usd: f64,
        limit_usd: f64,
    },
    /// A self-hosted cloud GPU changed state (`cost::lifecycle::GpuState` codes: stopped,
    /// starting, ready, stopping, preempted); `reason` is a code such as demand, idle, warm,
    /// schedule, probe_ok, ready_timeout, start_failed, probe_failed.
    GpuState {
        upstream: Arc<str>,
        from: &'static str,
        to: &'static str,
        reason: &'static str,
    },
}

impl TurnEvent {
    /// The turn an event belongs to; `None` for events about upstreams.
    pub fn turn_id(&self) -> Option<&TurnId> {
        match self {
            TurnEvent::TurnStarted { turn, .. }
            | TurnEvent::StageDecided { turn, .. }
            | TurnEvent::Routed { turn, .. }
            | TurnEvent::Degraded { turn, .. }
            | TurnEvent::CacheLookup { turn, .. }
            | TurnEvent::RuleMatched { turn, .. }
            | TurnEvent::UpstreamAttempt { turn, .. }
            | TurnEvent::UpstreamFinished { turn, .. }
            | TurnEvent::Retry { turn, .. }
            | TurnEvent::RetryBudgetExhausted { turn }
            | TurnEvent::ToolCalled { turn, .. }
            | TurnEvent::PiiMasked { turn, .. }
            | TurnEvent::TokensUsed { turn, .. }
            | TurnEvent::Overhead { turn, .. }
            | TurnEvent::TurnFinished { turn, .. } => Some(turn),
            TurnEvent::BreakerChanged { .. }
            | TurnEvent::HealthChanged { .. }
            | TurnEvent::BudgetThreshold { .. }
            | TurnEvent::GpuState { .. }
            | TurnEvent::JobFinished { .. } => None,
        }
    }
}

/// How a turn ended, as a bounded code for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnOutcome {
    Ok,
    /// An error before anything was sent to the client: `code` is the API error code.
    Failed {
        status: u16,
        code: &'static str,
    },
    /// A stream that had started ended with an error event.
    StreamAborted {
        code: &'static str,
    },
    /// The client went away before the end.
    ClientGone,
}

impl TurnOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            TurnOutcome::Ok => "ok",
            TurnOutcome::Failed { code, .. } => code,
            TurnOutcome::StreamAborted { .. } => "stream_aborted",
            TurnOutcome::ClientGone => "client_gone",
        }
    }
}

/// Where turns report: the broadcast of typed events (metrics, plugins, MQTT) and the durable
/// audit log (what left the device). Cheap to clone; one per process (or per test app).
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<TurnEvent>>,
    audit: AuditLog,
    ledger: Ledger,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventBus {
            tx,
            audit: AuditLog::disabled(),
            ledger: Ledger::disabled(),
        }
    }

    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = ledger;
        self
    }

    /// The usage ledger (tokens, cost, who answered) and its price table.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn emit(&self, event: TurnEvent) {
        metrics::record(&event);
        if self.tx.receiver_count() > 0 {
            // Err only means no subscriber is left; events are fire-and-forget by design.
            let _ = self.tx.send(Arc::new(event));
        }
    }

    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
        }
    }
}

/// A subscriber's end. Lagging behind drops the oldest events and counts them.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<TurnEvent>>,
}

impl Subscription {
    /// The next event, or `None` when the bus is gone.
    pub async fn next(&mut self) -> Option<Arc<TurnEvent>> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => metrics::events_dropped(n),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    pub fn try_next(&mut self) -> Option<Arc<TurnEvent>> {
        loop {
            match self.rx.try_recv() {
                Ok(e) => return Some(e),
                Err(broadcast::error::TryRecvError::Lagged(n)) => metrics::events_dropped(n),
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slow_subscriber_loses_events_but_emit_never_blocks() {
        let bus = EventBus::new(16);
        let mut sub = bus.subscribe();
        for _ in 0..100 {
            bus.emit(TurnEvent::RetryBudgetExhausted {
                turn: TurnId::new(),
            });
        }
        let mut seen = 0;
        while sub.try_next().is_some() {
            seen += 1;
        }
        assert_eq!(
            seen, 16,
            "the newest 16 are kept, the rest counted as dropped"
        );
    }
}
