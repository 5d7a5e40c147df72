//! Models, health, 404, recording and the out-of-process control endpoints.

use crate::client::{chat, Client};
use crate::server;
use serde_json::{json, Value};

#[tokio::test]
async fn models_and_health_and_404() {
    let up = server().await;
    let mut c = Client::connect(up.addr()).await;
    c.send("GET", "/v1/models", "", &[]).await;
    let r = c.read_response().await;
    assert_eq!(
        r.json(),
        json!({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})
    );
    up.set_models(vec!["a".into(), "b".into()]);
    c.send("GET", "/v1/models", "", &[]).await;
    assert_eq!(c.read_response().await.json()["data"][1]["id"], "b");
    up.set_models_status(503);
    c.send("GET", "/v1/models", "", &[]).await;
    let r = c.read_response().await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "503");
    c.send("GET", "/nope", "", &[]).await;
    let r = c.read_response().await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    assert_eq!(up.chat_request_count(), 0);
}

#[tokio::test]
async fn recording_ring_and_switch() {
    let up = server().await;
    let mut c = Client::connect(up.addr()).await;
    let body = crate::client::chat_body("x", false, false);
    for _ in 0..1003 {
        c.send(
            "POST",
            "/v1/chat/completions?n=1",
            &body,
            &[("X-Trace", "t")],
        )
        .await;
        c.read_response().await;
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1000);
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/chat/completions?n=1")
    );
    assert!(r
        .headers
        .contains(&("x-trace".to_string(), "t".to_string())));
    up.set_recording(false);
    c.send("POST", "/v1/chat/completions", &body, &[]).await;
    c.read_response().await;
    assert_eq!(up.requests().len(), 1000);
    assert_eq!(up.chat_request_count(), 1004);
}

#[tokio::test]
async fn control_endpoints() {
    let up = server().await;
    let mut c = Client::connect(up.addr()).await;
    c.send("POST", "/_fake/script", r#"{"text":"queued"}"#, &[])
        .await;
    assert_eq!(c.read_response().await.status, 200);
    c.send("POST", "/_fake/default", r#"{"text":"dflt"}"#, &[])
        .await;
    assert_eq!(c.read_response().await.status, 200);
    c.send("POST", "/_fake/script", r#"{"txet":"typo"}"#, &[])
        .await;
    let r = c.read_response().await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("txet"));
    c.send("POST", "/_fake/models", r#"{"status":500}"#, &[])
        .await;
    assert_eq!(c.read_response().await.status, 200);

    let content = |r: crate::client::Response| r.json()["choices"][0]["message"]["content"].clone();
    assert_eq!(content(chat(up.addr(), "a", false, false).await), "queued");
    assert_eq!(content(chat(up.addr(), "b", false, false).await), "dflt");

    c.send("GET", "/_fake/requests", "", &[]).await;
    let list = c.read_response().await.json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["method"], "POST");
    assert_eq!(list[1]["path"], "/v1/chat/completions");
    assert_eq!(list[1]["headers"]["host"], "fake");
    assert_eq!(list[1]["body"]["messages"][1]["content"], "b");

    c.send("POST", "/_fake/reset", "", &[]).await;
    assert_eq!(c.read_response().await.status, 200);
    c.send("GET", "/_fake/requests", "", &[]).await;
    assert_eq!(c.read_response().await.json(), Value::Array(vec![]));
    c.send("GET", "/v1/models", "", &[]).await;
    assert_eq!(c.read_response().await.status, 200);
    assert_eq!(
        content(chat(up.addr(), "c", false, false).await),
        kotaemon_fake_upstream::DEFAULT_TEXT
    );
}
