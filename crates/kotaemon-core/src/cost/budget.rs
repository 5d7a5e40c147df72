//! Cloud budgets. Two kinds, both charged after each model call:
//! - a token allowance per fixed window (e.g. a day from start-up), on tokio's clock so tests
//!   pause and advance time instead of waiting;
//! - spending limits in USD per calendar day and month (local time), globally and per client
//!   key, priced from `[usage.prices]`, reloaded from the usage ledger at start-up so a restart
//!   does not reset them. Crossing `soft_ratio` of a limit warns (event, metric, log) once per
//!   period; at the limit the policy applies.
//!
//! Once a budget is spent, cloud turns go to the local model (or are refused with 429
//! `insufficient_quota`) until the period rolls over. Charging happens after the answer, so
//! one turn may overshoot: a budget stops the *next* turn, it never cuts an answer in half.

use crate::events::TurnEvent;
use chrono::{DateTime, Datelike, Local, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
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
    /// Cloud spending limits for all clients together, in USD; 0 = none.
    pub daily_usd: f64,
    pub monthly_usd: f64,
    /// Warn once per period when spending passes this share of a limit.
    pub soft_ratio: f64,
    /// Limits per client key (names from `[[server.clients]]`, or `key-N` for `api_keys`).
    pub clients: BTreeMap<String, SpendLimits>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendLimits {
    pub daily_usd: f64,
    pub monthly_usd: f64,
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
            daily_usd: 0.0,
            monthly_usd: 0.0,
            soft_ratio: 0.8,
            clients: BTreeMap::new(),
        }
    }
}

impl BudgetConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.window_secs == 0 {
            p.push(format!("{path}.window_secs: must be at least 1"));
        }
        if !(self.soft_ratio > 0.0 && self.soft_ratio <= 1.0) {
            p.push(format!("{path}.soft_ratio: must be in (0, 1]"));
        }
        let limits = std::iter::once((
            String::new(),
            SpendLimits {
                daily_usd: self.daily_usd,
                monthly_usd: self.monthly_usd,
            },
        ))
        .chain(
            self.clients
                .iter()
                .map(|(k, v)| (format!(".clients.{k}"), *v)),
        );
        for (at, l) in limits {
            for (what, v) in [("daily_usd", l.daily_usd), ("monthly_usd", l.monthly_usd)] {
                if !v.is_finite() || v < 0.0 {
                    p.push(format!("{path}{at}.{what}: must be a non-negative number"));
                }
            }
        }
    }
}

/// The budget state shared by the router (decides) and the llm stage (charges, enforces).
pub struct CloudBudget {
    allowance: u64,
    window: Duration,
    on_exhausted: OnExhausted,
    state: Mutex<Window>,
    global: SpendLimits,
    clients: BTreeMap<String, SpendLimits>,
    soft_ratio: f64,
    /// Spending of the current day and month, by scope ("global" or a client name).
    spent: Mutex<HashMap<Arc<str>, Spend>>,
}

const GLOBAL: &str = "global";

#[derive(Debug, Clone)]
struct Spend {
    day: NaiveDate,
    day_usd: f64,
    month: (i32, u32),
    month_usd: f64,
    /// Thresholds already announced this period: [day soft, day hard, month soft, month hard].
    announced: [bool; 4],
}

impl Spend {
    fn at(now: DateTime<Local>) -> Spend {
        Spend {
            day: now.date_naive(),
            day_usd: 0.0,
            month: (now.year(), now.month()),
            month_usd: 0.0,
            announced: [false; 4],
        }
    }
    /// Starts new periods that began since the last charge.
    fn roll(&mut self, now: DateTime<Local>) {
        if self.month != (now.year(), now.month()) {
            *self = Spend::at(now);
        } else if self.day != now.date_naive() {
            self.day = now.date_naive();
            self.day_usd = 0.0;
            self.announced[0] = false;
            self.announced[1] = false;
        }
    }
}

fn until_local(now: DateTime<Local>, date: Option<NaiveDate>) -> Duration {
    let next = date
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|t| Local.from_local_datetime(&t).earliest());
    next.and_then(|n| (n - now).to_std().ok())
        .unwrap_or(Duration::from_secs(3600))
}

fn next_day(now: DateTime<Local>) -> Duration {
    until_local(now, now.date_naive().succ_opt())
}

fn next_month(now: DateTime<Local>) -> Duration {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    until_local(now, NaiveDate::from_ymd_opt(y, m, 1))
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
            global: SpendLimits {
                daily_usd: config.daily_usd,
                monthly_usd: config.monthly_usd,
            },
            clients: config.clients.clone(),
            soft_ratio: config.soft_ratio,
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// Spending recorded before this start (from the usage ledger): `(client, day, month)`.
    pub fn preload(&self, rows: &[(String, f64, f64)]) {
        let now = Local::now();
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        for (client, day, month) in rows {
            for scope in [GLOBAL, client.as_str()] {
                if scope.is_empty() {
                    continue;
                }
                let s = spent.entry(scope.into()).or_insert_with(|| Spend::at(now));
                s.day_usd += day;
                s.month_usd += month;
            }
        }
    }

    fn limits(&self, scope: &str) -> Option<SpendLimits> {
        if scope == GLOBAL {
            Some(self.global)
        } else {
            self.clients.get(scope).copied()
        }
    }

    /// Charges what a cloud call cost; returns the thresholds crossed by this charge (for the
    /// caller to emit: it has the turn's context).
    pub fn charge_usd(&self, client: Option<&str>, usd: f64) -> Vec<TurnEvent> {
        self.charge_usd_at(client, usd, Local::now())
    }

    fn charge_usd_at(
        &self,
        client: Option<&str>,
        usd: f64,
        now: DateTime<Local>,
    ) -> Vec<TurnEvent> {
        let mut crossed = Vec::new();
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        for scope in std::iter::once(GLOBAL).chain(client) {
            let s = spent.entry(scope.into()).or_insert_with(|| Spend::at(now));
            s.roll(now);
            s.day_usd += usd;
            s.month_usd += usd;
            crate::events::metrics::budget_spent(scope, "day", s.day_usd);
            crate::events::metrics::budget_spent(scope, "month", s.month_usd);
            let Some(limits) = self.limits(scope) else {
                continue;
            };
            let periods = [
                ("day", s.day_usd, limits.daily_usd, 0),
                ("month", s.month_usd, limits.monthly_usd, 2),
            ];
            for (period, value, limit, slot) in periods {
                if limit <= 0.0 {
                    continue;
                }
                for (hard, at, i) in [
                    (false, limit * self.soft_ratio, slot),
                    (true, limit, slot + 1),
                ] {
                    if value >= at && !s.announced[i] {
                        s.announced[i] = true;
                        crossed.push(TurnEvent::BudgetThreshold {
                            scope: scope.into(),
                            period,
                            hard,
                            spent_usd: value,
                            limit_usd: limit,
                        });
                    }
                }
            }
        }
        crossed
    }

    /// `Some` when a cloud turn of `client` may not run now: the token window is spent, or a
    /// global or the client's spending limit is reached.
    pub fn exhausted_for(&self, client: Option<&str>) -> Option<Exhausted> {
        self.exhausted()
            .or_else(|| self.spending_exhausted_at(client, Local::now()))
    }

    fn spending_exhausted_at(
        &self,
        client: Option<&str>,
        now: DateTime<Local>,
    ) -> Option<Exhausted> {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        for scope in std::iter::once(GLOBAL).chain(client) {
            let (Some(limits), Some(s)) = (self.limits(scope), spent.get_mut(scope)) else {
                continue;
            };
            s.roll(now);
            let resets_in = if limits.monthly_usd > 0.0 && s.month_usd >= limits.monthly_usd {
                Some(next_month(now))
            } else if limits.daily_usd > 0.0 && s.day_usd >= limits.daily_usd {
                Some(next_day(now))
            } else {
                None
            };
            if let Some(resets_in) = resets_in {
                return Some(Exhausted {
                    policy: self.on_exhausted,
                    resets_in,
                });
            }
        }
        None
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
            ..BudgetConfig::default()
        })
    }

    fn local(y: i32, m: u32, d: u32, h: u32) -> DateTime<Local> {
        Local
            .from_local_datetime(
                &NaiveDate::from_ymd_opt(y, m, d)
                    .unwrap()
                    .and_hms_opt(h, 0, 0)
                    .unwrap(),
            )
            .earliest()
            .unwrap()
    }

    fn spending() -> CloudBudget {
        let mut clients = BTreeMap::new();
        clients.insert(
            "panel".to_string(),
            SpendLimits {
                daily_usd: 1.0,
                monthly_usd: 0.0,
            },
        );
        CloudBudget::new(&BudgetConfig {
            daily_usd: 10.0,
            monthly_usd: 25.0,
            soft_ratio: 0.8,
            clients,
            on_exhausted: OnExhausted::Reject,
            ..BudgetConfig::default()
        })
    }

    fn levels(events: &[TurnEvent]) -> Vec<(String, &'static str, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                TurnEvent::BudgetThreshold {
                    scope,
                    period,
                    hard,
                    ..
                } => Some((scope.to_string(), *period, *hard)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn spending_warns_once_then_stops_the_client_and_everyone_per_period() {
        let b = spending();
        let morning = local(2026, 11, 25, 9);
        assert!(levels(&b.charge_usd_at(Some("panel"), 0.5, morning)).is_empty());
        assert_eq!(
            levels(&b.charge_usd_at(Some("panel"), 0.35, morning)),
            vec![("panel".into(), "day", false)],
            "80% of the panel's 1 USD"
        );
        assert!(
            b.charge_usd_at(Some("panel"), 0.01, morning).is_empty(),
            "warned once"
        );
        assert_eq!(b.spending_exhausted_at(Some("panel"), morning), None);
        assert_eq!(
            levels(&b.charge_usd_at(Some("panel"), 0.2, morning)),
            vec![("panel".into(), "day", true)]
        );
        let stop = b.spending_exhausted_at(Some("panel"), morning).unwrap();
        assert_eq!(
            stop.resets_in,
            Duration::from_secs(15 * 3600),
            "until midnight"
        );
        assert_eq!(
            b.spending_exhausted_at(Some("speaker"), morning),
            None,
            "others go on"
        );
        // The next day the panel may spend again; the month keeps counting.
        let next = local(2026, 11, 26, 9);
        assert_eq!(b.spending_exhausted_at(Some("panel"), next), None);
        let crossed = levels(&b.charge_usd_at(Some("speaker"), 9.0, next));
        assert_eq!(crossed, vec![("global".into(), "day", false)]);
        // A new day: both of the day's thresholds at once, and the month passes 80% of 25.
        let crossed = levels(&b.charge_usd_at(None, 10.0, local(2026, 11, 27, 9)));
        assert_eq!(
            crossed,
            vec![
                ("global".into(), "day", false),
                ("global".into(), "day", true),
                ("global".into(), "month", false)
            ]
        );
        let crossed = levels(&b.charge_usd_at(None, 5.0, local(2026, 11, 28, 8)));
        assert_eq!(crossed, vec![("global".into(), "month", true)]);
        let stop = b
            .spending_exhausted_at(None, local(2026, 11, 28, 9))
            .unwrap();
        assert_eq!(stop.policy, OnExhausted::Reject);
        assert_eq!(
            stop.resets_in,
            Duration::from_secs(2 * 86400 + 15 * 3600),
            "until December"
        );
        assert_eq!(b.spending_exhausted_at(None, local(2026, 12, 1, 0)), None);
    }

    #[test]
    fn spending_from_before_a_restart_counts() {
        let b = spending();
        b.preload(&[("panel".into(), 1.2, 3.0), ("".into(), 0.5, 0.5)]);
        assert!(b.exhausted_for(Some("panel")).is_some());
        assert!(b.exhausted_for(Some("speaker")).is_none());
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
