//! Plugins on the event bus: an in-process component sees every event and can ask the agent;
//! the webhook sink posts events (codes, never user text) with its credential.

use crate::harness::*;
use async_trait::async_trait;
use kotaemon_core::events::TurnEvent;
use kotaemon_core::plugins::{AgentHandle, Component};
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// Records finished turns; on the first one it sees, asks the agent something itself.
struct Recorder {
    finished: Mutex<Vec<String>>,
    asked: Mutex<Option<String>>,
}

#[async_trait]
impl Component for Recorder {
    type Input = Arc<TurnEvent>;
    type Output = ();
    fn name(&self) -> &'static str {
        "recorder"
    }
    async fn run(&self, event: Arc<TurnEvent>, agent: &AgentHandle) {
        if let TurnEvent::TurnFinished { outcome, .. } = &*event {
            self.finished
                .lock()
                .unwrap()
                .push(outcome.label().to_string());
            let first = self.asked.lock().unwrap().is_none();
            if first {
                let answer = agent.ask("fake-model", "status?").await;
                *self.asked.lock().unwrap() =
                    Some(answer.unwrap_or_else(|e| format!("error {}", e.code)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_sees_turn_events_and_can_ask_the_agent() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        text: Some("all good".into()),
        ..Script::default()
    });
    let config = kotaemon_core::Config::from_toml_str(&format!(
        "[local]\nenabled = false\n[audit]\nenabled = false\n[usage]\nenabled = false\n[queue]\nenabled = false\n[pool.health]\nenabled = false\n[[upstreams]]\nname = \"c\"\nbase_url = \"{}\"\n",
        fake.base_url()
    ))
    .unwrap();
    let app = kotaemon_core::App::build(config).unwrap();
    let recorder = Arc::new(Recorder {
        finished: Mutex::default(),
        asked: Mutex::default(),
    });
    app.spawn_event_component(recorder.clone());
    let answer = app.agent_handle().ask("fake-model", "hello there").await;
    assert_eq!(answer.unwrap(), "all good");
    eventually("the component asked the agent", || {
        recorder.asked.lock().unwrap().is_some()
    })
    .await;
    assert_eq!(recorder.asked.lock().unwrap().as_deref(), Some("all good"));
    eventually("both turns finished", || {
        recorder.finished.lock().unwrap().len() >= 2
    })
    .await;
    assert_eq!(fake.chat_request_count(), 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receives_events_without_user_text() {
    let got: Arc<Mutex<Vec<(Option<String>, Value)>>> = Arc::default();
    let sink = got.clone();
    let receiver = axum::Router::new().route(
        "/events",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    let token = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    sink.lock().unwrap().push((token, body));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    std::env::set_var("KOTAEMON_TEST_WEBHOOK_TOKEN", "Bearer hook-canary-91c2");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start(
        &[("cloud", &fake)],
        "",
        &format!(
            "[pool.health]\nenabled = false\n[[plugins.webhooks]]\nurl = \"http://127.0.0.1:{port}/events\"\nsecret_headers = {{ authorization = \"env:KOTAEMON_TEST_WEBHOOK_TOKEN\" }}\n"
        ),
    )
    .await;
    let secret_question = "my private question about project Falcon";
    let reply = agent
        .chat(json!({"model": "fake-model", "messages": [{"role": "user", "content": secret_question}]}))
        .await;
    assert_eq!(reply.status, 200);
    let turn = reply.headers["x-kotaemon-turn-id"]
        .to_str()
        .unwrap()
        .to_string();
    eventually("the turn_finished event reached the webhook", || {
        got.lock()
            .unwrap()
            .iter()
            .any(|(_, b)| b["kind"] == "turn_finished" && b["turn"] == turn.as_str())
    })
    .await;
    for (token, body) in got.lock().unwrap().iter() {
        assert_eq!(token.as_deref(), Some("Bearer hook-canary-91c2"));
        assert!(!body.to_string().contains("Falcon"), "{body}");
        let kind = body["kind"].as_str().unwrap();
        assert!(
            [
                "turn_finished",
                "degraded",
                "breaker_changed",
                "tool_called"
            ]
            .contains(&kind),
            "only the configured kinds: {kind}"
        );
    }
    agent.stop().await;
}
