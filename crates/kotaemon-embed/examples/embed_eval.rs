//! Measures a model directory: paraphrase vs hard-negative cosines on
//! `tests/data/pairs.tsv`, and throughput / memory.
//!
//! `cargo run --release -p kotaemon-embed --example embed_eval -- pairs <model-dir> [pairs.tsv]`
//! `cargo run --release -p kotaemon-embed --example embed_eval -- embed <model-dir> <text>...`
//! `cargo run --release -p kotaemon-embed --example embed_eval -- bench <model-dir> <threads> [seconds]`
//!
//! Figures are printed, not asserted (benchmarks print, tests assert).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kotaemon_embed::{cosine, EmbedConfig, Embedder};

struct Pair {
    lang: String,
    para: bool,
    kind: String,
    a: String,
    b: String,
}

fn read_pairs(path: &PathBuf) -> Result<Vec<Pair>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 {
            return Err(format!(
                "{}:{}: expected 5 tab-separated fields",
                path.display(),
                n + 1
            ));
        }
        out.push(Pair {
            lang: f[0].to_string(),
            para: f[1] == "1",
            kind: f[2].to_string(),
            a: f[3].to_string(),
            b: f[4].to_string(),
        });
    }
    Ok(out)
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    v.iter().sum::<f32>() / v.len() as f32
}

/// Best accuracy of "cosine >= t means paraphrase" over every threshold.
fn best_threshold(paras: &[f32], negs: &[f32]) -> (f32, f32) {
    let mut cands: Vec<f32> = paras.iter().chain(negs).copied().collect();
    cands.sort_by(|a, b| a.total_cmp(b));
    let total = (paras.len() + negs.len()) as f32;
    let mut best = (0.0, 0.0);
    for &t in &cands {
        let ok =
            paras.iter().filter(|&&c| c >= t).count() + negs.iter().filter(|&&c| c < t).count();
        let acc = ok as f32 / total;
        if acc > best.1 {
            best = (t, acc);
        }
    }
    best
}

fn pairs(dir: PathBuf, file: PathBuf) -> Result<(), String> {
    let e = Embedder::load(EmbedConfig::new(dir)).map_err(|e| e.to_string())?;
    let pairs = read_pairs(&file)?;
    println!("model {}", e.model_id());
    let mut by_lang: BTreeMap<&str, Vec<(&Pair, f32)>> = BTreeMap::new();
    for p in &pairs {
        let v = e.embed(&[&p.a, &p.b]).map_err(|e| e.to_string())?;
        by_lang
            .entry(&p.lang)
            .or_default()
            .push((p, cosine(&v[0], &v[1])));
    }
    for (lang, rows) in by_lang {
        let paras: Vec<f32> = rows.iter().filter(|r| r.0.para).map(|r| r.1).collect();
        let hard: Vec<f32> = rows
            .iter()
            .filter(|r| !r.0.para && r.0.kind != "unrelated")
            .map(|r| r.1)
            .collect();
        let min_para = paras.iter().copied().fold(f32::INFINITY, f32::min);
        let max_hard = hard.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let hard_over = hard.iter().filter(|&&c| c >= min_para).count();
        let para_under = paras.iter().filter(|&&c| c <= max_hard).count();
        let (t, acc) = best_threshold(&paras, &hard);
        println!(
            "{lang}: paraphrase mean {:.3} min {:.3} | hard-neg mean {:.3} max {:.3} | \
             overlap: {hard_over}/{} hard negs >= min paraphrase, {para_under}/{} paraphrases <= max hard neg | \
             best threshold {t:.3} -> accuracy {:.0}%",
            mean(&paras),
            min_para,
            mean(&hard),
            max_hard,
            hard.len(),
            paras.len(),
            acc * 100.0
        );
        let mut kinds: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
        for (p, c) in &rows {
            kinds.entry(p.kind.as_str()).or_default().push(*c);
        }
        let line: Vec<String> = kinds
            .iter()
            .map(|(k, v)| format!("{k} {:.3} (n={})", mean(v), v.len()))
            .collect();
        println!("    by kind: {}", line.join(", "));
        if std::env::var_os("EVAL_VERBOSE").is_some() {
            for (p, c) in &rows {
                println!("    {c:.3} {} {} | {}", p.kind, p.a, p.b);
            }
        }
    }
    Ok(())
}

fn proc_status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l.to_string())
        })
        .unwrap_or_default()
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds per thread name (embed-pool-N = our matmul pool, candle-bp-N =
/// candle's element-wise pool), to show where the work ran.
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name.trim().to_string()).or_insert(0.0) += (ticks(11) + ticks(12)) / 100.0;
    }
    out
}

fn bench(dir: PathBuf, threads: usize, secs: u64) -> Result<(), String> {
    let t0 = Instant::now();
    let cfg = EmbedConfig {
        threads,
        ..EmbedConfig::new(dir)
    };
    let e = Embedder::load(cfg).map_err(|e| e.to_string())?;
    let load = t0.elapsed();
    let rss_loaded = proc_status("VmRSS");
    let sentences: Vec<&str> = vec![
        "How do I reset my password?",
        "明天上午10点开会",
        "Turn off the living room lights.",
        "帮我定一个早上七点的闹钟",
        "What's the weather like tomorrow?",
        "药店几点关门？",
        "Remind me to call mom tonight.",
        "给张经理打电话",
    ];
    e.embed(&sentences).map_err(|e| e.to_string())?; // warm-up
    let budget = Duration::from_secs(secs);
    for batch in [1usize, 32] {
        let inputs: Vec<&str> = sentences.iter().cycle().take(batch).copied().collect();
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        let mut n = 0usize;
        while start.elapsed() < budget {
            e.embed(&inputs).map_err(|e| e.to_string())?;
            n += batch;
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{} threads={threads} batch={batch}: {:.0} sentences/s (cpu/wall {:.2})",
            e.model_id(),
            n as f64 / wall,
            cpu / wall
        );
    }
    let per_thread: Vec<String> = thread_cpu()
        .iter()
        .filter(|(_, &c)| c > 0.05)
        .map(|(n, c)| format!("{n} {c:.1}s"))
        .collect();
    println!("cpu by thread: {}", per_thread.join(", "));
    println!(
        "load {:.2}s; after load {rss_loaded}; after runs {}; peak {}",
        load.as_secs_f64(),
        proc_status("VmRSS"),
        proc_status("VmHWM")
    );
    Ok(())
}

/// Prints the first dimensions of each text's embedding (to compare engines).
fn show(dir: PathBuf, texts: &[String]) -> Result<(), String> {
    let e = Embedder::load(EmbedConfig::new(dir)).map_err(|e| e.to_string())?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (t, v) in texts.iter().zip(e.embed(&refs).map_err(|e| e.to_string())?) {
        // EVAL_FULL=1 prints every dimension (to diff against another engine).
        let n = if std::env::var_os("EVAL_FULL").is_some() {
            v.len()
        } else {
            8
        };
        let head: Vec<String> = v.iter().take(n).map(|x| format!("{x:.7}")).collect();
        println!("{t}: [{} ...]", head.join(" "));
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("pairs") if args.len() >= 2 => {
            let file = args.get(2).map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/pairs.tsv")
            });
            pairs(PathBuf::from(&args[1]), file)
        }
        Some("embed") if args.len() >= 3 => show(PathBuf::from(&args[1]), &args[2..]),
        Some("bench") if args.len() >= 3 => match args[2].parse() {
            Ok(t) => bench(
                PathBuf::from(&args[1]),
                t,
                args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5),
            ),
            Err(_) => Err("threads must be a number".into()),
        },
        _ => Err("usage: embed_eval pairs <model-dir> [pairs.tsv] | embed <model-dir> <text>... | bench <model-dir> <threads> [seconds]".into()),
    };
    if let Err(e) = r {
        eprintln!("embed_eval: {e}");
        std::process::exit(1);
    }
}
