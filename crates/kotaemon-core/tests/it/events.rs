//! The event sequence of whole turns, pinned: what plugins and metrics can rely on.

use crate::harness::*;
use kotaemon_core::events::TurnEvent;
use kotaemon_fake_upstream::{FakeUpstream, Script};

fn name(e: &TurnEvent) -> String {
    match e {
        TurnEvent::TurnStarted { stream, .. } => format!("turn_started(stream={stream})"),
        TurnEvent::StageDecided {
            stage, decision, ..
        } => format!("stage({stage}:{decision})"),
        TurnEvent::RuleMatched { intent, .. } => format!("rule({intent})"),
        TurnEvent::CacheLookup { outcome, .. } => format!("cache({outcome})"),
        TurnEvent::Routed { route, reason, .. } => format!("routed({}:{reason})", route.as_str()),
        TurnEvent::Degraded { reason, .. } => format!("degraded({reason})"),
        TurnEvent::UpstreamAttempt { attempt, .. } => format!("attempt({attempt})"),
        TurnEvent::UpstreamFinished { outcome, ttft, .. } => {
            format!("upstream_finished({outcome}, ttft={})", ttft.is_some())
        }
        TurnEvent::Retry { reason, .. } => format!("retry({reason})"),
        TurnEvent::RetryBudgetExhausted { .. } => "retry_budget_exhausted".into(),
        TurnEvent::TokensUsed { .. } => "tokens_used".into(),
        TurnEvent::ToolCalled { tool, outcome, .. } => format!("tool({tool}:{outcome})"),
        TurnEvent::PiiMasked { entity, count, .. } => format!("pii({entity}:{count})"),
        TurnEvent::BreakerChanged { to, .. } => format!("breaker({})", to.as_str()),
        TurnEvent::HealthChanged { healthy, .. } => format!("health({healthy})"),
        TurnEvent::Overhead { .. } => "overhead".into(),
        TurnEvent::TurnFinished { outcome, .. } => format!("turn_finished({})", outcome.label()),
        TurnEvent::GpuState { to, reason, .. } => format!("gpu({to}:{reason})"),
        TurnEvent::BudgetThreshold { scope, hard, .. } => format!("budget({scope}, hard={hard})"),
        TurnEvent::JobFinished { status, .. } => format!("job({status})"),
    }
}

async fn sequence(agent: &Agent, body: serde_json::Value) -> Vec<String> {
    let mut sub = agent.bus.subscribe();
    let reply = agent.chat(body).await;
    let turn = reply.headers["x-kotaemon-turn-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut seen = Vec::new();
    // The stream's end is reported when its body is dropped: wait for the finishing event.
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
            .await
            .expect("no turn_finished")
            .unwrap();
        let ours = e.turn_id().is_none_or(|t| t.as_str() == turn);
        if ours {
            seen.push(name(&e));
        }
        if matches!(&*e, TurnEvent::TurnFinished { .. }) && ours {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sequences_of_whole_turns() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let pool = "[pool]\nbackoff_base_ms = 1\nbackoff_max_ms = 1\nbackoff_jitter = 0.0\n[pool.health]\nenabled = false\n";
    let agent = Agent::start(&[("events", &fake)], "", pool).await;
    assert_eq!(
        sequence(&agent, ask(false)).await,
        [
            "turn_started(stream=false)",
            "stage(pii_guard:clean)",
            "routed(cloud:no_local_model)",
            "stage(llm:cloud)",
            "attempt(1)",
            "upstream_finished(ok, ttft=false)",
            "tokens_used",
            "overhead",
            "turn_finished(ok)"
        ]
    );
    assert_eq!(
        sequence(&agent, ask(true)).await,
        [
            "turn_started(stream=true)",
            "stage(pii_guard:clean)",
            "routed(cloud:no_local_model)",
            "stage(llm:cloud)",
            "attempt(1)",
            "overhead",
            "tokens_used",
            "upstream_finished(ok, ttft=true)",
            "turn_finished(ok)"
        ]
    );
    fake.push(Script {
        status: 503,
        ..Script::default()
    });
    assert_eq!(
        sequence(&agent, ask(false)).await,
        [
            "turn_started(stream=false)",
            "stage(pii_guard:clean)",
            "routed(cloud:no_local_model)",
            "stage(llm:cloud)",
            "attempt(1)",
            "upstream_finished(upstream_server_error, ttft=false)",
            "retry(upstream_server_error)",
            "attempt(2)",
            "upstream_finished(ok, ttft=false)",
            "tokens_used",
            "overhead",
            "turn_finished(ok)"
        ]
    );
    agent.stop().await;
}
