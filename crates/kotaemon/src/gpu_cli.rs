//! `kotaemon gpu start|stop|status`: runs one `[[gpu]]` entry's hooks by hand and shows whether
//! its upstream answers. A running agent is not told; it notices by its own probes (an
//! instance stopped under it while ready looks preempted to it, and `on_preempt` applies).

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kotaemon_core::cost::lifecycle::{hooks, GpuConfig, Schedule};
use kotaemon_core::upstream::openai::OpenAiUpstream;
use kotaemon_core::upstream::{Probe, Upstream, UpstreamError};
use kotaemon_core::Config;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    cmd: GpuCmd,
}

#[derive(Subcommand)]
enum GpuCmd {
    /// Run the start hook, then wait until the upstream answers (at most ready_timeout_secs).
    Start(Select),
    /// Run the stop hook.
    Stop(Select),
    /// Probe the upstream once. Exit code 0 when it answers, 3 when it does not.
    Status(Select),
}

#[derive(Args)]
struct Select {
    /// The [[gpu]] entry, by its upstream's name (default: the only one).
    #[arg(long)]
    upstream: Option<String>,
}

/// Exit code of `status` when the upstream does not answer (as `systemctl is-active`).
const NOT_RUNNING: u8 = 3;

pub async fn run(args: GpuArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let select = match &args.cmd {
        GpuCmd::Start(s) | GpuCmd::Stop(s) | GpuCmd::Status(s) => s,
    };
    let (index, gpu) = choose(&config, select.upstream.as_deref())?;
    let (up_index, up_config) = config
        .upstreams
        .iter()
        .enumerate()
        .find(|(_, u)| u.name == gpu.upstream)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "gpu[{index}].upstream: no [[upstreams]] entry is named `{}`",
                gpu.upstream
            )
        })?;
    let upstream = OpenAiUpstream::new(up_config, &format!("upstreams[{up_index}]"))
        .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
    let name = gpu.upstream.as_str();
    match args.cmd {
        GpuCmd::Status(_) => {
            if let Some(s) = &gpu.schedule {
                let schedule = Schedule::new(s, &format!("gpu[{index}].schedule"))
                    .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
                let now = if schedule.is_open(chrono::Utc::now()) {
                    "inside a window (starts on demand)"
                } else {
                    "outside every window (kept off)"
                };
                println!("{name}: schedule: {now}");
            }
            match upstream.probe(probe_timeout(gpu)).await {
                Ok(p) => {
                    println!("{name}: ready — {}", describe(&p));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("{name}: not answering ({})", why(&e));
                    Ok(ExitCode::from(NOT_RUNNING))
                }
            }
        }
        GpuCmd::Stop(_) => {
            let hook = hooks::build(&gpu.stop, &format!("gpu[{index}].stop"))
                .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
            let spinner = spinner(name, "running the stop hook");
            let result = hook.run().await;
            spinner.finish_and_clear();
            match result {
                Ok(()) => {
                    println!("{name}: stop hook succeeded");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "error: {name}: stop hook failed: {e} — the instance may still be running"
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        GpuCmd::Start(_) => {
            let hook = hooks::build(&gpu.start, &format!("gpu[{index}].start"))
                .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
            let spinner = spinner(name, "running the start hook");
            let started = Instant::now();
            if let Err(e) = hook.run().await {
                spinner.finish_and_clear();
                eprintln!("error: {name}: start hook failed: {e}");
                return Ok(ExitCode::FAILURE);
            }
            spinner.set_message("started; waiting for the upstream to answer");
            let deadline = started + gpu.ready_timeout();
            loop {
                let last = match upstream.probe(probe_timeout(gpu)).await {
                    Ok(p) => {
                        spinner.finish_and_clear();
                        println!(
                            "{name}: ready after {} s — {}",
                            started.elapsed().as_secs(),
                            describe(&p)
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(e) => why(&e),
                };
                if Instant::now() >= deadline {
                    spinner.finish_and_clear();
                    eprintln!(
                        "error: {name}: not ready within ready_timeout_secs = {} (last probe: {last}); \
                         the instance may be running: `kotaemon gpu stop` stops it",
                        gpu.ready_timeout_secs
                    );
                    return Ok(ExitCode::FAILURE);
                }
                spinner.set_message(format!("waiting for the upstream; last probe: {last}"));
                tokio::time::sleep_until((Instant::now() + gpu.poll()).min(deadline)).await;
            }
        }
    }
}

fn choose<'a>(
    config: &'a Config,
    upstream: Option<&str>,
) -> anyhow::Result<(usize, &'a GpuConfig)> {
    let names = || {
        config
            .gpu
            .iter()
            .map(|g| g.upstream.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (upstream, config.gpu.len()) {
        (_, 0) => anyhow::bail!("the configuration has no [[gpu]] entry"),
        (Some(name), _) => config
            .gpu
            .iter()
            .enumerate()
            .find(|(_, g)| g.upstream == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no [[gpu]] entry for upstream `{name}` (there are: {})",
                    names()
                )
            }),
        (None, 1) => Ok((0, &config.gpu[0])),
        (None, _) => anyhow::bail!(
            "several [[gpu]] entries ({}): choose one with --upstream NAME",
            names()
        ),
    }
}

fn spinner(name: &str, message: &'static str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_prefix(name.to_string());
    spinner.set_message(message);
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

fn probe_timeout(gpu: &GpuConfig) -> Duration {
    gpu.poll()
        .clamp(Duration::from_secs(1), Duration::from_secs(10))
}

fn describe(p: &Probe) -> String {
    let models = if p.models.is_empty() {
        "no models listed".to_string()
    } else {
        format!("serving {}", p.models.join(", "))
    };
    format!("{models} ({} ms)", p.latency.as_millis())
}

/// Code and kind only: upstream errors carry no URLs or credentials.
fn why(e: &UpstreamError) -> String {
    format!("{}: {}", e.code(), e.kind)
}
