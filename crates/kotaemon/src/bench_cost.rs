//! `kotaemon bench cost`: a day of mixed traffic replayed twice against the same scripted
//! cloud — through the agent as shipped (rules, cache, queue) and through an all-cloud,
//! always-on baseline — and what each spends: cloud calls, tokens (as the upstream reported
//! them, from each run's usage ledger), token cost, and GPU-hours.
//!
//! The trace (seeded, printed): office hours 08:00–20:00 plus a quiet evening; greetings and
//! time/date questions in English and Chinese (what the default rules answer), FAQs repeated
//! with Zipf-like popularity and paraphrases of FAQs already asked (from the labelled cache
//! pairs), open questions that are all different, and batch jobs (log summaries) that the
//! agent queues and sends together in the evening. The local model is off: the savings shown
//! are the rules' and the cache's alone.

use clap::Args as ClapArgs;
use kotaemon_core::config::DEFAULT_TOML;
use kotaemon_core::cost::ledger::report;
use kotaemon_core::cost::pricing::TokenPrice;
use kotaemon_core::turn::{Origin, Reply};
use kotaemon_core::wire::ChatRequest;
use kotaemon_core::{App, Config};
use kotaemon_fake_upstream::{FakeUpstream, Script};
use std::path::Path;
use std::process::ExitCode;

const PAIRS: &str = include_str!("../../kotaemon-core/tests/data/cache_pairs.tsv");

#[derive(ClapArgs)]
pub struct Args {
    /// Turns in the day.
    #[arg(long, default_value_t = 480)]
    turns: usize,
    /// Seed of the trace.
    #[arg(long, default_value_t = 20261125)]
    seed: u64,
    /// GPU price per hour (a T4 instance).
    #[arg(long, default_value_t = 0.53)]
    gpu_hour: f64,
    /// Minutes the GPU stays on after its last call.
    #[arg(long, default_value_t = 15)]
    idle_minutes: u32,
    /// Minutes from start to ready, charged per start.
    #[arg(long, default_value_t = 3)]
    boot_minutes: u32,
}

use crate::bench_cache::Rng;

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Greeting,
    Faq,
    Paraphrase,
    Open,
    Batch,
}

struct Turn {
    minute: u32,
    kind: Kind,
    text: String,
}

const GREETINGS: &[&str] = &[
    "hello",
    "你好",
    "what time is it",
    "现在几点",
    "what's the date today",
    "今天几号",
];

fn trace(args: &Args) -> Vec<Turn> {
    let mut paraphrases: Vec<(String, String)> = Vec::new();
    let mut different: Vec<String> = Vec::new();
    for line in PAIRS.lines().filter(|l| !l.starts_with('#')) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 5 || cols[0] == "lang" {
            continue;
        }
        match (cols[1], cols[2]) {
            ("1", "paraphrase") => paraphrases.push((cols[3].into(), cols[4].into())),
            ("0", _) => different.push(cols[4].into()),
            _ => {}
        }
    }
    paraphrases.truncate(40);
    let mut rng = Rng(args.seed.max(1));
    let mut asked: Vec<usize> = Vec::new();
    let mut turns = Vec::new();
    for i in 0..args.turns {
        // 95% in office hours, the rest in the evening.
        let minute = if rng.below(100) < 95 {
            8 * 60 + rng.below(12 * 60) as u32
        } else {
            20 * 60 + rng.below(3 * 60) as u32
        };
        let roll = rng.below(100);
        let (kind, text) = if roll < 15 {
            (
                Kind::Greeting,
                GREETINGS[rng.below(GREETINGS.len())].to_string(),
            )
        } else if roll < 55 {
            // Zipf-like: the first questions are asked most.
            let n = paraphrases.len();
            let pick = (n as f64 / (1.0 + rng.below(n * 4) as f64)).floor() as usize;
            let pick = pick.min(n - 1);
            asked.push(pick);
            (Kind::Faq, paraphrases[pick].0.clone())
        } else if roll < 70 && !asked.is_empty() {
            let pick = asked[rng.below(asked.len())];
            (Kind::Paraphrase, paraphrases[pick].1.clone())
        } else if roll < 95 {
            let q = &different[rng.below(different.len())];
            (Kind::Open, format!("{q} (case {i})"))
        } else {
            (
                Kind::Batch,
                format!(
                    "Summarize the device logs of hour {} in five bullet points.",
                    minute / 60
                ),
            )
        };
        turns.push(Turn { minute, kind, text });
    }
    turns.sort_by_key(|t| t.minute);
    turns
}

struct Run {
    cloud_calls: u64,
    prompt: u64,
    completion: u64,
    answered_locally: u64,
    /// Minutes of the day at which the cloud was called.
    cloud_minutes: Vec<u32>,
}

fn config(fake: &FakeUpstream, dir: &Path, agent: bool) -> anyhow::Result<Config> {
    let mut config = Config::from_toml_str(DEFAULT_TOML)?;
    config.upstreams = vec![kotaemon_core::upstream::UpstreamConfig::new(
        "cloud",
        &fake.base_url(),
    )];
    config.local.enabled = false;
    config.pool.health.enabled = false;
    config.audit.dir = Some(dir.join("audit"));
    config.usage.path = Some(dir.join("usage.db"));
    config.queue.path = Some(dir.join("queue.db"));
    config.stages.cache.path = Some(dir.join("cache.db"));
    config.usage.prices.insert(
        "*".into(),
        TokenPrice {
            input: 0.15,
            output: 0.60,
        },
    );
    if !agent {
        config.stages.rules.enabled = false;
        config.stages.cache.enabled = false;
    }
    Ok(config)
}

async fn replay(
    fake: &FakeUpstream,
    turns: &[Turn],
    agent: bool,
) -> anyhow::Result<(Run, Vec<String>)> {
    let dir = TempDir::new(if agent { "agent" } else { "baseline" })?;
    let app = App::build(config(fake, dir.path(), agent)?)?;
    let warnings = app.warnings.clone();
    let mut run = Run {
        cloud_calls: 0,
        prompt: 0,
        completion: 0,
        answered_locally: 0,
        cloud_minutes: Vec::new(),
    };
    for t in turns {
        let request = ChatRequest::utterance("default", t.text.clone());
        // The agent sends batch work together in the evening; the baseline when it comes.
        let minute = if agent && t.kind == Kind::Batch {
            19 * 60
        } else {
            t.minute
        };
        let (reply, ctx) = app
            .run_turn(Origin::Cli, request)
            .await
            .map_err(|e| anyhow::anyhow!("turn failed: {e}"))?;
        if let Reply::Stream(mut s) = reply {
            use futures::StreamExt;
            while s.next().await.is_some() {}
        }
        match ctx.meta().answered_by {
            Some("rules") | Some("cache") | Some("local") => run.answered_locally += 1,
            _ => run.cloud_minutes.push(minute),
        }
        drop(ctx);
    }
    app.shutdown().await;
    let today = chrono::Local::now().format("%Y-%m-%d").to_string();
    let r = report(&dir.path().join("usage.db"), "day", &today)?;
    run.cloud_calls = r.cloud_calls;
    run.prompt = r.cloud_prompt_tokens;
    run.completion = r.cloud_completion_tokens;
    Ok((run, warnings))
}

/// A scratch directory of this run, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> std::io::Result<TempDir> {
        let dir =
            std::env::temp_dir().join(format!("kotaemon-bench-cost-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GPU minutes under "start on demand, stop after `idle` minutes": each call keeps it on
/// until `idle` after it; every start costs `boot` minutes.
fn gpu_minutes(minutes: &[u32], idle: u32, boot: u32) -> (u32, u32) {
    let mut sorted = minutes.to_vec();
    sorted.sort_unstable();
    let (mut total, mut starts) = (0, 0);
    let mut on_until: Option<u32> = None;
    for m in sorted {
        match on_until {
            Some(until) if m <= until => {
                total += m + idle - until;
                on_until = Some(m + idle);
            }
            _ => {
                starts += 1;
                total += boot + idle;
                on_until = Some(m + idle);
            }
        }
    }
    (total, starts)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let fake = FakeUpstream::bind_loopback().await?;
    fake.set_default(Script {
        text: Some(
            "Here is a complete answer of a typical length, with a few sentences of detail so \
             that completion tokens are not negligible next to the prompt."
                .into(),
        ),
        ..Script::default()
    });
    let turns = trace(&args);
    let count = |k: Kind| turns.iter().filter(|t| t.kind == k).count();
    println!(
        "kotaemon bench cost: {} turns (seed {}): {} greetings/time/date, {} FAQ repeats, {} paraphrases, {} open questions, {} batch jobs; local model off",
        turns.len(),
        args.seed,
        count(Kind::Greeting),
        count(Kind::Faq),
        count(Kind::Paraphrase),
        count(Kind::Open),
        count(Kind::Batch)
    );
    let started = std::time::Instant::now();
    let (base, _) = replay(&fake, &turns, false).await?;
    let (agent, warnings) = replay(&fake, &turns, true).await?;
    for w in warnings {
        println!("note: {w}");
    }
    let price = |r: &Run| (r.prompt as f64 * 0.15 + r.completion as f64 * 0.60) / 1e6;
    let (gpu_min, starts) = gpu_minutes(&agent.cloud_minutes, args.idle_minutes, args.boot_minutes);
    let agent_gpu_h = gpu_min as f64 / 60.0;
    println!();
    println!(
        "{:<34} {:>16} {:>16} {:>8}",
        "", "all-cloud", "agent", "ratio"
    );
    let row = |name: &str, b: f64, a: f64, digits: usize| {
        println!(
            "{name:<34} {b:>16.digits$} {a:>16.digits$} {:>8.2}",
            if b > 0.0 { a / b } else { 0.0 }
        );
    };
    row(
        "cloud calls",
        base.cloud_calls as f64,
        agent.cloud_calls as f64,
        0,
    );
    row(
        "answered on the device",
        base.answered_locally as f64,
        agent.answered_locally as f64,
        0,
    );
    row(
        "cloud prompt tokens",
        base.prompt as f64,
        agent.prompt as f64,
        0,
    );
    row(
        "cloud completion tokens",
        base.completion as f64,
        agent.completion as f64,
        0,
    );
    row(
        "token cost USD (0.15/0.60 per 1M)",
        price(&base),
        price(&agent),
        4,
    );
    row("GPU hours (always-on vs idle stop)", 24.0, agent_gpu_h, 2);
    row(
        &format!("GPU cost USD ({:.2}/h)", args.gpu_hour),
        24.0 * args.gpu_hour,
        agent_gpu_h * args.gpu_hour,
        2,
    );
    println!();
    println!(
        "GPU under the agent: {starts} start(s), stop after {} min idle, {} min boot each; batch jobs sent together at 19:00. Hour of the last cloud call: {}. Replay took {:.1} s.",
        args.idle_minutes,
        args.boot_minutes,
        agent.cloud_minutes.iter().max().map(|m| format!("{:02}:{:02}", m / 60, m % 60)).unwrap_or_else(|| "-".into()),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_stop_merges_calls_within_the_idle_time() {
        // 09:00 and 09:10 share one start; 12:00 needs another.
        let (minutes, starts) = gpu_minutes(&[540, 550, 720], 15, 3);
        assert_eq!(starts, 2);
        assert_eq!(minutes, (3 + 15 + 10) + (3 + 15));
    }
}
