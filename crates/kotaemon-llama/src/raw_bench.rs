//! A minimal direct llama.cpp loop, the baseline `kotaemon bench local` compares the engine and
//! the agent against: load the model, create one context with the engine's settings, decode the
//! prompt as one batch, then greedily sample and decode `gen_tokens` tokens.
//!
//! End-of-generation tokens are *ignored* (the loop always produces exactly `gen_tokens`), so
//! the figure does not depend on what the model says. Timing follows the engine's
//! [`GenStats`](crate::GenStats): prompt time = the prompt decode; generation time = from the
//! end of the prompt to the last sampled token (the last token is sampled, not decoded).

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::{LlamaError, AUTO_N_CTX_CAP, DEFAULT_N_BATCH};

/// Filler for [`raw_bench`] when only a prompt length is given.
const FILLER: &str = "The quick brown fox jumps over the lazy dog while the small robot counts \
    the stars above the quiet town and writes each number in its notebook. ";

/// What the prompt is.
#[derive(Debug, Clone)]
pub enum RawPrompt {
    /// Exactly this many tokens of filler text (BOS first).
    Tokens(u32),
    /// This text, tokenized like `LocalEngine::generate` does (BOS added, special tokens parsed).
    Text(String),
}

/// Figures of one raw run (the fastest of `reps` for prompt and generation separately).
#[derive(Debug, Clone)]
pub struct RawBench {
    /// Model load plus context creation.
    pub load_time: Duration,
    pub prompt_tokens: u32,
    pub gen_tokens: u32,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    /// Resident set of the process right after load (Linux `/proc/self/status`; else `None`).
    pub rss_after_load_kib: Option<u64>,
}

impl RawBench {
    pub fn prompt_tps(&self) -> f64 {
        tokens_per_second(self.prompt_tokens, self.prompt_time)
    }
    pub fn gen_tps(&self) -> f64 {
        tokens_per_second(self.gen_tokens, self.gen_time)
    }
}

/// Tokens per second, 0 when no time was measured (shared with the benches).
pub fn tokens_per_second(n: u32, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        f64::from(n) / s
    } else {
        0.0
    }
}

/// One run with a filler prompt of exactly `prompt_tokens` tokens.
pub fn raw_bench(
    path: &Path,
    n_threads: u32,
    prompt_tokens: u32,
    gen_tokens: u32,
) -> Result<RawBench, LlamaError> {
    raw_bench_with(
        path,
        n_threads,
        &RawPrompt::Tokens(prompt_tokens),
        gen_tokens,
        1,
    )
}

/// Loads once, runs `reps` times (at least 1), keeps the fastest prompt and generation times.
pub fn raw_bench_with(
    path: &Path,
    n_threads: u32,
    prompt: &RawPrompt,
    gen_tokens: u32,
    reps: u32,
) -> Result<RawBench, LlamaError> {
    let started = Instant::now();
    crate::check_gguf(path)?;
    let backend = crate::backend()?;
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| LlamaError::Load(format!("{}: {e}", path.display())))?;
    let tokens = prompt_tokens(&model, prompt)?;
    let n_train = model.n_ctx_train();
    // The engine's default context (so attention costs the same).
    let n_ctx = if n_train == 0 {
        AUTO_N_CTX_CAP
    } else {
        n_train.min(AUTO_N_CTX_CAP)
    };
    let needed = tokens.len() + gen_tokens as usize + 1;
    if needed > n_ctx as usize {
        return Err(LlamaError::ContextTooLong {
            prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            n_ctx,
        });
    }
    let n_batch = u32::try_from(tokens.len())
        .unwrap_or(u32::MAX)
        .max(DEFAULT_N_BATCH);
    let threads = match n_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let threads = i32::try_from(threads).unwrap_or(i32::MAX);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(1)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(backend, params)
        .map_err(|e| LlamaError::Load(format!("context of {n_ctx} tokens: {e}")))?;
    let load_time = started.elapsed();
    let rss_after_load_kib = rss_kib();

    let err = |e: &dyn std::fmt::Display| LlamaError::Decode(e.to_string());
    let pos = |i: usize| i32::try_from(i).map_err(|_| LlamaError::Decode(format!("position {i}")));
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    let mut best_prompt = Duration::MAX;
    let mut best_gen = Duration::MAX;
    for _ in 0..reps.max(1) {
        ctx.clear_kv_cache();
        batch.clear();
        for (i, t) in tokens.iter().enumerate() {
            batch
                .add(*t, pos(i)?, &[0], i + 1 == tokens.len())
                .map_err(|e| err(&e))?;
        }
        let t0 = Instant::now();
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        let prompt_time = t0.elapsed();

        let t1 = Instant::now();
        let mut sampler = LlamaSampler::greedy();
        let mut logits_idx = batch.n_tokens() - 1;
        let mut n_past = tokens.len();
        for k in 0..gen_tokens {
            let token = sampler.sample(&ctx, logits_idx);
            if k + 1 == gen_tokens {
                break;
            }
            batch.clear();
            batch
                .add(token, pos(n_past)?, &[0], true)
                .map_err(|e| err(&e))?;
            ctx.decode(&mut batch).map_err(|e| err(&e))?;
            n_past += 1;
            logits_idx = 0;
        }
        let gen_time = t1.elapsed();
        best_prompt = best_prompt.min(prompt_time);
        best_gen = best_gen.min(gen_time);
    }
    Ok(RawBench {
        load_time,
        prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
        gen_tokens,
        prompt_time: best_prompt,
        gen_time: best_gen,
        rss_after_load_kib,
    })
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn prompt_tokens(model: &LlamaModel, prompt: &RawPrompt) -> Result<Vec<LlamaToken>, LlamaError> {
    let vocab = model.vocab();
    match prompt {
        RawPrompt::Tokens(n) => {
            let n = (*n).max(1) as usize;
            let filler = vocab.tokenize(FILLER.as_bytes(), false, false);
            if filler.is_empty() {
                return Err(LlamaError::Template(
                    "filler text tokenizes to nothing".into(),
                ));
            }
            let mut tokens = Vec::with_capacity(n);
            tokens.push(vocab.bos());
            while tokens.len() < n {
                let room = n - tokens.len();
                tokens.extend(filler.iter().take(room).copied());
            }
            Ok(tokens)
        }
        RawPrompt::Text(text) => {
            let mut tokens = vocab.tokenize(text.as_bytes(), true, true);
            // Same rule as `LocalEngine::tokenize`: a template writing BOS itself gives two.
            if tokens.len() >= 2 && tokens[0] == vocab.bos() && tokens[1] == vocab.bos() {
                tokens.remove(0);
            }
            if tokens.is_empty() {
                return Err(LlamaError::Template("the prompt is empty".into()));
            }
            Ok(tokens)
        }
    }
}
