//! `kotaemon`: the edge agent's command line. `println!` lives here and nowhere else.

mod audit_cli;
mod bench;
mod bench_cache;
mod bench_cost;
mod bench_local;
mod bench_pii;
mod bench_scenario;
mod cli_turn;
mod doctor;
mod gpu_cli;
mod models_cli;
mod usage_cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kotaemon_core::config::{LogFormat, DEFAULT_TOML};
use kotaemon_core::{App, Config};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kotaemon",
    version,
    about = "Edge AI agent: fast path local, heavy thinking in the cloud"
)]
struct Cli {
    /// Configuration file (TOML). Without one, the embedded defaults are used.
    #[arg(long, short, global = true, env = "KOTAEMON_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent's OpenAI-compatible API.
    Serve {
        /// Overrides server.listen.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Ask one question; the answer streams to the terminal.
    Ask {
        /// The question.
        prompt: Vec<String>,
        /// Model name (default: the first configured model, or "default").
        #[arg(long, short, env = "KOTAEMON_MODEL")]
        model: Option<String>,
        /// Wait for the whole answer instead of streaming it.
        #[arg(long)]
        no_stream: bool,
    },
    /// Interactive chat (type /reset to forget, /exit or Ctrl-D to leave).
    Chat {
        #[arg(long, short, env = "KOTAEMON_MODEL")]
        model: Option<String>,
    },
    /// Write the commented default configuration.
    Init {
        /// Where to write it.
        #[arg(default_value = "kotaemon.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check the configuration, secrets, file permissions and every upstream.
    Doctor,
    /// Start, stop or probe a self-hosted cloud GPU ([[gpu]]) by hand.
    Gpu(gpu_cli::GpuArgs),
    /// Cloud tokens, cost and what the device saved: today and this month.
    Usage(usage_cli::UsageArgs),
    /// The audit log of what left the device.
    Audit {
        #[command(subcommand)]
        cmd: audit_cli::AuditCmd,
    },
    /// Install, list and verify model files.
    Models {
        /// Models directory (default: $KOTAEMON_MODELS_DIR or ~/.local/share/kotaemon/models).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: models_cli::ModelsCmd,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Run the scripted fake upstream (tests and benchmarks).
    #[command(hide = true)]
    FakeUpstream {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Script used when none is queued (JSON, see kotaemon_fake_upstream::Script).
        #[arg(long)]
        default_script: Option<String>,
    },
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KOTAEMON_LOG")
        .unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.map(PathBuf::as_path))?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { listen } => {
            let mut config = load_config(cli.config.as_ref())?;
            if let Some(l) = listen {
                config.server.listen = l.parse().with_context(|| {
                    format!("--listen `{l}` is not an address like 127.0.0.1:8080")
                })?;
            }
            init_logging(&config);
            let addr = config.server.listen;
            let app = App::build(config)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            app.serve(listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ask {
            prompt,
            model,
            no_stream,
        } => {
            let config = load_config(cli.config.as_ref())?;
            init_logging(&config);
            let prompt = prompt.join(" ");
            if prompt.trim().is_empty() {
                anyhow::bail!("nothing to ask: give the question as arguments, e.g. kotaemon ask \"what time is it in Tokyo?\"");
            }
            let app = App::build(config)?;
            let model = model.unwrap_or_else(|| cli_turn::default_model(&app.config));
            let mut history = Vec::new();
            let asked = cli_turn::ask(&app, &model, &mut history, &prompt, !no_stream).await;
            // Before exiting: the turn's usage row reaches the ledger.
            app.shutdown().await;
            if let Some(id) = asked? {
                // A one-shot process cannot wait for a decision: say so, and signal it.
                eprintln!("action {id} needs your confirmation and was NOT done; use `kotaemon chat` (asks y/N) or the API (POST /v1/kotaemon/actions/{id}) of a running agent");
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat { model } => {
            let config = load_config(cli.config.as_ref())?;
            init_logging(&config);
            let app = App::build(config)?;
            let model = model.unwrap_or_else(|| cli_turn::default_model(&app.config));
            let chatted = cli_turn::repl(&app, &model).await;
            app.shutdown().await;
            chatted?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { path, force } => {
            if path.exists() && !force {
                anyhow::bail!("{} exists; use --force to overwrite it", path.display());
            }
            std::fs::write(&path, DEFAULT_TOML)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {} — edit the [[upstreams]] section, then run: kotaemon serve --config {}",
                path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { dir, cmd } => models_cli::run(cmd, dir).await,
        Command::Doctor => doctor::run(cli.config.as_deref()).await,
        Command::Gpu(args) => gpu_cli::run(args, cli.config.as_deref()).await,
        Command::Audit { cmd } => audit_cli::run(cmd, cli.config.as_deref()),
        Command::Usage(args) => usage_cli::run(args, cli.config.as_deref()),
        Command::Bench { which } => bench::run(which).await,
        Command::FakeUpstream {
            listen,
            default_script,
        } => {
            let default_script = default_script
                .map(|json| serde_json::from_str::<kotaemon_fake_upstream::Script>(&json))
                .transpose()
                .context("invalid --default-script")?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let fake = kotaemon_fake_upstream::FakeUpstream::start(listener).await;
            if let Some(script) = default_script {
                fake.set_default(script);
            }
            println!("listening on {}", fake.base_url());
            shutdown_signal().await;
            fake.shutdown();
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: draining requests in flight");
}
