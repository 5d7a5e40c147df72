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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_rate_limits_and_refusals_are_logged() {
    std::env::set_var("KOTAEMON_IT_PANEL_KEY", "panel-key-4711");
    std::env::set_var("KOTAEMON_IT_OPS_KEY", "ops-key-0815");
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start(
        &[("cloud", &fake)],
        "",
        "[[server.clients]]\nname = \"panel\"\nkey = \"env:KOTAEMON_IT_PANEL_KEY\"\nscopes = [\"chat\"]\n\
         requests_per_minute = 1\nburst = 2\n\
         [[server.clients]]\nname = \"ops\"\nkey = \"env:KOTAEMON_IT_OPS_KEY\"\nscopes = [\"metrics\", \"admin\"]\n\
         [pool.health]\nenabled = false\n",
    )
    .await;
    let as_key = |key: &str, req: reqwest::RequestBuilder| req.bearer_auth(key.to_string());
    let chat = |key: &str| as_key(key, client().post(agent.chat_url()).json(&ask(false)));

    // The panel may chat (twice: its burst), then the limit answers 429 with Retry-After.
    assert_eq!(send(chat("panel-key-4711")).await.status, 200);
    assert_eq!(send(chat("panel-key-4711")).await.status, 200);
    let limited = send(chat("panel-key-4711")).await;
    limited.assert_error(429);
    assert_eq!(limited.error_code(), "rate_limit_exceeded");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(fake.chat_request_count(), 2);

    // Scopes: the panel cannot read metrics or the audit log; ops cannot chat.
    let metrics_url = format!("{}/metrics", agent.url);
    let audit_url = format!("{}/v1/kotaemon/audit", agent.url);
    let r = send(as_key("panel-key-4711", client().get(&metrics_url))).await;
    r.assert_error(403);
    assert_eq!(r.error_code(), "insufficient_scope");
    send(as_key("panel-key-4711", client().get(&audit_url)))
        .await
        .assert_error(403);
    send(chat("ops-key-0815")).await.assert_error(403);
    let audit = send(as_key("ops-key-0815", client().get(&audit_url))).await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    send(client().get(&audit_url)).await.assert_error(401);
    send(as_key("wrong-key", client().get(&audit_url)))
        .await
        .assert_error(401);

    // Every refusal is counted and in the audit log with the peer, never with a key.
    let metrics = send(as_key("ops-key-0815", client().get(&metrics_url))).await;
    let text = metrics.body.clone();
    assert_eq!(
        metric(
            &text,
            "kotaemon_auth_refusals_total",
            &[("reason", "scope")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "kotaemon_rate_limited_total", &[("client", "panel")]),
        Some(1.0)
    );
    let records = audit_records(&agent.audit_dir);
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "auth_refused")
        .collect();
    let reasons: Vec<&str> = refused
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["scope", "scope", "scope", "missing", "invalid"]);
    assert!(
        refused.iter().all(|r| r["peer"] == "127.0.0.1"),
        "{refused:?}"
    );
    assert_eq!(refused[1]["route"], "/v1/kotaemon/audit");
    let log = serde_json::to_string(&records).unwrap();
    for secret in ["panel-key-4711", "ops-key-0815", "wrong-key"] {
        assert!(!log.contains(secret) && !text.contains(secret));
    }
    agent.stop().await;
}

#[tokio::test]
async fn client_config_problems_are_reported_with_their_paths() {
    let toml = "[server]\n[[server.clients]]\nname = \"bad name\"\nkey = \"env:KOTAEMON_IT_UNSET_KEY_X\"\nscopes = []\nburst = 3\n\
                [[upstreams]]\nname = \"c\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
    let config = kotaemon_core::Config::from_toml_str(toml).unwrap();
    let err = kotaemon_core::App::build(config).err().unwrap().to_string();
    for want in [
        "server.clients[0].name",
        "server.clients[0].scopes",
        "server.clients[0].burst",
        "server.clients[0].key: environment variable `KOTAEMON_IT_UNSET_KEY_X` is not set",
    ] {
        assert!(err.contains(want), "{want} missing in {err}");
    }
}
