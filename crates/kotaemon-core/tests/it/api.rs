//! The terminal-facing API: shapes, pass-through, bad input, limits.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script, ScriptToolCall};
use serde_json::{json, Value};

async fn agent_with(fake: &FakeUpstream, name: &str, server: &str) -> Agent {
    Agent::start(&[(name, fake)], server, "[pool.health]\nenabled = false\n").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_client_tools_reach_the_upstream_untouched() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        tool_calls: vec![ScriptToolCall {
            name: "get_weather".into(),
            arguments: "{\"city\":\"深圳\"}".into(),
        }],
        ..Script::default()
    });
    let agent = agent_with(&fake, "passthrough", "").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({
        "model": "fake-model", "messages": [{"role": "user", "content": "深圳天气?", "name": "u1"}],
        "tools": tools, "tool_choice": "auto", "seed": 7, "vendor_x": {"nested": [1, 2]}
    });
    let reply = agent.chat(body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"深圳\"}"
    );
    let sent = &fake.requests()[0].body;
    assert_eq!(sent["tools"], tools);
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["vendor_x"], json!({"nested": [1, 2]}));
    assert_eq!(sent["messages"][0]["name"], "u1");
    assert!(reply.headers.contains_key("x-kotaemon-turn-id"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_only_when_asked_and_always_requested_upstream() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        text: Some("明天上午10点开会".into()),
        ..Script::default()
    });
    let agent = agent_with(&fake, "usage-stream", "").await;
    let plain = agent.chat(ask(true)).await;
    assert_eq!(plain.streamed_text(), "明天上午10点开会");
    assert!(
        !plain.body.contains("\"usage\""),
        "client did not ask for usage: {}",
        plain.body
    );
    assert_eq!(
        fake.requests()[0].body["stream_options"]["include_usage"],
        true,
        "we always ask upstream"
    );
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let with_usage = agent.chat(body).await;
    let events = with_usage.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage_event: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage_event["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_tokens_total",
            &[("upstream", "usage-stream"), ("direction", "out")]
        )
        .unwrap()
            > 0.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_agent_survives() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent_with(&fake, "bad-input", "max_body_bytes = 65536").await;
    let raw = |body: &'static str| {
        client()
            .post(agent.chat_url())
            .header("content-type", "application/json")
            .body(body)
    };
    let r = send(raw("{not json")).await;
    r.assert_error(400);
    assert_eq!(r.error_code(), "invalid_json");
    let r = send(raw(
        r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
    ))
    .await;
    r.assert_error(400);
    assert!(
        r.json()["error"]["param"]
            .as_str()
            .unwrap()
            .starts_with("messages[0]"),
        "{}",
        r.body
    );
    let r = send(raw(
        r#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#,
    ))
    .await;
    r.assert_error(400);
    let r = send(raw(r#"{"model": "m", "messages": []}"#)).await;
    r.assert_error(400);
    assert!(r.body.contains("messages"));
    let r = send(raw(r#"{"messages": [{"role": "user", "content": "x"}]}"#)).await;
    r.assert_error(400);
    assert!(r.body.contains("model"));
    let r = send(raw(r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}"#)).await;
    r.assert_error(400);
    // 10 MB against a 64 KiB limit.
    let big = format!(
        r#"{{"model": "m", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "a".repeat(10 * 1024 * 1024)
    );
    let r = client()
        .post(agent.chat_url())
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
    } // else: the server closed the connection while the client was still writing — also a refusal.
    agent.get("/nope").await.assert_error(404);
    send(client().get(agent.chat_url())).await.assert_error(405);
    let r = send(
        client()
            .post(agent.chat_url())
            .header("x-kotaemon-upstream", "nope")
            .json(&ask(false)),
    )
    .await;
    r.assert_error(400);
    assert_eq!(r.error_code(), "unknown_upstream");
    assert_eq!(
        fake.chat_request_count(),
        0,
        "nothing invalid reached the upstream"
    );
    // Still alive and answering.
    assert_eq!(agent.get("/healthz").await.status, 200);
    assert_eq!(agent.chat(ask(false)).await.status, 200);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_turns_in_flight_get_429() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.push(Script {
        ttft_ms: 300,
        ..Script::default()
    });
    let agent = Agent::start(
        &[("slots", &fake)],
        "max_concurrent_turns = 1",
        "[pool.health]\nenabled = false\n",
    )
    .await;
    let slow = agent.chat(ask(false));
    let second = async {
        let fake_ref = &fake;
        eventually("first turn reached the upstream", || {
            fake_ref.chat_request_count() == 1
        })
        .await;
        agent.chat(ask(false)).await
    };
    let (first, second) = tokio::join!(slow, second);
    assert_eq!(first.status, 200);
    second.assert_error(429);
    assert_eq!(second.error_code(), "overloaded");
    assert!(second.headers.contains_key("retry-after"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_every_route() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = agent_with(&fake, "openapi", "").await;
    let doc = agent.get("/openapi.json").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/v1/kotaemon/audit", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not described"
        );
        let status = if method == "get" {
            agent.get(path).await.status
        } else {
            agent.chat(ask(false)).await.status
        };
        assert_eq!(
            status, 200,
            "{method} {path} is described but does not answer"
        );
    }
    assert!(doc["paths"]["/v1/kotaemon/actions/{id}"]["post"].is_object());
    for status in ["400", "401", "404", "413", "429", "502", "503", "504"] {
        assert!(
            doc["paths"]["/v1/chat/completions"]["post"]["responses"][status].is_object(),
            "status {status} not described"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_budget_without_a_local_model_is_refused_with_429_insufficient_quota() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start(
        &[("metered", &fake)],
        "",
        "[pool.health]\nenabled = false\n[budget]\ncloud_tokens_per_window = 1\nwindow_secs = 3600\non_exhausted = \"reject\"\n",
    )
    .await;
    assert_eq!(agent.chat(ask(false)).await.status, 200);
    for stream in [false, true] {
        let refused = agent.chat(ask(stream)).await;
        refused.assert_error(429);
        assert_eq!(refused.error_code(), "insufficient_quota");
        let retry: u64 = refused.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (3500..=3600).contains(&retry),
            "resets within the hour: {retry}"
        );
    }
    assert_eq!(fake.chat_request_count(), 1);
    agent.stop().await;
}
