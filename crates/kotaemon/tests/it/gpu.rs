//! The cloud-GPU lifecycle with real processes: the hooks start and kill a real
//! `kotaemon fake-upstream` process, the agent answers from the local model while it boots,
//! then from the "GPU", and stops it again when idle. No wall-clock durations are asserted;
//! every wait has a generous hang guard.

use super::{bin, run, text, Server};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TOML basic string (the paths and scripts here are ASCII).
fn q(s: &str) -> String {
    format!("{s:?}")
}

/// `[[upstreams]]` + `[[gpu]]` whose start hook boots a real fake upstream on `port` in the
/// background (after a second, as an instance would) and writes its pid; the stop hook kills it.
fn gpu_toml(dir: &Path, port: u16, extra_gpu: &str) -> String {
    let pidfile = dir.join("gpu.pid");
    let start = format!(
        "(sleep 1; exec {} fake-upstream --listen 127.0.0.1:{port} --default-script '{{\"text\":\"from the cloud gpu\"}}') >/dev/null 2>&1 & echo $! > {}",
        env!("CARGO_BIN_EXE_kotaemon"),
        pidfile.display()
    );
    let stop = format!("kill $(cat {})", pidfile.display());
    format!(
        "[[upstreams]]\nname = \"gpu\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nttfb_ms = 5000\n\
         [[gpu]]\nupstream = \"gpu\"\n\
         start = {{ command = [\"sh\", \"-c\", {}], timeout_secs = 30 }}\n\
         stop = {{ command = [\"sh\", \"-c\", {}], timeout_secs = 30 }}\n{extra_gpu}",
        q(&start),
        q(&stop)
    )
}

/// Kills the fake GPU if a test fails half-way (so no process outlives the test).
struct GpuProcess(PathBuf);

impl GpuProcess {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for GpuProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid().filter(|p| alive(*p)) {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Running, not a zombie (the fake's parent shell is gone; nobody may reap it at once).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

async fn eventually(what: &str, guard: Duration, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + guard;
    while !cond() {
        assert!(tokio::time::Instant::now() < until, "hang guard: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sample of `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels_text, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| labels_text.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_cli_starts_probes_and_stops_a_real_instance() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("kotaemon.toml");
    std::fs::write(
        &cfg,
        gpu_toml(dir.path(), port, "poll_ms = 100\nready_timeout_secs = 60\n"),
    )
    .unwrap();
    let gpu = GpuProcess(dir.path().join("gpu.pid"));
    let gpu_cmd = |args: &[&str]| {
        let cfg = cfg.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            run(bin().arg("gpu").args(&args).arg("--config").arg(&cfg))
        })
    };

    let out = gpu_cmd(&["status"]).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("gpu: not answering (upstream_connect"),
        "{}",
        text(&out.stdout)
    );
    // `doctor` does not count a stopped [[gpu]] instance as a fault.
    let c = cfg.clone();
    let out = tokio::task::spawn_blocking(move || run(bin().args(["doctor", "--config"]).arg(&c)))
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("  off   gpu: not answering [upstream_connect]"),
        "{}",
        text(&out.stdout)
    );
    assert!(out.status.success(), "{}", text(&out.stdout));

    let out = gpu_cmd(&["start"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("gpu: ready after"),
        "{}",
        text(&out.stdout)
    );
    let pid = gpu.pid().expect("the start hook wrote the pid");
    assert!(alive(pid));

    let out = gpu_cmd(&["status", "--upstream", "gpu"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("gpu: ready"),
        "{}",
        text(&out.stdout)
    );

    let out = gpu_cmd(&["stop"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    eventually(
        "the stop hook ends the instance",
        Duration::from_secs(20),
        || !alive(pid),
    )
    .await;

    let out = gpu_cmd(&["start", "--upstream", "a100"]).await.unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no [[gpu]] entry for upstream `a100` (there are: gpu)"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_locally_while_the_gpu_starts_then_from_it_and_stops_it_when_idle() {
    let Ok(gguf) = std::env::var("KOTAEMON_TEST_GGUF") else {
        eprintln!("skipped: KOTAEMON_TEST_GGUF is not set (./scripts/test sets it to the installed gemma3-270m)");
        return;
    };
    assert!(
        Path::new(&gguf).is_file(),
        "KOTAEMON_TEST_GGUF points at a missing file: {gguf}"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("kotaemon.toml");
    // Everything goes to the cloud when it can (router), nothing is answered from the cache.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [stages.cache]\nenabled = false\n[stages.router]\nlocal_below_complexity = 0.0\n\
         [local]\nenabled = true\nrequired = true\nmodel = {}\nthreads = 1\nn_ctx = 512\nmax_tokens = 8\n{}",
        q(&gguf),
        gpu_toml(dir.path(), port, "idle_secs = 2\npoll_ms = 200\nready_timeout_secs = 60\n")
    );
    std::fs::write(&cfg, toml).unwrap();
    let gpu = GpuProcess(dir.path().join("gpu.pid"));

    let agent_port = free_port();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let agent = Server(
        bin()
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("KOTAEMON_SERVER__LISTEN", format!("127.0.0.1:{agent_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{agent_port}");
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let up = client.get(format!("{url}/healthz")).send().await;
        if up.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: the agent never listened\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ask = |question: &str| {
        let body = serde_json::json!({"model": "fake-model", "temperature": 0,
            "messages": [{"role": "user", "content": question}]});
        client
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
    };
    let metrics = || async {
        client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    // 1. The GPU is off: the local model answers, and the header says why.
    let r = ask("Explain why the sky is blue").await.unwrap();
    assert_eq!(r.status(), 200, "{}", logs());
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(header(&r, "x-kotaemon-answered-by"), "local");
    assert_eq!(
        header(&r, "x-kotaemon-degraded"),
        "true; reason=cloud_starting"
    );

    // 2. That turn started the instance; once it answers its probe, turns reach it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics().await;
        if metric(&m, "kotaemon_gpu_state", &[("upstream", "gpu")]) == Some(2.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: the GPU never became ready\n{m}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = gpu.pid().expect("the start hook wrote the pid");
    assert!(alive(pid));
    let r = ask("Explain why the sea is blue").await.unwrap();
    assert_eq!(header(&r, "x-kotaemon-answered-by"), "cloud");
    assert_eq!(header(&r, "x-kotaemon-degraded"), "");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "from the cloud gpu"
    );

    // 3. No calls for idle_secs: the stop hook runs and the process is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics().await;
        if metric(&m, "kotaemon_gpu_state", &[("upstream", "gpu")]) == Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: the GPU was never stopped\n{m}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(
        "the fake GPU process exits",
        Duration::from_secs(20),
        || !alive(pid),
    )
    .await;

    // 4. Every transition is counted; running time covers at least the idle wait.
    let m = metrics().await;
    for to in ["starting", "ready", "stopping", "stopped"] {
        assert!(
            metric(
                &m,
                "kotaemon_gpu_transitions_total",
                &[("upstream", "gpu"), ("to", to)]
            ) >= Some(1.0),
            "no transition to {to}:\n{m}"
        );
    }
    assert!(
        metric(
            &m,
            "kotaemon_gpu_running_seconds_total",
            &[("upstream", "gpu")]
        ) >= Some(2.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "kotaemon_degraded_turns_total",
            &[("reason", "cloud_starting")]
        ) >= Some(1.0),
        "{m}"
    );
    let logs = logs();
    assert!(logs.contains("GPU state changed"), "{logs}");
    drop(agent);
}
