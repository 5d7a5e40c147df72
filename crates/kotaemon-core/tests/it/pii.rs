//! The PII guard's promise, checked with canaries: names from the contacts, phones, ID and
//! card numbers, emails and addresses go through the real pipeline to a recording fake cloud,
//! which must see none of them; the user sees the real values back, streamed or not.

use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script};
use serde_json::json;

const PROMPT: &str = "请联系张经理（13800138000，zhang.wei@example.com）和 Director Li，身份证11010519491231002X，卡号6222020200112233446，服务器10.1.2.3";
const CANARIES: &[&str] = &[
    "张经理",
    "Director Li",
    "13800138000",
    "zhang.wei@example.com",
    "11010519491231002X",
    "6222020200112233446",
    "10.1.2.3",
];

fn toml(fake: &FakeUpstream, guard: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[pool.health]
enabled = false
[stages.cache]
enabled = false
[stages.pii_guard]
{guard}
[tools.contacts]
[[tools.contacts.entries]]
name = "张伟"
title = "产品经理"
[[tools.contacts.entries]]
name = "Li Na"
title = "Director"
aliases = ["Director Li"]
[[upstreams]]
name = "cloud"
base_url = "{}"
"#,
        fake.base_url()
    )
}

fn ask(stream: bool) -> serde_json::Value {
    json!({"model": "fake-model", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
}

fn cloud_saw(fake: &FakeUpstream) -> String {
    fake.requests().iter().map(|r| r.body.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_sees_pseudonyms_and_the_user_sees_real_values() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    // The cloud echoes what it got: pseudonyms, which the guard restores on the way out —
    // in streams too, where the fake splits them across chunks.
    fake.set_default(Script {
        echo: true,
        ..Script::default()
    });
    let agent = Agent::start_toml(&toml(&fake, "mode = \"pseudonymize\"")).await;
    for stream in [false, true] {
        let reply = agent.chat(ask(stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = if stream {
            reply.streamed_text()
        } else {
            reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(answer, PROMPT, "the user gets the real values back");
    }
    let seen = cloud_saw(&fake);
    for canary in CANARIES {
        assert!(!seen.contains(canary), "{canary} reached the cloud: {seen}");
    }
    for label in [
        "<PERSON_1>",
        "<PHONE_1>",
        "<EMAIL_1>",
        "<ID_1>",
        "<CARD_1>",
        "<IP_1>",
    ] {
        assert!(seen.contains(label), "{label} missing: {seen}");
    }
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_pii_masked_total",
            &[("entity", "phone")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert!(!CANARIES.iter().any(|c| metrics.contains(c)));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_is_irreversible_and_block_keeps_the_turn_on_the_device() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        echo: true,
        ..Script::default()
    });
    let agent = Agent::start_toml(&toml(&fake, "mode = \"redact\"")).await;
    let reply = agent.chat(ask(false)).await;
    let answer = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        answer.contains("<PHONE>") && answer.contains("<PERSON>"),
        "{answer}"
    );
    let seen = cloud_saw(&fake);
    assert!(!CANARIES.iter().any(|c| seen.contains(c)), "{seen}");
    agent.stop().await;

    // Block: an ID number keeps the turn local; with no local model it is refused — and the
    // cloud never hears of it.
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start_toml(&toml(&fake, "mode = \"block\"\nblock = [\"id_number\"]")).await;
    let reply = agent.chat(ask(false)).await;
    reply.assert_error(503);
    assert_eq!(reply.error_code(), "no_local_model");
    assert_eq!(fake.chat_request_count(), 0);
    // A turn without the blocked kind still goes out, pseudonymized.
    let plain = agent
        .chat(json!({"model": "fake-model", "messages": [{"role": "user", "content": "call 13800138000"}]}))
        .await;
    assert_eq!(plain.status, 200);
    assert!(!cloud_saw(&fake).contains("13800138000"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_shows_what_left_the_device_masked() {
    use kotaemon_fake_upstream::ScriptToolCall;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    // Step 1 the cloud asks the device to look up <PERSON_1>; step 2 it answers.
    fake.push(Script {
        tool_calls: vec![ScriptToolCall {
            name: "contacts_lookup".into(),
            arguments: r#"{"name": "<PERSON_1>"}"#.into(),
        }],
        ..Script::default()
    });
    fake.push(Script {
        text: Some("done".into()),
        ..Script::default()
    });
    let with_tools = toml(&fake, "mode = \"pseudonymize\"")
        .replace("[tools.contacts]\n", "[tools.contacts]\nenabled = true\n");
    let agent = Agent::start_toml(&with_tools).await;
    let reply = agent.chat(ask(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let turn = reply.headers["x-kotaemon-turn-id"]
        .to_str()
        .unwrap()
        .to_string();

    let records = audit_records(&agent.audit_dir);
    let uploads: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "upstream_request")
        .collect();
    assert_eq!(uploads.len(), fake.chat_request_count(), "{records:?}");
    for upload in &uploads {
        assert_eq!(upload["turn"], turn.as_str());
        assert_eq!(upload["upstream"], "cloud");
        let sent = upload["request"].to_string();
        assert!(
            sent.contains("<PERSON_1>") && sent.contains("<PHONE_1>"),
            "{sent}"
        );
    }
    let tools: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "tool_call")
        .collect();
    assert_eq!(tools.len(), 1, "{records:?}");
    assert_eq!(tools[0]["tool"], "contacts_lookup");
    assert_eq!(tools[0]["arguments"], json!({"name": "<PERSON_1>"}));
    assert_eq!(tools[0]["outcome"], "ok");
    let log = serde_json::to_string(&records).unwrap();
    for canary in CANARIES {
        assert!(!log.contains(canary), "{canary} is in the audit log");
    }
    // The tool result went back to the cloud masked, and the log shows that second upload.
    assert!(!uploads[1]["request"].to_string().contains("张伟"));
    let chains = kotaemon_core::audit::verify_dir(&agent.audit_dir).unwrap();
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].records, records.len() as u64);

    // The same records through the admin API, filtered by turn.
    let api = agent
        .get(&format!("/v1/kotaemon/audit?turn={turn}&limit=10"))
        .await;
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(api.json()["data"].as_array().unwrap().len(), 3);
    agent
        .get("/v1/kotaemon/audit?limit=0")
        .await
        .assert_error(400);
    agent.stop().await;
}
