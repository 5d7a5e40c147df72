//! One GPU's state machine. Every transition goes through [`Machine::go`], which sets the pool
//! member's parked flag, emits the `GpuState` event (metrics follow from it) and logs — so the
//! flag, the event and the state cannot disagree. Time is tokio's; the schedule is read on an
//! injected wall clock, so tests run whole days on a paused clock.

use super::hooks::Hook;
use super::schedule::Schedule;
use super::{GpuConfig, Initially, OnPreempt};
use crate::events::{metrics, BreakerState, EventBus, TurnEvent};
use crate::upstream::pool::Member;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuState {
    Stopped,
    Starting,
    Ready,
    Stopping,
    /// The instance vanished while ready (spot preemption) without us stopping it.
    Preempted,
}

impl GpuState {
    pub const ALL: [GpuState; 5] = [
        GpuState::Stopped,
        GpuState::Starting,
        GpuState::Ready,
        GpuState::Stopping,
        GpuState::Preempted,
    ];

    /// The code in events, metric labels and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuState::Stopped => "stopped",
            GpuState::Starting => "starting",
            GpuState::Ready => "ready",
            GpuState::Stopping => "stopping",
            GpuState::Preempted => "preempted",
        }
    }

    pub fn from_code(code: &str) -> Option<GpuState> {
        Self::ALL.into_iter().find(|s| s.as_str() == code)
    }

    /// `kotaemon_gpu_state`: 0 stopped, 1 starting, 2 ready, 3 stopping, 4 preempted.
    pub fn gauge_value(self) -> f64 {
        match self {
            GpuState::Stopped => 0.0,
            GpuState::Starting => 1.0,
            GpuState::Ready => 2.0,
            GpuState::Stopping => 3.0,
            GpuState::Preempted => 4.0,
        }
    }

    /// Is the instance billing (as far as we know)? A preempted one is gone.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            GpuState::Starting | GpuState::Ready | GpuState::Stopping
        )
    }
}

/// The clock schedules are read on: `Utc::now` in production, one driven by tokio's paused
/// clock in tests.
pub type WallClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Failed probes in a row, while ready, that mean the instance is gone (an open breaker plus
/// one failed probe means the same sooner).
const PREEMPT_AFTER_FAILED_PROBES: u32 = 3;
/// A failed stop hook is tried again after this long: the instance may still be billing.
const STOP_RETRY: Duration = Duration::from_secs(60);
/// The schedule is looked at again at least this often (wall-clock jumps, DST).
const MAX_NAP: Duration = Duration::from_secs(60);

type Next = Option<(GpuState, &'static str)>;

/// Controls the instance behind one pool member. Cheap to clone; [`Controller::spawn`] runs it.
#[derive(Clone)]
pub struct Controller {
    name: Arc<str>,
    member: Arc<Member>,
    start: Arc<dyn Hook>,
    stop: Arc<dyn Hook>,
    idle: Duration,
    ready_timeout: Duration,
    poll: Duration,
    schedule: Option<Schedule>,
    on_preempt: OnPreempt,
    initially: Initially,
    bus: EventBus,
    clock: WallClock,
}

impl Controller {
    pub fn new(
        config: &GpuConfig,
        member: Arc<Member>,
        start: Arc<dyn Hook>,
        stop: Arc<dyn Hook>,
        schedule: Option<Schedule>,
        bus: EventBus,
    ) -> Self {
        Controller {
            name: member.name().clone(),
            member,
            start,
            stop,
            idle: config.idle(),
            ready_timeout: config.ready_timeout(),
            poll: config.poll(),
            schedule,
            on_preempt: config.on_preempt,
            initially: config.initially,
            bus,
            clock: Arc::new(Utc::now),
        }
    }

    /// Reads the schedule on `clock` instead of the system's wall clock.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    pub fn upstream(&self) -> &Arc<str> {
        &self.name
    }

    /// Parks the member at once (unless it is assumed running), so no turn reaches an
    /// instance nobody has seen yet, then runs the state machine until `stop` is cancelled.
    pub fn spawn(&self, stop: CancellationToken, tasks: &TaskTracker) {
        let running = self.initially == Initially::Running;
        self.member.set_parked(!running, !self.is_open());
        metrics::gpu_registered(&self.name, GpuState::Stopped.gauge_value());
        tasks.spawn(self.clone().run(stop));
    }

    /// The state machine. Leaves the instance as it is when `stop` is cancelled: a restart
    /// of the agent should not bounce a GPU that is serving (`initially = "probe"` finds it).
    pub async fn run(self, stop: CancellationToken) {
        let name = self.name.clone();
        let mut m = Machine {
            c: self,
            state: GpuState::Stopped,
            running_since: None,
            running_total: Duration::ZERO,
            reported_secs: 0,
            stop_failed_at: None,
        };
        match m.c.initially {
            Initially::Stopped => {}
            Initially::Running => m.go(GpuState::Ready, "initially_running"),
            Initially::Probe => {
                let probe = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = m.probe() => r,
                };
                match probe {
                    Ok(()) => m.go(GpuState::Ready, "found_running"),
                    Err(code) => {
                        tracing::info!(upstream = %name, probe = code, "GPU not answering at start-up: assuming it is stopped")
                    }
                }
            }
        }
        loop {
            let next = match m.state {
                GpuState::Stopped => m.stopped(&stop).await,
                GpuState::Starting => m.starting(&stop).await,
                GpuState::Ready => m.ready(&stop).await,
                GpuState::Stopping => m.stopping(&stop).await,
                GpuState::Preempted => m.preempted(&stop).await,
            };
            let Some((to, reason)) = next else { break };
            m.go(to, reason);
        }
        m.flush_running();
        tracing::info!(upstream = %name, state = m.state.as_str(), "GPU controller stopped; the instance is left as it is");
    }

    fn is_open(&self) -> bool {
        self.schedule
            .as_ref()
            .is_none_or(|s| s.is_open((self.clock)()))
    }

    fn warm(&self) -> bool {
        self.schedule.as_ref().is_some_and(|s| s.warm)
    }

    /// How long until the schedule may change (at most [`MAX_NAP`]).
    fn nap(&self) -> Duration {
        let Some(s) = &self.schedule else {
            return MAX_NAP;
        };
        let now = (self.clock)();
        s.next_change(now)
            .and_then(|t| (t - now).to_std().ok())
            .map_or(MAX_NAP, |d| d.min(MAX_NAP))
    }
}

/// The running state machine: the controller plus what it tracks between transitions.
struct Machine {
    c: Controller,
    state: GpuState,
    running_since: Option<Instant>,
    /// Closed running intervals, for `kotaemon_gpu_running_seconds_total`.
    running_total: Duration,
    reported_secs: u64,
    /// The last stop hook failed at this time: the stop is owed and retried.
    stop_failed_at: Option<Instant>,
}

impl Machine {
    fn go(&mut self, to: GpuState, reason: &'static str) {
        let from = self.state;
        let now = Instant::now();
        match (from.is_running(), to.is_running()) {
            (false, true) => self.running_since = Some(now),
            (true, false) => {
                if let Some(since) = self.running_since.take() {
                    self.running_total += now - since;
                }
            }
            _ => {}
        }
        self.state = to;
        let member = &self.c.member;
        member.set_parked(to != GpuState::Ready, !self.c.is_open());
        // A wake-up left from turns that wanted the GPU while it started is either served
        // (Ready) or moot (the start failed or is given up): it must not start it again.
        // Demand that arrives while stopping is kept, and starts it once stopped.
        let stale = matches!(
            to,
            GpuState::Starting | GpuState::Ready | GpuState::Stopping
        ) || (from == GpuState::Starting && to == GpuState::Stopped);
        if stale {
            let _ = member.demand.notified().now_or_never();
        }
        if to == GpuState::Starting {
            self.stop_failed_at = None;
        }
        let (name, from_s, to_s) = (&self.c.name, from.as_str(), to.as_str());
        match to {
            GpuState::Preempted => {
                tracing::warn!(upstream = %name, from = from_s, to = to_s, reason, "GPU instance gone while ready (preempted?)")
            }
            _ => {
                tracing::info!(upstream = %name, from = from_s, to = to_s, reason, "GPU state changed")
            }
        }
        self.c.bus.emit(TurnEvent::GpuState {
            upstream: name.clone(),
            from: from_s,
            to: to_s,
            reason,
        });
        self.flush_running();
    }

    /// Adds whole running seconds not yet reported to the counter.
    fn flush_running(&mut self) {
        let total = self.running_total + self.running_since.map_or(Duration::ZERO, |s| s.elapsed());
        let secs = total.as_secs();
        if secs > self.reported_secs {
            let delta = secs - self.reported_secs;
            metrics::gpu_running_seconds(&self.c.name, delta);
            // GPU-hours and their cost go to the usage ledger too (`kotaemon usage`).
            let ledger = self.c.bus.ledger();
            let per_hour = ledger
                .pricing()
                .gpu_hour
                .get(self.c.name.as_ref())
                .copied()
                .unwrap_or(0.0);
            ledger.record_gpu(crate::cost::ledger::GpuRow {
                upstream: self.c.name.to_string(),
                seconds: delta as f64,
                cost_usd: delta as f64 / 3600.0 * per_hour,
            });
            self.reported_secs = secs;
        }
    }

    async fn probe(&self) -> Result<(), &'static str> {
        let timeout = self
            .c
            .poll
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        self.c
            .member
            .upstream
            .probe(timeout)
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    }

    async fn stopped(&mut self, stop: &CancellationToken) -> Next {
        let member = self.c.member.clone();
        let mut was_open = self.c.is_open();
        loop {
            member.set_parked(true, !was_open);
            let retry_at = self.stop_failed_at.map(|t| t + STOP_RETRY);
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = member.demand.notified() => {
                    if self.c.is_open() {
                        return Some((GpuState::Starting, "demand"));
                    }
                    // Outside the schedule a call cannot start it; the pool said `cloud_stopped`.
                }
                _ = tokio::time::sleep(self.c.nap()) => {
                    let open = self.c.is_open();
                    if open && !was_open && self.c.warm() {
                        return Some((GpuState::Starting, "warm"));
                    }
                    was_open = open;
                }
                _ = sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {
                    return Some((GpuState::Stopping, "stop_retry"));
                }
            }
        }
    }

    async fn starting(&mut self, stop: &CancellationToken) -> Next {
        let deadline = Instant::now() + self.c.ready_timeout;
        let hooked = tokio::select! {
            _ = stop.cancelled() => return None,
            r = self.c.start.run() => r,
        };
        if let Err(e) = hooked {
            tracing::error!(upstream = %self.c.name, code = e.code(), error = %e, "GPU start hook failed; the instance stays stopped until the next call");
            return Some((GpuState::Stopped, "start_failed"));
        }
        loop {
            if !self.c.is_open() {
                return Some((GpuState::Stopping, "schedule"));
            }
            let probe = tokio::select! {
                _ = stop.cancelled() => return None,
                r = self.probe() => r,
            };
            let last_error = match probe {
                Ok(()) => return Some((GpuState::Ready, "probe_ok")),
                Err(code) => code,
            };
            self.flush_running();
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(upstream = %self.c.name, last_probe = last_error, "GPU not ready within ready_timeout_secs; stopping it");
                return Some((GpuState::Stopping, "ready_timeout"));
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = sleep_until((now + self.c.poll).min(deadline)) => {}
            }
        }
    }

    async fn ready(&mut self, stop: &CancellationToken) -> Next {
        let member = self.c.member.clone();
        // Readiness was just proven by a probe: no need to wait for the next health check.
        if member.set_healthy(true) {
            self.c.bus.emit(TurnEvent::HealthChanged {
                upstream: self.c.name.clone(),
                healthy: true,
            });
        }
        let entered = Instant::now();
        let mut next_probe = entered + self.c.poll;
        let mut failed_probes = 0u32;
        loop {
            if !self.c.is_open() {
                return Some((GpuState::Stopping, "schedule"));
            }
            let now = Instant::now();
            let idle_at = member.last_used().max(entered) + self.c.idle;
            if now >= idle_at && member.inflight() == 0 {
                // Park first, then look again: a turn that picked the member just before the
                // park holds load by now, and the GPU stays up for it.
                member.set_parked(true, false);
                if member.inflight() == 0 {
                    return Some((GpuState::Stopping, "idle"));
                }
                member.set_parked(false, false);
            }
            if now >= next_probe {
                let probe = tokio::select! {
                    _ = stop.cancelled() => return None,
                    r = self.probe() => r,
                };
                next_probe = Instant::now() + self.c.poll;
                if let Err(code) = probe {
                    failed_probes += 1;
                    let breaker_open = member.breaker.state() == BreakerState::Open;
                    tracing::debug!(upstream = %self.c.name, probe = code, failed_probes, breaker_open, "GPU probe failed while ready");
                    if breaker_open {
                        return Some((GpuState::Preempted, "breaker_open"));
                    }
                    if failed_probes >= PREEMPT_AFTER_FAILED_PROBES {
                        return Some((GpuState::Preempted, "probe_failed"));
                    }
                } else {
                    failed_probes = 0;
                }
                self.flush_running();
                continue;
            }
            let mut wake = next_probe.min(now + self.c.nap());
            if idle_at > now {
                wake = wake.min(idle_at);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = sleep_until(wake) => {}
            }
        }
    }

    async fn stopping(&mut self, stop: &CancellationToken) -> Next {
        let result = tokio::select! {
            _ = stop.cancelled() => return None,
            r = self.c.stop.run() => r,
        };
        match result {
            Ok(()) => {
                self.stop_failed_at = None;
                Some((GpuState::Stopped, "stop_ok"))
            }
            Err(e) => {
                tracing::error!(upstream = %self.c.name, code = e.code(), error = %e, "GPU stop hook failed: the instance may still be running and billing; retrying in 60 s");
                self.stop_failed_at = Some(Instant::now());
                Some((GpuState::Stopped, "stop_failed"))
            }
        }
    }

    async fn preempted(&mut self, stop: &CancellationToken) -> Next {
        if !self.c.is_open() {
            return Some((GpuState::Stopping, "schedule"));
        }
        if self.c.on_preempt == OnPreempt::Restart {
            return Some((GpuState::Starting, "preempt_restart"));
        }
        let member = self.c.member.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = member.demand.notified() => {
                    if self.c.is_open() {
                        return Some((GpuState::Starting, "demand"));
                    }
                }
                _ = tokio::time::sleep(self.c.nap()) => {
                    if !self.c.is_open() {
                        return Some((GpuState::Stopping, "schedule"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
