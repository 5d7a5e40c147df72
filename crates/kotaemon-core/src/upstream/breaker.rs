//! Per-upstream circuit breaker: one state machine behind one lock, on tokio's clock so tests
//! drive it with a paused clock.
//!
//! Closed --(N failures in a row, or failure rate over a window)--> Open
//! Open --(open_ms elapsed; one probe admitted)--> HalfOpen
//! HalfOpen --(probe succeeds)--> Closed, --(probe fails)--> Open

use crate::events::{BreakerState, EventBus, TurnEvent};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub window: usize,
    pub min_calls: usize,
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_ms: 10_000,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.consecutive_failures == 0 {
            p.push(format!("{path}.consecutive_failures: must be at least 1"));
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            p.push(format!("{path}.failure_rate: must be in (0, 1]"));
        }
        if self.window == 0 || self.min_calls > self.window {
            p.push(format!(
                "{path}.window: must be at least 1 and at least min_calls"
            ));
        }
        if self.open_ms == 0 {
            p.push(format!("{path}.open_ms: must be greater than 0"));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

struct Inner {
    state: State,
    consecutive_failures: u32,
    /// Recent outcomes while closed, `true` = failure.
    window: VecDeque<bool>,
}

/// Whether a call may go ahead, and if it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Rejected,
    Admitted,
    Probe,
}

pub struct Breaker {
    upstream: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    bus: EventBus,
}

impl Breaker {
    pub fn new(upstream: Arc<str>, config: BreakerConfig, bus: EventBus) -> Self {
        let breaker = Breaker {
            upstream,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                window: VecDeque::with_capacity(config.window),
            }),
            config,
            bus,
        };
        // Export the initial state so dashboards see every upstream from the start.
        crate::events::metrics::record(&TurnEvent::BreakerChanged {
            upstream: breaker.upstream.clone(),
            from: BreakerState::Closed,
            to: BreakerState::Closed,
        });
        breaker
    }

    pub fn state(&self) -> BreakerState {
        public(self.lock().state)
    }

    /// Time until an open breaker admits a probe (for Retry-After), if it is open.
    pub fn open_for(&self) -> Option<Duration> {
        match self.lock().state {
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    /// Would `admit` let a call through right now? Does not change state.
    pub fn is_admitting(&self) -> bool {
        match self.lock().state {
            State::Closed => true,
            State::Open { until } => Instant::now() >= until,
            State::HalfOpen { probe_in_flight } => !probe_in_flight,
        }
    }

    pub fn admit(&self) -> Admission {
        let mut inner = self.lock();
        let (admission, change) = match inner.state {
            State::Closed => (Admission::Admitted, None),
            State::Open { until } if Instant::now() >= until => {
                inner.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                (
                    Admission::Probe,
                    Some((BreakerState::Open, BreakerState::HalfOpen)),
                )
            }
            State::Open { .. } => (Admission::Rejected, None),
            State::HalfOpen {
                probe_in_flight: false,
            } => {
                inner.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                (Admission::Probe, None)
            }
            State::HalfOpen {
                probe_in_flight: true,
            } => (Admission::Rejected, None),
        };
        drop(inner);
        self.announce(change);
        admission
    }

    pub fn on_success(&self) {
        let mut inner = self.lock();
        let change = match inner.state {
            State::HalfOpen { .. } => {
                inner.state = State::Closed;
                inner.consecutive_failures = 0;
                inner.window.clear();
                Some((BreakerState::HalfOpen, BreakerState::Closed))
            }
            State::Closed => {
                inner.consecutive_failures = 0;
                self.push_outcome(&mut inner, false);
                None
            }
            // A call admitted before the breaker opened finished fine: no evidence either way.
            State::Open { .. } => None,
        };
        drop(inner);
        self.announce(change);
    }

    pub fn on_failure(&self) {
        let mut inner = self.lock();
        let open_until = Instant::now() + Duration::from_millis(self.config.open_ms);
        let change = match inner.state {
            State::HalfOpen { .. } => {
                inner.state = State::Open { until: open_until };
                Some((BreakerState::HalfOpen, BreakerState::Open))
            }
            State::Closed => {
                inner.consecutive_failures += 1;
                self.push_outcome(&mut inner, true);
                let failures = inner.window.iter().filter(|f| **f).count();
                let rate_tripped = inner.window.len() >= self.config.min_calls.max(1)
                    && failures as f64 / inner.window.len() as f64 >= self.config.failure_rate;
                if inner.consecutive_failures >= self.config.consecutive_failures || rate_tripped {
                    inner.state = State::Open { until: open_until };
                    Some((BreakerState::Closed, BreakerState::Open))
                } else {
                    None
                }
            }
            State::Open { .. } => None,
        };
        drop(inner);
        self.announce(change);
    }

    /// A probe that ended without a verdict (the client went away): let another probe through.
    pub fn release_probe(&self) {
        let mut inner = self.lock();
        if let State::HalfOpen {
            probe_in_flight: true,
        } = inner.state
        {
            inner.state = State::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    fn push_outcome(&self, inner: &mut Inner, failure: bool) {
        if inner.window.len() == self.config.window {
            inner.window.pop_front();
        }
        inner.window.push_back(failure);
    }

    fn announce(&self, change: Option<(BreakerState, BreakerState)>) {
        if let Some((from, to)) = change {
            match to {
                BreakerState::Open => {
                    tracing::warn!(upstream = %self.upstream, "circuit breaker opened")
                }
                BreakerState::Closed => {
                    tracing::info!(upstream = %self.upstream, "circuit breaker closed")
                }
                BreakerState::HalfOpen => {
                    tracing::debug!(upstream = %self.upstream, "circuit breaker half-open")
                }
            }
            self.bus.emit(TurnEvent::BreakerChanged {
                upstream: self.upstream.clone(),
                from,
                to,
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave Inner half-updated in a way that
        // matters more than losing the breaker, so recover the guard.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn public(state: State) -> BreakerState {
    match state {
        State::Closed => BreakerState::Closed,
        State::Open { .. } => BreakerState::Open,
        State::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(consecutive: u32) -> (Breaker, crate::events::Subscription) {
        let bus = EventBus::new(64);
        let sub = bus.subscribe();
        let cfg = BreakerConfig {
            consecutive_failures: consecutive,
            failure_rate: 0.5,
            window: 10,
            min_calls: 6,
            open_ms: 1_000,
        };
        (Breaker::new("u".into(), cfg, bus), sub)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_and_closes() {
        let (b, mut sub) = breaker(3);
        for _ in 0..2 {
            assert_eq!(b.admit(), Admission::Admitted);
            b.on_failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(), Admission::Rejected);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(b.admit(), Admission::Rejected);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.admit(), Admission::Rejected, "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        let mut seen = Vec::new();
        while let Some(e) = sub.try_next() {
            if let TurnEvent::BreakerChanged { to, .. } = *e {
                seen.push(to);
            }
        }
        assert_eq!(
            seen,
            vec![
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_a_full_period() {
        let (b, _sub) = breaker(1);
        b.on_failure();
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(b.admit(), Admission::Probe);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.admit(), Admission::Rejected);
        assert!(b.open_for().unwrap() <= Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_lets_the_next_one_through() {
        let (b, _sub) = breaker(1);
        b.on_failure();
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(b.admit(), Admission::Probe);
        b.release_probe();
        assert_eq!(b.admit(), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_trips_without_consecutive_failures() {
        let (b, _sub) = breaker(100);
        // fail, ok, fail, ok, fail, fail: 4 of 6 failed, never 3 in a row.
        for failed in [true, false, true, false, true, true] {
            if failed {
                b.on_failure()
            } else {
                b.on_success()
            }
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn occasional_failures_keep_it_closed() {
        let (b, _sub) = breaker(3);
        for i in 0..50 {
            if i % 4 == 0 {
                b.on_failure()
            } else {
                b.on_success()
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
