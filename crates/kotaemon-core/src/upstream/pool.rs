//! The cloud pool: picks an upstream by power-of-two-choices on requests in flight (weighted),
//! skips upstreams whose breaker is open, that failed health checks or asked us to back off
//! (429 Retry-After), and fails over before the commit point within a retry budget.
//! After commit nothing is retried: the stream ends with an error instead.

use super::breaker::{Admission, Breaker, BreakerConfig};
use super::health::HealthConfig;
use super::{Upstream, UpstreamError};
use crate::audit::AuditEntry;
use crate::events::TurnEvent;
use crate::turn::{ChunkStream, Deadline, Route, RouteHints, TurnCtx};
use crate::wire::{ChatRequest, Completion};
use futures::future::BoxFuture;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub max_attempts: u32,
    pub retry_budget_ratio: f32,
    pub retry_budget_min_per_s: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_jitter: f64,
    pub breaker: BreakerConfig,
    pub health: HealthConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_attempts: 3,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_s: 5,
            backoff_base_ms: 25,
            backoff_max_ms: 1_000,
            backoff_jitter: 0.5,
            breaker: BreakerConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

impl PoolConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.max_attempts == 0 {
            p.push(format!("{path}.max_attempts: must be at least 1"));
        }
        if !(0.0..=1000.0).contains(&self.retry_budget_ratio) {
            p.push(format!(
                "{path}.retry_budget_ratio: must be between 0 and 1000"
            ));
        }
        if !(0.0..=1.0).contains(&self.backoff_jitter) {
            p.push(format!("{path}.backoff_jitter: must be between 0 and 1"));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            p.push(format!(
                "{path}.backoff_max_ms: must be at least backoff_base_ms"
            ));
        }
        self.breaker.validate(&format!("{path}.breaker"), p);
        self.health.validate(&format!("{path}.health"), p);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no upstream serves model `{model}`")]
    UnknownModel { model: String },
    #[error("no local model is configured (see [local] and `kotaemon models install`)")]
    NoLocalModel,
    #[error("no upstream is named `{name}`")]
    UnknownUpstream { name: String },
    #[error(
        "every upstream for this request is unavailable (circuit open, unhealthy or backing off)"
    )]
    Unavailable { retry_after: Option<Duration> },
    #[error("{last} (after {attempts} attempt(s))")]
    Failed { last: UpstreamError, attempts: u32 },
    /// Every cloud candidate is a GPU that is off (`cost::lifecycle`): `code` is
    /// `cloud_starting` (asking for it started it) or `cloud_stopped` (outside its schedule).
    #[error("the cloud GPU for this request is not running ({code}); it starts on demand within its schedule")]
    Parked { code: &'static str },
}

impl PoolError {
    /// Could the local model stand in? Yes when the cloud is down, open, busy or too slow
    /// before its first byte; no when the request itself was refused or time is up.
    pub fn cloud_unavailable(&self) -> bool {
        match self {
            PoolError::Unavailable { .. } | PoolError::Parked { .. } => true,
            PoolError::Failed { last, .. } => last.retryable(),
            PoolError::UnknownModel { .. }
            | PoolError::UnknownUpstream { .. }
            | PoolError::NoLocalModel => false,
        }
    }
}

/// One upstream in the pool with its breaker, load and health.
pub struct Member {
    pub upstream: Arc<dyn Upstream>,
    pub weight: u32,
    /// Client model name -> upstream model name; empty = pass names through.
    pub models: BTreeMap<String, String>,
    pub breaker: Breaker,
    /// The on-device model: only chosen when a turn is routed local (by the router, the
    /// client, or fallback), never as a cloud candidate.
    pub is_local: bool,
    inflight: AtomicUsize,
    healthy: AtomicBool,
    cooldown_until: Mutex<Option<Instant>>,
    discovered: Mutex<Vec<String>>,
    /// Set by the GPU lifecycle controller while the instance is not ready: no candidate.
    parked: AtomicBool,
    /// Parked and not to be started now (outside its schedule).
    off_schedule: AtomicBool,
    /// Notified when a turn wanted this member while parked: that starts the instance.
    pub demand: tokio::sync::Notify,
    /// Start or end of the latest call: the lifecycle controller's idle clock.
    last_used: Mutex<Instant>,
}

impl Member {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        weight: u32,
        models: BTreeMap<String, String>,
        breaker: Breaker,
    ) -> Self {
        Member {
            upstream,
            weight: weight.max(1),
            models,
            breaker,
            is_local: false,
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            cooldown_until: Mutex::new(None),
            discovered: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            off_schedule: AtomicBool::new(false),
            demand: tokio::sync::Notify::new(),
            last_used: Mutex::new(Instant::now()),
        }
    }

    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }

    pub fn is_off_schedule(&self) -> bool {
        self.off_schedule.load(Ordering::SeqCst)
    }

    /// The lifecycle controller parks a member while its instance is not ready.
    pub fn set_parked(&self, parked: bool, off_schedule: bool) {
        self.off_schedule.store(off_schedule, Ordering::SeqCst);
        self.parked.store(parked, Ordering::SeqCst);
    }

    pub fn last_used(&self) -> Instant {
        *lock(&self.last_used)
    }

    pub fn name(&self) -> &Arc<str> {
        self.upstream.name()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Set by health checks; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    pub fn set_discovered_models(&self, models: Vec<String>) {
        *lock(&self.discovered) = models;
    }

    pub fn discovered_models(&self) -> Vec<String> {
        lock(&self.discovered).clone()
    }

    /// Marks this member as the on-device model.
    pub fn local(mut self) -> Self {
        self.is_local = true;
        self
    }

    /// The upstream's name for `model`, if it serves it. The local model answers whatever
    /// name a turn routed to it carries.
    fn upstream_model(&self, model: &str) -> Option<String> {
        if self.models.is_empty() || self.is_local {
            Some(model.to_string())
        } else {
            self.models.get(model).cloned()
        }
    }

    /// A bounded label for metrics: configured or discovered names only.
    fn model_label(&self, model: &str) -> Arc<str> {
        if self.models.contains_key(model) || lock(&self.discovered).iter().any(|m| m == model) {
            model.into()
        } else {
            "unlisted".into()
        }
    }

    fn cooling_for(&self, now: Instant) -> Option<Duration> {
        lock(&self.cooldown_until).and_then(|until| (until > now).then(|| until - now))
    }

    fn cool_down(&self, d: Duration) {
        *lock(&self.cooldown_until) = Some(Instant::now() + d);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds one unit of load on a member for as long as the call (or its stream) lives.
struct InflightGuard(Arc<Member>);

impl InflightGuard {
    fn new(member: Arc<Member>) -> Self {
        member.inflight.fetch_add(1, Ordering::Relaxed);
        *lock(&member.last_used) = Instant::now();
        InflightGuard(member)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        *lock(&self.0.last_used) = Instant::now();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted call: load held, breaker verdict owed. Dropped without a verdict (client went
/// away), a half-open probe is released so the breaker does not stay stuck.
struct Attempt {
    load: InflightGuard,
    probe: bool,
    settled: bool,
    started: Instant,
}

impl Attempt {
    fn member(&self) -> &Arc<Member> {
        &self.load.0
    }
    fn succeeded(&mut self) {
        self.settled = true;
        self.member().breaker.on_success();
    }
    fn failed(&mut self, e: &UpstreamError) {
        self.settled = true;
        if e.is_upstream_fault() {
            self.member().breaker.on_failure();
        } else if self.probe {
            self.member().breaker.release_probe();
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.member().breaker.release_probe();
        }
    }
}

/// Which upstream answered, and the model label for metrics.
#[derive(Debug, Clone)]
pub struct Served {
    pub upstream: Arc<str>,
    pub model_label: Arc<str>,
    /// The local model answered (its tokens cost no cloud budget).
    pub local: bool,
}

pub struct Pool {
    members: Vec<Arc<Member>>,
    config: PoolConfig,
    budget: TpsBudget,
    rng: Mutex<StdRng>,
}

impl Pool {
    /// `seed` makes balancing and jitter reproducible in tests.
    pub fn new(members: Vec<Member>, config: PoolConfig, seed: Option<u64>) -> Self {
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.retry_budget_min_per_s,
            config.retry_budget_ratio,
        );
        let rng = seed
            .map(StdRng::seed_from_u64)
            .unwrap_or_else(StdRng::from_entropy);
        Pool {
            members: members.into_iter().map(Arc::new).collect(),
            config,
            budget,
            rng: Mutex::new(rng),
        }
    }

    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Is at least one upstream able to take a call right now?
    /// Is at least one upstream (cloud or local) able to take a call right now?
    pub fn is_ready(&self) -> bool {
        self.members.iter().any(|m| self.admitting(m))
    }

    /// Is at least one cloud upstream able to take a call right now?
    pub fn cloud_ready(&self) -> bool {
        self.members
            .iter()
            .any(|m| !m.is_local && self.admitting(m))
    }

    pub fn has_local(&self) -> bool {
        self.members.iter().any(|m| m.is_local)
    }

    /// Does `model` name the local model (so asking for it by name routes local)?
    pub fn is_local_model_name(&self, model: &str) -> bool {
        self.members
            .iter()
            .any(|m| m.is_local && m.name().as_ref() == model)
    }

    /// A parked GPU counts: only a turn sent its way can start it (or learn why it cannot).
    fn admitting(&self, m: &Member) -> bool {
        m.is_parked()
            || (m.is_healthy()
                && m.breaker.is_admitting()
                && m.cooling_for(Instant::now()).is_none())
    }

    /// Models clients may ask for: configured names, plus what pass-through upstreams report.
    pub fn models(&self) -> Vec<(String, Arc<str>)> {
        let mut out: BTreeMap<String, Arc<str>> = BTreeMap::new();
        for m in &self.members {
            let names = if m.models.is_empty() {
                m.discovered_models()
            } else {
                m.models.keys().cloned().collect()
            };
            for n in names {
                out.entry(n).or_insert_with(|| m.name().clone());
            }
        }
        out.into_iter().collect()
    }

    fn candidates(
        &self,
        model: &str,
        hints: &RouteHints,
        route: Route,
    ) -> Result<Vec<(Arc<Member>, String)>, PoolError> {
        let pinned = match &hints.upstream {
            Some(name) => Some(
                self.members
                    .iter()
                    .find(|m| m.name().as_ref() == name.as_str())
                    .ok_or_else(|| PoolError::UnknownUpstream { name: name.clone() })?,
            ),
            None => None,
        };
        let local = route == Route::Local;
        let list: Vec<_> = self
            .members
            .iter()
            .filter(|m| m.is_local == local)
            .filter(|m| pinned.is_none_or(|p| Arc::ptr_eq(p, m)))
            .filter_map(|m| m.upstream_model(model).map(|um| (m.clone(), um)))
            .collect();
        if list.is_empty() {
            return Err(match route {
                Route::Local => PoolError::NoLocalModel,
                Route::Cloud => PoolError::UnknownModel {
                    model: model.to_string(),
                },
            });
        }
        Ok(list)
    }

    /// Power of two choices among members that can take a call, preferring ones not yet tried
    /// and healthy ones (health checks are advice: if every one failed its check, still try).
    fn pick(&self, candidates: &[(Arc<Member>, String)], tried: &[bool]) -> Option<usize> {
        let now = Instant::now();
        let usable = |i: &usize| {
            let m = &candidates[*i].0;
            !m.is_parked() && m.breaker.is_admitting() && m.cooling_for(now).is_none()
        };
        let all: Vec<usize> = (0..candidates.len()).filter(usable).collect();
        let tiers = [
            all.iter()
                .copied()
                .filter(|i| !tried[*i] && candidates[*i].0.is_healthy())
                .collect::<Vec<_>>(),
            all.iter().copied().filter(|i| !tried[*i]).collect(),
            all.iter()
                .copied()
                .filter(|i| candidates[*i].0.is_healthy())
                .collect(),
            all.clone(),
        ];
        let eligible = tiers.into_iter().find(|t| !t.is_empty())?;
        if eligible.len() == 1 {
            return Some(eligible[0]);
        }
        let (a, b) = {
            let mut rng = lock(&self.rng);
            let a = rng.gen_range(0..eligible.len());
            let mut b = rng.gen_range(0..eligible.len() - 1);
            if b >= a {
                b += 1;
            }
            (eligible[a], eligible[b])
        };
        let load = |i: usize| {
            let m = &candidates[i].0;
            (m.inflight() as u64 + 1) * 1_000_000 / m.weight as u64
        };
        Some(if load(b) < load(a) { b } else { a })
    }

    fn unavailable(&self, candidates: &[(Arc<Member>, String)]) -> PoolError {
        if candidates.iter().all(|(m, _)| m.is_parked()) {
            let startable = candidates.iter().any(|(m, _)| !m.is_off_schedule());
            return PoolError::Parked {
                code: if startable {
                    "cloud_starting"
                } else {
                    "cloud_stopped"
                },
            };
        }
        let now = Instant::now();
        let retry_after = candidates
            .iter()
            .filter_map(|(m, _)| match (m.breaker.open_for(), m.cooling_for(now)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            })
            .min();
        PoolError::Unavailable { retry_after }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << retry.min(16))
            .min(self.config.backoff_max_ms);
        let jitter = self.config.backoff_jitter;
        let factor = if jitter > 0.0 {
            lock(&self.rng).gen_range((1.0 - jitter)..=(1.0 + jitter))
        } else {
            1.0
        };
        Duration::from_secs_f64(exp as f64 / 1000.0 * factor)
    }

    /// The failover loop shared by complete and stream: up to `max_attempts` admitted calls,
    /// retries within the budget and only for retryable (pre-commit) errors.
    async fn attempt<T>(
        &self,
        ctx: &TurnCtx,
        request: &ChatRequest,
        hints: &RouteHints,
        route: Route,
        deadline: Deadline,
        call: impl for<'a> Fn(
            &'a dyn Upstream,
            &'a ChatRequest,
            &'a str,
        ) -> BoxFuture<'a, Result<T, UpstreamError>>,
    ) -> Result<(T, Attempt, Served), PoolError> {
        let candidates = self.candidates(&request.model, hints, route)?;
        // A parked GPU is no candidate, but wanting it is what starts it.
        for (m, _) in candidates.iter().filter(|(m, _)| m.is_parked()) {
            m.demand.notify_one();
        }
        let mut tried = vec![false; candidates.len()];
        self.budget.deposit();
        let mut last: Option<UpstreamError> = None;
        let mut attempts = 0u32;
        while attempts < self.config.max_attempts {
            let Some(i) = self.pick(&candidates, &tried) else {
                break;
            };
            let (member, upstream_model) = &candidates[i];
            let admission = member.breaker.admit();
            if admission == Admission::Rejected {
                tried[i] = true;
                continue;
            }
            if attempts > 0 {
                if !self.budget.withdraw() {
                    ctx.emit(TurnEvent::RetryBudgetExhausted {
                        turn: ctx.id.clone(),
                    });
                    if admission == Admission::Probe {
                        member.breaker.release_probe();
                    }
                    break;
                }
                let reason = last
                    .as_ref()
                    .map(UpstreamError::code)
                    .unwrap_or("unavailable");
                ctx.emit(TurnEvent::Retry {
                    turn: ctx.id.clone(),
                    upstream: member.name().clone(),
                    reason,
                });
            }
            attempts += 1;
            tried[i] = true;
            ctx.emit(TurnEvent::UpstreamAttempt {
                turn: ctx.id.clone(),
                upstream: member.name().clone(),
                attempt: attempts,
            });
            let mut attempt = Attempt {
                load: InflightGuard::new(member.clone()),
                probe: admission == Admission::Probe,
                settled: false,
                started: Instant::now(),
            };
            let audit = ctx.bus.audit();
            if !member.is_local && audit.is_enabled() {
                // Write-ahead: the record is on disk before the request leaves.
                audit
                    .record(AuditEntry::UpstreamRequest {
                        turn: ctx.id.to_string(),
                        upstream: member.name().to_string(),
                        model: upstream_model.to_string(),
                        attempt: attempts,
                        request: serde_json::to_value(request).unwrap_or_default(),
                    })
                    .await;
            }
            match call(member.upstream.as_ref(), request, upstream_model).await {
                Ok(value) => {
                    attempt.succeeded();
                    ctx.add_upstream_wait(attempt.started.elapsed());
                    let served = Served {
                        upstream: member.name().clone(),
                        model_label: member.model_label(&request.model),
                        local: member.is_local,
                    };
                    return Ok((value, attempt, served));
                }
                Err(e) => {
                    attempt.failed(&e);
                    if let Some(d) = e
                        .retry_after()
                        .filter(|_| e.code() == "upstream_rate_limited")
                    {
                        member.cool_down(d);
                    }
                    ctx.emit(TurnEvent::UpstreamFinished {
                        turn: ctx.id.clone(),
                        upstream: member.name().clone(),
                        outcome: e.code(),
                        elapsed: attempt.started.elapsed(),
                        ttft: None,
                    });
                    tracing::debug!(turn = %ctx.id, upstream = %member.name(), code = e.code(), "upstream attempt failed");
                    let retryable = e.retryable();
                    last = Some(e);
                    if !retryable || deadline.passed() {
                        break;
                    }
                    if attempts < self.config.max_attempts {
                        let pause = self.backoff(attempts - 1).min(deadline.remaining());
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
        match last {
            Some(last) => Err(PoolError::Failed { last, attempts }),
            None => Err(self.unavailable(&candidates)),
        }
    }

    pub async fn complete(
        &self,
        ctx: &TurnCtx,
        request: &ChatRequest,
        hints: &RouteHints,
        route: Route,
        deadline: Deadline,
    ) -> Result<(Completion, Served), PoolError> {
        let (completion, attempt, served) = self
            .attempt(
                ctx,
                request,
                hints,
                route,
                deadline,
                move |up, req, model| up.complete(req, model, deadline),
            )
            .await?;
        ctx.emit(TurnEvent::UpstreamFinished {
            turn: ctx.id.clone(),
            upstream: served.upstream.clone(),
            outcome: "ok",
            elapsed: attempt.started.elapsed(),
            ttft: None,
        });
        Ok((completion, served))
    }

    /// Returns once an upstream committed. The stream holds the upstream's load until it ends
    /// or is dropped (client gone), and reports a failure after commit to the breaker.
    pub async fn stream(
        &self,
        ctx: &TurnCtx,
        request: &ChatRequest,
        hints: &RouteHints,
        route: Route,
        deadline: Deadline,
    ) -> Result<(ChunkStream, Served), PoolError> {
        let (stream, attempt, served) = self
            .attempt(
                ctx,
                request,
                hints,
                route,
                deadline,
                move |up, req, model| up.stream(req, model, deadline),
            )
            .await?;
        let ttft = attempt.started.elapsed();
        let watch = StreamWatch {
            attempt,
            ctx: ctx.clone(),
            ttft,
            outcome: None,
        };
        let stream =
            futures::stream::unfold((stream, watch), |(mut stream, mut watch)| async move {
                match stream.next().await {
                    Some(Ok(chunk)) => Some((Ok(chunk), (stream, watch))),
                    Some(Err(e)) => {
                        watch.attempt.member().breaker.on_failure();
                        watch.outcome = Some(e.code());
                        Some((Err(e), (stream, watch)))
                    }
                    None => {
                        watch.outcome.get_or_insert("ok");
                        drop(watch);
                        None
                    }
                }
            });
        Ok((stream.boxed(), served))
    }
}

/// Reports the end of a committed stream exactly once, however it ends.
struct StreamWatch {
    attempt: Attempt,
    ctx: TurnCtx,
    ttft: Duration,
    outcome: Option<&'static str>,
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        self.ctx.emit(TurnEvent::UpstreamFinished {
            turn: self.ctx.id.clone(),
            upstream: self.attempt.member().name().clone(),
            outcome: self.outcome.unwrap_or("cancelled"),
            elapsed: self.attempt.started.elapsed(),
            ttft: Some(self.ttft),
        });
    }
}
