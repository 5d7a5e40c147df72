//! `kotaemon bench scenario`: the founding meeting-room scenario, timed stage by stage.
//!
//! A simulated cloud (the fake upstream: TTFT and tokens/s as given, answering with the tool
//! calls a capable model makes), the device's own contacts directory, and a real Radicale
//! started for the run. Each turn books a meeting on a different day; the events of the turn
//! tell where its time went: the cloud (every model call), the tools (wall time of each tool
//! step), and the rest — the agent's own share.

use anyhow::Context as _;
use clap::Args as ClapArgs;
use kotaemon_core::events::TurnEvent;
use kotaemon_fake_upstream::services::Radicale;
use kotaemon_fake_upstream::{FakeUpstream, Script, ScriptToolCall};
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;

#[derive(ClapArgs)]
pub struct Args {
    /// Turns to run (each books a meeting on its own day).
    #[arg(long, default_value_t = 10)]
    turns: u32,
    /// Simulated cloud time to first token, per model call.
    #[arg(long, default_value_t = 250)]
    ttft_ms: u64,
    /// Simulated cloud generation speed.
    #[arg(long, default_value_t = 50)]
    tokens_per_second: u64,
}

const UTTERANCE: &str = "帮我安排明天上午10点的会议,主题是产品发布,邀请张经理和李总监";
const ANSWER: &str = "已为您创建明天上午10点的产品发布会会议";

fn script(args: &Args, day: chrono::NaiveDate) -> Vec<Script> {
    let inter_chunk_ms = 1000 / args.tokens_per_second.max(1);
    let timed = |s: Script| Script {
        ttft_ms: args.ttft_ms,
        inter_chunk_ms,
        ..s
    };
    let calls = |list: Vec<(&str, serde_json::Value)>| {
        timed(Script {
            tool_calls: list
                .into_iter()
                .map(|(name, a)| ScriptToolCall {
                    name: name.into(),
                    arguments: a.to_string(),
                })
                .collect(),
            ..Script::default()
        })
    };
    let (start, end) = (format!("{day}T10:00"), format!("{day}T11:00"));
    vec![
        calls(vec![
            ("contacts_lookup", json!({"name": "张经理"})),
            ("contacts_lookup", json!({"name": "李总监"})),
        ]),
        calls(vec![(
            "calendar_find_conflicts",
            json!({"start": start, "end": end}),
        )]),
        calls(vec![(
            "calendar_create_event",
            json!({"summary": "产品发布", "start": start, "end": end, "attendees": [
                {"name": "张伟", "email": "zhang.wei@example.com"},
                {"name": "李娜", "email": "li.na@example.com"}]}),
        )]),
        timed(Script {
            text: Some(ANSWER.into()),
            ..Script::default()
        }),
    ]
}

#[derive(Default, Clone, Copy)]
struct Split {
    total: Duration,
    cloud: Duration,
    tools: Duration,
    cloud_calls: u32,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let radicale = Radicale::start().await.map_err(anyhow::Error::msg)?;
    let fake = FakeUpstream::bind_loopback().await?;
    // The audit log is on, as shipped, in a directory of this run.
    let audit_dir =
        std::env::temp_dir().join(format!("kotaemon-bench-audit-{}", std::process::id()));
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[audit]
dir = {audit_dir:?}
[local]
enabled = false
[stages.cache]
enabled = false
[pool.health]
enabled = false
[[upstreams]]
name = "simulated-cloud"
base_url = "{}"
[tools.calendar]
enabled = true
url = "{}"
username = "{}"
password = "file:{}"
create_calendar_if_missing = true
[tools.contacts]
enabled = true
[[tools.contacts.entries]]
name = "张伟"
email = "zhang.wei@example.com"
title = "产品经理"
[[tools.contacts.entries]]
name = "李娜"
email = "li.na@example.com"
title = "技术总监"
"#,
        fake.base_url(),
        radicale.calendar_url(),
        radicale.user,
        radicale.password_file().display()
    );
    let config = kotaemon_core::Config::from_toml_str(&toml)?;
    let app = kotaemon_core::App::build(config)?;
    let bus = app.bus.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let http = reqwest::Client::new();
    let today = (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive();
    println!(
        "scenario: \"{UTTERANCE}\"\nsimulated cloud: TTFT {} ms, {} tokens/s; contacts on the device; Radicale on loopback; {} turns",
        args.ttft_ms, args.tokens_per_second, args.turns
    );
    let mut splits = Vec::new();
    // One warm-up turn (connection pools, first calendar creation) is not counted.
    for i in 0..=args.turns {
        let day = today + chrono::Duration::days(1 + i64::from(i));
        for s in script(&args, day) {
            fake.push(s);
        }
        let mut events = bus.subscribe();
        let response = http
            .post(&url)
            .json(&json!({"model": "fake-model", "messages": [{"role": "user", "content": UTTERANCE}]}))
            .send()
            .await?;
        let turn = response
            .headers()
            .get("x-kotaemon-turn-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body: serde_json::Value = response.json().await?;
        let text = body
            .pointer("/choices/0/message/content")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        anyhow::ensure!(text == ANSWER, "unexpected answer: {body}");
        let mut split = Split::default();
        let mut step_tools = Duration::ZERO;
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .context("no turn_finished event")?
                .context("event bus closed")?;
            if e.turn_id().map(|t| t.as_str()) != Some(turn.as_str()) {
                continue;
            }
            match &*e {
                TurnEvent::UpstreamFinished { elapsed, .. } => {
                    // Tools of one step run in parallel: the step costs its slowest call.
                    split.tools += std::mem::take(&mut step_tools);
                    split.cloud += *elapsed;
                    split.cloud_calls += 1;
                }
                TurnEvent::ToolCalled { elapsed, .. } => step_tools = step_tools.max(*elapsed),
                TurnEvent::TurnFinished { elapsed, .. } => {
                    split.tools += step_tools;
                    split.total = *elapsed;
                    break;
                }
                _ => {}
            }
        }
        if i > 0 {
            splits.push(split);
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    let events_left = radicale_events(&http, &radicale).await.unwrap_or(0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let stat = |f: &dyn Fn(&Split) -> Duration| {
        let mut v: Vec<f64> = splits.iter().map(|s| ms(f(s))).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let p50 = v.get(v.len() / 2).copied().unwrap_or(0.0);
        let max = v.last().copied().unwrap_or(0.0);
        (mean, p50, max)
    };
    println!(
        "\n{:<34} {:>9} {:>9} {:>9}",
        "where the time went", "mean ms", "p50 ms", "max ms"
    );
    let rows: [(&str, &dyn Fn(&Split) -> Duration); 4] = [
        ("cloud (4 model calls)", &|s: &Split| s.cloud),
        ("tools (contacts, conflicts, create)", &|s: &Split| s.tools),
        ("agent's own share", &|s: &Split| {
            s.total.saturating_sub(s.cloud).saturating_sub(s.tools)
        }),
        ("total", &|s: &Split| s.total),
    ];
    for (name, f) in rows {
        let (mean, p50, max) = stat(f);
        println!("{name:<34} {mean:>9.1} {p50:>9.1} {max:>9.1}");
    }
    let calls = splits.first().map(|s| s.cloud_calls).unwrap_or(0);
    println!(
        "\n{calls} cloud calls per turn; {events_left} events in Radicale after {} turns (one per turn, warm-up included)",
        args.turns + 1
    );
    let _ = std::fs::remove_dir_all(&audit_dir);
    Ok(ExitCode::SUCCESS)
}

async fn radicale_events(http: &reqwest::Client, radicale: &Radicale) -> anyhow::Result<usize> {
    let body = r#"<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>
</C:calendar-query>"#;
    let text = http
        .request(
            reqwest::Method::from_bytes(b"REPORT")?,
            radicale.calendar_url(),
        )
        .basic_auth(&radicale.user, Some(&radicale.password))
        .header("Depth", "1")
        .header("Content-Type", "application/xml")
        .body(body)
        .send()
        .await?
        .text()
        .await?;
    Ok(text.matches("getetag>").count() / 2)
}
