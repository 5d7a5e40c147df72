//! `kotaemon doctor`: checks config, secrets, file permissions and every upstream, and says
//! what to fix. Secret values are never printed; only where they come from.

use kotaemon_core::config::SecretRef;
use kotaemon_core::{App, Config};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let source = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "embedded defaults".into());
    println!("config: {source}");
    if let Some(p) = path {
        match std::fs::metadata(p) {
            Ok(meta) if meta.permissions().mode() & 0o002 != 0 => {
                println!("  WARN  {} is world-writable: anyone on the device can redirect your traffic (chmod o-w)", p.display());
            }
            Ok(_) => println!("  ok    file permissions"),
            Err(e) => {
                println!("  FAIL  cannot read {}: {e}", p.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            println!("  FAIL  {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("  ok    configuration is valid");
    for r in secret_refs(&config) {
        if let SecretRef::File(file) = &r {
            if let Ok(meta) = std::fs::metadata(file) {
                if meta.permissions().mode() & 0o077 != 0 {
                    println!(
                        "  WARN  secret file {} is readable by others (chmod 600)",
                        file.display()
                    );
                }
            }
        }
    }
    let app = match App::build(config) {
        Ok(a) => a,
        Err(e) => {
            println!("  FAIL  {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "  ok    secrets resolve, pipeline builds: {}",
        app.pipeline.stage_names().join(" -> ")
    );
    for w in &app.warnings {
        failed = true;
        println!("  FAIL  {w}");
    }
    if app.pool.has_local() {
        println!("  ok    local model `{}` loaded", app.config.local.name);
    }
    let server = &app.config.server;
    if server.api_keys.is_empty() && server.clients.is_empty() {
        if !server.listen.ip().is_loopback() {
            println!(
                "  WARN  server.listen is {} but no client keys are set: the API is open to the network",
                server.listen
            );
        }
    } else {
        let mut clients: Vec<String> = (0..server.api_keys.len())
            .map(|i| format!("key-{i} [all scopes]"))
            .collect();
        clients.extend(server.clients.iter().map(|c| {
            let scopes: Vec<&str> = c.scopes.iter().map(|s| s.as_str()).collect();
            let rate = match c.requests_per_minute {
                0 => String::new(),
                n => format!(" {n}/min"),
            };
            format!("{} [{}]{rate}", c.name, scopes.join(","))
        }));
        println!("  ok    client keys: {}", clients.join("; "));
    }
    match app.bus.audit().dir() {
        Some(dir) => println!("  ok    audit log: {}", dir.display()),
        None => println!("  WARN  audit log is off ([audit] enabled = false)"),
    }
    println!("upstreams:");
    let probes = app.pool.members().iter().map(|m| async move {
        (
            m.name().clone(),
            m.upstream.probe(Duration::from_secs(5)).await,
        )
    });
    for (name, result) in futures::future::join_all(probes).await {
        match result {
            Ok(p) => {
                let shown: Vec<_> = p.models.iter().take(8).cloned().collect();
                let more = p.models.len().saturating_sub(shown.len());
                let models = if more > 0 {
                    format!("{} (+{more} more)", shown.join(", "))
                } else {
                    shown.join(", ")
                };
                println!(
                    "  ok    {name}: reachable in {:.1} ms; models: {}",
                    p.latency.as_secs_f64() * 1000.0,
                    if models.is_empty() {
                        "(none listed)".into()
                    } else {
                        models
                    }
                );
            }
            // A [[gpu]] instance is off until a turn needs it: not a fault.
            Err(e) if app.config.gpu.iter().any(|g| *g.upstream == *name) => {
                println!("  off   {name}: not answering [{}]; a [[gpu]] instance, started on demand (`kotaemon gpu start` to try it)", e.code());
            }
            Err(e) => {
                failed = true;
                println!("  FAIL  {name}: {} [{}]", e, e.code());
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn secret_refs(config: &Config) -> Vec<SecretRef> {
    let mut refs: Vec<SecretRef> = config.server.api_keys.clone();
    refs.extend(config.server.clients.iter().map(|c| c.key.clone()));
    for u in &config.upstreams {
        refs.extend(u.api_key.clone());
        refs.extend(u.client_key.clone());
        refs.extend(u.oauth2.as_ref().map(|o| o.client_secret.clone()));
    }
    for g in &config.gpu {
        refs.extend(g.start.headers.values().cloned());
        refs.extend(g.stop.headers.values().cloned());
    }
    refs
}
