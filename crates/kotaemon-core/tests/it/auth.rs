//! Client keys, upstream credentials (static key, Azure style, OAuth2), and secrets that never
//! show up in responses or metrics.

use crate::harness::*;
use axum::routing::post;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keys_guard_the_api_but_not_health() {
    std::env::set_var("KOTAEMON_IT_CLIENT_KEY", "client-key-123");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start(
        &[("keys", &fake)],
        "api_keys = [\"env:KOTAEMON_IT_CLIENT_KEY\"]",
        "[pool.health]\nenabled = false\n",
    )
    .await;
    let r = agent.chat(ask(false)).await;
    r.assert_error(401);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing"));
    let r = send(
        client()
            .post(agent.chat_url())
            .bearer_auth("client-key-12")
            .json(&ask(false)),
    )
    .await;
    r.assert_error(401);
    let r = send(
        client()
            .post(agent.chat_url())
            .bearer_auth("client-key-123")
            .json(&ask(false)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(agent.get("/metrics").await.status, 401);
    assert_eq!(
        send(
            client()
                .get(format!("{}/metrics", agent.url))
                .bearer_auth("client-key-123")
        )
        .await
        .status,
        200
    );
    assert_eq!(agent.get("/healthz").await.status, 200);
    assert_eq!(agent.get("/readyz").await.status, 200);
    assert_eq!(fake.chat_request_count(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_key_is_sent_but_never_shown() {
    std::env::set_var("KOTAEMON_IT_UPSTREAM_CANARY", "sk-canary-9f8e7d");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool]\nmax_attempts = 1\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"canary\"\nbase_url = \"{}\"\napi_key = \"env:KOTAEMON_IT_UPSTREAM_CANARY\"\n",
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    assert_eq!(agent.chat(ask(false)).await.status, 200);
    let sent = fake.requests()[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone());
    assert_eq!(sent.as_deref(), Some("Bearer sk-canary-9f8e7d"));
    fake.set_default(Script {
        status: 401,
        ..Script::default()
    });
    let r = agent.chat(ask(false)).await;
    r.assert_error(502);
    assert_eq!(r.error_code(), "upstream_rejected");
    for text in [
        r.body.clone(),
        metrics_text(&agent).await,
        agent.get("/readyz").await.body,
    ] {
        assert!(!text.contains("canary-9f8e7d"), "the key leaked: {text}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_style_key_header_and_query() {
    std::env::set_var("KOTAEMON_IT_AZURE_KEY", "azure-key-1");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"azure\"\nbase_url = \"{}\"\napi_key = \"env:KOTAEMON_IT_AZURE_KEY\"\nauth_header = \"api-key\"\n\
         query = {{ \"api-version\" = \"2024-06-01\" }}\n",
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    assert_eq!(agent.chat(ask(false)).await.status, 200);
    let req = &fake.requests()[0];
    assert_eq!(req.path, "/v1/chat/completions?api-version=2024-06-01");
    assert!(req
        .headers
        .iter()
        .any(|(k, v)| k == "api-key" && v == "azure-key-1"));
    assert!(!req.headers.iter().any(|(k, _)| k == "authorization"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_client_credentials_token_is_fetched_once_and_reused() {
    std::env::set_var("KOTAEMON_IT_OAUTH_SECRET", "oauth-secret-1");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let idp = axum::Router::new().route(
        "/token",
        post(move |body: String| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                assert!(body.contains("grant_type=client_credentials"), "{body}");
                axum::Json(serde_json::json!({"access_token": "tok-abc", "token_type": "bearer", "expires_in": 3600}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, idp).await });
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"oauth\"\nbase_url = \"{}\"\n\
         oauth2 = {{ token_url = \"{idp_url}\", client_id = \"edge-01\", client_secret = \"env:KOTAEMON_IT_OAUTH_SECRET\", scopes = [\"inference\"] }}\n",
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    for _ in 0..3 {
        assert_eq!(agent.chat(ask(false)).await.status, 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the token is cached");
    for req in fake.requests() {
        assert!(req
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == "Bearer tok-abc"));
    }
    agent.stop().await;
}
