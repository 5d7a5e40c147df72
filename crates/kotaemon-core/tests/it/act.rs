//! The server-side tool loop over real sockets: the scripted cloud asks for tools, the device
//! runs them (the contacts directory here: no service needed), results go back, the answer
//! comes out — streamed or not. Malformed calls, unknown tools, endless calling, confirmation,
//! and client-side tools that must pass through untouched.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script, ScriptToolCall};
use serde_json::{json, Value};

const CONTACTS: &str = r#"
[tools.contacts]
enabled = true
[[tools.contacts.entries]]
name = "张伟"
email = "zhang.wei@example.com"
title = "产品经理"
aliases = ["Manager Zhang"]
[[tools.contacts.entries]]
name = "李娜"
email = "li.na@example.com"
title = "技术总监"
aliases = ["Director Li"]
"#;

async fn agent(fake: &FakeUpstream, extra: &str) -> Agent {
    Agent::start(
        &[("cloud", fake)],
        "",
        &format!(
            "[pool.health]\nenabled = false\n[stages.cache]\nenabled = false\n{CONTACTS}\n{extra}"
        ),
    )
    .await
}

fn call(name: &str, arguments: &str) -> ScriptToolCall {
    ScriptToolCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

fn calls(list: Vec<ScriptToolCall>) -> Script {
    Script {
        tool_calls: list,
        ..Script::default()
    }
}

fn text(t: &str) -> Script {
    Script {
        text: Some(t.into()),
        ..Script::default()
    }
}

fn q(text: &str, stream: bool) -> Value {
    json!({"model": "fake-model", "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// The tool messages the cloud received in its `n`th request.
fn tool_results(fake: &FakeUpstream, n: usize) -> Vec<Value> {
    let chats: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .collect();
    chats[n].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| serde_json::from_str(m["content"].as_str().unwrap()).unwrap_or(Value::Null))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_calls_a_device_tool_and_answers_with_its_result() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent(&fake, "").await;
    for stream in [false, true] {
        // The cloud only ever saw pseudonyms, so it writes pseudonyms.
        fake.push(calls(vec![
            call("contacts_lookup", r#"{"name": "<PERSON_1>"}"#),
            call("contacts_lookup", r#"{"name": "<PERSON_2>"}"#),
        ]));
        fake.push(text("张伟 and 李娜 found."));
        let before = fake.chat_request_count();
        let reply = agent.chat(q("邀请张经理和李总监", stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = if stream {
            assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
            let ids: std::collections::HashSet<String> = reply
                .events()
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .filter_map(|v| v["id"].as_str().map(str::to_string))
                .collect();
            assert_eq!(ids.len(), 1, "one stream id across the steps: {ids:?}");
            reply.streamed_text()
        } else {
            let body = reply.json();
            assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(answer, "张伟 and 李娜 found.");
        assert_eq!(fake.chat_request_count(), before + 2);
        // The offered tools reached the cloud; the results went back in order.
        // The results went back in order — masked: the cloud sees pseudonyms, never the
        // people's names or emails.
        let results = tool_results(&fake, before + 1);
        assert_eq!(results.len(), 2);
        let email = |i: usize| {
            results[i]["matches"][0]["email"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(email(0).starts_with("<EMAIL_") && email(1).starts_with("<EMAIL_"));
        assert_ne!(email(0), email(1));
        let seen: String = fake.requests().iter().map(|r| r.body.to_string()).collect();
        for real in [
            "张伟",
            "李娜",
            "张经理",
            "李总监",
            "zhang.wei@example.com",
            "li.na@example.com",
        ] {
            assert!(!seen.contains(real), "{real} reached the cloud: {seen}");
        }
    }
    let chats: Vec<_> = fake.requests();
    let offered = chats
        .iter()
        .find(|r| r.body["tools"].is_array())
        .expect("tools were offered");
    assert_eq!(
        offered.body["tools"][0]["function"]["name"],
        "contacts_lookup"
    );
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_tool_calls_total",
            &[("tool", "contacts_lookup"), ("outcome", "ok")]
        )
        .unwrap_or(0.0)
            >= 4.0,
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_go_back_to_the_model_and_endless_calling_stops() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent(&fake, "[stages.act]\nmax_steps = 4\n").await;
    fake.push(calls(vec![
        call("contacts_lookup", r#"{"name": "张经理""#),
        call("delete_everything", "{}"),
        call("contacts_lookup", r#"{"name": 42}"#),
        call("contacts_lookup", ""),
    ]));
    fake.push(text("Sorry, I could not look that up."));
    let reply = agent.chat(q("who is 张经理", false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = tool_results(&fake, 1);
    assert!(results[0]["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert!(results[1]["error"]
        .as_str()
        .unwrap()
        .contains("no tool named `delete_everything`"));
    assert!(results[2]["error"].as_str().unwrap().contains("/name"));
    assert!(results[3]["error"].as_str().unwrap().contains("name"));

    // A model that never stops calling tools: the loop ends at the step limit with a clear
    // answer, in both shapes, and the last call is offered no tools.
    for stream in [false, true] {
        let before = fake.chat_request_count();
        fake.set_default(calls(vec![call(
            "contacts_lookup",
            r#"{"name": "张经理"}"#,
        )]));
        let reply = agent.chat(q("loop forever", stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = if stream {
            reply.streamed_text()
        } else {
            reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(answer.contains("after 4 steps"), "{answer}");
        assert_eq!(fake.chat_request_count(), before + 4);
        let last = fake.requests().last().unwrap().body.clone();
        assert!(last.get("tools").is_none(), "the last step offers no tools");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_tools_wait_for_confirmation() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent(&fake, "[stages.act]\nconfirm = [\"contacts_*\"]\n").await;
    for (decision, expect) in [("confirm", "<EMAIL_1>"), ("reject", "rejected")] {
        fake.push(calls(vec![call(
            "contacts_lookup",
            r#"{"name": "张经理"}"#,
        )]));
        let reply = agent.chat(q("find 张经理", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let id = reply.headers["x-kotaemon-pending-action"]
            .to_str()
            .unwrap()
            .to_string();
        let content = reply.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            content.contains(&id) && content.contains("contacts_lookup"),
            "{content}"
        );
        let before = fake.chat_request_count();
        fake.push(text("done"));
        let url = format!("{}/v1/kotaemon/actions/{id}", agent.url);
        let decided = send(client().post(&url).json(&json!({"decision": decision}))).await;
        assert_eq!(decided.status, 200, "{}", decided.body);
        assert_eq!(decided.json()["choices"][0]["message"]["content"], "done");
        assert_eq!(fake.chat_request_count(), before + 1);
        let result = &tool_results(&fake, before)[0];
        assert!(result.to_string().contains(expect), "{result}");
        // Decided once: a second decision finds nothing.
        let again = send(client().post(&url).json(&json!({"decision": "confirm"}))).await;
        again.assert_error(404);
    }
    let bad = send(
        client()
            .post(format!("{}/v1/kotaemon/actions/act-x", agent.url))
            .json(&json!({"decision": "maybe"})),
    )
    .await;
    bad.assert_error(400);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_tools_pass_through_and_server_tools_stay_out() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent(&fake, "").await;
    fake.push(calls(vec![call("get_weather", r#"{"city": "Paris"}"#)]));
    let mut body = q("weather in Paris?", false);
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let reply = agent.chat(body).await;
    assert_eq!(reply.status, 200);
    let tc = &reply.json()["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(tc["function"]["name"], "get_weather");
    let sent = fake.requests().last().unwrap().body.clone();
    let names: Vec<&str> = sent["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["get_weather"], "only the client's tools");
    assert_eq!(
        fake.chat_request_count(),
        1,
        "the client runs its own tools"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tool_adds_the_secret_and_stays_on_its_allowlist() {
    use std::sync::{Arc, Mutex};
    // A webhook receiver that records what it got.
    let seen: Arc<Mutex<Vec<(String, Option<String>, Value)>>> = Arc::default();
    let seen_by_hook = seen.clone();
    let hook = axum::Router::new().route(
        "/hook/{room}",
        axum::routing::post(
            move |axum::extract::Path(room): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  axum::Json(body): axum::Json<Value>| {
                let seen = seen_by_hook.clone();
                async move {
                    let auth = headers
                        .get("x-bot-token")
                        .map(|v| v.to_str().unwrap_or("").to_string());
                    seen.lock().unwrap().push((room, auth, body));
                    axum::Json(json!({"ok": true, "msg_id": 7}))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, hook).await });
    let canary = "canary-bot-token-6b1f";
    std::env::set_var("KOTAEMON_TEST_BOT_TOKEN", canary);
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let extra = format!(
        r#"
[[tools.http]]
name = "notify_room"
description = "Post a message to a meeting room's screen"
url = "http://127.0.0.1:{port}/hook/{{room}}"
parameters = {{ type = "object", properties = {{ room = {{ type = "string" }}, text = {{ type = "string" }} }}, required = ["room", "text"] }}
body = {{ msg_type = "text", content = {{ text = "{{text}}" }} }}
secret_headers = {{ x-bot-token = "env:KOTAEMON_TEST_BOT_TOKEN" }}
"#
    );
    let agent = agent(&fake, &extra).await;
    fake.push(calls(vec![
        call(
            "notify_room",
            r#"{"room": "三楼A", "text": "会议10点开始"}"#,
        ),
        // A parameter that tries to leave the host is encoded, not followed.
        call(
            "notify_room",
            r#"{"room": "x@evil.example/", "text": "hi"}"#,
        ),
    ]));
    fake.push(text("Posted."));
    let reply = agent
        .chat(q("tell room 三楼A the meeting starts at 10", false))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The two calls run in parallel: they arrive in either order.
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "both calls stayed on 127.0.0.1: {got:?}");
    let room = got
        .iter()
        .find(|g| g.0 == "三楼A")
        .expect("the room's call");
    assert_eq!(room.1.as_deref(), Some(canary));
    assert_eq!(room.2["content"]["text"], "会议10点开始");
    assert!(got.iter().any(|g| g.0 == "x@evil.example/"), "{got:?}");
    let results = tool_results(&fake, 1);
    assert_eq!(results[0]["body"]["msg_id"], 7);
    // The credential never reaches the model or the metrics.
    let all_requests: String = fake.requests().iter().map(|r| r.body.to_string()).collect();
    assert!(!all_requests.contains(canary));
    assert!(!metrics_text(&agent).await.contains(canary));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_local_model_in_the_loop_ends_with_an_answer() {
    // The cloud is down; the on-device Gemma gets the tools in its prompt and the JSON call
    // format. A 270M base model writes calls badly or not at all: whatever it does, the loop
    // must end with a 200 answer within max_steps.
    let gguf = crate::local::gguf();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[local]\nenabled = true\nrequired = true\nmodel = \"{gguf}\"\nthreads = 1\nn_ctx = 1024\nmax_tokens = 40\n[pool.health]\nenabled = false\n[stages.cache]\nenabled = false\n[stages.act]\nmax_steps = 3\n{CONTACTS}\n[[upstreams]]\nname = \"down\"\nbase_url = \"http://127.0.0.1:9/v1\"\nconnect_timeout_ms = 200\n"
    );
    let agent = Agent::start_toml(&toml).await;
    let prompt = "Look up 张经理. Reply only with {\"tool\": \"contacts_lookup\", \"arguments\": {\"name\": \"张经理\"}}";
    for stream in [false, true] {
        let mut events = agent.bus.subscribe();
        let reply = agent
            .chat(
                json!({"model": "fake-model", "stream": stream, "temperature": 0,
                         "messages": [{"role": "user", "content": prompt}]}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "local");
        if stream {
            assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
        } else {
            assert!(reply.json()["choices"][0]["message"]["content"].is_string());
        }
        let turn = reply.headers["x-kotaemon-turn-id"]
            .to_str()
            .unwrap()
            .to_string();
        let (mut attempts, mut tools) = (0, Vec::new());
        while let Ok(Some(e)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), events.next()).await
        {
            if e.turn_id().map(|t| t.as_str()) != Some(turn.as_str()) {
                continue;
            }
            match &*e {
                kotaemon_core::events::TurnEvent::UpstreamAttempt { upstream, .. }
                    if &**upstream == "local" =>
                {
                    attempts += 1
                }
                kotaemon_core::events::TurnEvent::ToolCalled { tool, outcome, .. } => {
                    tools.push(format!("{tool}:{outcome}"))
                }
                _ => {}
            }
        }
        eprintln!("local model, stream={stream}: {attempts} model calls, tool calls {tools:?}");
        assert!(attempts <= 3, "within max_steps: {attempts}");
    }
    agent.stop().await;
}
