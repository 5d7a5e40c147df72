//! The durable job queue for work that can wait: log summaries, reports, anything submitted
//! with `priority: "batch"` (or `"deferrable"` when the cloud is away). A submit is on disk
//! before it is acknowledged; workers send jobs when the cloud is up and within budget, a few
//! at a time, retry with backoff, and store the result once.
//!
//! Jobs never answer from the local model (they wait for the cloud instead) and never run
//! device tools: a job may run twice after a crash (the upstream call is repeated), so it must
//! be pure text work — an action needs a person and a turn.

mod store;

pub use store::Job;

use crate::events::EventBus;
use crate::pipeline::{Pipeline, TurnError};
use crate::turn::{Origin, Reply, Route, Turn};
use crate::upstream::pool::{Pool, PoolError};
use crate::wire::ChatRequest;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub enabled: bool,
    /// The jobs database (default: `<data dir>/queue.db`).
    pub path: Option<PathBuf>,
    /// Jobs sent to the cloud at once.
    pub concurrency: usize,
    /// Attempts before a job fails for good.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max_ms`.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// How often idle workers look for due jobs and a returning cloud.
    pub poll_ms: u64,
    /// Per job: the deadline of its turn.
    pub job_timeout_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            path: None,
            concurrency: 2,
            max_attempts: 8,
            backoff_ms: 2_000,
            backoff_max_ms: 300_000,
            poll_ms: 1_000,
            job_timeout_ms: 300_000,
        }
    }
}

impl QueueConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.concurrency == 0 {
            p.push(format!("{path}.concurrency: must be at least 1"));
        }
        if self.max_attempts == 0 {
            p.push(format!("{path}.max_attempts: must be at least 1"));
        }
        if self.poll_ms == 0 || self.job_timeout_ms == 0 || self.backoff_ms == 0 {
            p.push(format!(
                "{path}: poll_ms, backoff_ms and job_timeout_ms must be greater than 0"
            ));
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| crate::models::default_data_dir().join("queue.db"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job queue `{}`: {message}", .path.display())]
    Open { path: PathBuf, message: String },
    #[error("job queue: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("job queue: the writer thread failed")]
    Join,
}

pub struct JobQueue {
    conn: Mutex<Connection>,
    config: QueueConfig,
    wake: Notify,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl JobQueue {
    pub fn open(config: &QueueConfig) -> Result<Arc<JobQueue>, QueueError> {
        let path = config.db_path();
        let fail = |message: String| QueueError::Open {
            path: path.clone(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let conn =
            store::open(&path).map_err(|e| fail(format!("not a usable jobs database: {e}")))?;
        Ok(Arc::new(JobQueue {
            conn: Mutex::new(conn),
            config: config.clone(),
            wake: Notify::new(),
        }))
    }

    /// Runs `f` on the connection off the async threads (SQLite fsyncs block).
    async fn with_conn<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, QueueError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = this.conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|_| QueueError::Join)?
        .map_err(QueueError::Db)
    }

    /// Stores a job (durably) and wakes a worker. With an idempotency key already used, the
    /// existing job is returned and `false` says nothing new was created.
    pub async fn submit(
        self: &Arc<Self>,
        mut request: ChatRequest,
        idempotency_key: Option<String>,
        client: Option<String>,
    ) -> Result<(Job, bool), QueueError> {
        request.stream = Some(false);
        request.stream_options = None;
        let body = serde_json::to_string(&request).unwrap_or_default();
        let id = format!("job-{}", uuid::Uuid::new_v4().simple());
        let result = self
            .with_conn(move |c| {
                store::submit(
                    c,
                    &id,
                    idempotency_key.as_deref(),
                    client.as_deref(),
                    &body,
                    now_ms(),
                )
            })
            .await?;
        self.wake.notify_waiters();
        Ok(result)
    }

    pub async fn get(self: &Arc<Self>, id: String) -> Result<Option<Job>, QueueError> {
        self.with_conn(move |c| store::get(c, &id)).await
    }

    pub async fn list(
        self: &Arc<Self>,
        status: Option<String>,
        limit: usize,
    ) -> Result<Vec<Job>, QueueError> {
        self.with_conn(move |c| store::list(c, status.as_deref(), limit))
            .await
    }

    pub async fn counts(self: &Arc<Self>) -> Result<Vec<(String, u64)>, QueueError> {
        self.with_conn(|c| store::counts(c)).await
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exp = self
            .config
            .backoff_ms
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
        Duration::from_millis(exp.min(self.config.backoff_max_ms))
    }
}

/// What workers need from the agent.
#[derive(Clone)]
pub struct WorkerDeps {
    pub pipeline: Pipeline,
    pub pool: Arc<Pool>,
    pub bus: EventBus,
}

/// Starts `concurrency` workers; they stop with `stop`.
pub fn spawn_workers(
    queue: Arc<JobQueue>,
    deps: WorkerDeps,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
    for _ in 0..queue.config.concurrency {
        tasks.spawn(worker(queue.clone(), deps.clone(), stop.clone()));
    }
}

async fn worker(queue: Arc<JobQueue>, deps: WorkerDeps, stop: CancellationToken) {
    let poll = Duration::from_millis(queue.config.poll_ms);
    let mut waiting = Duration::ZERO;
    loop {
        if !waiting.is_zero() {
            // The cloud is away (down, parked GPU, budget spent): look again later, one job
            // at a time, instead of churning through the whole queue.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(waiting) => {}
            }
        }
        if stop.is_cancelled() {
            return;
        }
        let claimed = match queue.with_conn(|c| store::claim(c, now_ms())).await {
            Ok(job) => job,
            Err(e) => {
                tracing::error!("job queue: {e}");
                None
            }
        };
        let Some(job) = claimed else {
            waiting = Duration::ZERO;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = queue.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        };
        let outcome = tokio::select! {
            // Stopping mid-job leaves it running in the table: the next start queues it again.
            _ = stop.cancelled() => return,
            outcome = run_job(&queue, &deps, &job) => outcome,
        };
        let id = job.id.clone();
        waiting = Duration::ZERO;
        let finished = |status: &'static str| {
            deps.bus.emit(crate::events::TurnEvent::JobFinished {
                job: job.id.as_str().into(),
                status,
                attempts: job.attempts,
            })
        };
        let written = match outcome {
            Ok(result) => {
                let stored = queue
                    .with_conn(move |c| store::complete(c, &id, &result, now_ms()))
                    .await;
                // Announced after the result is on disk, and only by the write that stored it.
                if matches!(stored, Ok(true)) {
                    finished("completed");
                }
                stored.map(|_| ())
            }
            Err(Failure::CloudAway(error)) => {
                // Not the job's fault: the attempt does not count, the job keeps its place.
                waiting = (waiting + poll).max(queue.backoff(1));
                queue
                    .with_conn(move |c| store::requeue_uncounted(c, &id, &error))
                    .await
            }
            Err(Failure::Retry(error)) if job.attempts < queue.config.max_attempts => {
                let at = now_ms() + queue.backoff(job.attempts).as_millis() as i64;
                tracing::info!(job = %job.id, attempt = job.attempts, "job will be retried: {error}");
                queue
                    .with_conn(move |c| store::retry_at(c, &id, &error, at))
                    .await
            }
            Err(Failure::Retry(error) | Failure::Fatal(error)) => {
                tracing::warn!(job = %job.id, attempts = job.attempts, "job failed: {error}");
                let stored = queue
                    .with_conn(move |c| store::fail(c, &id, &error, now_ms()))
                    .await;
                if stored.is_ok() {
                    finished("failed");
                }
                stored
            }
        };
        if let Err(e) = written {
            tracing::error!(job = %job.id, "job queue: {e}");
        }
    }
}

enum Failure {
    /// The cloud cannot take it now (down, parked, budget spent): wait, do not count.
    CloudAway(String),
    /// The attempt failed: retry with backoff while attempts remain.
    Retry(String),
    Fatal(String),
}

/// One attempt: the job's request as a turn that must reach the cloud.
async fn run_job(
    queue: &JobQueue,
    deps: &WorkerDeps,
    job: &store::Claimed,
) -> Result<serde_json::Value, Failure> {
    let request: ChatRequest = serde_json::from_str(&job.request)
        .map_err(|e| Failure::Fatal(format!("stored request is unreadable: {e}")))?;
    let mut turn = Turn::new(
        deps.bus.clone(),
        Origin::Queue,
        request,
        Duration::from_millis(queue.config.job_timeout_ms),
    );
    turn.hints.route = Some(Route::Cloud);
    turn.hints.deferrable = true;
    turn.hints.no_device_tools = true;
    turn.hints.client = job.client.clone();
    let client = job.client.clone();
    turn.ctx.annotate(|m| m.client = client);
    match deps.pipeline.run(turn).await {
        Ok(Reply::Complete(c)) => Ok(c.body),
        Ok(Reply::Stream(_)) => Err(Failure::Fatal("the pipeline streamed a job".into())),
        Err(e) => Err(match &e {
            TurnError::Pool(PoolError::Failed { .. }) if e.is_cloud_away() => {
                Failure::Retry(e.to_string())
            }
            _ if e.is_cloud_away() => Failure::CloudAway(e.to_string()),
            _ => Failure::Fatal(e.to_string()),
        }),
    }
}
