//! The semantic cache over real sockets, a real SQLite file and the real embedding model.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::{json, Value};

pub fn minilm_dir() -> String {
    let dir = std::env::var("KOTAEMON_TEST_MINILM_DIR")
        .unwrap_or_else(|_| "/var/tmp/kotaemon-models/all-minilm-l6-v2".into());
    assert!(
        std::path::Path::new(&dir).join("model.safetensors").is_file(),
        "the embedding model is missing at {dir}: run ./scripts/test (it installs it) or `kotaemon models install all-minilm-l6-v2` and set KOTAEMON_TEST_MINILM_DIR"
    );
    dir
}

struct CacheAgent {
    agent: Agent,
    fake: FakeUpstream,
    _dir: tempfile::TempDir,
}

async fn start(extra: &str) -> CacheAgent {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        echo: true,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [stages.cache]\nenabled = true\npath = \"{}\"\nembedding_model = \"{}\"\nlookup_budget_ms = 5000\n{extra}\n\
         [[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\n",
        dir.path().join("cache.db").display(),
        minilm_dir(),
        fake.base_url()
    );
    let agent = Agent::start_toml(&toml).await;
    CacheAgent {
        agent,
        fake,
        _dir: dir,
    }
}

fn q(text: &str, stream: bool) -> Value {
    json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]})
}

async fn wait_stored(c: &CacheAgent, n: usize) {
    // Stores happen off the reply path; wait until the file has them.
    for _ in 0..250 {
        let metrics = metrics_text(&c.agent).await;
        let _ = metrics;
        let path = c._dir.path().join("cache.db");
        let count = rusqlite::Connection::open(&path)
            .and_then(|conn| {
                conn.query_row("SELECT COUNT(*) FROM cache_entries", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_or(0);
        if count as usize >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the cache never stored {n} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_and_paraphrases_hit_near_misses_do_not() {
    let c = start("threshold = 0.8").await;
    let first = c.agent.chat(q("How do I reset my password?", false)).await;
    assert_eq!(first.headers["x-kotaemon-cache"], "miss");
    wait_stored(&c, 1).await;

    let again = c.agent.chat(q("how do I reset my password", false)).await;
    assert_eq!(again.headers["x-kotaemon-cache"], "hit-exact");
    assert_eq!(again.headers["x-kotaemon-answered-by"], "cache");
    assert_eq!(
        again.json()["choices"][0]["message"]["content"],
        "How do I reset my password?",
        "the stored answer"
    );

    let para = c.agent.chat(q("How can I reset my password?", true)).await;
    assert_eq!(
        para.headers["x-kotaemon-cache"], "hit-semantic",
        "{:?}",
        para.headers
    );
    let sim: f32 = para.headers["x-kotaemon-cache-similarity"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(sim >= 0.8 && sim < 1.0, "{sim}");
    assert_eq!(para.streamed_text(), "How do I reset my password?");
    assert_eq!(
        para.events().last().map(String::as_str),
        Some("[DONE]"),
        "a streamed hit is a proper SSE stream"
    );
    assert_eq!(c.fake.chat_request_count(), 1);

    // Different question, similar words: not served from the cache.
    for other in [
        "How do I reset my router?",
        "Can I reset my password 3 times?",
        "Why can't I reset my password?",
    ] {
        let r = c.agent.chat(q(other, false)).await;
        assert!(
            r.headers["x-kotaemon-cache"]
                .to_str()
                .unwrap()
                .starts_with("miss"),
            "{other}: {:?}",
            r.headers["x-kotaemon-cache"]
        );
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            other,
            "{other} answered by the model"
        );
    }
    let metrics = metrics_text(&c.agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_cache_lookups_total",
            &[("outcome", "hit-semantic")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(metrics.contains("kotaemon_cache_hit_similarity_bucket"));
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personas_tools_errors_and_cut_answers_are_never_shared_or_stored() {
    let c = start("").await;
    let with_system = |system: &str| json!({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Who are you?"}]});
    c.agent.chat(with_system("You are a pirate.")).await;
    wait_stored(&c, 1).await;
    let lawyer = c.agent.chat(with_system("You are a lawyer.")).await;
    assert_eq!(
        lawyer.headers["x-kotaemon-cache"], "miss",
        "a different system prompt is a different namespace"
    );
    let tools = json!({"model": "m", "messages": [{"role": "user", "content": "Who are you?"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]});
    assert_eq!(
        c.agent.chat(tools).await.headers["x-kotaemon-cache"],
        "skipped-tools"
    );

    // An upstream error is not stored; a length-cut answer is not stored.
    c.fake.push(Script {
        status: 500,
        ..Script::default()
    });
    c.fake.push(Script {
        status: 500,
        ..Script::default()
    });
    c.fake.push(Script {
        status: 500,
        ..Script::default()
    });
    assert_eq!(
        c.agent
            .chat(q("What is the speed of light?", false))
            .await
            .status,
        502
    );
    let again = c.agent.chat(q("What is the speed of light?", false)).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.headers["x-kotaemon-cache"], "miss",
        "the error was not cached"
    );
    // Bypass: neither read nor written; refresh: not read.
    wait_stored(&c, 3).await;
    let bypass = send(
        client()
            .post(c.agent.chat_url())
            .header("x-kotaemon-cache", "bypass")
            .json(&q("What is the speed of light?", false)),
    )
    .await;
    assert_eq!(bypass.headers["x-kotaemon-cache"], "bypass");
    assert_eq!(bypass.headers["x-kotaemon-answered-by"], "cloud");
    let refresh = send(
        client()
            .post(c.agent.chat_url())
            .header("x-kotaemon-cache", "refresh")
            .json(&q("What is the speed of light?", false)),
    )
    .await;
    assert_eq!(refresh.headers["x-kotaemon-answered-by"], "cloud");
    let hit = c.agent.chat(q("What is the speed of light?", false)).await;
    assert_eq!(hit.headers["x-kotaemon-cache"], "hit-exact");
    let bad = send(
        client()
            .post(c.agent.chat_url())
            .header("x-kotaemon-cache", "sometimes")
            .json(&q("x", false)),
    )
    .await;
    bad.assert_error(400);
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_not_cached() {
    let c = start("").await;
    c.fake.push(Script {
        fault: Some(kotaemon_fake_upstream::Fault::ResetAfterChunks { chunks: 2 }),
        text: Some("one two three four".into()),
        ..Script::default()
    });
    let cut = c.agent.chat(q("Tell me four words", true)).await;
    assert!(cut.body.contains("\"error\""));
    let again = c.agent.chat(q("Tell me four words", true)).await;
    assert_eq!(
        again.headers["x-kotaemon-cache"], "miss",
        "a cut stream must not be replayed"
    );
    assert_eq!(again.streamed_text(), "Tell me four words");
    wait_stored(&c, 1).await;
    let hit = c.agent.chat(q("Tell me four words", false)).await;
    assert_eq!(hit.headers["x-kotaemon-cache"], "hit-exact");
    c.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_cache_database_leaves_the_agent_serving() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cache.db");
    std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[audit]\nenabled = false\n[usage]\nenabled = false\n[queue]\nenabled = false\n[pool.health]\nenabled = false\n[stages.cache]\nenabled = true\nsemantic = false\npath = \"{}\"\n\
         [[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\n",
        db.display(),
        fake.base_url()
    );
    let app = kotaemon_core::App::build(kotaemon_core::Config::from_toml_str(&toml).unwrap())
        .expect("the agent starts without its cache");
    assert!(
        app.warnings
            .iter()
            .any(|w| w.contains("cache disabled") && w.contains("cache.db")),
        "{:?}",
        app.warnings
    );
    drop(app);
    let agent = Agent::start_toml(&toml).await;
    let r = agent.chat(ask(false)).await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("x-kotaemon-cache"));
    agent.stop().await;
}
