//! Local rules answer on the device: no upstream call, every turn, both languages.

use crate::harness::*;
use kotaemon_fake_upstream::FakeUpstream;
use serde_json::json;

const RULES: &str = r#"
[pool.health]
enabled = false
[stages.rules]
enabled = true
[[stages.rules.intents]]
name = "light"
patterns = ['turn (?P<state>on|off) the meeting room light', '(?P<state>打开|关闭)会议室的?灯']
answer = "OK, meeting room light {state}. / 好的，已{state}会议室的灯。"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_answer_without_touching_the_upstream_on_every_turn() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let agent = Agent::start(&[("rules-cloud", &fake)], "", RULES).await;
    let reply = agent
        .chat(json!({"model": "m", "messages": [{"role": "user", "content": "请打开会议室的灯"}]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "OK, meeting room light 打开. / 好的，已打开会议室的灯。"
    );
    assert_eq!(reply.headers["x-kotaemon-answered-by"], "rules");

    // A follow-up deep in a conversation still takes the fast path.
    let follow_up = json!({"model": "m", "stream": true, "messages": [
        {"role": "user", "content": "What's on today?"},
        {"role": "assistant", "content": "A product launch meeting at 10."},
        {"role": "user", "content": "Thanks. Turn off the meeting room light please"}
    ]});
    let reply = agent.chat(follow_up).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.streamed_text(),
        "OK, meeting room light off. / 好的，已off会议室的灯。"
    );
    assert_eq!(reply.events().last().map(String::as_str), Some("[DONE]"));
    assert!(!reply.body.contains("usage"), "usage only when asked");
    assert_eq!(fake.chat_request_count(), 0, "no model was involved");

    // Not a rule: goes to the model. Client tools: the model decides, even on a match.
    assert_eq!(
        agent.chat(ask(false)).await.headers["x-kotaemon-answered-by"],
        "cloud"
    );
    let with_tools = json!({"model": "m", "messages": [{"role": "user", "content": "打开会议室灯"}],
        "tools": [{"type": "function", "function": {"name": "switch", "parameters": {}}}]});
    assert_eq!(
        agent.chat(with_tools).await.headers["x-kotaemon-answered-by"],
        "cloud"
    );
    assert_eq!(fake.chat_request_count(), 2);
    let metrics = metrics_text(&agent).await;
    assert!(
        metric(
            &metrics,
            "kotaemon_rule_matches_total",
            &[("intent", "light")]
        )
        .unwrap()
            >= 2.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_rules_answer_time_in_both_languages() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let mut config = kotaemon_core::Config::load_with_env(None, Vec::new()).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.upstreams[0].base_url = fake.base_url();
    let toml_text = toml::to_string(&config).unwrap();
    let agent = Agent::start_toml(&toml_text).await;
    for q in ["What time is it?", "现在几点了？", "你好", "今天星期几"] {
        let reply = agent
            .chat(json!({"model": "m", "messages": [{"role": "user", "content": q}]}))
            .await;
        assert_eq!(reply.headers["x-kotaemon-answered-by"], "rules", "{q}");
    }
    assert_eq!(fake.chat_request_count(), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_runs_a_tool_directly_without_any_model() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let rules = r#"
[pool.health]
enabled = false
[tools.contacts]
enabled = true
[[tools.contacts.entries]]
name = "张伟"
email = "zhang.wei@example.com"
title = "产品经理"
[stages.rules]
enabled = true
[[stages.rules.intents]]
name = "check_person"
patterns = ['^(?P<who>\S+)在通讯录里吗']
tool = { name = "contacts_lookup", arguments = { name = "{who}" } }
answer = "在，{who}在通讯录里。"
error_answer = "没有找到{who}：{error}"
"#;
    let agent = Agent::start(&[("rules-cloud", &fake)], "", rules).await;
    let ask = |text: &str| json!({"model": "m", "messages": [{"role": "user", "content": text}]});
    let found = agent.chat(ask("张经理在通讯录里吗")).await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert_eq!(
        found.json()["choices"][0]["message"]["content"],
        "在，张经理在通讯录里。"
    );
    assert_eq!(found.headers["x-kotaemon-answered-by"], "rules");
    let missing = agent.chat(ask("王总在通讯录里吗")).await;
    let text = missing.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.starts_with("没有找到王总：") && text.contains("nobody"),
        "{text}"
    );
    assert_eq!(fake.chat_request_count(), 0, "no model was involved");
    let metrics = metrics_text(&agent).await;
    assert_eq!(
        metric(
            &metrics,
            "kotaemon_tool_calls_total",
            &[("tool", "contacts_lookup"), ("outcome", "failed")]
        ),
        Some(1.0)
    );

    // A rule naming a tool that is not configured is a start-up error with its key path.
    let bad = rules.replace("contacts_lookup", "light_switch");
    let config = kotaemon_core::Config::from_toml_str(&format!(
        "[[upstreams]]\nname = \"c\"\nbase_url = \"http://127.0.0.1:9/v1\"\n{bad}"
    ));
    let problems = match config.map(kotaemon_core::App::build) {
        Ok(Err(e)) => e.problems,
        Err(e) => e.problems,
        Ok(Ok(_)) => panic!("an unknown tool must not start"),
    };
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("stages.rules.intents[0].tool.name")),
        "{problems:?}"
    );
    agent.stop().await;
}
