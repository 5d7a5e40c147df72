//! Integration tests: a real server on loopback, driven by a raw TCP client.

mod client;
mod control;
mod faults;

use client::{chat, chat_body, content_pieces, Client};
use kotaemon_fake_upstream::{FakeUpstream, Script, ScriptToolCall};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub async fn server() -> FakeUpstream {
    FakeUpstream::bind_loopback().await.unwrap()
}

fn text(s: &str) -> Script {
    Script {
        text: Some(s.to_string()),
        ..Script::default()
    }
}

#[tokio::test]
async fn non_stream_answer_shape() {
    let up = server().await;
    assert!(up.base_url().starts_with("http://127.0.0.1:"));
    assert!(up.base_url().ends_with("/v1"));
    let r = chat(up.addr(), "12345678", false, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-fake-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "test-model");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the fake upstream."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "be brief" (8) + "12345678" (8) = 16 chars -> 4 tokens; 5 pieces.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9})
    );
}

#[tokio::test]
async fn stream_sequence_and_usage_only_when_asked() {
    let up = server().await;
    let r = chat(up.addr(), "hi", true, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = parsed[0]["id"].clone();
    assert!(parsed
        .iter()
        .all(|p| p["id"] == id && p["object"] == "chat.completion.chunk"));
    assert_eq!(
        parsed[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(
        content_pieces(&ev),
        vec!["Hello", " from", " the", " fake", " upstream."]
    );
    let fin = &parsed[parsed.len() - 1];
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    assert_eq!(fin["choices"][0]["delta"], json!({}));
    assert!(parsed.iter().all(|p| p.get("usage").is_none()));
    assert_eq!(parsed.len(), 1 + 5 + 1);

    let r = chat(up.addr(), "hi", true, true).await;
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(
        usage["usage"]["total_tokens"],
        usage["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    let fin: Value = serde_json::from_str(&ev[ev.len() - 3]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn echo_and_cjk_stream() {
    let up = server().await;
    up.set_default(Script {
        echo: true,
        text: Some("ignored".into()),
        ..Script::default()
    });
    let r = chat(up.addr(), "say this back", false, false).await;
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "say this back"
    );
    let r = chat(up.addr(), "你好世界", true, false).await;
    assert_eq!(content_pieces(&r.events()), vec!["你", "好", "世", "界"]);
}

fn tool_script() -> Script {
    Script {
        tool_calls: vec![
            ScriptToolCall {
                name: "search".into(),
                arguments: r#"{"query":"rust"}"#.into(),
            },
            ScriptToolCall {
                name: "fetch".into(),
                arguments: r#"{"url":"x"}"#.into(),
            },
        ],
        ..Script::default()
    }
}

#[tokio::test]
async fn tool_calls_non_stream() {
    let up = server().await;
    up.push(tool_script());
    let v = chat(up.addr(), "hi", false, false).await.json();
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["content"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        msg["tool_calls"][0],
        json!({"id": "call_0", "type": "function", "function": {"name": "search", "arguments": "{\"query\":\"rust\"}"}})
    );
    assert_eq!(msg["tool_calls"][1]["function"]["name"], "fetch");
    assert_eq!(v["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn tool_calls_stream() {
    let up = server().await;
    up.push(tool_script());
    let r = chat(up.addr(), "hi", true, false).await;
    let ev = r.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // role + 2 * (head + 2 argument pieces) + finish
    assert_eq!(parsed.len(), 1 + 6 + 1);
    let head = &parsed[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(
        *head,
        json!({"index": 0, "id": "call_0", "type": "function", "function": {"name": "search", "arguments": ""}})
    );
    let mut args = [String::new(), String::new()];
    for p in &parsed[1..7] {
        let tc = &p["choices"][0]["delta"]["tool_calls"][0];
        let i = tc["index"].as_u64().unwrap() as usize;
        args[i].push_str(tc["function"]["arguments"].as_str().unwrap());
    }
    assert_eq!(args, [r#"{"query":"rust"}"#, r#"{"url":"x"}"#]);
    assert_eq!(parsed[7]["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn status_429_with_retry_after() {
    let up = server().await;
    for _ in 0..2 {
        up.push(Script {
            status: 429,
            retry_after_s: Some(7),
            ..Script::default()
        });
    }
    for stream in [true, false] {
        let r = chat(up.addr(), "hi", stream, false).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("7"));
        assert_eq!(
            r.json(),
            json!({"error": {"message": "fake upstream error 429", "type": "upstream_error", "param": null, "code": "429"}})
        );
    }
    assert_eq!(
        chat(up.addr(), "hi", false, false).await.status,
        200,
        "then the default"
    );
}

#[tokio::test]
async fn keep_alive_two_requests_one_connection() {
    let up = server().await;
    let mut c = Client::connect(up.addr()).await;
    for stream in [true, false, true] {
        c.send(
            "POST",
            "/v1/chat/completions",
            &chat_body("x", stream, false),
            &[],
        )
        .await;
        assert_eq!(c.read_response().await.status, 200);
    }
    c.send("GET", "/health", "", &[]).await;
    let r = c.read_response().await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(up.chat_request_count(), 3);
    assert_eq!(up.open_connections(), 1);
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let up = server().await;
    let mut c = Client::connect(up.addr()).await;
    c.send(
        "POST",
        "/v1/chat/completions",
        &chat_body("x", true, false),
        &[("Connection", "close")],
    )
    .await;
    let r = c.read_response().await;
    assert_eq!(r.header("connection"), Some("close"));
    let (rest, eof) = c.read_until_quiet(Duration::from_secs(5)).await;
    assert!(rest.is_empty() && eof);
}

#[tokio::test]
async fn script_queue_order_then_default() {
    let up = server().await;
    up.push(text("one"));
    up.push(text("two"));
    up.set_default(text("dflt"));
    let mut c = Client::connect(up.addr()).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        c.send(
            "POST",
            "/v1/chat/completions",
            &chat_body("x", false, false),
            &[],
        )
        .await;
        got.push(c.read_response().await.json()["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(
        got,
        vec![json!("one"), json!("two"), json!("dflt"), json!("dflt")]
    );
}

#[tokio::test]
async fn open_connections_returns_to_zero() {
    let up = server().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(up.addr()).await;
        c.send("GET", "/health", "", &[]).await;
        c.read_response().await;
        clients.push(c);
    }
    assert_eq!(up.open_connections(), 3);
    drop(clients);
    wait_for(|| up.open_connections() == 0).await;
}

pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 2s");
}

#[tokio::test]
async fn delays_are_applied() {
    let up = server().await;
    up.push(Script {
        ttft_ms: 300,
        inter_chunk_ms: 20,
        ..Script::default()
    });
    let t = Instant::now();
    let mut c = Client::connect(up.addr()).await;
    c.send(
        "POST",
        "/v1/chat/completions",
        &chat_body("x", true, false),
        &[],
    )
    .await;
    let (status, headers) = c.read_head().await;
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "headers go out at once"
    );
    let r = c.read_body(status, headers).await;
    assert!(t.elapsed() >= Duration::from_millis(300 + 4 * 20));
    assert_eq!(r.events().last().unwrap(), "[DONE]");

    // Non-stream: ttft + (chunks - 1) * inter, after the headers delay.
    up.push(Script {
        headers_delay_ms: 30,
        ttft_ms: 20,
        inter_chunk_ms: 10,
        ..Script::default()
    });
    let t = Instant::now();
    assert_eq!(chat(up.addr(), "x", false, false).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(30 + 20 + 4 * 10));
}
