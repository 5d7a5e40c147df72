//! MQTT against a real Mosquitto: the `mqtt_publish` tool through the tool registry, and the
//! bridge plugin end to end (command in, reply and events out) in a served agent.
//!
//! [`Mosquitto`] starts a private broker on a free loopback port and kills it on drop;
//! [`Watcher`] is a test client that records everything it receives. Both are `pub` for other
//! tests.

use crate::harness::*;
use kotaemon_core::tools::{ToolCtx, ToolError, ToolRegistry, ToolsConfig};
use kotaemon_fake_upstream::{FakeUpstream, Script, DEFAULT_TEXT};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long any expected message may take before the test fails (a hang is a failure).
const PATIENCE: Duration = Duration::from_secs(10);

/// A private Mosquitto on `127.0.0.1:<port>`, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn mosquitto_binary() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// Is `mosquitto_passwd` installed (needed for brokers with users)?
pub fn have_mosquitto_passwd() -> bool {
    Command::new("mosquitto_passwd")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Mosquitto {
    /// Anonymous access allowed.
    pub async fn start() -> Mosquitto {
        Self::launch(&[]).await
    }

    /// Only these users (a `password_file` made with `mosquitto_passwd -b`); no anonymous
    /// access. Needs [`have_mosquitto_passwd`].
    pub async fn start_with_users(users: &[(&str, &str)]) -> Mosquitto {
        Self::launch(users).await
    }

    async fn launch(users: &[(&str, &str)]) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut conf = String::from("allow_anonymous true\n");
        if !users.is_empty() {
            let file = dir.path().join("passwd");
            for (i, (user, password)) in users.iter().enumerate() {
                let mut cmd = Command::new("mosquitto_passwd");
                if i == 0 {
                    cmd.arg("-c");
                }
                let status = cmd
                    .arg("-b")
                    .arg(&file)
                    .arg(user)
                    .arg(password)
                    .stdout(Stdio::null())
                    .status()
                    .expect("mosquitto_passwd");
                assert!(status.success(), "mosquitto_passwd failed");
            }
            conf = format!("allow_anonymous false\npassword_file {}\n", file.display());
        }
        // As root, Mosquitto would switch to the `mosquitto` user, who cannot read our files.
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(dir.path()).unwrap().uid() == 0 {
            conf.push_str("user root\n");
        }
        std::fs::write(dir.path().join("base.conf"), conf).unwrap();
        let mut broker = Mosquitto {
            port: 0,
            child: None,
            dir,
        };
        // A free port can be taken between asking and binding: try a few.
        for _ in 0..5 {
            broker.port = free_port();
            if broker.spawn().await {
                return broker;
            }
        }
        panic!("mosquitto did not start:\n{}", broker.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Starts the broker on `self.port`; false if it exited (port taken).
    async fn spawn(&mut self) -> bool {
        let base = std::fs::read_to_string(self.dir.path().join("base.conf")).unwrap();
        let conf: PathBuf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\npersistence false\n{base}",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let mut child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto is not installed");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills the broker (clients see the connection drop; nothing is persisted).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "mosquitto did not restart on {}:\n{}",
            self.port,
            self.log()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message a [`Watcher`] received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("not JSON on {} ({e}): {}", self.topic, self.text()))
    }
}

enum Note {
    Connected,
    Refused(String),
    SubAck,
    Message(Msg),
}

/// A test client that records every message it receives; it reconnects and subscribes again
/// when the broker comes back.
pub struct Watcher {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Note>,
    /// Everything received so far, in order.
    pub log: Vec<Msg>,
    filters: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

static CLIENTS: AtomicU32 = AtomicU32::new(0);

impl Watcher {
    pub async fn connect(port: u16) -> Watcher {
        Self::try_connect(port, None).await.unwrap()
    }

    /// Connects (with a username and password if given); `Err` is the broker's refusal.
    pub async fn try_connect(port: u16, login: Option<(&str, &str)>) -> Result<Watcher, String> {
        let id = format!(
            "test-{}-{}",
            std::process::id(),
            CLIENTS.fetch_add(1, Ordering::Relaxed)
        );
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let filters: Arc<Mutex<Vec<String>>> = Arc::default();
        let (again, resubscribe) = (client.clone(), filters.clone());
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in resubscribe.lock().unwrap().iter() {
                            let _ = again.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        }
                        let _ = tx.send(Note::Connected);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Note::SubAck);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Note::Message(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Note::Refused(e.to_string()));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let mut watcher = Watcher {
            client,
            rx,
            log: Vec::new(),
            filters,
            task,
        };
        match tokio::time::timeout(PATIENCE, watcher.rx.recv()).await {
            Ok(Some(Note::Connected)) => Ok(watcher),
            Ok(Some(Note::Refused(e))) => Err(e),
            _ => panic!("the test client could not connect to the broker"),
        }
    }

    /// Subscribes (QoS 1) and waits for the broker's SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.filters.lock().unwrap().push(filter.to_string());
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.recv().await {
                Note::SubAck => return,
                Note::Message(m) => self.log.push(m),
                _ => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Note {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .ok()
            .flatten()
            .expect("nothing more arrived from the broker")
    }

    /// Where the log ends now: pass to [`Watcher::wait_from`] to look only at what comes next.
    pub fn mark(&self) -> usize {
        self.log.len()
    }

    /// The first message (received so far or still to come) that satisfies `pred`.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        self.wait_from(0, what, pred).await
    }

    /// Like [`Watcher::wait_for`], looking only at messages from log index `from` on.
    pub async fn wait_from(&mut self, from: usize, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        if let Some(m) = self.log.iter().skip(from).find(|m| pred(m)) {
            return m.clone();
        }
        let until = Instant::now() + PATIENCE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Note::Message(m))) => {
                    self.log.push(m.clone());
                    if pred(&m) {
                        return m;
                    }
                }
                Ok(Some(_)) => {}
                _ => panic!(
                    "never received: {what}; got:\n{}",
                    self.log
                        .iter()
                        .map(|m| format!("  {} {}", m.topic, m.text()))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Messages received on `topic` so far.
    pub fn on(&self, topic: &str) -> Vec<&Msg> {
        self.log.iter().filter(|m| m.topic == topic).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The `mqtt_publish` tool.

fn tools(toml_text: &str) -> Arc<ToolRegistry> {
    let config: ToolsConfig = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"));
    kotaemon_core::tools::build(&config).unwrap_or_else(|p| panic!("{p:?}"))
}

fn tool_toml(port: u16, extra: &str) -> String {
    format!(
        "[mqtt]\nenabled = true\nport = {port}\nallowed_topics = [\"office/+/set\", \"home/#\"]\n{extra}\n"
    )
}

static CALLS: AtomicU32 = AtomicU32::new(0);

async fn publish(reg: &ToolRegistry, args: Value) -> Result<Value, ToolError> {
    let key = format!("turn-1:call-{}", CALLS.fetch_add(1, Ordering::Relaxed));
    publish_as(reg, args, &key).await
}

async fn publish_as(reg: &ToolRegistry, args: Value, key: &str) -> Result<Value, ToolError> {
    let ctx = ToolCtx {
        idempotency_key: key.to_string(),
    };
    reg.call("mqtt_publish", args, &ctx, Duration::from_secs(60))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_reaches_subscribers_on_allowed_topics_only() {
    let broker = Mosquitto::start().await;
    let mut watcher = Watcher::connect(broker.port).await;
    watcher.subscribe("#").await;
    let reg = tools(&tool_toml(broker.port, ""));
    assert_eq!(reg.names(), vec!["mqtt_publish"]);

    let done = publish(
        &reg,
        json!({"topic": "office/light/set", "payload": {"state": "ON", "brightness": 80}}),
    )
    .await
    .unwrap();
    assert_eq!(
        done,
        json!({"published": true, "topic": "office/light/set"})
    );
    let got = watcher
        .wait_for("the light command", |m| m.topic == "office/light/set")
        .await;
    assert_eq!(got.json(), json!({"state": "ON", "brightness": 80}));

    // Text goes out as is, UTF-8 included.
    publish(&reg, json!({"topic": "home/客厅/风扇", "payload": "开"}))
        .await
        .unwrap();
    let fan = watcher
        .wait_for("the fan command", |m| m.topic == "home/客厅/风扇")
        .await;
    assert_eq!(fan.payload, "开".as_bytes());

    // Outside the allowlist: refused, nothing reaches the broker.
    let refused = publish(&reg, json!({"topic": "office/door/open", "payload": "1"})).await;
    assert!(
        matches!(&refused, Err(ToolError::Failed(m)) if m.starts_with("topic not allowed")),
        "{refused:?}"
    );
    let wildcard = publish(&reg, json!({"topic": "office/#", "payload": "1"})).await;
    assert!(matches!(wildcard, Err(ToolError::InvalidArguments(_))));
    let bad_args = publish(&reg, json!({"topic": "office/light/set", "payload": 1})).await;
    assert!(matches!(bad_args, Err(ToolError::InvalidArguments(_))));

    // The same tool call twice (same idempotency key) publishes once.
    let args = json!({"topic": "office/heater/set", "payload": "toggle"});
    publish_as(&reg, args.clone(), "turn-9:call-1")
        .await
        .unwrap();
    let again = publish_as(&reg, args, "turn-9:call-1").await.unwrap();
    assert_eq!(again["repeated"], true);

    // Retained: a client subscribing later gets it as the topic's last value.
    publish(
        &reg,
        json!({"topic": "home/light/state", "payload": "OFF", "retain": true}),
    )
    .await
    .unwrap();
    publish(&reg, json!({"topic": "home/marker", "payload": "end"}))
        .await
        .unwrap();
    watcher
        .wait_for("the marker", |m| m.topic == "home/marker")
        .await;
    assert!(watcher.on("office/door/open").is_empty());
    assert_eq!(watcher.on("office/heater/set").len(), 1);
    let mut late = Watcher::connect(broker.port).await;
    late.subscribe("home/light/state").await;
    let kept = late
        .wait_for("the retained state", |m| m.topic == "home/light/state")
        .await;
    assert!(kept.retain);
    assert_eq!(kept.text(), "OFF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_fails_clearly_while_the_broker_is_down_and_recovers() {
    // Nothing listens: refused at once, with the reason and the address.
    let closed = free_port();
    let reg = tools(&tool_toml(closed, "timeout_ms = 3000"));
    let started = Instant::now();
    let down = publish(&reg, json!({"topic": "office/light/set", "payload": "ON"})).await;
    match &down {
        Err(ToolError::Failed(m)) => {
            assert!(m.contains(&format!("127.0.0.1:{closed}")), "{m}");
            assert!(m.contains("refused"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // A hang guard, not a timing claim: the machine may be loaded.
    assert!(started.elapsed() < Duration::from_secs(10));

    // A listener that never answers the MQTT handshake: Failed (not a bare timeout) within
    // the tool's timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let reg = tools(&tool_toml(port, "timeout_ms = 1000"));
    let started = Instant::now();
    let hung = publish(&reg, json!({"topic": "office/light/set", "payload": "ON"})).await;
    assert!(
        matches!(&hung, Err(ToolError::Failed(m)) if m.contains("no connection")),
        "{hung:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(silent);

    // The broker goes away and comes back on the same port: the kept connection follows.
    let mut broker = Mosquitto::start().await;
    let reg = tools(&tool_toml(broker.port, "timeout_ms = 3000"));
    publish(&reg, json!({"topic": "office/light/set", "payload": "ON"}))
        .await
        .unwrap();
    broker.stop();
    let started = Instant::now();
    let lost = publish(&reg, json!({"topic": "office/light/set", "payload": "OFF"})).await;
    assert!(matches!(&lost, Err(ToolError::Failed(_))), "{lost:?}");
    // A hang guard, not a timing claim: the machine may be loaded.
    assert!(started.elapsed() < Duration::from_secs(10));
    broker.restart().await;
    let mut watcher = Watcher::connect(broker.port).await;
    watcher.subscribe("office/#").await;
    // A call while the broker is back triggers a reconnect at once (no waiting out the
    // backoff); an attempt already under way when the broker came back may still fail.
    let mut result = Err(ToolError::Failed("not tried".into()));
    for _ in 0..3 {
        result = publish(&reg, json!({"topic": "office/light/set", "payload": "OFF"})).await;
        if result.is_ok() {
            break;
        }
    }
    assert_eq!(result.unwrap()["published"], true);
    let got = watcher
        .wait_for("OFF after the restart", |m| m.topic == "office/light/set")
        .await;
    assert_eq!(got.text(), "OFF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_logs_in_with_a_password_file() {
    if !have_mosquitto_passwd() {
        eprintln!("mosquitto_passwd is not installed: skipping");
        return;
    }
    const PASSWORD: &str = "canary-pw-5e1d";
    let broker = Mosquitto::start_with_users(&[("agent", PASSWORD), ("tester", "t")]).await;
    let anonymous = Watcher::try_connect(broker.port, None).await;
    assert!(anonymous.is_err(), "anonymous access must be refused");
    let mut watcher = Watcher::try_connect(broker.port, Some(("tester", "t")))
        .await
        .unwrap();
    watcher.subscribe("office/#").await;

    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    std::fs::write(&good, format!("{PASSWORD}\n")).unwrap();
    std::fs::write(&bad, "wrong-canary-77\n").unwrap();
    let login = |file: &Path| {
        format!(
            "username = \"agent\"\npassword = \"file:{}\"\ntimeout_ms = 3000",
            file.display()
        )
    };

    let reg = tools(&tool_toml(broker.port, &login(&good)));
    publish(&reg, json!({"topic": "office/light/set", "payload": "ON"}))
        .await
        .unwrap();
    let got = watcher
        .wait_for("the authenticated publish", |m| {
            m.topic == "office/light/set"
        })
        .await;
    assert_eq!(got.text(), "ON");

    let reg = tools(&tool_toml(broker.port, &login(&bad)));
    let refused = publish(&reg, json!({"topic": "office/light/set", "payload": "ON"})).await;
    match refused {
        Err(ToolError::Failed(m)) => {
            // Mosquitto answers a wrong password with "not authorized".
            assert!(m.contains("not authorized"), "{m}");
            assert!(!m.contains("canary"), "the password leaked: {m}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The bridge.

const GREETING: &str = "Hello! How can I help? / 你好！有什么可以帮你？";

fn bridge_toml(port: u16, extra: &str) -> String {
    format!(
        r#"
[pool]
max_attempts = 1
[pool.health]
enabled = false
[stages.rules]
enabled = true
[[stages.rules.intents]]
name = "greeting"
patterns = ['^\s*(hi|hello|hey)( there)?[\s!.,]*$', '^\s*(你好|您好|嗨|哈喽)[\s!！。,，]*$']
answer = "{GREETING}"
[plugins.mqtt_bridge]
enabled = true
port = {port}
reply_topics = ["satellites/+/reply"]
{extra}
"#
    )
}

/// Waits for the bridge's reply carrying `id` on `topic`.
async fn reply_for(w: &mut Watcher, topic: &str, id: &Value) -> Value {
    let what = format!("a reply with id {id} on {topic}");
    w.wait_for(&what, |m| {
        m.topic == topic
            && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["id"] == *id)
    })
    .await
    .json()
}

/// The events of one turn, up to its `turn_finished`.
async fn turn_events(w: &mut Watcher, turn: &str) -> Vec<Value> {
    w.wait_for("the turn's turn_finished event", |m| {
        m.topic == "kotaemon/events"
            && serde_json::from_slice::<Value>(&m.payload)
                .is_ok_and(|v| v["turn"] == turn && v["kind"] == "turn_finished")
    })
    .await;
    w.on("kotaemon/events")
        .into_iter()
        .map(Msg::json)
        .filter(|v| v["turn"] == turn)
        .collect()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_answers_utterances_and_publishes_events_without_user_text() {
    let broker = Mosquitto::start().await;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let mut w = Watcher::connect(broker.port).await;
    w.subscribe("#").await;
    let agent = Agent::start(&[("mqtt-cloud", &fake)], "", &bridge_toml(broker.port, "")).await;
    let online = w
        .wait_for("status online", |m| m.topic == "kotaemon/status")
        .await;
    assert_eq!(online.text(), "online");

    // To the cloud, as a turn of origin mqtt; the reply carries the id and the turn.
    let question = "What is the weather like in Shenzhen tomorrow?";
    w.publish(
        "kotaemon/command",
        json!({"text": question, "id": "c-1"}).to_string(),
    )
    .await;
    let reply = reply_for(&mut w, "kotaemon/reply", &json!("c-1")).await;
    assert_eq!(reply["text"], DEFAULT_TEXT, "{reply}");
    assert_eq!(reply["answered_by"], "cloud");
    let turn = reply["turn"].as_str().unwrap().to_string();
    let sent = &fake.requests()[0].body;
    assert_eq!(sent["model"], "kotaemon");
    assert_eq!(sent["messages"][0]["content"], question);
    let events = turn_events(&mut w, &turn).await;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"turn_started"), "{k:?}");
    assert_eq!(k.last(), Some(&"turn_finished"), "{k:?}");
    assert!(k.contains(&"upstream_finished"), "{k:?}");
    assert_eq!(events[0]["origin"], "mqtt");
    assert_eq!(events.last().unwrap()["outcome"], "ok");

    // Chinese in, Chinese out (the fake echoes the utterance).
    fake.push(Script {
        echo: true,
        ..Script::default()
    });
    let zh = "深圳明天天气怎么样？";
    w.publish("kotaemon/command", json!({"text": zh, "id": 7}).to_string())
        .await;
    let reply = reply_for(&mut w, "kotaemon/reply", &json!(7)).await;
    assert_eq!(reply["text"], zh);
    let zh_turn = reply["turn"].as_str().unwrap().to_string();
    assert_eq!(
        kinds(&turn_events(&mut w, &zh_turn).await).last(),
        Some(&"turn_finished")
    );

    // Rules answer on the device: plain text (id null) and JSON, both languages.
    let before = fake.chat_request_count();
    w.publish("kotaemon/command", "hello").await;
    let reply = reply_for(&mut w, "kotaemon/reply", &Value::Null).await;
    assert_eq!(reply["text"], GREETING);
    assert_eq!(reply["answered_by"], "rules");
    w.publish(
        "kotaemon/command",
        json!({"text": "你好", "id": "zh-rule"}).to_string(),
    )
    .await;
    let reply = reply_for(&mut w, "kotaemon/reply", &json!("zh-rule")).await;
    assert_eq!(reply["text"], GREETING);
    let rule_events = turn_events(&mut w, reply["turn"].as_str().unwrap()).await;
    assert!(rule_events
        .iter()
        .any(|e| e["kind"] == "rule_matched" && e["intent"] == "greeting"));
    assert_eq!(fake.chat_request_count(), before, "no model was involved");

    // reply_to: under the prefix or the configured filters only.
    w.publish(
        "kotaemon/command",
        json!({"text": "hello", "id": "r-1", "reply_to": "satellites/kitchen/reply"}).to_string(),
    )
    .await;
    let reply = reply_for(&mut w, "satellites/kitchen/reply", &json!("r-1")).await;
    assert_eq!(reply["text"], GREETING);
    w.publish(
        "kotaemon/command",
        json!({"text": "hello", "id": "r-2", "reply_to": "office/light/set"}).to_string(),
    )
    .await;
    let refused = reply_for(&mut w, "kotaemon/reply", &json!("r-2")).await;
    assert_eq!(
        refused["error"]["code"], "reply_to_not_allowed",
        "{refused}"
    );
    assert!(w.on("office/light/set").is_empty());

    // Events carry no user text; the bridge's own turns show as origin mqtt.
    for e in w.on("kotaemon/events") {
        let text = e.text();
        for secret in ["Shenzhen", "weather", "深圳", "你好", "hello"] {
            assert!(!text.contains(secret), "user text in an event: {text}");
        }
    }

    // A clean shutdown says offline (retained).
    let mark = w.mark();
    agent.stop().await;
    let offline = w
        .wait_from(mark, "status offline", |m| m.topic == "kotaemon/status")
        .await;
    assert_eq!(offline.text(), "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_turns_bad_commands_into_error_replies_and_survives_the_broker() {
    let mut broker = Mosquitto::start().await;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let mut w = Watcher::connect(broker.port).await;
    w.subscribe("#").await;
    // A retained command from long ago must not run when the bridge subscribes.
    w.publish_retained("kotaemon/command", json!({"id": "stale"}).to_string())
        .await;
    let agent = Agent::start(
        &[("mqtt-faults", &fake)],
        "",
        &bridge_toml(broker.port, "max_concurrent_turns = 1"),
    )
    .await;
    w.wait_for("status online", |m| {
        m.topic == "kotaemon/status" && m.text() == "online"
    })
    .await;

    let mark = w.mark();
    w.publish("kotaemon/command", b"\xff\xfe\xfd".to_vec())
        .await;
    w.publish("kotaemon/command", "   ").await;
    w.publish("kotaemon/command", r#"{"text": "hi", "id": "b-0""#)
        .await;
    w.publish("kotaemon/command", json!({"id": "b-1"}).to_string())
        .await;
    w.publish(
        "kotaemon/command",
        json!({"id": "b-2", "text": 5}).to_string(),
    )
    .await;
    w.publish(
        "kotaemon/command",
        json!({"id": "b-3", "txt": "hello"}).to_string(),
    )
    .await;
    let replies: Vec<Value> = {
        w.wait_from(mark, "the sixth error reply", |m| {
            m.topic == "kotaemon/reply" && m.text().contains("b-3")
        })
        .await;
        w.log[mark..]
            .iter()
            .filter(|m| m.topic == "kotaemon/reply")
            .map(Msg::json)
            .collect()
    };
    let got: Vec<(Value, &str)> = replies
        .iter()
        .map(|r| (r["id"].clone(), r["error"]["code"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        got,
        vec![
            (Value::Null, "invalid_payload"),
            (Value::Null, "empty_command"),
            (Value::Null, "invalid_json"),
            (json!("b-1"), "invalid_command"),
            (json!("b-2"), "invalid_command"),
            (json!("b-3"), "invalid_command"),
        ],
        "the stale retained command must not have run: {replies:?}"
    );
    assert!(replies.iter().all(|r| r["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty())));
    assert!(
        w.on("kotaemon/reply")
            .iter()
            .all(|m| m.json()["id"] != "stale"),
        "a retained command ran"
    );

    // One turn at a time here: a second utterance while the first runs is refused.
    // (Below the harness's 400 ms time to first byte.)
    fake.push(Script {
        headers_delay_ms: 300,
        ..Script::default()
    });
    w.publish(
        "kotaemon/command",
        json!({"text": "slow question", "id": "s-1"}).to_string(),
    )
    .await;
    w.publish(
        "kotaemon/command",
        json!({"text": "impatient question", "id": "s-2"}).to_string(),
    )
    .await;
    let busy = reply_for(&mut w, "kotaemon/reply", &json!("s-2")).await;
    assert_eq!(busy["error"]["code"], "overloaded", "{busy}");
    let slow = reply_for(&mut w, "kotaemon/reply", &json!("s-1")).await;
    assert_eq!(slow["text"], DEFAULT_TEXT);

    // The upstream fails: an error reply with the API's code, and the turn's events say so.
    fake.push(Script {
        status: 500,
        ..Script::default()
    });
    w.publish(
        "kotaemon/command",
        json!({"text": "question for a broken cloud", "id": "e-1"}).to_string(),
    )
    .await;
    let failed = reply_for(&mut w, "kotaemon/reply", &json!("e-1")).await;
    let code = failed["error"]["code"].as_str().unwrap().to_string();
    assert!(!code.is_empty(), "{failed}");
    let turn = failed["turn"].as_str().unwrap().to_string();
    let events = turn_events(&mut w, &turn).await;
    assert_eq!(events.last().unwrap()["outcome"], code.as_str());

    // The broker restarts: the bridge reconnects, announces itself and answers again.
    broker.restart().await;
    let mark = w.mark();
    w.wait_from(mark, "status online after the restart", |m| {
        m.topic == "kotaemon/status" && m.text() == "online"
    })
    .await;
    w.publish(
        "kotaemon/command",
        json!({"text": "hello", "id": "after"}).to_string(),
    )
    .await;
    let reply = reply_for(&mut w, "kotaemon/reply", &json!("after")).await;
    assert_eq!(reply["text"], GREETING);
    agent.stop().await;
}
