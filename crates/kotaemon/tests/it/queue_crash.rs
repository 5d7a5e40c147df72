//! The durable queue against `kill -9`: clients submit jobs while the agent is killed at
//! random moments, again and again; after the last restart every acknowledged job has
//! completed, exactly one job exists per idempotency key, and none was lost.

use super::{bin, config_for, wait_ready};
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::Duration;

struct Killable(Child);

impl Drop for Killable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cfg: &std::path::Path) -> (Killable, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = bin()
        .args(["serve", "--config"])
        .arg(cfg)
        .env("KOTAEMON_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Killable(child), format!("http://127.0.0.1:{port}"))
}

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn submit(client: &reqwest::Client, url: &str, key: &str) -> Option<String> {
    let response = client
        .post(format!("{url}/v1/jobs"))
        .header("Idempotency-Key", key)
        .json(&json!({"model": "gpt-x", "messages": [{"role": "user", "content": format!("summarize log {key}")}]}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !matches!(response.status().as_u16(), 200 | 202) {
        return None;
    }
    let job: Value = response.json().await.ok()?;
    job["id"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_job() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    // Slow enough that kills land while jobs are in flight.
    fake.set_default(Script {
        text: Some("summary done".into()),
        ttft_ms: 60,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let cfg = config_for(
        dir.path(),
        &fake.base_url(),
        &format!(
            "[queue]\npath = {db:?}\nconcurrency = 4\nbackoff_ms = 100\npoll_ms = 50\n[local]\nenabled = false\n[stages.cache]\nenabled = false\n"
        ),
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Lcg(seed);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut unanswered: Vec<String> = Vec::new();
    let mut next = 0u32;
    let cycles = 8;
    for cycle in 0..cycles {
        let (mut agent, url) = start(&cfg);
        wait_ready(&url).await;
        let pid = agent.0.id();
        let after = Duration::from_millis(150 + rng.below(700));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        });
        // Submit until the agent dies under us; clients retry unanswered keys later.
        loop {
            let key = unanswered.pop().unwrap_or_else(|| {
                next += 1;
                format!("log-{next}")
            });
            match submit(&client, &url, &key).await {
                Some(id) => {
                    if let Some(before) = acked.insert(key.clone(), id.clone()) {
                        assert_eq!(before, id, "key {key} named two jobs");
                    }
                }
                None => {
                    unanswered.push(key);
                    break;
                }
            }
            // A client's pace (tens of jobs per cycle), not a flood the fake would take
            // minutes to answer.
            tokio::time::sleep(Duration::from_millis(10 + rng.below(40))).await;
        }
        killer.await.unwrap();
        let _ = agent.0.wait();
        println!(
            "cycle {cycle}: killed after {after:?}; {} acknowledged so far",
            acked.len()
        );
    }

    // The last start: retried keys are answered, and every job finishes.
    let (_agent, url) = start(&cfg);
    wait_ready(&url).await;
    for key in std::mem::take(&mut unanswered) {
        let id = submit(&client, &url, &key)
            .await
            .expect("a retried submit is answered");
        if let Some(before) = acked.insert(key.clone(), id.clone()) {
            assert_eq!(before, id);
        }
    }
    assert!(acked.len() >= cycles, "jobs were submitted in every cycle");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for (key, id) in &acked {
        loop {
            let job: Value = client
                .get(format!("{url}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_ne!(job["status"], "failed", "{key}: {job}");
            if job["status"] == "completed" {
                assert_eq!(
                    job["result"]["choices"][0]["message"]["content"],
                    "summary done"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never completed: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // One job per key: nothing stored twice, nothing orphaned.
    let all: Value = client
        .get(format!("{url}/v1/jobs?limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = all["data"].as_array().unwrap();
    assert_eq!(jobs.len(), acked.len());
    assert!(jobs.iter().all(|j| j["status"] == "completed"));
    println!(
        "{} jobs across {cycles} kills; the upstream answered {} requests (repeats: jobs in flight at a kill)",
        jobs.len(),
        fake.chat_request_count()
    );
}
