//! The controller's state machine on a paused clock, with in-memory hooks and upstream.
use super::super::hooks::HookError;
use super::super::{HookConfig, ScheduleConfig, WindowConfig};
use super::*;
use crate::events::Subscription;
use crate::turn::{ChunkStream, Deadline, Route, RouteHints, TurnCtx};
use crate::upstream::breaker::Breaker;
use crate::upstream::pool::{Pool, PoolConfig, PoolError};
use crate::upstream::{Phase, Probe, Upstream, UpstreamError, UpstreamErrorKind};
use crate::wire::{ChatRequest, Completion};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// An instance that answers probes from `up_at` on (boot time), until taken down.
struct FakeGpu {
    name: Arc<str>,
    up_at: Mutex<Option<Instant>>,
}

impl FakeGpu {
    fn boot(&self, after: Duration) {
        *self.up_at.lock().unwrap() = Some(Instant::now() + after);
    }
    fn vanish(&self) {
        *self.up_at.lock().unwrap() = None;
    }
    fn err(&self) -> UpstreamError {
        UpstreamError::new(&self.name, Phase::NotSent, UpstreamErrorKind::Connect)
    }
}

#[async_trait]
impl Upstream for FakeGpu {
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    async fn complete(
        &self,
        _: &ChatRequest,
        _: &str,
        _: Deadline,
    ) -> Result<Completion, UpstreamError> {
        Err(self.err())
    }
    async fn stream(
        &self,
        _: &ChatRequest,
        _: &str,
        _: Deadline,
    ) -> Result<ChunkStream, UpstreamError> {
        Err(self.err())
    }
    async fn probe(&self, _: Duration) -> Result<Probe, UpstreamError> {
        match *self.up_at.lock().unwrap() {
            Some(t) if Instant::now() >= t => Ok(Probe {
                latency: Duration::ZERO,
                models: Vec::new(),
            }),
            _ => Err(self.err()),
        }
    }
}

/// In-memory hook: records when it ran, takes `delay`, fails on demand; a start hook
/// boots the fake GPU, a stop hook takes it down.
struct FakeHook {
    gpu: Arc<FakeGpu>,
    starts: bool,
    boot: Duration,
    delay: Duration,
    fail: AtomicBool,
    calls: Mutex<Vec<Instant>>,
}

impl FakeHook {
    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Hook for FakeHook {
    async fn run(&self) -> Result<(), HookError> {
        self.calls.lock().unwrap().push(Instant::now());
        tokio::time::sleep(self.delay).await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(HookError::Status(500));
        }
        if self.starts {
            self.gpu.boot(self.boot);
        } else {
            self.gpu.vanish();
        }
        Ok(())
    }
}

struct Rig {
    gpu: Arc<FakeGpu>,
    start: Arc<FakeHook>,
    stop: Arc<FakeHook>,
    pool: Arc<Pool>,
    bus: EventBus,
    events: Subscription,
    cancel: CancellationToken,
    tasks: TaskTracker,
    t0: Instant,
}

struct Options {
    boot: Duration,
    start_delay: Duration,
    gpu_up: bool,
    wall: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            boot: Duration::from_secs(5),
            start_delay: Duration::ZERO,
            gpu_up: false,
            // A Monday.
            wall: "2026-03-02T12:00:00Z",
        }
    }
}

fn hook(gpu: &Arc<FakeGpu>, starts: bool, o: &Options) -> Arc<FakeHook> {
    Arc::new(FakeHook {
        gpu: gpu.clone(),
        starts,
        boot: o.boot,
        delay: if starts {
            o.start_delay
        } else {
            Duration::ZERO
        },
        fail: AtomicBool::new(false),
        calls: Mutex::new(Vec::new()),
    })
}

fn rig(config: GpuConfig, o: Options) -> Rig {
    let bus = EventBus::new(1024);
    let gpu = Arc::new(FakeGpu {
        name: "t4".into(),
        up_at: Mutex::new(o.gpu_up.then(Instant::now)),
    });
    let breaker = Breaker::new(gpu.name.clone(), Default::default(), bus.clone());
    let member = crate::upstream::pool::Member::new(gpu.clone(), 1, Default::default(), breaker);
    let pool_config = PoolConfig {
        max_attempts: 1,
        ..PoolConfig::default()
    };
    let pool = Arc::new(Pool::new(vec![member], pool_config, Some(7)));
    let (start, stop) = (hook(&gpu, true, &o), hook(&gpu, false, &o));
    let schedule = config
        .schedule
        .as_ref()
        .map(|s| Schedule::new(s, "gpu[0].schedule").unwrap());
    let t0 = Instant::now();
    let wall0 = DateTime::parse_from_rfc3339(o.wall)
        .unwrap()
        .with_timezone(&Utc);
    let clock: WallClock =
        Arc::new(move || wall0 + chrono::TimeDelta::from_std(t0.elapsed()).unwrap());
    let controller = Controller::new(
        &config,
        pool.members()[0].clone(),
        start.clone(),
        stop.clone(),
        schedule,
        bus.clone(),
    )
    .with_clock(clock);
    let events = bus.subscribe();
    let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
    controller.spawn(cancel.clone(), &tasks);
    Rig {
        gpu,
        start,
        stop,
        pool,
        bus,
        events,
        cancel,
        tasks,
        t0,
    }
}

fn config() -> GpuConfig {
    GpuConfig::new(
        "t4",
        HookConfig::command(&["unused"]),
        HookConfig::command(&["unused"]),
    )
}

fn weekdays(from: &str, to: &str, warm: bool) -> Option<ScheduleConfig> {
    Some(ScheduleConfig {
        timezone: "UTC".into(),
        windows: vec![WindowConfig {
            days: "mon-fri".into(),
            from: from.into(),
            to: to.into(),
        }],
        warm,
    })
}

impl Rig {
    /// The next GPU transition: (from, to, reason, seconds since the rig started).
    async fn next(&mut self) -> (&'static str, &'static str, &'static str, u64) {
        let guard = Duration::from_secs(30 * 86_400);
        loop {
            let e = tokio::time::timeout(guard, self.events.next())
                .await
                .expect("no GPU transition within 30 days of paused time")
                .expect("bus open");
            if let TurnEvent::GpuState {
                from, to, reason, ..
            } = *e
            {
                return (from, to, reason, self.secs(Instant::now()));
            }
        }
    }

    /// No GPU transition happens within `d` (paused time).
    async fn quiet_for(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
        while let Some(e) = self.events.try_next() {
            assert!(
                !matches!(*e, TurnEvent::GpuState { .. }),
                "unexpected transition: {e:?}"
            );
        }
    }

    fn secs(&self, t: Instant) -> u64 {
        (t - self.t0).as_secs()
    }

    fn member(&self) -> &Arc<Member> {
        &self.pool.members()[0]
    }

    /// One cloud turn through the pool, as the llm stage makes it.
    async fn call(&self) -> Result<(), PoolError> {
        let request: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        let ctx = TurnCtx::new(self.bus.clone());
        self.pool
            .complete(
                &ctx,
                &request,
                &RouteHints::default(),
                Route::Cloud,
                Deadline::after(Duration::from_secs(60)),
            )
            .await
            .map(|_| ())
    }

    async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .expect("the controller stops on cancellation");
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_starts_a_stopped_gpu_and_turns_reach_it_once_ready() {
    // initially = probe (default), and the GPU is not answering: assumed stopped.
    let mut r = rig(config(), Options::default());
    assert!(r.member().is_parked());
    let e = r.call().await.unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Parked {
                code: "cloud_starting"
            }
        ),
        "{e:?}"
    );
    assert!(e.cloud_unavailable(), "the local model stands in");
    assert_eq!(r.next().await, ("stopped", "starting", "demand", 0));
    // Booting takes 5 s; readiness is polled every 2 s.
    assert_eq!(r.next().await, ("starting", "ready", "probe_ok", 6));
    assert!(!r.member().is_parked());
    assert_eq!(r.start.calls().len(), 1);
    // Now a candidate again: the call reaches the upstream (whose answer is an error here).
    let e = r.call().await.unwrap_err();
    assert!(
        matches!(&e, PoolError::Failed { last, .. } if last.code() == "upstream_connect"),
        "{e:?}"
    );
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_stop_after_exactly_idle_secs_without_a_call() {
    let mut cfg = config();
    cfg.initially = Initially::Running;
    let mut r = rig(
        cfg,
        Options {
            gpu_up: true,
            ..Options::default()
        },
    );
    assert_eq!(r.next().await, ("stopped", "ready", "initially_running", 0));
    tokio::time::sleep(Duration::from_secs(300)).await;
    let _ = r.call().await;
    let called_at = Instant::now();
    assert_eq!(r.next().await, ("ready", "stopping", "idle", 1200));
    assert_eq!(
        r.stop.calls(),
        vec![called_at + Duration::from_secs(900)],
        "the stop hook runs idle_secs after the last call, not after Ready"
    );
    assert_eq!(r.next().await, ("stopping", "stopped", "stop_ok", 1200));
    assert!(r.member().is_parked());
    assert!(r.start.calls().is_empty());
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_start_outside_the_schedule_window() {
    let mut cfg = config();
    cfg.initially = Initially::Stopped;
    cfg.schedule = weekdays("08:00", "20:00", false);
    // Saturday 10:00 UTC.
    let mut r = rig(
        cfg,
        Options {
            wall: "2026-03-07T10:00:00Z",
            ..Options::default()
        },
    );
    let e = r.call().await.unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Parked {
                code: "cloud_stopped"
            }
        ),
        "{e:?}"
    );
    assert!(e.cloud_unavailable());
    r.quiet_for(Duration::from_secs(6 * 3600)).await;
    assert!(
        r.start.calls().is_empty(),
        "never started outside the window"
    );
    // Monday 08:00 is 46 h after Saturday 10:00; a minute into the window a call starts it.
    tokio::time::sleep(Duration::from_secs(40 * 3600 + 60)).await;
    let e = r.call().await.unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Parked {
                code: "cloud_starting"
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        r.next().await,
        ("stopped", "starting", "demand", 46 * 3600 + 60)
    );
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn warm_start_at_the_window_start_and_stop_at_its_end() {
    let mut cfg = config();
    cfg.initially = Initially::Stopped;
    cfg.idle_secs = 86_400;
    cfg.schedule = weekdays("08:00", "20:00", true);
    // Monday 07:00 UTC: the window opens in an hour.
    let mut r = rig(
        cfg,
        Options {
            wall: "2026-03-02T07:00:00Z",
            boot: Duration::ZERO,
            ..Options::default()
        },
    );
    assert_eq!(r.next().await, ("stopped", "starting", "warm", 3600));
    assert_eq!(r.start.calls(), vec![r.t0 + Duration::from_secs(3600)]);
    assert_eq!(r.next().await, ("starting", "ready", "probe_ok", 3600));
    assert_eq!(
        r.next().await,
        ("ready", "stopping", "schedule", 13 * 3600),
        "stopped when the window closes at 20:00"
    );
    assert_eq!(
        r.next().await,
        ("stopping", "stopped", "stop_ok", 13 * 3600)
    );
    // Tuesday 08:00: warm again.
    assert_eq!(r.next().await, ("stopped", "starting", "warm", 25 * 3600));
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn preemption_while_ready_restarts_the_instance() {
    let mut cfg = config();
    cfg.initially = Initially::Running;
    let mut r = rig(
        cfg,
        Options {
            gpu_up: true,
            boot: Duration::from_secs(30),
            ..Options::default()
        },
    );
    assert_eq!(r.next().await, ("stopped", "ready", "initially_running", 0));
    // Between two probes (every 2 s), so the order of wake-ups cannot matter.
    tokio::time::sleep(Duration::from_secs(101)).await;
    r.gpu.vanish();
    // Probes every 2 s: three failures in a row at 102, 104, 106 s.
    assert_eq!(r.next().await, ("ready", "preempted", "probe_failed", 106));
    assert_eq!(
        r.next().await,
        ("preempted", "starting", "preempt_restart", 106)
    );
    assert!(r.member().is_parked());
    assert_eq!(r.next().await, ("starting", "ready", "probe_ok", 136));
    assert_eq!(r.start.calls().len(), 1);
    assert!(r.stop.calls().is_empty(), "we did not stop it");
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_and_one_failed_probe_mean_preempted() {
    let mut cfg = config();
    cfg.initially = Initially::Running;
    let mut r = rig(
        cfg,
        Options {
            gpu_up: true,
            ..Options::default()
        },
    );
    assert_eq!(r.next().await.1, "ready");
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.gpu.vanish();
    // Turns fail against it until its breaker opens (5 in a row by default).
    for _ in 0..5 {
        let _ = r.call().await;
    }
    assert_eq!(r.member().breaker.state(), BreakerState::Open);
    // The next probe (at 2 s) fails: no need to wait for two more.
    assert_eq!(r.next().await, ("ready", "preempted", "breaker_open", 2));
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn preemption_with_on_preempt_wait_starts_again_only_on_demand() {
    let mut cfg = config();
    cfg.initially = Initially::Running;
    cfg.on_preempt = OnPreempt::Wait;
    let mut r = rig(
        cfg,
        Options {
            gpu_up: true,
            ..Options::default()
        },
    );
    assert_eq!(r.next().await.1, "ready");
    r.gpu.vanish();
    assert_eq!(r.next().await, ("ready", "preempted", "probe_failed", 6));
    r.quiet_for(Duration::from_secs(3600)).await;
    assert!(r.start.calls().is_empty());
    let e = r.call().await.unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Parked {
                code: "cloud_starting"
            }
        ),
        "{e:?}"
    );
    assert_eq!(r.next().await.0, "preempted");
    assert_eq!(r.start.calls().len(), 1);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_hook_goes_back_to_stopped_with_an_event() {
    let mut cfg = config();
    cfg.initially = Initially::Stopped;
    let mut r = rig(
        cfg,
        Options {
            start_delay: Duration::from_secs(10),
            ..Options::default()
        },
    );
    r.start.fail.store(true, Ordering::SeqCst);
    let _ = r.call().await;
    assert_eq!(r.next().await, ("stopped", "starting", "demand", 0));
    // More turns want it while the hook runs: they must not retry a failed start at once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = r.call().await;
    assert_eq!(r.next().await, ("starting", "stopped", "start_failed", 10));
    assert!(r.member().is_parked());
    assert!(r.stop.calls().is_empty());
    r.quiet_for(Duration::from_secs(3600)).await;
    assert_eq!(r.start.calls().len(), 1);
    // A new call tries again.
    r.start.fail.store(false, Ordering::SeqCst);
    let _ = r.call().await;
    assert_eq!(r.next().await.2, "demand");
    assert_eq!(r.start.calls().len(), 2);
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn ready_timeout_stops_the_instance() {
    let mut cfg = config();
    cfg.initially = Initially::Stopped;
    cfg.ready_timeout_secs = 60;
    let mut r = rig(
        cfg,
        Options {
            // Never answers within the timeout.
            boot: Duration::from_secs(3600),
            ..Options::default()
        },
    );
    let _ = r.call().await;
    assert_eq!(r.next().await, ("stopped", "starting", "demand", 0));
    assert_eq!(
        r.next().await,
        ("starting", "stopping", "ready_timeout", 60)
    );
    assert_eq!(r.next().await, ("stopping", "stopped", "stop_ok", 60));
    assert_eq!(r.stop.calls(), vec![r.t0 + Duration::from_secs(60)]);
    assert!(r.member().is_parked());
    r.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_stop_hook_is_retried() {
    let mut cfg = config();
    cfg.initially = Initially::Running;
    cfg.idle_secs = 60;
    let mut r = rig(
        cfg,
        Options {
            gpu_up: true,
            ..Options::default()
        },
    );
    r.stop.fail.store(true, Ordering::SeqCst);
    assert_eq!(r.next().await.1, "ready");
    assert_eq!(r.next().await, ("ready", "stopping", "idle", 60));
    assert_eq!(r.next().await, ("stopping", "stopped", "stop_failed", 60));
    r.stop.fail.store(false, Ordering::SeqCst);
    assert_eq!(r.next().await, ("stopped", "stopping", "stop_retry", 120));
    assert_eq!(r.next().await, ("stopping", "stopped", "stop_ok", 120));
    assert_eq!(r.stop.calls().len(), 2);
    r.shutdown().await;
}

#[test]
fn gauge_values_follow_the_documented_order() {
    let values: Vec<f64> = GpuState::ALL.iter().map(|s| s.gauge_value()).collect();
    assert_eq!(values, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    for s in GpuState::ALL {
        assert_eq!(GpuState::from_code(s.as_str()), Some(s));
    }
}
