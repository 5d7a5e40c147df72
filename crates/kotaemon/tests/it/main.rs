//! The `kotaemon` binary as a user runs it: init, serve, ask, doctor, bad configs, signals,
//! and secrets that never reach the logs.

use kotaemon_fake_upstream::{FakeUpstream, Script};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod gpu;
mod queue_crash;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kotaemon"));
    // Tests must not pick up a developer's environment, nor write into their data directory
    // (audit log, cache): one temporary data directory per test process.
    for (k, _) in std::env::vars() {
        if k.starts_with("KOTAEMON_") {
            c.env_remove(k);
        }
    }
    c.env("KOTAEMON_DATA_DIR", test_data_dir());
    c
}

fn test_data_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("cannot run kotaemon")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn config_for(dir: &Path, upstream: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("kotaemon.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n{extra}\n[[upstreams]]\nname = \"cloud\"\nbase_url = \"{upstream}\"\nttfb_ms = 2000\n"),
    )
    .unwrap();
    path
}

#[test]
fn init_writes_a_config_that_loads_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    let out = run(bin().arg("init").arg(&path));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains("[[upstreams]]") && written.contains("# "),
        "commented config"
    );
    kotaemon_core::Config::from_toml_str(&written).expect("what init writes parses");
    let again = run(bin().arg("init").arg(&path));
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert!(run(bin().arg("init").arg(&path).arg("--force"))
        .status
        .success());
}

#[test]
fn bad_config_lists_every_problem_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nmax_body_bytes = 1\n[pool]\nmax_attempts = 0\n[[upstreams]]\nname = \"a b\"\nbase_url = \"nope\"\napi_key = \"sk-literal\"\n",
    )
    .unwrap();
    let out = run(bin().args(["serve", "--config"]).arg(&path));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // A literal secret is a type error caught first, with its path.
    assert!(
        err.contains("upstreams[0].api_key") && err.contains("env:"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(&path, "[server]\nmax_body_bytes = 1\n[pool]\nmax_attempts = 0\n[[upstreams]]\nname = \"a b\"\nbase_url = \"nope\"\n").unwrap();
    let out = run(bin().args(["serve", "--config"]).arg(&path));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for key in [
        "server.max_body_bytes",
        "pool.max_attempts",
        "upstreams[0].name",
        "upstreams[0].base_url",
    ] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    let out = run(bin().args(["serve", "--config"]).arg(&path));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid configuration"),
        "{}",
        text(&out.stderr)
    );
    let out = run(bin().args(["serve", "--config", "/nonexistent/kotaemon.toml"]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot read file"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_streams_the_answer_to_the_terminal() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_default(Script {
        echo: true,
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(dir.path(), &fake.base_url(), "");
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["ask", "--config"])
            .arg(&cfg)
            .arg("帮我安排明天上午10点的会议"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "帮我安排明天上午10点的会议");
    assert_eq!(fake.requests()[0].body["stream"], true);

    // An upstream that fails: a clear message, non-zero exit.
    fake.set_default(Script {
        status: 500,
        ..Script::default()
    });
    let cfg = config_for(dir.path(), &fake.base_url(), "[pool]\nmax_attempts = 1\n");
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["ask", "--no-stream", "--config"])
            .arg(&cfg)
            .arg("hi"))
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("upstream_server_error"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_each_upstream() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    fake.set_models(vec!["qwen2.5-7b".into()]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(dir.path(), &fake.base_url(), "");
    let c = cfg.clone();
    let out = tokio::task::spawn_blocking(move || run(bin().args(["doctor", "--config"]).arg(&c)))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ok    cloud: reachable") && stdout.contains("qwen2.5-7b"),
        "{stdout}"
    );

    let unreachable = config_for(dir.path(), "http://127.0.0.1:9/v1", "");
    let out = tokio::task::spawn_blocking(move || {
        run(bin().args(["doctor", "--config"]).arg(&unreachable))
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("FAIL  cloud"),
        "{}",
        text(&out.stdout)
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve` on a free port with env overrides; returns the process and its base URL.
fn serve(cfg: &Path, envs: &[(&str, &str)]) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = bin();
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .env("KOTAEMON_SERVER__LISTEN", format!("127.0.0.1:{port}"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Server(child), format!("http://127.0.0.1:{port}"))
}

async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..250 {
        if client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("agent at {url} never answered /healthz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_env_overrides_keeps_secrets_out_of_logs_and_stops_on_sigterm() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(
        dir.path(),
        "http://127.0.0.1:9/v1",
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n",
    );
    let canary = "sk-log-canary-4242";
    let (mut server, url) = serve(
        &cfg,
        &[
            // The config points at a dead port; the override points at the fake.
            ("KOTAEMON_UPSTREAMS__0__BASE_URL", &fake.base_url()),
            ("KOTAEMON_UPSTREAMS__0__API_KEY", "env:KOTAEMON_LOG_CANARY"),
            ("KOTAEMON_LOG_CANARY", canary),
        ],
    );
    wait_ready(&url).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    fake.set_default(Script {
        status: 401,
        ..Script::default()
    });
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(!r.text().await.unwrap().contains(canary));
    assert!(fake.requests()[0]
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v.ends_with(canary)));

    let pid = server.0.id() as i32;
    // SAFETY-free: `kill` via the command line, the way an init system would.
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || {
        let status = server.0.wait().unwrap();
        let mut logs = String::new();
        server
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
        (status, logs)
    })
    .await
    .unwrap();
    let (status, logs) = status;
    assert!(
        status.success(),
        "graceful exit on SIGTERM: {status:?}\n{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("kotaemon is listening")),
        "{logs}"
    );
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        !logs.contains(canary),
        "the upstream key leaked into the logs"
    );
    assert!(!logs.contains("\"hi\""), "user text leaked into the logs");
}

#[test]
fn serve_warns_loudly_when_open_to_the_network_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(dir.path(), "http://127.0.0.1:9/v1", "");
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains("WITHOUT client API keys") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("WITHOUT client API keys"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_upstream_subcommand_prints_its_address_and_follows_its_script() {
    let mut child = bin()
        .args([
            "fake-upstream",
            "--default-script",
            r#"{"text":"from the binary"}"#,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_string();
    let server = Server(child);
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "from the binary");
    drop(server);
    let bad = run(bin().args(["fake-upstream", "--default-script", "{nope"]));
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("invalid --default-script"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_install_own_files_from_a_path_and_a_url_with_checksums() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let file = dir.path().join("my-model.gguf");
    std::fs::write(&file, b"GGUF pretend weights").unwrap();
    let sum = kotaemon_core::models::sha256_file(&file).unwrap().0;
    let m = models.clone();
    let f = file.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["models", "--dir"])
            .arg(&m)
            .args(["install", "mine", "--sha256", &"0".repeat(64), "--from"])
            .arg(&f))
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("checksum mismatch"),
        "{}",
        text(&out.stderr)
    );

    // Serve the file once over HTTP, as a user's download URL would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/my-model.gguf", listener.local_addr().unwrap());
    let body = std::fs::read(&file).unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&body).await.unwrap();
    });
    let m = models.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["models", "--dir"])
            .arg(&m)
            .args(["install", "mine", "--sha256", &sum, "--from", &url]))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(models.join("mine/my-model.gguf")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let m = models.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["models", "--dir"])
            .arg(&m)
            .args(["verify", "mine"]))
    })
    .await
    .unwrap();
    assert!(out.status.success());
    std::fs::write(models.join("mine/my-model.gguf"), b"corrupted").unwrap();
    let out = run(bin()
        .args(["models", "--dir"])
        .arg(&models)
        .args(["verify", "mine"]));
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains("checksum mismatch"));
    let out = run(bin()
        .args(["models", "--dir"])
        .arg(&models)
        .args(["install", "no-such-catalogue-model"]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not in the catalogue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_asks_before_a_dangerous_tool_runs_and_ask_refuses_to_guess() {
    use kotaemon_fake_upstream::ScriptToolCall;
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let lookup = || Script {
        tool_calls: vec![ScriptToolCall {
            name: "contacts_lookup".into(),
            arguments: r#"{"name": "张经理"}"#.into(),
        }],
        ..Script::default()
    };
    fake.push(lookup());
    fake.push(Script {
        text: Some("Found Zhang Wei.".into()),
        ..Script::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let extra = "[stages.act]\nconfirm = [\"contacts_*\"]\n[tools.contacts]\nenabled = true\n[[tools.contacts.entries]]\nname = \"张伟\"\nemail = \"zhang.wei@example.com\"\ntitle = \"产品经理\"\n";
    let cfg = config_for(dir.path(), &fake.base_url(), extra);
    let chat_cfg = cfg.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = bin()
            .args(["chat", "--config"])
            .arg(&chat_cfg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all("who is 张经理?\ny\n/exit\n".as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("confirmation"), "{stdout}");
    assert!(stdout.contains("Found Zhang Wei."), "{stdout}");
    let second = &fake.requests()[1].body;
    assert!(
        second.to_string().contains("<EMAIL_1>") && !second.to_string().contains("zhang.wei@"),
        "the confirmed lookup ran, its result masked for the cloud: {second}"
    );

    // A one-shot `ask` cannot wait for a decision: exit code 3, nothing done.
    fake.push(lookup());
    let before = fake.chat_request_count();
    let out = tokio::task::spawn_blocking(move || {
        run(bin()
            .args(["ask", "--config"])
            .arg(&cfg)
            .arg("who is 张经理?"))
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("NOT done"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(fake.chat_request_count(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_an_edited_line_and_doctor_never_prints_secrets() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let key_file = dir.path().join("client.key");
    std::fs::write(&key_file, "client-key-SECRET-31337\n").unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let cfg = config_for(
        dir.path(),
        &fake.base_url(),
        &format!(
            "[audit]\ndir = {audit:?}\n[usage]\npath = {:?}\n[usage.prices]\n\"*\" = {{ input = 1.0, output = 2.0 }}\n[[server.clients]]\nname = \"panel\"\nkey = \"file:{}\"\nscopes = [\"chat\"]\nrequests_per_minute = 30\n",
            dir.path().join("usage.db"),
            key_file.display()
        ),
    );
    for question in ["first question", "second question"] {
        let c = cfg.clone();
        let out = tokio::task::spawn_blocking(move || {
            run(bin()
                .args(["ask", "--no-stream", "--config"])
                .arg(&c)
                .arg(question))
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let c = cfg.clone();
    let doctor =
        tokio::task::spawn_blocking(move || run(bin().args(["doctor", "--config"]).arg(&c)))
            .await
            .unwrap();
    let said = format!("{}{}", text(&doctor.stdout), text(&doctor.stderr));
    assert!(said.contains("client keys: panel [chat] 30/min"), "{said}");
    assert!(said.contains("audit log:"), "{said}");
    assert!(!said.contains("SECRET-31337"), "{said}");

    // Both turns are in the usage ledger, priced.
    let usage = run(bin().args(["usage", "--json", "--config"]).arg(&cfg));
    assert!(usage.status.success(), "{}", text(&usage.stderr));
    let reports: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap();
    let today = &reports[0];
    assert_eq!(today["turns"], 2, "{today}");
    assert_eq!(today["cloud_calls"], 2);
    assert!(today["cost_usd"].as_f64().unwrap() > 0.0);
    let bad = run(bin()
        .args(["usage", "--period", "yesterday", "--config"])
        .arg(&cfg));
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--period"),
        "{}",
        text(&bad.stderr)
    );

    let c = cfg.clone();
    let ok = run(bin().args(["audit", "verify", "--config"]).arg(&c));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let report = text(&ok.stdout);
    assert_eq!(
        report
            .matches("1 records in 1 file(s), chain intact from its start")
            .count(),
        2,
        "{report}"
    );

    // Two `ask` runs wrote two series; make one of them lie about what was sent.
    let file = std::fs::read_dir(&audit)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let line = std::fs::read_to_string(&file).unwrap();
    assert!(line.contains("question"));
    std::fs::write(&file, line.replace("question", "answer")).unwrap();
    // A single-record series has no later line to break, so append a forged continuation.
    let mut record: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    record["seq"] = 2.into();
    std::fs::write(
        &file,
        format!("{}{}\n", line.replace("question", "answer"), record),
    )
    .unwrap();
    let bad = run(bin().args(["audit", "verify", "--dir"]).arg(&audit));
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("hash chain broken"),
        "{}",
        text(&bad.stderr)
    );
}
