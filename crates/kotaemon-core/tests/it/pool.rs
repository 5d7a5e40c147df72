//! Pool behaviour over real sockets: breaker opens and recovers, load is balanced, model names
//! are mapped, a rate-limited upstream is rested.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_a_failing_upstream_and_recovers() {
    let sick = FakeUpstream::bind_loopback().await.unwrap();
    let well = FakeUpstream::bind_loopback().await.unwrap();
    sick.set_default(Script {
        status: 503,
        ..Script::default()
    });
    let pool = "[pool]\nbackoff_base_ms = 1\nbackoff_max_ms = 2\nbackoff_jitter = 0.0\n\
                [pool.breaker]\nconsecutive_failures = 2\nopen_ms = 1500\n[pool.health]\nenabled = false\n";
    let agent = Agent::start(&[("brk-sick", &sick), ("brk-well", &well)], "", pool).await;
    for _ in 0..12 {
        let reply = agent.chat(ask(false)).await;
        assert_eq!(
            reply.status, 200,
            "failover hides the sick upstream: {}",
            reply.body
        );
    }
    let metrics = metrics_text(&agent).await;
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_breaker_state",
            &[("upstream", "brk-sick")]
        ),
        Some(2.0),
        "breaker open"
    );
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_breaker_state",
            &[("upstream", "brk-well")]
        ),
        Some(0.0)
    );
    let ready = agent.get("/readyz").await.json();
    assert_eq!(ready["ready"], true, "one upstream is still fine");
    let states: Vec<_> = ready["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].clone(), u["breaker"].clone()))
        .collect();
    assert!(
        states.contains(&(json!("brk-sick"), json!("open"))),
        "{states:?}"
    );
    let sick_calls = sick.chat_request_count();
    assert!(
        sick_calls <= 3,
        "an open breaker keeps traffic away ({sick_calls} calls)"
    );

    // The upstream heals; after open_ms a probe goes through and closes the breaker.
    sick.set_default(Script::default());
    let pool_ref = agent.pool.clone();
    eventually("the breaker admits a probe", move || {
        pool_ref.members()[0].breaker.is_admitting()
    })
    .await;
    for _ in 0..20 {
        agent.chat(ask(false)).await;
        if sick.chat_request_count() > sick_calls {
            break;
        }
    }
    let metrics = metrics_text(&agent).await;
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_breaker_state",
            &[("upstream", "brk-sick")]
        ),
        Some(0.0),
        "breaker closed again"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pool_down_is_a_clean_503_with_retry_after() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        status: 500,
        ..Script::default()
    });
    let pool = "[pool]\nmax_attempts = 1\n[pool.breaker]\nconsecutive_failures = 1\nopen_ms = 60000\n[pool.health]\nenabled = false\n";
    let agent = Agent::start(&[("down-503", &fake)], "", pool).await;
    agent.chat(ask(false)).await.assert_error(502);
    for stream in [false, true] {
        let reply = agent.chat(ask(stream)).await;
        reply.assert_error(503);
        assert_eq!(reply.error_code(), "upstream_unavailable");
        let retry: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(
        fake.chat_request_count(),
        1,
        "an open breaker sends nothing"
    );
    assert_eq!(agent.get("/readyz").await.status, 503);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_spread_by_weight() {
    let a = FakeUpstream::bind_loopback().await.unwrap();
    let b = FakeUpstream::bind_loopback().await.unwrap();
    // Slow answers keep requests in flight, so power-of-two-choices sees load.
    for f in [&a, &b] {
        f.set_default(Script {
            ttft_ms: 30,
            ..Script::default()
        });
    }
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"w-a\"\nbase_url = \"{}\"\nweight = 3\n\
         [[upstreams]]\nname = \"w-b\"\nbase_url = \"{}\"\nweight = 1\n",
        a.base_url(),
        b.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    let calls = (0..80).map(|_| agent.chat(ask(false)));
    let replies = futures::future::join_all(calls).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let (na, nb) = (a.chat_request_count(), b.chat_request_count());
    assert_eq!(na + nb, 80);
    assert!(na > nb, "weight 3 takes more than weight 1 ({na} vs {nb})");
    assert!(nb > 0, "weight 1 still gets traffic");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_are_mapped_and_unknown_models_are_404() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"mapped\"\nbase_url = \"{}\"\nmodels = {{ \"qwen-small\" = \"Qwen/Qwen2.5-7B-Instruct\" }}\n",
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    let reply = agent
        .chat(json!({"model": "qwen-small", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(fake.requests()[0].body["model"], "Qwen/Qwen2.5-7B-Instruct");
    let reply = agent
        .chat(json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    reply.assert_error(404);
    assert_eq!(reply.error_code(), "model_not_found");
    let models = agent.get("/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], "qwen-small");
    assert_eq!(fake.chat_request_count(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_upstream_is_rested_for_its_retry_after() {
    let busy = FakeUpstream::bind_loopback().await.unwrap();
    let free = FakeUpstream::bind_loopback().await.unwrap();
    busy.set_default(Script {
        status: 429,
        retry_after_s: Some(30),
        ..Script::default()
    });
    let agent = Agent::start(
        &[("rl-busy", &busy), ("rl-free", &free)],
        "",
        "[pool.health]\nenabled = false\n",
    )
    .await;
    for _ in 0..10 {
        assert_eq!(agent.chat(ask(false)).await.status, 200);
    }
    assert!(
        busy.chat_request_count() <= 1,
        "asked to wait 30 s, the busy upstream got {} calls",
        busy.chat_request_count()
    );
    let metrics = metrics_text(&agent).await;
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_breaker_state",
            &[("upstream", "rl-busy")]
        ),
        Some(0.0),
        "429 is not a breaker failure"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_from_the_upstream_are_relayed_not_retried() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        status: 422,
        ..Script::default()
    });
    let agent = Agent::start(
        &[("relay-422", &fake)],
        "",
        "[pool.health]\nenabled = false\n",
    )
    .await;
    let reply = agent.chat(ask(false)).await;
    reply.assert_error(422);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fake upstream error 422"),
        "{}",
        reply.body
    );
    assert_eq!(
        fake.chat_request_count(),
        1,
        "a bad request is bad everywhere: no retry"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_dead_upstream_out_of_first_choice() {
    let dead = FakeUpstream::bind_loopback().await.unwrap();
    let live = FakeUpstream::bind_loopback().await.unwrap();
    dead.set_models_status(500);
    live.set_models(vec!["live-model".into()]);
    let health = "[pool.health]\ninterval_ms = 50\ntimeout_ms = 500\nunhealthy_after = 1\n";
    let agent = Agent::start(&[("hc-dead", &dead), ("hc-live", &live)], "", health).await;
    let pool = agent.pool.clone();
    eventually("health check marks the dead upstream", move || {
        !pool.members()[0].is_healthy()
    })
    .await;
    for _ in 0..10 {
        assert_eq!(agent.chat(ask(false)).await.status, 200);
    }
    assert_eq!(
        dead.chat_request_count(),
        0,
        "an unhealthy upstream is not chosen while a healthy one is there"
    );
    let models = agent.get("/v1/models").await.json();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "live-model"),
        "{models}"
    );
    let metrics = metrics_text(&agent).await;
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_upstream_healthy",
            &[("upstream", "hc-dead")]
        ),
        Some(0.0)
    );
    agent.stop().await;
}
