//! The local model over real sockets: asked by name or header, routed for simple turns, and
//! standing in (degraded) when the cloud dies — then handing back when it returns.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::json;

pub fn gguf() -> String {
    let path = std::env::var("KOTAEMON_TEST_GGUF")
        .unwrap_or_else(|_| "/var/tmp/kotaemon-models/gemma-3-270m-q4_k_m.gguf".into());
    assert!(
        std::path::Path::new(&path).is_file(),
        "the local model is missing at {path}: run ./scripts/test (it installs it) or `kotaemon models install gemma3-270m` and set KOTAEMON_TEST_GGUF"
    );
    path
}

fn local_toml(extra: &str) -> String {
    format!(
        "[local]\nenabled = true\nrequired = true\nmodel = \"{}\"\nthreads = 1\nn_ctx = 512\nmax_tokens = 12\n{extra}",
        gguf()
    )
}

fn q(text: &str, stream: bool) -> serde_json::Value {
    json!({"model": "fake-model", "stream": stream, "temperature": 0, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cloud_at_all_answers_locally() {
    let toml = format!("[server]\nlisten = \"127.0.0.1:0\"\n{}", local_toml(""));
    let agent = Agent::start_toml(&toml).await;
    for stream in [false, true] {
        let reply = agent
            .chat(q("What is the capital of France?", stream))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "local");
        let text = if stream {
            reply.streamed_text()
        } else {
            reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(!text.trim().is_empty(), "an answer, not an error");
        if stream {
            assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
        } else {
            let usage = &reply.json()["usage"];
            assert!(
                usage["completion_tokens"].as_u64().unwrap() >= 1
                    && usage["completion_tokens"].as_u64().unwrap() <= 12
            );
        }
    }
    let metrics = metrics_text(&agent).await;
    assert!(metric(&metrics, "kotaemon_local_model_load_seconds", &[]).unwrap() > 0.0);
    assert!(metrics.contains("kotaemon_local_tokens_per_second_bucket"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_dies_turns_degrade_to_local_then_recover() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let extra = "[stages.router]\nlocal_below_complexity = 0.0\n[pool.breaker]\nconsecutive_failures = 2\nopen_ms = 400\n[pool.health]\nenabled = false\n";
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[[upstreams]]\nname = \"dying-cloud\"\nbase_url = \"{}\"\nttfb_ms = 500\n",
        local_toml(extra),
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    let reply = agent.chat(q("Summarize the plan", false)).await;
    assert_eq!(reply.headers["x-kotaemon-answered-by"], "cloud");
    assert!(!reply.headers.contains_key("x-kotaemon-degraded"));

    // The cloud goes down: every turn still gets an answer, from the device, marked degraded.
    fake.set_default(Script {
        status: 503,
        ..Script::default()
    });
    for stream in [false, true, false] {
        let reply = agent.chat(q("Summarize the plan", stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "local");
        let degraded = reply.headers["x-kotaemon-degraded"].to_str().unwrap();
        assert!(degraded.starts_with("true; reason="), "{degraded}");
    }
    let metrics = metrics_text(&agent).await;
    assert!(metric(&metrics, "kotaemon_degraded_turns_total", &[]).unwrap_or(0.0) >= 1.0);

    // It comes back: once the breaker lets a probe through, turns return to the cloud.
    fake.set_default(Script::default());
    let mut back = false;
    for _ in 0..100 {
        let reply = agent.chat(q("Summarize the plan", false)).await;
        if reply.headers["x-kotaemon-answered-by"] == "cloud" {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(back, "turns never returned to the cloud");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_by_name_by_header_and_for_simple_turns() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[pool.health]\nenabled = false\n[[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\n",
        local_toml(""),
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    let by_name = agent.chat(json!({"model": "local", "messages": [{"role": "user", "content": "Explain why, step by step"}]})).await;
    assert_eq!(
        by_name.headers["x-kotaemon-route"],
        "local; reason=forced_model"
    );
    assert_eq!(by_name.headers["x-kotaemon-answered-by"], "local");
    let by_header = send(
        client()
            .post(agent.chat_url())
            .header("x-kotaemon-route", "local")
            .json(&q("Explain why the sky is blue, step by step", false)),
    )
    .await;
    assert_eq!(
        by_header.headers["x-kotaemon-route"],
        "local; reason=forced_header"
    );
    let simple = agent.chat(q("tell me a joke", false)).await;
    assert_eq!(simple.headers["x-kotaemon-route"], "local; reason=simple");
    let complex = agent
        .chat(q(
            "Explain why the sky is blue and compare it with sunsets, step by step",
            false,
        ))
        .await;
    assert_eq!(complex.headers["x-kotaemon-route"], "cloud; reason=complex");
    assert_eq!(complex.headers["x-kotaemon-answered-by"], "cloud");
    let tools = json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi there friend"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]});
    assert_eq!(
        agent.chat(tools).await.headers["x-kotaemon-route"],
        "cloud; reason=tools"
    );
    let bad = send(
        client()
            .post(agent.chat_url())
            .header("x-kotaemon-route", "moon")
            .json(&q("hi", false)),
    )
    .await;
    bad.assert_error(400);
    assert_eq!(
        fake.chat_request_count(),
        2,
        "only the complex and the tools turns reached the cloud"
    );
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_route_decisions_total",
            &[("route", "local"), ("reason", "simple")]
        )
        .unwrap()
            >= 1.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_corrupt_model_keeps_the_cloud_path_serving() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let dir = std::env::temp_dir().join(format!("kotaemon-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("broken.gguf");
    std::fs::write(&corrupt, vec![7u8; 4096]).unwrap();
    for model in [dir.join("absent.gguf"), corrupt.clone()] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[local]\nenabled = true\nmodel = \"{}\"\n[pool.health]\nenabled = false\n[[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\n",
            model.display(),
            fake.base_url()
        );
        let config = kotaemon_core::Config::from_toml_str(&toml).unwrap();
        let app = kotaemon_core::App::build(config)
            .expect("a broken local model must not stop the cloud path");
        let why = app.warnings.join("\n");
        assert!(why.contains(&model.display().to_string()), "{why}");
        drop(app);
        let agent = Agent::start_toml(&toml).await;
        let reply = agent.chat(ask(false)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "cloud");
        // Asking for the local model by header now says why it cannot.
        let r = send(
            client()
                .post(agent.chat_url())
                .header("x-kotaemon-route", "local")
                .json(&ask(false)),
        )
        .await;
        r.assert_error(503);
        assert_eq!(
            r.error_code(),
            "no_local_model",
            "forced local never silently goes to the cloud"
        );
        agent.stop().await;
        // With required = true the same config refuses to start.
        let strict = toml.replace("enabled = true\n", "enabled = true\nrequired = true\n");
        let err = kotaemon_core::App::build(kotaemon_core::Config::from_toml_str(&strict).unwrap())
            .err()
            .expect("required model")
            .to_string();
        assert!(err.contains("local.model"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_cloud_budget_sends_turns_to_the_local_model() {
    // 20 tokens a window, or a daily spending limit of 20 µUSD at 1 USD per million tokens:
    // either way the first cloud answer spends it.
    for budget in [
        "[budget]\ncloud_tokens_per_window = 20\n",
        "[budget]\ndaily_usd = 0.00002\n[usage.prices]\n\"*\" = { input = 1.0, output = 1.0 }\n",
    ] {
        spent_budget_goes_local(budget).await;
    }
}

async fn spent_budget_goes_local(budget: &str) {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let extra = format!("[stages.router]\nlocal_below_complexity = 0.0\n{budget}");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[pool.health]\nenabled = false\n[[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\n",
        local_toml(&extra),
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    let long_question =
        "Explain why the sea is salty, and compare it with lakes that are not, in detail";
    let first = agent.chat(q(long_question, false)).await;
    assert_eq!(first.headers["x-kotaemon-answered-by"], "cloud");
    let used = first.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(
        used >= 20,
        "the scripted cloud answer spends the budget: {used}"
    );
    for stream in [false, true] {
        let reply = agent.chat(q(long_question, stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.headers["x-kotaemon-route"],
            "local; reason=budget_exhausted"
        );
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "local");
        assert!(reply.headers.contains_key("x-kotaemon-degraded"));
    }
    // Forcing the cloud by header does not get around the budget.
    let forced = send(
        client()
            .post(agent.chat_url())
            .header("x-kotaemon-route", "cloud")
            .json(&q(long_question, false)),
    )
    .await;
    assert_eq!(forced.headers["x-kotaemon-answered-by"], "local");
    assert_eq!(
        fake.chat_request_count(),
        1,
        "the cloud saw only the first turn"
    );
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_route_decisions_total",
            &[("route", "local"), ("reason", "budget_exhausted")]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{metrics}"
    );
    agent.stop().await;
}
