//! `kotaemon bench gateway`: the agent's overhead over a direct call to the same upstream.
//!
//! Starts the scripted fake upstream (zero added latency) and the agent as separate processes,
//! then drives both with the same open-loop load at fixed rates and a closed-loop run, and
//! prints percentiles, the added latency and the throughput ratio, all measured in one run.
//! Figures are for reading, never asserted: the machine is shared and noisy.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Subcommand)]
pub enum Which {
    /// Local model speed: raw llama.cpp vs. our engine vs. through the agent (one run).
    Local(crate::bench_local::Args),
    /// Sentence-embedding speed of each installed embedding model.
    Embed(crate::bench_local::EmbedArgs),
    /// Cache precision on a labelled set, and lookup latency.
    Cache(crate::bench_cache::Args),
    /// PII guard throughput (mask + restore) on mixed text.
    Pii(crate::bench_pii::Args),
    /// A day of mixed traffic: cloud tokens, cost and GPU-hours, agent vs all-cloud always-on.
    Cost(crate::bench_cost::Args),
    /// The meeting-room scenario (tools, Radicale, simulated cloud), stage by stage.
    Scenario(crate::bench_scenario::Args),
    /// Added latency and throughput of the agent vs. the upstream called directly.
    Gateway {
        /// Request rates (per second) of the open-loop runs.
        #[arg(long, value_delimiter = ',', default_values_t = vec![500u32, 1000, 2000])]
        rates: Vec<u32>,
        /// Seconds per measured cell.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections of the closed-loop run.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

pub async fn run(which: Which) -> anyhow::Result<ExitCode> {
    match which {
        Which::Local(args) => crate::bench_local::run(args).await,
        Which::Embed(args) => crate::bench_local::embed(args).await,
        Which::Cache(args) => crate::bench_cache::run(args).await,
        Which::Scenario(args) => crate::bench_scenario::run(args).await,
        Which::Cost(args) => crate::bench_cost::run(args).await,
        Which::Pii(args) => {
            tokio::task::spawn_blocking(move || crate::bench_pii::run(args)).await?
        }
        Which::Gateway {
            rates,
            seconds,
            concurrency,
        } => gateway(rates, seconds, concurrency).await,
    }
}

/// A child process killed when dropped, so a failed bench leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Complete,
    Stream,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Complete => "complete",
            Mode::Stream => "stream",
        }
    }
    fn body(self) -> Bytes {
        let stream = self == Mode::Stream;
        Bytes::from(
            serde_json::json!({
                "model": "fake-model",
                "messages": [{"role": "user", "content": "Say hello in five words."}],
                "stream": stream,
            })
            .to_string(),
        )
    }
}

/// One request; returns the latency that matters for the mode: the whole response for
/// `complete`, the first body byte for `stream` (then drains the stream).
async fn one(client: &HttpClient, url: &hyper::Uri, body: Bytes) -> Result<Duration, String> {
    let started = Instant::now();
    let req = hyper::Request::post(url.clone())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(req).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| e.to_string())?;
        first.get_or_insert_with(|| started.elapsed());
    }
    Ok(first.unwrap_or_else(|| started.elapsed()))
}

struct Cell {
    latencies: Vec<Duration>,
    errors: usize,
    achieved_rps: f64,
}

async fn open_loop(
    client: &HttpClient,
    url: &hyper::Uri,
    mode: Mode,
    rate: u32,
    seconds: u64,
) -> Cell {
    let total = rate as u64 * seconds;
    let body = mode.body();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for _ in 0..total {
        ticker.tick().await;
        let (client, url, body, tx) = (client.clone(), url.clone(), body.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(one(&client, &url, body).await);
        });
    }
    drop(tx);
    let mut cell = Cell {
        latencies: Vec::with_capacity(total as usize),
        errors: 0,
        achieved_rps: 0.0,
    };
    while let Some(r) = rx.recv().await {
        match r {
            Ok(d) => cell.latencies.push(d),
            Err(_) => cell.errors += 1,
        }
    }
    cell.achieved_rps = cell.latencies.len() as f64 / started.elapsed().as_secs_f64();
    cell.latencies.sort();
    cell
}

async fn closed_loop(
    client: &HttpClient,
    url: &hyper::Uri,
    concurrency: usize,
    seconds: u64,
) -> (f64, usize) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, done, errors) =
                (client.clone(), url.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    match one(&client, &url, Mode::Complete.body()).await {
                        Ok(_) => done.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let n = done.load(std::sync::atomic::Ordering::Relaxed);
    (
        n as f64 / started.elapsed().as_secs_f64(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn wait_ready(client: &HttpClient, url: &str) -> anyhow::Result<()> {
    let uri: hyper::Uri = url.parse()?;
    for _ in 0..100 {
        let req = hyper::Request::get(uri.clone()).body(Full::new(Bytes::new()))?;
        if let Ok(r) = client.request(req).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not become ready within 10 s")
}

async fn gateway(rates: Vec<u32>, seconds: u64, concurrency: usize) -> anyhow::Result<ExitCode> {
    if rates.is_empty() || rates.contains(&0) || seconds == 0 || concurrency == 0 {
        bail!("rates, seconds and concurrency must all be positive");
    }
    let exe = std::env::current_exe().context("cannot find the kotaemon executable")?;
    let mut fake = Proc(
        Command::new(&exe)
            .args(["fake-upstream", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the fake upstream")?,
    );
    let mut line = String::new();
    BufReader::new(
        fake.0
            .stdout
            .take()
            .context("fake upstream has no stdout")?,
    )
    .read_line(&mut line)?;
    let upstream = line
        .trim()
        .strip_prefix("listening on ")
        .context("fake upstream did not report its address")?
        .to_string();

    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("kotaemon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("bench.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_concurrent_turns = 100000\n[log]\nlevel = \"warn\"\n\
             [audit]\ndir = {:?}\n\
             [[upstreams]]\nname = \"fake\"\nbase_url = \"{upstream}\"\n",
            dir.join("audit")
        ),
    )?;
    let agent = Proc(
        Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the agent")?,
    );
    let client = client();
    wait_ready(&client, &format!("http://127.0.0.1:{port}/readyz")).await?;
    let idle_rss = rss_kib(agent.0.id());

    let direct: hyper::Uri = format!("{upstream}/chat/completions").parse()?;
    let through: hyper::Uri = format!("http://127.0.0.1:{port}/v1/chat/completions").parse()?;

    println!("kotaemon bench gateway: fake upstream with zero added latency; load generator, agent and upstream share this machine ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("{seconds} s per cell; latency = whole response (complete) or first byte (stream); open loop at fixed rates; audit log on (as shipped: one write-ahead record per upload)");
    println!();
    println!(
        "{:<9} {:>6} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>7} {:>6}",
        "mode",
        "rps",
        "direct50",
        "direct99",
        "agent50",
        "agent99",
        "added50",
        "added99",
        "thr.%",
        "errors"
    );
    for mode in [Mode::Complete, Mode::Stream] {
        // Warm both paths (connections, allocator) outside the measurement.
        open_loop(&client, &direct, mode, 200, 1).await;
        open_loop(&client, &through, mode, 200, 1).await;
        for &rate in &rates {
            let d = open_loop(&client, &direct, mode, rate, seconds).await;
            let a = open_loop(&client, &through, mode, rate, seconds).await;
            let (d50, d99, a50, a99) = (
                pct(&d.latencies, 0.5),
                pct(&d.latencies, 0.99),
                pct(&a.latencies, 0.5),
                pct(&a.latencies, 0.99),
            );
            println!(
                "{:<9} {:>6} | {:>7.0}us {:>7.0}us | {:>7.0}us {:>7.0}us | {:>+7.0}us {:>+7.0}us | {:>6.1}% {:>6}",
                mode.label(),
                rate,
                us(d50),
                us(d99),
                us(a50),
                us(a99),
                us(a50) - us(d50),
                us(a99) - us(d99),
                100.0 * a.achieved_rps / d.achieved_rps.max(1e-9),
                d.errors + a.errors
            );
        }
    }
    let (direct_rps, de) = closed_loop(&client, &direct, concurrency, seconds).await;
    let (agent_rps, ae) = closed_loop(&client, &through, concurrency, seconds).await;
    println!();
    println!(
        "closed loop, {concurrency} connections, non-stream: direct {direct_rps:.0} req/s, through the agent {agent_rps:.0} req/s, ratio {:.2} (errors {})",
        agent_rps / direct_rps.max(1e-9),
        de + ae
    );
    let loaded_rss = rss_kib(agent.0.id());
    let mib = |k: Option<u64>| {
        k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "agent RSS: idle {}, after load {}",
        mib(idle_rss),
        mib(loaded_rss)
    );
    drop(agent);
    drop(fake);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
