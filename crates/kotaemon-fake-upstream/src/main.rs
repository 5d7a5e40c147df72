//! `kotaemon-fake-upstream [--listen 127.0.0.1:0] [--default-script JSON]`

use anyhow::Context as _;
use clap::Parser;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use std::io::Write as _;

#[derive(Parser, Debug)]
#[command(
    name = "kotaemon-fake-upstream",
    about = "Scripted OpenAI-compatible fake upstream"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Default script, as JSON (used when no script is queued).
    #[arg(long)]
    default_script: Option<String>,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
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
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let default = match &args.default_script {
        Some(json) => {
            Some(serde_json::from_str::<Script>(json).context("invalid --default-script")?)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let server = FakeUpstream::start(listener).await;
    if let Some(script) = default {
        server.set_default(script);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.base_url())?;
        out.flush()?;
    }
    shutdown_signal().await;
    server.shutdown();
    Ok(())
}
