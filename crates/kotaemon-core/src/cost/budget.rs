//! Cloud token budget: a fixed window (e.g. a day) with a token allowance. Tokens the cloud
//! reports are charged after each turn; once the allowance is spent, turns go to the local
//! model (or are refused with 429 `insufficient_quota`) until the window rolls over.
//!
//! The window runs on tokio's clock so tests pause and advance time instead of waiting.
//! Charging happens after the answer, so one turn may overshoot the allowance: a budget stops
//! the *next* turn, it never cuts an answer in half.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Cloud tokens (prompt + completion) allowed per window; 0 means no limit.
    pub cloud_tokens_per_window: u64,
    /// Window length in seconds (86400: a day from the agent's start, then the next day…).
    pub window_secs: u64,
    /// What happens to cloud turns once the allowance is spent.
    pub on_exhausted: OnExhausted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExhausted {
    /// Answer from the local model (refuse when there is none).
    Local,
    /// Refuse cloud turns with 429 `insufficient_quota` and the time until the window resets.
    Reject,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            cloud_tokens_per_window: 0,
            window_secs: 86_400,
            on_exhausted: OnExhausted::Local,
        }
    }
}

impl BudgetConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.window_secs == 0 {
            p.push(format!("{path}.window_secs: must be at least 1"));
        }
    }
}

/// The budget state shared by the router (decides) and the llm stage (charges, enforces).
pub struct CloudBudget {
    allowance: u64,
    window: Duration,
    on_exhausted: OnExhausted,
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    used: u64,
}

/// Why a cloud turn may not run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub policy: OnExhausted,
    /// Time until the window rolls over and the allowance is back.
    pub resets_in: Duration,
}

impl CloudBudget {
    pub fn new(config: &BudgetConfig) -> Self {
        CloudBudget {
            allowance: config.cloud_tokens_per_window,
            window: Duration::from_secs(config.window_secs.max(1)),
            on_exhausted: config.on_exhausted,
            state: Mutex::new(Window {
                started: Instant::now(),
                used: 0,
            }),
        }
    }

    /// A budget that never runs out (tests and embedders that do not care).
    pub fn unlimited() -> Self {
        Self::new(&BudgetConfig::default())
    }

    fn with_window<R>(&self, f: impl FnOnce(&mut Window) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update of two integers:
        // the numbers are still usable.
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(w.started);
        if elapsed >= self.window {
            // Whole windows passed: the new one starts on the window grid, not at `now`.
            let windows = (elapsed.as_nanos() / self.window.as_nanos()) as u32;
            w.started += self.window * windows;
            w.used = 0;
        }
        f(&mut w)
    }

    /// Charges tokens the cloud reported for a turn.
    pub fn charge(&self, tokens: u64) {
        if self.allowance > 0 {
            self.with_window(|w| w.used = w.used.saturating_add(tokens));
        }
    }

    /// `Some` when the allowance of the current window is spent.
    pub fn exhausted(&self) -> Option<Exhausted> {
        if self.allowance == 0 {
            return None;
        }
        self.with_window(|w| {
            (w.used >= self.allowance).then(|| Exhausted {
                policy: self.on_exhausted,
                resets_in: (w.started + self.window).saturating_duration_since(Instant::now()),
            })
        })
    }

    /// Tokens used in the current window.
    pub fn used(&self) -> u64 {
        self.with_window(|w| w.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(tokens: u64, policy: OnExhausted) -> CloudBudget {
        CloudBudget::new(&BudgetConfig {
            cloud_tokens_per_window: tokens,
            window_secs: 60,
            on_exhausted: policy,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn spent_allowance_blocks_until_the_window_rolls_over() {
        let b = budget(100, OnExhausted::Reject);
        b.charge(60);
        assert_eq!(b.exhausted(), None);
        b.charge(60);
        let e = b.exhausted().expect("120 of 100 tokens is exhausted");
        assert_eq!(e.policy, OnExhausted::Reject);
        assert_eq!(e.resets_in, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(
            b.exhausted().map(|e| e.resets_in),
            Some(Duration::from_secs(15))
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(
            b.exhausted(),
            None,
            "a new window starts with a full allowance"
        );
        assert_eq!(b.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn windows_stay_on_their_grid_after_idle_time() {
        let b = budget(10, OnExhausted::Local);
        tokio::time::advance(Duration::from_secs(150)).await;
        b.charge(10);
        // The third window began at 120 s: 30 s left, not 60.
        assert_eq!(
            b.exhausted().map(|e| e.resets_in),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn zero_allowance_means_unlimited() {
        let b = CloudBudget::unlimited();
        b.charge(u64::MAX);
        assert_eq!(b.exhausted(), None);
    }
}
