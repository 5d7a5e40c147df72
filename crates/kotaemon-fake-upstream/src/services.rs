//! Real services started for tests and benchmarks: a Radicale CalDAV server of our own on a
//! free loopback port, with a temporary store, killed on drop. (The Debian package provides
//! the binary; the system service is not used.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nobody listens on (right now).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Radicale with one user (plain htpasswd, owner-only rights).
pub struct Radicale {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub user: String,
    pub password: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Radicale {
    /// Starts Radicale with user `alice` and waits until it accepts connections.
    pub async fn start() -> Result<Radicale, String> {
        let io = |what: &str, e: std::io::Error| format!("radicale: {what}: {e}");
        let dir = tempfile::tempdir().map_err(|e| io("temp dir", e))?;
        let (user, password) = ("alice".to_string(), "s3cret-radicale-pw".to_string());
        std::fs::write(dir.path().join("users"), format!("{user}:{password}\n"))
            .map_err(|e| io("users file", e))?;
        std::fs::write(dir.path().join("password"), format!("{password}\n"))
            .map_err(|e| io("password file", e))?;
        let port = free_port().map_err(|e| io("free port", e))?;
        let config = format!(
            "[server]\nhosts = 127.0.0.1:{port}\n\
             [auth]\ntype = htpasswd\nhtpasswd_filename = {users}\nhtpasswd_encryption = plain\ndelay = 0\n\
             [rights]\ntype = owner_only\n\
             [storage]\nfilesystem_folder = {storage}\n\
             [web]\ntype = none\n\
             [logging]\nlevel = warning\n",
            users = dir.path().join("users").display(),
            storage = dir.path().join("collections").display(),
        );
        let config_path = dir.path().join("config");
        std::fs::write(&config_path, config).map_err(|e| io("config", e))?;
        let log = std::fs::File::create(dir.path().join("radicale.log"))
            .map_err(|e| io("log file", e))?;
        let log2 = log.try_clone().map_err(|e| io("log file", e))?;
        let child = Command::new("radicale")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RADICALE_CONFIG")
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start `radicale` ({e}): install the Debian package `radicale`")
            })?;
        let mut r = Radicale {
            url: format!("http://127.0.0.1:{port}"),
            user,
            password,
            child,
            dir,
        };
        r.wait_ready(port).await?;
        Ok(r)
    }

    async fn wait_ready(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("radicale exited ({status}):\n{}", self.log()));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "radicale did not answer within 20s:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What Radicale logged (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("radicale.log")).unwrap_or_default()
    }

    /// The URL of the user's calendar collection `name` (it may not exist yet).
    pub fn calendar_url_named(&self, name: &str) -> String {
        format!("{}/{}/{name}/", self.url, self.user)
    }

    /// The user's default calendar collection (`calendar`).
    pub fn calendar_url(&self) -> String {
        self.calendar_url_named("calendar")
    }

    /// A file holding the password (for `file:` secret references).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
