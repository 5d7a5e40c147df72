//! The worker thread: owns the llama.cpp context, takes jobs FIFO from a bounded queue and runs
//! them one at a time.
//!
//! Invariants:
//! - One context, created once, reused for every job (the KV cache is cleared per job).
//! - Jobs run in submission order; `max_queue` bounds the jobs *waiting* (not the running one).
//! - A job whose receiver is dropped is cancelled at the next token (or before it starts).
//! - Every accepted job gets exactly one terminal event (`Done` or an error) unless its receiver
//!   is gone: jobs still queued when the engine stops get `EngineStopped`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use crate::detok::Detokenizer;
use crate::{FinishReason, GenEvent, GenStats, GenerateParams, LlamaError};

pub(crate) type EventTx = mpsc::Sender<Result<GenEvent, LlamaError>>;

/// One queued generation.
pub(crate) struct Job {
    pub tokens: Vec<LlamaToken>,
    pub params: GenerateParams,
    pub tx: EventTx,
    pub enqueued: Instant,
}

/// Context settings resolved by `LocalEngine::load`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CtxSettings {
    pub n_ctx: u32,
    pub n_threads: i32,
    pub n_batch: u32,
}

/// State shared between the engine handles and the worker.
pub(crate) struct Shared {
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    max_queue: usize,
    /// Set when the last engine handle is dropped.
    shutdown: AtomicBool,
    /// Cleared when the worker thread exits (for any reason).
    alive: AtomicBool,
}

impl Shared {
    pub(crate) fn new(max_queue: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            max_queue,
            shutdown: AtomicBool::new(false),
            alive: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Job>> {
        // The queue is only pushed/popped under the lock; nothing in between can panic.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn submit(&self, job: Job) -> Result<(), LlamaError> {
        let mut q = self.lock();
        if !self.alive.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire) {
            return Err(LlamaError::EngineStopped);
        }
        if q.len() >= self.max_queue {
            return Err(LlamaError::QueueFull);
        }
        q.push_back(job);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Asks the worker to stop; the running job ends with `EngineStopped` at its next token.
    pub(crate) fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _q = self.lock();
        self.wake.notify_all();
    }

    /// Blocks until a job is available; `None` once shutdown was requested.
    fn next_job(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return None;
            }
            if let Some(job) = q.pop_front() {
                return Some(job);
            }
            q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Marks the worker dead and fails every queued job, however the worker exits.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        let drained: Vec<Job> = {
            let mut q = self.0.lock();
            self.0.alive.store(false, Ordering::Release);
            q.drain(..).collect()
        };
        for job in drained {
            let _ = job.tx.try_send(Err(LlamaError::EngineStopped));
        }
    }
}

/// Spawns the worker, which creates the context; returns once the context exists (with its
/// actual size) or failed.
pub(crate) fn spawn(
    model: Arc<LlamaModel>,
    backend: &'static LlamaBackend,
    settings: CtxSettings,
    shared: Arc<Shared>,
) -> Result<(JoinHandle<()>, u32), LlamaError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, LlamaError>>();
    let handle = std::thread::Builder::new()
        .name("kotaemon-llama".into())
        .spawn(move || {
            let _alive = AliveGuard(shared.clone());
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(settings.n_ctx))
                .with_n_batch(settings.n_batch)
                .with_n_ubatch(settings.n_batch)
                .with_n_seq_max(1)
                .with_n_threads(settings.n_threads)
                .with_n_threads_batch(settings.n_threads);
            let mut ctx = match model.new_context(backend, params) {
                Ok(ctx) => ctx,
                Err(e) => {
                    let _ = ready_tx.send(Err(LlamaError::Load(format!(
                        "could not create a context of {} tokens: {e}",
                        settings.n_ctx
                    ))));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(ctx.n_ctx()));
            drop(ready_tx);
            worker_loop(&mut ctx, &model, settings.n_batch, &shared);
        })
        .map_err(|e| LlamaError::Load(format!("could not spawn the worker thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(n_ctx)) => Ok((handle, n_ctx)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(LlamaError::Load(
                "worker thread died while creating the context".into(),
            ))
        }
    }
}

fn worker_loop(ctx: &mut LlamaContext<'_>, model: &LlamaModel, n_batch: u32, shared: &Shared) {
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    while let Some(job) = shared.next_job() {
        let tx = job.tx.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_job(
                ctx,
                model,
                &mut batch,
                n_batch as usize,
                job,
                &shared.shutdown,
            )
        }));
        let result = match outcome {
            Ok(r) => r,
            Err(_) => Err(LlamaError::Decode(
                "llama.cpp wrapper panicked during the job".into(),
            )),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "local generation failed");
            let _ = tx.blocking_send(Err(e));
        }
    }
    // Jobs still queued at shutdown are failed by `AliveGuard`.
}

/// Sends an event; `false` when the receiver is gone (the job is cancelled).
fn emit(tx: &EventTx, ev: GenEvent) -> bool {
    tx.blocking_send(Ok(ev)).is_ok()
}

fn decode_err(e: impl std::fmt::Display) -> LlamaError {
    LlamaError::Decode(e.to_string())
}

fn pos(i: usize) -> Result<i32, LlamaError> {
    i32::try_from(i).map_err(|_| LlamaError::Decode(format!("position {i} out of range")))
}

fn sampler(p: &GenerateParams) -> LlamaSampler {
    if p.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let mut chain = Vec::with_capacity(3);
    if p.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(p.top_p, 1));
    }
    chain.push(LlamaSampler::temp(p.temperature));
    chain.push(LlamaSampler::dist(p.seed));
    LlamaSampler::chain_simple(chain)
}

/// Runs one job to completion. `Ok(())` means the terminal event was sent (or the receiver is
/// gone); an `Err` is sent to the receiver by the caller.
fn run_job(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    batch: &mut LlamaBatch<'_>,
    n_batch: usize,
    job: Job,
    shutdown: &AtomicBool,
) -> Result<(), LlamaError> {
    let Job {
        tokens,
        params,
        tx,
        enqueued,
    } = job;
    if tx.is_closed() {
        tracing::debug!("local job cancelled before it started");
        return Ok(());
    }
    let queue_wait = enqueued.elapsed();
    let n_ctx = ctx.n_ctx() as usize;
    let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    if tokens.len() + 1 > n_ctx {
        return Err(LlamaError::ContextTooLong {
            prompt_tokens,
            n_ctx: ctx.n_ctx(),
        });
    }
    if tokens.is_empty() {
        return Err(LlamaError::Template("the rendered prompt is empty".into()));
    }

    // Prompt, in chunks of n_batch; logits only for the very last prompt token.
    let started = Instant::now();
    ctx.clear_kv_cache();
    let mut logits_idx = 0;
    for (c, chunk) in tokens.chunks(n_batch.max(1)).enumerate() {
        if tx.is_closed() {
            return Ok(());
        }
        if shutdown.load(Ordering::Acquire) {
            return Err(LlamaError::EngineStopped);
        }
        batch.clear();
        let base = c * n_batch.max(1);
        for (i, t) in chunk.iter().enumerate() {
            let last = base + i + 1 == tokens.len();
            batch
                .add(*t, pos(base + i)?, &[0], last)
                .map_err(decode_err)?;
        }
        ctx.decode(batch).map_err(decode_err)?;
        logits_idx = batch.n_tokens() - 1;
    }
    let prompt_time = started.elapsed();

    let gen_started = Instant::now();
    let vocab = model.vocab();
    let mut sampler = sampler(&params);
    let mut detok = Detokenizer::new(&params.stop);
    let mut n_past = tokens.len();
    let mut completion_tokens: u32 = 0;
    let mut piece = Vec::with_capacity(32);
    let finish = loop {
        // Only hit when max_tokens == 0; otherwise the check after each token ends the loop.
        if completion_tokens >= params.max_tokens {
            break FinishReason::Length;
        }
        if tx.is_closed() {
            tracing::debug!(completion_tokens, "local job cancelled (receiver dropped)");
            return Ok(());
        }
        if shutdown.load(Ordering::Acquire) {
            return Err(LlamaError::EngineStopped);
        }
        let token = sampler.sample(ctx, logits_idx);
        if vocab.is_eog(token) {
            break FinishReason::Stop;
        }
        completion_tokens += 1;
        piece.clear();
        vocab.token_to_piece_into(token, &mut piece, false, None);
        let step = detok.push(&piece);
        if !step.text.is_empty() && !emit(&tx, GenEvent::Piece(step.text)) {
            return Ok(());
        }
        if step.stopped {
            break FinishReason::StopSequence;
        }
        // The sampled token would be decoded at position n_past: no room left means Length.
        if completion_tokens >= params.max_tokens || n_past >= n_ctx {
            break FinishReason::Length;
        }
        batch.clear();
        batch
            .add(token, pos(n_past)?, &[0], true)
            .map_err(decode_err)?;
        ctx.decode(batch).map_err(decode_err)?;
        n_past += 1;
        logits_idx = 0;
    };
    if finish != FinishReason::StopSequence {
        let rest = detok.finish();
        if !rest.text.is_empty() && !emit(&tx, GenEvent::Piece(rest.text)) {
            return Ok(());
        }
    }
    let stats = GenStats {
        prompt_tokens,
        completion_tokens,
        finish,
        queue_wait,
        prompt_time,
        generation_time: gen_started.elapsed(),
    };
    tracing::debug!(
        prompt_tokens,
        completion_tokens,
        finish = ?finish,
        queue_wait_ms = queue_wait.as_millis() as u64,
        prompt_ms = prompt_time.as_millis() as u64,
        generation_ms = stats.generation_time.as_millis() as u64,
        "local generation finished"
    );
    emit(&tx, GenEvent::Done(stats));
    Ok(())
}
