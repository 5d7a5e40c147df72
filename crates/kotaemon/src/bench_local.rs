//! `kotaemon bench local` and `kotaemon bench embed`: on-device model speed.
//!
//! `local` measures, in one run, on the same GGUF and thread count:
//! - **raw**: a minimal direct llama.cpp loop (`kotaemon_llama::raw_bench_with`);
//! - **engine**: `LocalEngine::generate` (figures from its `GenStats`);
//! - **agent**: an in-process `App` (local model only) over HTTP on 127.0.0.1:0 — a
//!   non-stream request (usage tokens / wall time) and a stream (time to first token).
//!
//! All three evaluate the same prompt: the user text rendered by the model's chat template, so
//! the prompt token counts match (printed per path). Decoding is greedy with a fixed
//! `max_tokens`. The raw loop ignores end-of-generation and always makes exactly `--gen` tokens;
//! the engine and the agent stop at end-of-generation, so the prompt asks for a long answer and
//! each path prints how many tokens it actually generated: rates are per token, so a shorter
//! answer changes the count, not the comparison. Each path runs `--reps` times after one
//! warm-up and keeps its fastest figures; the rounds interleave the three paths (raw, engine,
//! agent, raw, …) so that load from other processes on a shared machine hits them alike.
//!
//! `embed` measures sentences/s of each installed embedding model at 1 and 2 threads, batch 1
//! and 32, on short English and Chinese sentences, with load time and the RSS it adds.
//!
//! Figures are for reading, never asserted: the machine is shared and noisy.

use anyhow::{bail, Context as _};
use futures::StreamExt as _;
use kotaemon_core::models::{self, ModelKind};
use kotaemon_llama::{ChatTurn, EngineConfig, GenEvent, GenStats, GenerateParams, LocalEngine};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `kotaemon bench local`.
#[derive(clap::Args)]
pub struct Args {
    /// GGUF file, or the name of an installed model.
    #[arg(long, default_value = "gemma3-270m")]
    pub model: String,
    /// CPU threads for prompt and generation (all three paths).
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Approximate prompt length in tokens (chat template included).
    #[arg(long, default_value_t = 256)]
    pub prompt: u32,
    /// Tokens to generate (`max_tokens`).
    #[arg(long, default_value_t = 64)]
    pub gen: u32,
    /// Measured repetitions per path (after one warm-up); the fastest is kept.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
}

/// Arguments of `kotaemon bench embed`.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Model directories or installed names (default: every installed embedding model).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2])]
    pub threads: Vec<usize>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 32])]
    pub batches: Vec<usize>,
    /// Seconds per measured cell (at least one full pass over the sentences).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

/// The resident set of this process, in MiB.
fn rss_mib() -> f64 {
    crate::bench::rss_kib(std::process::id()).map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn pct(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.0}%", 100.0 * a / b)
    } else {
        "-".into()
    }
}

const STORY: &str = "Mira keeps a small robot named Pip in her workshop at the edge of the harbour town. \
Every evening Pip sorts the brass gears, oils the old clock and listens to the fishing boats come home. ";
const ASK: &str = "Continue this story in a long, detailed way: describe the next day in the \
workshop, hour by hour, with many small events. Do not stop early.";

/// Builds the user text: story sentences until the rendered chat reaches ~`target` tokens.
fn build_prompt(engine: &LocalEngine, target: u32) -> anyhow::Result<(String, u32)> {
    let mut story = String::new();
    loop {
        let text = format!("{story}{ASK}");
        let rendered = engine.render_chat(&[ChatTurn::new("user", text.clone())], true)?;
        let n = engine.count_tokens(&rendered)? + 1;
        if n >= target || story.len() > 64 * 1024 {
            return Ok((text, n));
        }
        story.push_str(STORY);
    }
}

struct PathFigures {
    prompt_tokens: u32,
    completion_tokens: u32,
    prompt_tps: f64,
    gen_tps: f64,
    load: Duration,
    rss_mib: Option<f64>,
    note: String,
}

async fn engine_once(
    engine: &LocalEngine,
    text: &str,
    max_tokens: u32,
) -> anyhow::Result<GenStats> {
    let params = GenerateParams {
        max_tokens,
        ..Default::default()
    };
    let mut rx = engine.generate(vec![ChatTurn::new("user", text)], params)?;
    while let Some(ev) = rx.recv().await {
        if let GenEvent::Done(stats) = ev? {
            return Ok(stats);
        }
    }
    bail!("the engine ended the job without its final statistics")
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = models::resolve(&args.model, &models::default_models_dir())
        .with_context(|| format!("model {:?}", args.model))?;
    let reps = args.reps.max(1);
    println!(
        "bench local: {} | threads {} | prompt ~{} tokens | gen {} tokens | greedy | {reps} interleaved rounds after 1 warm-up, best kept",
        path.display(),
        args.threads,
        args.prompt,
        args.gen
    );
    let rss_start = rss_mib();

    // (b) The engine: it also renders the prompt the other two paths use.
    let cfg = EngineConfig {
        n_threads: args.threads,
        max_queue: 4,
        ..EngineConfig::new(&path)
    };
    let engine = tokio::task::spawn_blocking(move || LocalEngine::load(cfg)).await??;
    let engine_load = engine.info().load_time;
    let engine_rss = rss_mib() - rss_start;
    let (text, _) = build_prompt(&engine, args.prompt)?;
    let rendered = engine.render_chat(&[ChatTurn::new("user", text.clone())], true)?;

    // (c) The agent, serving only the local model.
    let before = rss_mib();
    let agent = Agent::start(&path, args.threads, args.gen).await?;
    let agent_rss = rss_mib() - before;

    // Rounds interleave the three paths, so load from other processes hits them alike.
    let raw_prompt = kotaemon_llama::RawPrompt::Text(rendered);
    let mut raw_best: Option<kotaemon_llama::RawBench> = None;
    let mut raw_first = None;
    let (mut e_p, mut e_g, mut e_last) = (Duration::MAX, Duration::MAX, None);
    let (mut a_wall, mut a_ttft, mut a_rest, mut a_usage) =
        (Duration::MAX, Duration::MAX, Duration::MAX, (0u32, 0u32));
    for round in 0..=reps {
        let measured = round > 0;
        // (a) Raw llama.cpp on the very same rendered prompt (loads per round: load is cheap
        // once the file is in the page cache; the first round's load is the cold-ish one).
        let (p, threads, gen, prompt) = (path.clone(), args.threads, args.gen, raw_prompt.clone());
        let before = rss_mib();
        let raw = tokio::task::spawn_blocking(move || {
            kotaemon_llama::raw_bench_with(&p, threads, &prompt, gen, 1)
        })
        .await??;
        if raw_first.is_none() {
            let rss = raw.rss_after_load_kib.map(|k| k as f64 / 1024.0 - before);
            raw_first = Some((raw.load_time, rss));
        }
        let s = engine_once(&engine, &text, args.gen).await?;
        let (wall, usage) = agent.complete(&text, args.gen).await?;
        let (ttft, rest) = agent.stream(&text, args.gen).await?;
        if !measured {
            continue;
        }
        raw_best = Some(match raw_best {
            None => raw,
            Some(mut b) => {
                b.prompt_time = b.prompt_time.min(raw.prompt_time);
                b.gen_time = b.gen_time.min(raw.gen_time);
                b
            }
        });
        e_p = e_p.min(s.prompt_time);
        e_g = e_g.min(s.generation_time);
        e_last = Some(s);
        a_wall = a_wall.min(wall);
        a_ttft = a_ttft.min(ttft);
        a_rest = a_rest.min(rest);
        a_usage = usage;
    }
    let agent_load = agent.load;
    agent.stop().await;
    drop(engine);
    let (Some(raw), Some(s), Some((raw_load, raw_rss))) = (raw_best, e_last, raw_first) else {
        bail!("no measured round")
    };

    let rawf = PathFigures {
        prompt_tokens: raw.prompt_tokens,
        completion_tokens: raw.gen_tokens,
        prompt_tps: raw.prompt_tps(),
        gen_tps: raw.gen_tps(),
        load: raw_load,
        rss_mib: raw_rss,
        note: "EOS ignored".into(),
    };
    let eng = PathFigures {
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        prompt_tps: kotaemon_llama::tokens_per_second(s.prompt_tokens, e_p),
        gen_tps: kotaemon_llama::tokens_per_second(s.completion_tokens, e_g),
        load: engine_load,
        rss_mib: Some(engine_rss),
        note: format!("GenStats; finish {:?}", s.finish),
    };
    let (prompt_tokens, completion_tokens) = a_usage;
    let agentf = PathFigures {
        prompt_tokens,
        completion_tokens,
        // Time to first token covers the prompt plus the first token (and HTTP).
        prompt_tps: kotaemon_llama::tokens_per_second(prompt_tokens, a_ttft),
        gen_tps: kotaemon_llama::tokens_per_second(completion_tokens.saturating_sub(1), a_rest),
        load: agent_load,
        rss_mib: Some(agent_rss),
        note: format!(
            "stream TTFT {:.0} ms; non-stream wall {:.0} ms",
            a_ttft.as_secs_f64() * 1e3,
            a_wall.as_secs_f64() * 1e3,
        ),
    };

    println!();
    println!(
        "{:<7} {:>6} {:>5} {:>10} {:>8} {:>8} {:>8} {:>7} {:>8}  note",
        "path",
        "prompt",
        "gen",
        "prompt t/s",
        "gen t/s",
        "p vs raw",
        "g vs raw",
        "load ms",
        "+RSS MiB"
    );
    for (name, f) in [("raw", &rawf), ("engine", &eng), ("agent", &agentf)] {
        println!(
            "{:<7} {:>6} {:>5} {:>10.1} {:>8.1} {:>8} {:>8} {:>7} {:>8}  {}",
            name,
            f.prompt_tokens,
            f.completion_tokens,
            f.prompt_tps,
            f.gen_tps,
            pct(f.prompt_tps, rawf.prompt_tps),
            pct(f.gen_tps, rawf.gen_tps),
            f.load.as_millis(),
            f.rss_mib.map_or("-".into(), |r| format!("{r:.0}")),
            f.note,
        );
    }
    let raw_e2e = raw.prompt_time + raw.gen_time;
    println!();
    println!(
        "agent non-stream end to end: {:.1} completion t/s; raw prompt+gen {:.0} ms vs agent wall {:.0} ms ({}).",
        kotaemon_llama::tokens_per_second(completion_tokens, a_wall),
        raw_e2e.as_secs_f64() * 1e3,
        a_wall.as_secs_f64() * 1e3,
        pct(raw_e2e.as_secs_f64(), a_wall.as_secs_f64()),
    );
    println!(
        "process RSS: {rss_start:.0} MiB at start, {:.0} MiB now. Goal: engine/raw and agent/raw >= 95%.",
        rss_mib()
    );
    if eng.prompt_tokens != rawf.prompt_tokens || agentf.prompt_tokens != rawf.prompt_tokens {
        println!("note: prompt token counts differ between paths (see the table).");
    }
    if eng.completion_tokens != rawf.completion_tokens
        || agentf.completion_tokens != rawf.completion_tokens
    {
        println!("note: the engine/agent stopped at end-of-generation before --gen tokens; rates are per token.");
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent in-process on 127.0.0.1:0, serving only the local model.
struct Agent {
    url: String,
    client: reqwest::Client,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    load: Duration,
}

impl Agent {
    async fn start(model: &Path, threads: u32, max_tokens: u32) -> anyhow::Result<Agent> {
        // n_ctx = 0: the model's own context capped like the engine's default, as raw uses.
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[local]\nenabled = true\nrequired = true\nmodel = {}\nthreads = {threads}\nn_ctx = 0\nmax_tokens = {max_tokens}\n",
            toml_str(&model.to_string_lossy())
        );
        let config = kotaemon_core::Config::from_toml_str(&toml)
            .map_err(|e| anyhow::anyhow!("agent config: {e}"))?;
        let started = Instant::now();
        let app = tokio::task::spawn_blocking(move || kotaemon_core::App::build(config))
            .await?
            .map_err(|e| anyhow::anyhow!("agent start: {e}"))?;
        let load = started.elapsed();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stop_rx.await;
        }));
        Ok(Agent {
            url: format!("http://{addr}/v1/chat/completions"),
            client: reqwest::Client::builder().tcp_nodelay(true).build()?,
            stop_tx,
            server,
            load,
        })
    }

    fn body(text: &str, max_tokens: u32, stream: bool) -> serde_json::Value {
        serde_json::json!({
            "model": "local",
            "stream": stream,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        })
    }

    /// Non-stream: wall time and (prompt, completion) usage tokens.
    async fn complete(
        &self,
        text: &str,
        max_tokens: u32,
    ) -> anyhow::Result<(Duration, (u32, u32))> {
        let t = Instant::now();
        let resp = self
            .client
            .post(&self.url)
            .json(&Self::body(text, max_tokens, false))
            .send()
            .await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        let wall = t.elapsed();
        if !status.is_success() {
            bail!("agent answered HTTP {status}: {json}");
        }
        let u = &json["usage"];
        let get = |k: &str| {
            u[k].as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        Ok((wall, (get("prompt_tokens"), get("completion_tokens"))))
    }

    /// Stream: time to the first content chunk, and from there to the end.
    async fn stream(&self, text: &str, max_tokens: u32) -> anyhow::Result<(Duration, Duration)> {
        let t = Instant::now();
        let resp = self
            .client
            .post(&self.url)
            .json(&Self::body(text, max_tokens, true))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("agent answered HTTP {} to a stream", resp.status());
        }
        let mut first = None;
        let mut buf = Vec::new();
        let mut chunks = resp.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            buf.extend_from_slice(&chunk?);
            if first.is_none() && has_content(&buf) {
                first = Some(t.elapsed());
            }
        }
        let total = t.elapsed();
        let ttft = first.unwrap_or(total);
        Ok((ttft, total.saturating_sub(ttft)))
    }

    async fn stop(self) {
        let _ = self.stop_tx.send(());
        let _ = self.server.await;
    }
}

/// True once an SSE `data:` event with non-empty `content` has arrived.
fn has_content(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .any(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

const EN: &[&str] = &[
    "How do I reset my password?",
    "Turn on the kitchen lights.",
    "What is the weather tomorrow?",
    "Remind me to call mom at six.",
    "Play some relaxing music.",
    "How far is the airport from here?",
    "Set a timer for ten minutes.",
    "What time does the store close?",
    "Send a message to John.",
    "Is it going to rain this weekend?",
    "Add milk to my shopping list.",
    "What's on my calendar today?",
    "Lock the front door please.",
    "How many calories are in an apple?",
    "Translate good morning into French.",
    "Call the nearest pharmacy.",
];

const ZH: &[&str] = &[
    "我的密码怎么重置？",
    "打开厨房的灯。",
    "明天天气怎么样？",
    "六点提醒我给妈妈打电话。",
    "播放一些轻松的音乐。",
    "这里离机场有多远？",
    "设置一个十分钟的计时器。",
    "商店几点关门？",
    "给张伟发一条消息。",
    "这个周末会下雨吗？",
    "把牛奶加到购物清单里。",
    "我今天有什么安排？",
    "请把前门锁上。",
    "一个苹果有多少卡路里？",
    "把早上好翻译成法语。",
    "打电话给最近的药店。",
];

/// Every installed embedding model of the catalogue (and any other with an embedding manifest).
fn installed_embedding_models() -> Vec<(String, PathBuf)> {
    let dir = models::default_models_dir();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    for d in dirs {
        if let Ok(m) = models::read_manifest(&d) {
            if m.kind == Some(ModelKind::Embedding) {
                let name = d
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                out.push((name, d));
            }
        }
    }
    out
}

pub async fn embed(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    let models_dir = models::default_models_dir();
    let list: Vec<(String, PathBuf)> = if args.models.is_empty() {
        installed_embedding_models()
    } else {
        args.models
            .iter()
            .map(|m| Ok((m.clone(), models::resolve(m, &models_dir)?)))
            .collect::<Result<_, models::ModelError>>()?
    };
    if list.is_empty() {
        bail!(
            "no embedding model installed in {} (kotaemon models install all-minilm-l6-v2 multilingual-e5-small-q4), or pass --model DIR",
            models_dir.display()
        );
    }
    let seconds = args.seconds.max(0.1);
    tokio::task::spawn_blocking(move || embed_blocking(list, args.threads, args.batches, seconds))
        .await??;
    Ok(ExitCode::SUCCESS)
}

fn embed_blocking(
    list: Vec<(String, PathBuf)>,
    threads: Vec<usize>,
    batches: Vec<usize>,
    seconds: f64,
) -> anyhow::Result<()> {
    println!(
        "bench embed: sentences/s, {seconds:.1} s per cell, {} short sentences per language. Goal: >= 200/s on 1 core.",
        EN.len()
    );
    let mut header = format!(
        "{:<28} {:>3} {:>8} {:>9}",
        "model", "thr", "load ms", "+RSS MiB"
    );
    for lang in ["en", "zh"] {
        for b in &batches {
            header.push_str(&format!(" {:>8}", format!("{lang} b{b}")));
        }
    }
    println!("{header}");
    for (name, dir) in &list {
        for &t in &threads {
            let before = rss_mib();
            let started = Instant::now();
            let e = kotaemon_embed::Embedder::load(kotaemon_embed::EmbedConfig {
                model_dir: dir.clone(),
                threads: t,
                max_tokens: 128,
            })
            .with_context(|| format!("loading {}", dir.display()))?;
            let load = started.elapsed();
            let _ = e.embed(&EN[..4])?;
            let delta = rss_mib() - before;
            let mut cells = Vec::new();
            for lang in [EN, ZH] {
                for &b in &batches {
                    cells.push(sentences_per_s(&e, lang, b.max(1), seconds)?);
                }
            }
            let mut line = format!(
                "{:<28} {:>3} {:>8} {:>9.0}",
                name,
                t,
                load.as_millis(),
                delta
            );
            for c in &cells {
                line.push_str(&format!(" {c:>8.0}"));
            }
            println!("{line}");
            drop(e);
        }
    }
    println!("+RSS = resident set added by load and a first embed (RSS is not returned to the OS exactly on drop).");
    Ok(())
}

/// Embeds `sentences` cycled in batches of `batch` for at least `seconds` and one full pass.
fn sentences_per_s(
    e: &kotaemon_embed::Embedder,
    sentences: &[&str],
    batch: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let pool: Vec<&str> = sentences
        .iter()
        .copied()
        .cycle()
        .take(batch.max(sentences.len()))
        .collect();
    // Warm-up.
    e.embed(&pool[..batch.min(pool.len())])?;
    let started = Instant::now();
    let mut done = 0usize;
    let mut i = 0usize;
    loop {
        let chunk: Vec<&str> = (0..batch).map(|k| pool[(i + k) % pool.len()]).collect();
        e.embed(&chunk)?;
        done += chunk.len();
        i = (i + batch) % pool.len();
        let el = started.elapsed().as_secs_f64();
        if el >= seconds && done >= sentences.len() {
            return Ok(done as f64 / el);
        }
    }
}
