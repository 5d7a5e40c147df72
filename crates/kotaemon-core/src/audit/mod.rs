//! The audit log: an append-only local record of what left the device (every request sent to a
//! cloud upstream, as sent: with pseudonyms, never the real values), which tools ran with which
//! arguments (as the model wrote them: masked), and which requests were refused for a missing or
//! wrong key. For compliance review on the device; it is never uploaded.
//!
//! Format: JSON Lines, one record per line, each carrying the SHA-256 of the line before it
//! (`prev`), so an edited or removed line breaks the chain and `kotaemon audit verify` says where.
//! Each writer (one per running agent) writes its own *series* of files
//! (`audit-<series>-<n>.jsonl`): a CLI `ask` next to a running `serve` never interleaves lines
//! into the other's chain, and needs no lock. Files rotate at `max_file_bytes`; the oldest are
//! deleted beyond `keep_files`.
//!
//! Records are written *before* the upload they describe (write-ahead): `record` returns once the
//! line is in the file, so nothing is sent that the log does not show.

mod verify;
mod writer;

pub use verify::{verify_dir, SeriesReport, VerifyError};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub enabled: bool,
    /// Where the files go (default: `<data dir>/audit`, see `KOTAEMON_DATA_DIR`).
    pub dir: Option<PathBuf>,
    /// A file is closed and a new one started beyond this size.
    pub max_file_bytes: u64,
    /// The oldest files (of any series) are deleted beyond this many.
    pub keep_files: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            dir: None,
            max_file_bytes: 8 * 1024 * 1024,
            keep_files: 16,
        }
    }
}

impl AuditConfig {
    pub fn validate(&self, path: &str, p: &mut Vec<String>) {
        if self.max_file_bytes < 4096 {
            p.push(format!("{path}.max_file_bytes: must be at least 4096"));
        }
        if self.keep_files == 0 {
            p.push(format!("{path}.keep_files: must be at least 1"));
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| crate::models::default_data_dir().join("audit"))
    }
}

/// One audited fact. Serialized with `kind` as the tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEntry {
    /// A request about to be sent to a cloud upstream (each attempt, failovers included).
    UpstreamRequest {
        turn: String,
        upstream: String,
        /// The model name the upstream receives.
        model: String,
        attempt: u32,
        /// The chat request as the guard left it (pseudonyms in place of personal data).
        request: Value,
    },
    /// A tool the device ran; `arguments` as the model (or a rule) wrote them, masked.
    ToolCall {
        turn: String,
        tool: String,
        arguments: Value,
        outcome: String,
        elapsed_ms: u64,
    },
    /// A request refused for its credentials. The presented key is never recorded.
    AuthRefused {
        reason: String,
        route: String,
        peer: Option<String>,
    },
}

impl AuditEntry {
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEntry::UpstreamRequest { .. } => "upstream_request",
            AuditEntry::ToolCall { .. } => "tool_call",
            AuditEntry::AuthRefused { .. } => "auth_refused",
        }
    }
}

/// A line of the log: the entry plus its place in the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts: String,
    pub series: String,
    /// SHA-256 (hex) of the previous line of this series; zeros for the first.
    pub prev: String,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log directory `{}`: {source}", .dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

type Job = (AuditEntry, oneshot::Sender<()>);

/// Cheap to clone. A disabled log records nothing.
#[derive(Clone, Default)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Job>>,
    dir: Option<PathBuf>,
    series: Option<String>,
}

impl AuditLog {
    pub fn disabled() -> Self {
        AuditLog::default()
    }

    /// Opens the directory and starts this process's writer (a thread: file writes block).
    pub fn open(config: &AuditConfig) -> Result<AuditLog, AuditError> {
        if !config.enabled {
            return Ok(AuditLog::disabled());
        }
        let dir = config.dir();
        let writer = writer::Writer::create(&dir, config.max_file_bytes, config.keep_files)
            .map_err(|source| AuditError::Dir {
                dir: dir.clone(),
                source,
            })?;
        let series = writer.series().to_string();
        let (tx, rx) = mpsc::channel::<Job>(1024);
        std::thread::Builder::new()
            .name("kotaemon-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditError::Dir {
                dir: dir.clone(),
                source,
            })?;
        Ok(AuditLog {
            tx: Some(tx),
            dir: Some(dir),
            series: Some(series),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn dir(&self) -> Option<&PathBuf> {
        self.dir.as_ref()
    }

    /// This writer's series name (its files are `audit-<series>-<n>.jsonl`).
    pub fn series(&self) -> Option<&str> {
        self.series.as_deref()
    }

    /// Appends `entry` and returns once it is written (or the write failed, which the writer
    /// logs and counts: an unwritable disk does not stop the agent).
    pub async fn record(&self, entry: AuditEntry) {
        let Some(tx) = &self.tx else {
            return;
        };
        let (done, written) = oneshot::channel();
        if tx.send((entry, done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// The most recent records of this writer's series, newest last, optionally only one
    /// turn's (for `GET /v1/kotaemon/audit`).
    pub fn recent(&self, turn: Option<&str>, limit: usize) -> std::io::Result<Vec<Value>> {
        let (Some(dir), Some(series)) = (&self.dir, &self.series) else {
            return Ok(Vec::new());
        };
        verify::recent(dir, series, turn, limit)
    }
}
