//! The writer thread: owns this series' current file, the sequence number and the chain hash.

use super::{AuditRecord, Job};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::mpsc;

pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Writers started by this process (several apps in one test process each get a series).
static WRITERS: AtomicU32 = AtomicU32::new(0);

pub(super) struct Writer {
    dir: PathBuf,
    series: String,
    file_no: u32,
    /// Opened at the first record: an agent that sends nothing leaves no empty file.
    file: Option<File>,
    size: u64,
    seq: u64,
    prev: String,
    max_file_bytes: u64,
    keep_files: usize,
}

pub(super) fn file_name(series: &str, file_no: u32) -> String {
    format!("audit-{series}-{file_no:06}.jsonl")
}

/// `audit-<series>-<n>.jsonl` → (series, n).
pub(super) fn parse_file_name(name: &str) -> Option<(&str, u32)> {
    let stem = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let (series, n) = stem.rsplit_once('-')?;
    Some((series, n.parse().ok()?))
}

fn open_new(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create_new(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Masked, but still what the users asked: readable by the agent's user only.
        options.mode(0o600);
    }
    options.open(path)
}

impl Writer {
    pub(super) fn create(
        dir: &Path,
        max_file_bytes: u64,
        keep_files: usize,
    ) -> std::io::Result<Writer> {
        std::fs::create_dir_all(dir)?;
        // Fail at start-up, not at the first upload, when the directory is not writable.
        let probe = dir.join(format!(".write-test-{}", std::process::id()));
        File::create(&probe)?;
        let _ = std::fs::remove_file(&probe);
        let series = format!(
            "{}-{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            std::process::id(),
            WRITERS.fetch_add(1, Ordering::Relaxed)
        );
        let writer = Writer {
            dir: dir.to_path_buf(),
            series,
            file_no: 1,
            file: None,
            size: 0,
            seq: 0,
            prev: GENESIS.to_string(),
            max_file_bytes,
            keep_files,
        };
        Ok(writer)
    }

    pub(super) fn series(&self) -> &str {
        &self.series
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some((entry, done)) = rx.blocking_recv() {
            let record = AuditRecord {
                seq: self.seq + 1,
                ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                series: self.series.clone(),
                prev: self.prev.clone(),
                entry,
            };
            match self.append(&record) {
                Ok(()) => crate::events::metrics::audit_record(record.entry.kind()),
                Err(e) => {
                    crate::events::metrics::audit_write_failed();
                    tracing::error!(dir = %self.dir.display(), "audit log write failed: {e}");
                }
            }
            let _ = done.send(());
        }
        if let Some(f) = &self.file {
            let _ = f.sync_all();
        }
    }

    fn append(&mut self, record: &AuditRecord) -> std::io::Result<()> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.max_file_bytes {
            self.rotate()?;
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = open_new(&self.dir.join(file_name(&self.series, self.file_no)))?;
                self.prune();
                self.file.insert(f)
            }
        };
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        // One write per record on an O_APPEND file: a crash leaves whole lines only (or a
        // torn last line, which `verify` reports).
        file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        self.seq = record.seq;
        self.prev = hex::encode(Sha256::digest(line.as_bytes()));
        Ok(())
    }

    /// Closes the current file; the next record opens file n+1.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        self.file_no += 1;
        self.size = 0;
        Ok(())
    }

    /// Deletes the oldest audit files beyond `keep_files` (never this writer's current one).
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let current = file_name(&self.series, self.file_no);
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| parse_file_name(n).is_some())
            .collect();
        if names.len() <= self.keep_files {
            return;
        }
        names.sort();
        let excess = names.len() - self.keep_files;
        for name in names.iter().filter(|n| **n != current).take(excess) {
            if let Err(e) = std::fs::remove_file(self.dir.join(name)) {
                tracing::warn!("could not delete old audit file {name}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let name = file_name("20261125T180000Z-42-0", 7);
        assert_eq!(name, "audit-20261125T180000Z-42-0-000007.jsonl");
        assert_eq!(parse_file_name(&name), Some(("20261125T180000Z-42-0", 7)));
        assert_eq!(parse_file_name("audit.jsonl"), None);
        assert_eq!(parse_file_name("audit-x-y.jsonl"), None);
    }
}
