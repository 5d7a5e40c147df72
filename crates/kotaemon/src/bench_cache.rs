//! `kotaemon bench cache`: how often the semantic cache answers a *different* question, and
//! what a lookup costs.
//!
//! Precision: for every labelled pair of `cache_pairs.tsv`, side A is stored in an empty
//! namespace of a real [`Store`] and side B is looked up (a hit = cosine ≥ threshold and, with
//! the guard, `guard::disagreement` finds nothing). Swept over thresholds, per embedding model,
//! for English, Chinese and both. Latency: the real store on a temporary SQLite file filled
//! with random unit vectors in one namespace (the worst case for the brute-force index).
//! Figures are for reading, never asserted.

use anyhow::Context as _;
use kotaemon_core::stages::cache::guard;
use kotaemon_core::stages::cache::key::{normalize, CacheKey};
use kotaemon_core::stages::cache::store::Store;
use kotaemon_core::stages::cache::{CacheConfig, Embed};
use kotaemon_core::wire::Usage;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The labelled set shipped with the source (see its header for what it is).
const PAIRS: &str = include_str!("../../kotaemon-core/tests/data/cache_pairs.tsv");

#[derive(clap::Args)]
pub struct Args {
    /// Embedding models (installed names or directories).
    #[arg(long, value_delimiter = ',', default_values_t = vec![
        "multilingual-e5-small-q4".to_string(),
        "all-minilm-l6-v2".to_string(),
    ])]
    models: Vec<String>,
    /// Labelled pairs (TSV: lang, label, kind, a, b); default: the built-in set.
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Similarity thresholds to sweep.
    #[arg(long, value_delimiter = ',', default_values_t = vec![
        0.70f32, 0.75, 0.80, 0.85, 0.88, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99,
    ])]
    thresholds: Vec<f32>,
    /// Store sizes (entries) of the latency runs; empty to skip them.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1_000usize, 10_000, 100_000])]
    sizes: Vec<usize>,
    /// Timed lookups per size and layer.
    #[arg(long, default_value_t = 300)]
    lookups: usize,
    /// List the pairs that are wrong at this threshold (false hits; paraphrases the guard refuses).
    #[arg(long)]
    show_errors: Option<f32>,
    /// Skip the precision tables.
    #[arg(long)]
    no_precision: bool,
}

struct Pair {
    lang: String,
    same: bool,
    kind: String,
    a: String,
    b: String,
}

fn parse_pairs(text: &str) -> anyhow::Result<Vec<Pair>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() || line.starts_with("lang\t") {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let [lang, label, kind, a, b] = f[..] else {
            anyhow::bail!("pairs line {}: expected 5 tab-separated fields", n + 1);
        };
        out.push(Pair {
            lang: lang.into(),
            same: label == "1",
            kind: kind.into(),
            a: a.into(),
            b: b.into(),
        });
    }
    Ok(out)
}

fn key(namespace: &str, prompt: &str) -> CacheKey {
    let normalized = normalize(prompt);
    CacheKey {
        namespace: namespace.into(),
        prompt: prompt.into(),
        exact: format!("{namespace}\n{normalized}"),
        normalized,
    }
}

fn temp_db(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kotaemon-bench-cache-{}-{tag}.db",
        std::process::id()
    ))
}

/// Removes the database and its WAL files when dropped.
struct TempDb(PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The configured default threshold of a model: the shipped config's for its model, the
/// built-in default's otherwise.
fn default_threshold(model: &str) -> Option<f32> {
    let shipped = kotaemon_core::config::DEFAULT_TOML;
    let section = shipped.split("[stages.cache]").nth(1)?;
    let value = |name: &str| {
        section
            .lines()
            .take_while(|l| !l.starts_with('['))
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_start_matches('=').trim().trim_matches('"'))
    };
    let model_name = std::path::Path::new(model)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(model);
    if value("embedding_model ") == Some(model_name) {
        value("threshold ")?.parse().ok()
    } else {
        Some(CacheConfig::default().threshold)
    }
}

#[derive(Default, Clone, Copy)]
struct Tally {
    para: usize,
    para_hits: usize,
    other: usize,
    false_hits: usize,
}

impl Tally {
    fn add(&mut self, same: bool, hit: bool) {
        if same {
            self.para += 1;
            self.para_hits += usize::from(hit);
        } else {
            self.other += 1;
            self.false_hits += usize::from(hit);
        }
    }
    fn cells(&self) -> String {
        let pct = |a: usize, b: usize| {
            if b == 0 {
                "    -".to_string()
            } else {
                format!("{:5.1}", 100.0 * a as f64 / b as f64)
            }
        };
        format!(
            "{} {} {}",
            pct(self.para_hits, self.para),
            pct(self.false_hits, self.other),
            pct(self.para_hits, self.para_hits + self.false_hits)
        )
    }
}

/// Similarity of each pair through the real store: A stored alone in its namespace, B looked up.
fn similarities(embed: &dyn Embed, pairs: &[Pair]) -> anyhow::Result<Vec<f32>> {
    let db = TempDb(temp_db("pairs"));
    let store = Store::open(&db.0, embed.model_id(), embed.dim(), pairs.len() + 1)?;
    let mut out = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let ns = format!("pair-{i}");
        let a = embed.embed(&p.a).map_err(anyhow::Error::msg)?;
        store.insert(&key(&ns, &p.a), Some(&a), "answer", Usage::default())?;
        let b = embed.embed(&p.b).map_err(anyhow::Error::msg)?;
        let (_, sim) = store
            .nearest(&ns, &b)
            .with_context(|| format!("pair {i}: stored entry not found"))?;
        out.push(sim);
    }
    Ok(out)
}

fn precision(args: &Args, model: &str, embed: &dyn Embed, pairs: &[Pair]) -> anyhow::Result<()> {
    let started = Instant::now();
    let sims = similarities(embed, pairs)?;
    let guard_started = Instant::now();
    let refusals: Vec<Option<&'static str>> = pairs
        .iter()
        .map(|p| guard::disagreement(&p.b, &p.a))
        .collect();
    let guard_us = guard_started.elapsed().as_secs_f64() * 1e6 / pairs.len().max(1) as f64;
    let marked = default_threshold(model);
    println!(
        "\n== {model} (dim {}, {} pairs embedded in {:.1} s; * = configured default {}) ==",
        embed.dim(),
        pairs.len(),
        started.elapsed().as_secs_f64(),
        marked.map_or("none".into(), |t| format!("{t:.2}")),
    );
    println!("hit = paraphrases answered from cache, false = non-paraphrases answered, prec = true hits / all hits (all %)");
    println!(
        "{:>6} {:>5} | {:^17} | {:^17} | {:^17}",
        "thresh", "guard", "English", "Chinese", "both"
    );
    println!(
        "{:>6} {:>5} | {:>5} {:>5} {:>5} | {:>5} {:>5} {:>5} | {:>5} {:>5} {:>5}",
        "", "", "hit", "false", "prec", "hit", "false", "prec", "hit", "false", "prec"
    );
    for &t in &args.thresholds {
        for with_guard in [false, true] {
            let (mut en, mut zh, mut all) = (Tally::default(), Tally::default(), Tally::default());
            for ((p, s), r) in pairs.iter().zip(&sims).zip(&refusals) {
                let hit = *s >= t && !(with_guard && r.is_some());
                match p.lang.as_str() {
                    "zh" => zh.add(p.same, hit),
                    _ => en.add(p.same, hit),
                }
                all.add(p.same, hit);
            }
            let mark = if marked.is_some_and(|m| (m - t).abs() < 1e-4) {
                "*"
            } else {
                " "
            };
            println!(
                "{mark}{t:>5.2} {:>5} | {} | {} | {}",
                if with_guard { "on" } else { "off" },
                en.cells(),
                zh.cells(),
                all.cells()
            );
        }
    }
    // What the guard refuses, by kind, over the whole set (independent of the threshold).
    let mut by_kind: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for (p, r) in pairs.iter().zip(&refusals) {
        let e = by_kind.entry(p.kind.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(r.is_some());
    }
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(k, (n, r))| format!("{k} {r}/{n}"))
        .collect();
    println!(
        "guard refuses (any similarity): {}; {guard_us:.1} µs per check",
        kinds.join(", ")
    );
    if let Some(t) = args.show_errors {
        println!("errors at {t:.2} with the guard:");
        for ((p, s), r) in pairs.iter().zip(&sims).zip(&refusals) {
            if *s < t {
                continue;
            }
            match (p.same, r) {
                (false, None) => println!("  FALSE HIT {:.3} [{}] {} | {}", s, p.kind, p.a, p.b),
                (true, Some(why)) => {
                    println!("  REFUSED   {:.3} [{why}] {} | {}", s, p.a, p.b)
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// xorshift64*: reproducible random vectors without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.into_iter().map(|x| x / n).collect()
    }
}

fn pct(samples: &mut [Duration], q: f64) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    let d = samples[i.min(samples.len() - 1)];
    if d < Duration::from_millis(1) {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn latency(args: &Args, embed: &dyn Embed, pairs: &[Pair]) -> anyhow::Result<()> {
    let dim = embed.dim();
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.a.as_str(), p.b.as_str()])
        .collect();
    anyhow::ensure!(!texts.is_empty(), "no pairs to take texts from");
    println!(
        "\n== lookup latency: real Store, temp SQLite file, one namespace, dim {dim}, {} lookups per cell; e2e embeds with {} ==",
        args.lookups,
        embed.model_id()
    );
    println!(
        "{:>8} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9}",
        "entries", "fill s", "exact p50", "p99", "near p50", "p99", "e2e p50", "p99"
    );
    let ns = "bench";
    for &size in &args.sizes {
        let db = TempDb(temp_db(&size.to_string()));
        let store = Store::open(&db.0, embed.model_id(), dim, size + 1)?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ size as u64);
        let filled = Instant::now();
        let prompt = |i: usize| format!("{} (#{i})", texts[i % texts.len()]);
        for i in 0..size {
            let v = rng.unit(dim);
            store.insert(&key(ns, &prompt(i)), Some(&v), "answer", Usage::default())?;
        }
        let fill_s = filled.elapsed().as_secs_f64();
        let (mut exact, mut near, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..args.lookups {
            let k = key(ns, &prompt((rng.next() as usize) % size.max(1)));
            let t = Instant::now();
            let found = store.exact(&k, 3600)?;
            exact.push(t.elapsed());
            anyhow::ensure!(found.is_some(), "exact lookup missed a stored key");
            let q = rng.unit(dim);
            let t = Instant::now();
            let best = store.nearest(ns, &q);
            near.push(t.elapsed());
            anyhow::ensure!(best.is_some(), "nearest found nothing");
            // End to end: embed the question, nearest, read the candidate, guard it.
            let question = texts[j % texts.len()];
            let t = Instant::now();
            let v = embed.embed(question).map_err(anyhow::Error::msg)?;
            if let Some((id, _)) = store.nearest(ns, &v) {
                if let Some(entry) = store.get_fresh(id, 3600)? {
                    std::hint::black_box(guard::disagreement(question, &entry.prompt));
                }
            }
            e2e.push(t.elapsed());
        }
        println!(
            "{size:>8} {fill_s:>9.1} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9}",
            pct(&mut exact, 0.5),
            pct(&mut exact, 0.99),
            pct(&mut near, 0.5),
            pct(&mut near, 0.99),
            pct(&mut e2e, 0.5),
            pct(&mut e2e, 0.99),
        );
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || run_blocking(&args)).await?
}

fn run_blocking(args: &Args) -> anyhow::Result<ExitCode> {
    let text = match &args.pairs {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => PAIRS.to_string(),
    };
    let pairs = parse_pairs(&text)?;
    let count = |lang: &str, same: bool| {
        pairs
            .iter()
            .filter(|p| p.lang == lang && p.same == same)
            .count()
    };
    println!(
        "labelled pairs: English {} paraphrases / {} not, Chinese {} / {}",
        count("en", true),
        count("en", false),
        count("zh", true),
        count("zh", false)
    );
    let mut loaded: Vec<(String, Arc<dyn Embed>)> = Vec::new();
    for m in &args.models {
        match kotaemon_core::embedding::load(m) {
            Ok(e) => loaded.push((m.clone(), e)),
            Err(e) => println!("skipping {m}: {e}"),
        }
    }
    anyhow::ensure!(!loaded.is_empty(), "no embedding model could be loaded");
    if !args.no_precision {
        for (name, embed) in &loaded {
            precision(args, name, embed.as_ref(), &pairs)?;
        }
    }
    if !args.sizes.is_empty() {
        latency(args, loaded[0].1.as_ref(), &pairs)?;
        for (name, embed) in &loaded {
            let mut samples = Vec::new();
            for p in pairs.iter().take(args.lookups.min(pairs.len())) {
                let t = Instant::now();
                embed.embed(&p.b).map_err(anyhow::Error::msg)?;
                samples.push(t.elapsed());
            }
            println!(
                "query embedding alone, {name}: p50 {}, p99 {}",
                pct(&mut samples, 0.5),
                pct(&mut samples, 0.99)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
