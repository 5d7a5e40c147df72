//! `kotaemon usage`: what the cloud cost today and this month, by model, answerer and client
//! key, read from the usage ledger.

use clap::Args;
use kotaemon_core::cost::ledger::{report, Breakdown, Report};
use kotaemon_core::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct UsageArgs {
    /// The ledger (default: [usage] path of the configuration).
    #[arg(long)]
    db: Option<PathBuf>,
    /// A day (YYYY-MM-DD) or month (YYYY-MM) instead of today and this month.
    #[arg(long)]
    period: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: UsageArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let db = match args.db {
        Some(p) => p,
        None => Config::load(config)?.usage.db_path(),
    };
    if !db.exists() {
        anyhow::bail!(
            "no usage ledger at {} (nothing recorded yet, or [usage] enabled = false)",
            db.display()
        );
    }
    let now = chrono::Local::now();
    let periods: Vec<(&str, String)> = match &args.period {
        Some(p) if is_day(p) => vec![("day", p.clone())],
        Some(p) if is_month(p) => vec![("month", p.clone())],
        Some(p) => anyhow::bail!("--period `{p}`: give a day (YYYY-MM-DD) or a month (YYYY-MM)"),
        None => vec![
            ("day", now.format("%Y-%m-%d").to_string()),
            ("month", now.format("%Y-%m").to_string()),
        ],
    };
    let mut reports = Vec::new();
    for (column, value) in &periods {
        reports.push(
            report(&db, column, value)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", db.display()))?,
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print_report(r);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn is_day(p: &str) -> bool {
    chrono::NaiveDate::parse_from_str(p, "%Y-%m-%d").is_ok()
}

fn is_month(p: &str) -> bool {
    chrono::NaiveDate::parse_from_str(&format!("{p}-01"), "%Y-%m-%d").is_ok() && p.len() == 7
}

fn print_report(r: &Report) {
    println!("== {} ==", r.period);
    println!(
        "turns {}  answered on the device {} ({:.0}%)  cloud calls {}",
        r.turns,
        r.answered_locally,
        r.local_share * 100.0,
        r.cloud_calls
    );
    println!(
        "cloud tokens {} in / {} out   local tokens {} in / {} out   estimated calls {}",
        r.cloud_prompt_tokens,
        r.cloud_completion_tokens,
        r.local_prompt_tokens,
        r.local_completion_tokens,
        r.estimated_calls
    );
    println!(
        "cloud cost ${:.4}   saved by the device ${:.4}   GPU {:.2} h (${:.2})",
        r.cost_usd, r.saved_usd, r.gpu_hours, r.gpu_cost_usd
    );
    if let Some(per_million) = r.gpu_usd_per_million_tokens {
        println!(
            "GPU upstreams served {} tokens: ${per_million:.2} per million once their hours are counted",
            r.gpu_tokens
        );
    }
    table("by model", &r.by_model, true);
    table("by answer", &r.by_answer, false);
    table("by client", &r.by_client, true);
    println!();
}

fn table(title: &str, rows: &[Breakdown], calls: bool) {
    if rows.is_empty() {
        return;
    }
    println!("  {title}:");
    for b in rows {
        if calls {
            println!(
                "    {:<32} {:>6} calls {:>10} in {:>10} out  ${:.4}",
                b.key, b.calls, b.prompt_tokens, b.completion_tokens, b.cost_usd
            );
        } else {
            println!(
                "    {:<32} {:>6} turns  saved ${:.4}",
                b.key, b.turns, b.cost_usd
            );
        }
    }
}
