//! The durable queue over real sockets: jobs are acknowledged once stored, retried while the
//! cloud fails, completed once; `priority: batch` queues a chat request; `deferrable` queues
//! it only when the cloud is away (store and forward) instead of a local answer.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::{json, Value};
use std::time::Duration;

fn toml(fake: &FakeUpstream, db: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool]\nmax_attempts = 1\n[pool.health]\nenabled = false\n\
         [stages.cache]\nenabled = false\n\
         [queue]\npath = {db:?}\nbackoff_ms = 50\nbackoff_max_ms = 200\npoll_ms = 50\n\
         [[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\nconnect_timeout_ms = 500\nttfb_ms = 2000\n",
        fake.base_url()
    )
}

fn failing() -> Script {
    Script {
        status: 503,
        ..Script::default()
    }
}

async fn wait_done(agent: &Agent, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let job = agent.get(&format!("/v1/jobs/{id}")).await.json();
        if job["status"] == "completed" || job["status"] == "failed" {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_retried_until_the_cloud_answers_and_complete_once() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        text: Some("Weekly summary: all systems nominal.".into()),
        ..Script::default()
    });
    fake.push(failing());
    fake.push(failing());
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_toml(&toml(&fake, &dir.path().join("queue.db"))).await;
    let mut events = agent.bus.subscribe();
    let body = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "summarize this week's logs"}]});
    let submit = || {
        send(
            client()
                .post(format!("{}/v1/jobs", agent.url))
                .header("Idempotency-Key", "weekly-2026-48")
                .json(&body),
        )
    };
    let first = submit().await;
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.json()["id"].as_str().unwrap().to_string();
    assert_eq!(first.headers["x-kotaemon-job-id"], id.as_str());
    let again = submit().await;
    assert_eq!(again.status, 200, "the same key is the same job");
    assert_eq!(again.json()["id"], id.as_str());

    let job = wait_done(&agent, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempts"], 3, "two failures, then the answer: {job}");
    assert_eq!(
        job["result"]["choices"][0]["message"]["content"],
        "Weekly summary: all systems nominal."
    );
    assert_eq!(fake.chat_request_count(), 3);
    // One notification (MQTT bridge and webhooks publish bus events), after the result is stored.
    let mut finished = Vec::new();
    while let Some(e) = events.try_next() {
        if let kotaemon_core::events::TurnEvent::JobFinished {
            job,
            status,
            attempts,
        } = e.as_ref()
        {
            finished.push((job.to_string(), *status, *attempts));
        }
    }
    assert_eq!(finished, vec![(id.clone(), "completed", 3)]);
    let listed = agent.get("/v1/jobs?status=completed").await.json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    agent.get("/v1/jobs/job-nope").await.assert_error(404);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_priority_queues_and_deferrable_queues_only_when_the_cloud_is_away() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        text: Some("done".into()),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_toml(&toml(&fake, &dir.path().join("queue.db"))).await;
    let ask = |priority: &str| {
        json!({"model": "gpt-x", "priority": priority, "stream": true,
               "messages": [{"role": "user", "content": "write the monthly report"}]})
    };
    let batch = agent.chat(ask("batch")).await;
    assert_eq!(batch.status, 202, "{}", batch.body);
    let batch_id = batch.json()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_done(&agent, &batch_id).await["status"], "completed");
    // The job went out without our `priority` field and as a non-streamed request.
    let sent = fake.requests().last().unwrap().body.clone();
    assert!(
        sent.get("priority").is_none() && sent["stream"] != true,
        "{sent}"
    );

    // Deferrable with a working cloud: answered now.
    let now = agent.chat(ask("deferrable")).await;
    assert_eq!(now.status, 200);
    assert!(now.headers.get("x-kotaemon-job-id").is_none());

    // Deferrable while the cloud fails: queued instead of an error or a local answer.
    fake.push(failing());
    fake.push(failing());
    let later = agent.chat(ask("deferrable")).await;
    assert_eq!(later.status, 202, "{}", later.body);
    let id = later.json()["id"].as_str().unwrap().to_string();
    let job = wait_done(&agent, &id).await;
    assert_eq!(job["status"], "completed", "{job}");

    agent.chat(ask("soon")).await.assert_error(400);
    agent.stop().await;
}
