//! Cost accounting and spending limits over real sockets: the ledger adds up to exactly what
//! the upstream reported, a client's budget warns, then refuses at the right turn — and still
//! refuses after a restart; other clients go on.

use crate::harness::*;
use kotaemon_core::cost::ledger::report;
use kotaemon_core::events::TurnEvent;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::{json, Value};
use std::path::Path;

fn today() -> String {
    chrono::Local::now().format("%Y-%m-%d").to_string()
}

fn toml(fake: &FakeUpstream, ledger: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{extra}
[pool.health]
enabled = false
[stages.cache]
enabled = false
[usage]
path = {ledger:?}
[usage.prices]
"*" = {{ input = 1000.0, output = 2000.0 }}
[[upstreams]]
name = "cloud"
base_url = "{}"
"#,
        fake.base_url()
    )
}

fn usage_of(reply: &Reply, stream: bool) -> (u64, u64) {
    let usage: Value = if stream {
        reply
            .events()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|v| v["usage"].is_object())
            .map(|v| v["usage"].clone())
            .expect("the client asked for usage")
    } else {
        reply.json()["usage"].clone()
    };
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_adds_up_to_what_the_upstream_reported() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        text: Some("The quarterly report is ready for review.".into()),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("usage.db");
    let rules = "[stages.rules]\nenabled = true\n[[stages.rules.intents]]\nname = \"greeting\"\n\
                 patterns = ['^hello$']\nanswer = \"Hello! How can I help?\"\n";
    let agent = Agent::start_toml(
        &toml(&fake, &ledger, "").replace("[pool.health]", &format!("{rules}[pool.health]")),
    )
    .await;
    let (mut prompt, mut completion) = (0, 0);
    for (i, stream) in [false, true, false, true, false].into_iter().enumerate() {
        let mut body = json!({"model": "gpt-x", "stream": stream,
            "messages": [{"role": "user", "content": format!("summarize report number {i} for me")}]});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let reply = agent.chat(body).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let (p, c) = usage_of(&reply, stream);
        prompt += p;
        completion += c;
    }
    // A greeting answered by a rule: no cloud tokens, and it saved a cloud call.
    let hi = agent
        .chat(json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hello"}]}))
        .await;
    assert_eq!(hi.headers["x-kotaemon-answered-by"], "rules");
    // An upstream that reports no usage: the call is estimated, and marked so.
    fake.push(Script {
        text: Some("no usage here".into()),
        omit_usage: true,
        ..Script::default()
    });
    let quiet = agent
        .chat(json!({"model": "gpt-x", "messages": [{"role": "user", "content": "一个没有用量的回答"}]}))
        .await;
    assert_eq!(quiet.status, 200);
    assert!(quiet.json()["usage"].is_null());

    agent.bus.ledger().flush().await;
    let r = report(&ledger, "day", &today()).unwrap();
    assert_eq!((r.turns, r.answered_locally, r.cloud_calls), (7, 1, 6));
    assert_eq!(r.estimated_calls, 1);
    let estimated = r.by_model[0].prompt_tokens - prompt;
    assert!(
        estimated > 0,
        "the quiet call's tokens are estimated, not zero"
    );
    let quiet_completion = r.cloud_completion_tokens - completion;
    assert_eq!(
        quiet_completion, 4,
        "`no usage here`: 13 characters, ~4 tokens"
    );
    // Exactly what the upstream reported, priced per million tokens.
    let expected_cost = ((prompt + estimated) as f64 * 1000.0
        + (completion + quiet_completion) as f64 * 2000.0)
        / 1e6;
    assert!(
        (r.cost_usd - expected_cost).abs() < 1e-9,
        "{} vs {expected_cost}",
        r.cost_usd
    );
    assert!(
        r.saved_usd > 0.0,
        "the rule's answer is valued at the reference price"
    );
    let rules = r.by_answer.iter().find(|b| b.key == "rules").unwrap();
    assert_eq!(rules.turns, 1);
    let metrics = metrics_text(&agent).await;
    let micro = metric(
        &metrics,
        "kotaemon_cloud_cost_microusd_total",
        &[("upstream", "cloud")],
    )
    .unwrap_or(0.0);
    // The recorder is shared by every test in this process: at least this agent's cost.
    assert!(micro >= expected_cost * 1e6 - 6.0, "{micro}");
    agent.stop().await;
}

fn thresholds(events: &mut kotaemon_core::events::Subscription) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(e) = events.try_next() {
        if let TurnEvent::BudgetThreshold { scope, hard, .. } = e.as_ref() {
            out.push((scope.to_string(), *hard));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_budget_warns_then_refuses_and_holds_across_a_restart() {
    std::env::set_var("KOTAEMON_IT_BUDGET_PANEL", "panel-key-1");
    std::env::set_var("KOTAEMON_IT_BUDGET_SPEAKER", "speaker-key-1");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    // 100 prompt tokens and a one-word answer: 0.1 USD and a little per turn at these prices.
    fake.set_default(Script {
        text: Some("ok".into()),
        prompt_tokens: Some(100),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("usage.db");
    let clients = "[[server.clients]]\nname = \"panel\"\nkey = \"env:KOTAEMON_IT_BUDGET_PANEL\"\n\
                   [[server.clients]]\nname = \"speaker\"\nkey = \"env:KOTAEMON_IT_BUDGET_SPEAKER\"\n\
                   [budget]\non_exhausted = \"reject\"\nsoft_ratio = 0.5\n\
                   [budget.clients.panel]\ndaily_usd = 0.25\n";
    let config = toml(&fake, &ledger, clients);
    let ask = |agent: &Agent, key: &str| {
        send(
            client()
                .post(agent.chat_url())
                .bearer_auth(key.to_string())
                .json(&json!({"model": "gpt-x", "messages": [{"role": "user", "content": "status?"}]})),
        )
    };
    let agent = Agent::start_toml(&config).await;
    let mut events = agent.bus.subscribe();
    assert_eq!(ask(&agent, "panel-key-1").await.status, 200);
    assert_eq!(
        thresholds(&mut events),
        vec![],
        "0.10 of 0.25: below the soft limit"
    );
    assert_eq!(ask(&agent, "panel-key-1").await.status, 200);
    assert_eq!(
        thresholds(&mut events),
        vec![("panel".into(), false)],
        "0.20: past half"
    );
    assert_eq!(ask(&agent, "panel-key-1").await.status, 200);
    assert_eq!(
        thresholds(&mut events),
        vec![("panel".into(), true)],
        "0.30: the hard limit"
    );
    let refused = ask(&agent, "panel-key-1").await;
    refused.assert_error(429);
    assert_eq!(refused.error_code(), "insufficient_quota");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        ask(&agent, "speaker-key-1").await.status,
        200,
        "other clients go on"
    );
    assert_eq!(fake.chat_request_count(), 4);
    agent.bus.ledger().flush().await;
    agent.stop().await;

    // A restart reads today's spending back from the ledger.
    let agent = Agent::start_toml(&config).await;
    ask(&agent, "panel-key-1").await.assert_error(429);
    assert_eq!(ask(&agent, "speaker-key-1").await.status, 200);
    assert_eq!(fake.chat_request_count(), 5);
    agent.stop().await;
}
