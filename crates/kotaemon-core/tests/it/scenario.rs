//! The founding scenario, end to end over real sockets: "帮我安排明天上午10点的会议,主题是产品发布,
//! 邀请张经理和李总监" (and in English). The cloud (scripted with the calls a real model makes)
//! asks for the people and the booking; the device resolves the names from its directory,
//! checks conflicts and creates the event in a real Radicale; the answer comes back.

use crate::calendar::Radicale;
use crate::harness::*;
use kotaemon_fake_upstream::{FakeUpstream, Script, ScriptToolCall};
use serde_json::{json, Value};

fn tomorrow_china() -> chrono::NaiveDate {
    let now = chrono::Utc::now() + chrono::Duration::hours(8);
    now.date_naive() + chrono::Duration::days(1)
}

fn config(radicale: &Radicale, fake: &FakeUpstream) -> String {
    let kotaemon_core::config::SecretRef::File(password) = radicale.password_ref() else {
        panic!("the test server keeps its password in a file");
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[pool.health]
enabled = false
[stages.cache]
enabled = false
[[upstreams]]
name = "cloud"
base_url = "{}"
[tools.calendar]
enabled = true
url = "{}"
username = "{}"
password = "file:{}"
utc_offset_minutes = 480
create_calendar_if_missing = true
[tools.contacts]
enabled = true
[[tools.contacts.entries]]
name = "张伟"
email = "zhang.wei@example.com"
title = "产品经理"
aliases = ["Manager Zhang"]
[[tools.contacts.entries]]
name = "李娜"
email = "li.na@example.com"
title = "技术总监"
aliases = ["Director Li"]
"#,
        fake.base_url(),
        radicale.calendar_url(),
        radicale.user,
        password.display()
    )
}

fn calls(list: &[(&str, Value)]) -> Script {
    Script {
        tool_calls: list
            .iter()
            .map(|(name, args)| ScriptToolCall {
                name: name.to_string(),
                arguments: args.to_string(),
            })
            .collect(),
        ..Script::default()
    }
}

/// What a capable model does with the request: look the people up, check the slot, book it.
/// It only ever sees pseudonyms (the guard masked the request and every tool result), so it
/// writes pseudonyms; the device puts the real values back before the tools run.
fn script_the_cloud(fake: &FakeUpstream, summary: &str, answer: &str) {
    let day = tomorrow_china();
    let start = format!("{day}T10:00");
    let end = format!("{day}T11:00");
    fake.push(calls(&[
        ("contacts_lookup", json!({"name": "<PERSON_1>"})),
        ("contacts_lookup", json!({"name": "<PERSON_2>"})),
    ]));
    fake.push(calls(&[(
        "calendar_find_conflicts",
        json!({"start": start, "end": end}),
    )]));
    fake.push(calls(&[(
        "calendar_create_event",
        json!({"summary": summary, "start": start, "end": end, "attendees": [
            {"name": "<PERSON_3>", "email": "<EMAIL_1>"},
            {"name": "<PERSON_4>", "email": "<EMAIL_2>"}]}),
    )]));
    fake.push(Script {
        text: Some(answer.to_string()),
        ..Script::default()
    });
}

fn tool_messages(fake: &FakeUpstream) -> Vec<Value> {
    let last = fake.requests().last().unwrap().body.clone();
    last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| serde_json::from_str(m["content"].as_str().unwrap()).unwrap_or(Value::Null))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meeting_room_assistant_books_the_meeting_in_chinese_and_english() {
    let radicale = Radicale::start().await;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start_toml(&config(&radicale, &fake)).await;
    let day = tomorrow_china();

    script_the_cloud(&fake, "产品发布", "已为您创建明天上午10点的产品发布会会议");
    let reply = agent
        .chat(json!({"model": "fake-model", "messages": [{"role": "user",
            "content": "帮我安排明天上午10点的会议,主题是产品发布,邀请张经理和李总监"}]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "已为您创建明天上午10点的产品发布会会议"
    );
    assert_eq!(fake.chat_request_count(), 4);
    let results = tool_messages(&fake);
    assert_eq!(results[0]["matches"][0]["email"], "<EMAIL_1>");
    assert_eq!(results[1]["matches"][0]["email"], "<EMAIL_2>");
    // No name, title-name or email of the people ever reached the cloud.
    let seen: String = fake.requests().iter().map(|r| r.body.to_string()).collect();
    for real in ["张经理", "李总监", "张伟", "李娜", "zhang.wei@", "li.na@"] {
        assert!(!seen.contains(real), "{real} reached the cloud");
    }
    assert!(
        results[2].to_string().contains("[]") || results[2]["conflicts"] == json!([]),
        "the slot was free: {}",
        results[2]
    );
    assert!(results[3]["uid"].is_string(), "created: {}", results[3]);

    // The event really exists in Radicale, at 10:00 China time = 02:00 UTC, with the emails.
    let events = radicale.raw_vevents(&radicale.calendar_url()).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    let utc = day.format("%Y%m%d").to_string();
    assert!(ev.contains(&format!("DTSTART:{utc}T020000Z")), "{ev}");
    assert!(ev.contains(&format!("DTEND:{utc}T030000Z")), "{ev}");
    assert!(ev.contains("SUMMARY:产品发布"), "{ev}");
    assert!(ev.contains("mailto:zhang.wei@example.com"), "{ev}");
    assert!(ev.contains("mailto:li.na@example.com"), "{ev}");

    // The English version, same hour: the device finds the conflict and books nothing.
    let before = fake.chat_request_count();
    script_the_cloud(
        &fake,
        "Product launch",
        "There is already a meeting at 10; shall I book 11?",
    );
    let reply = agent
        .chat(json!({"model": "fake-model", "stream": true, "messages": [{"role": "user",
            "content": "Schedule a meeting tomorrow at 10am about the product launch, invite Manager Zhang and Director Li"}]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.streamed_text(),
        "There is already a meeting at 10; shall I book 11?"
    );
    assert_eq!(fake.chat_request_count(), before + 4);
    let results = tool_messages(&fake);
    assert_eq!(results[0]["matches"][0]["email"], "<EMAIL_1>");
    let seen: String = fake.requests().iter().map(|r| r.body.to_string()).collect();
    assert!(!seen.contains("Manager Zhang") && !seen.contains("zhang.wei@"));
    assert!(
        results[2].to_string().contains("产品发布"),
        "the conflict is reported to the model: {}",
        results[2]
    );
    let refused = results[3]["error"].as_str().unwrap_or_default();
    assert!(
        refused.contains("产品发布"),
        "create refused with the conflict: {}",
        results[3]
    );
    let events = radicale.raw_vevents(&radicale.calendar_url()).await;
    assert_eq!(
        events.len(),
        1,
        "no half-created or double-booked events: {events:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_failure_after_booking_still_tells_the_user_what_was_done() {
    let radicale = Radicale::start().await;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start_toml(&config(&radicale, &fake)).await;
    let day = tomorrow_china();
    fake.push(calls(&[(
        "calendar_create_event",
        json!({"summary": "产品发布", "start": format!("{day}T15:00"), "duration_minutes": 30,
               "attendees": ["li.na@example.com"]}),
    )]));
    // The cloud dies before it can word the confirmation.
    fake.set_default(Script {
        status: 500,
        ..Script::default()
    });
    let ask = |stream: bool| {
        json!({"model": "fake-model", "stream": stream, "messages": [{"role": "user",
            "content": "明天下午3点和李总监开半小时产品发布会"}]})
    };
    let reply = agent.chat(ask(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let text = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("calendar_create_event") && text.contains("产品发布"),
        "the user learns the event was booked: {text}"
    );
    // With the cloud down from the start nothing was done: an honest error, not a made-up
    // success.
    let reply = agent.chat(ask(true)).await;
    reply.assert_error(502);
    let events = radicale.raw_vevents(&radicale.calendar_url()).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("T070000Z"),
        "15:00 China time: {}",
        events[0]
    );
    agent.stop().await;
}
